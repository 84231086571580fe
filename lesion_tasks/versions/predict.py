"""The one prediction path of a model version on pooled backbone features: seeded MC-dropout masks ->
calibrated p_mel samples -> (p_mel, entropy, mutual information) -> the decision at the version's threshold
-> p_other from its out-of-scope head -> the review reasons. Evaluation, the gate's comparison with the
champion and nightly scoring all call `predict`; only how the features are computed differs (cached
features there, one pipelined backbone pass with Grad-CAM activations here).
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lesion_tasks.model import attention, mc, scope
from lesion_tasks.versions.registry import ModelVersion, ReviewRule


@dataclass(frozen=True)
class Predictions:
    image_ids: list[str]
    logits: np.ndarray  # (N, T) uncalibrated MC logit differences MEL - NV
    samples: np.ndarray  # (N, T) calibrated p(MEL) per dropout sample
    p_mel: np.ndarray
    entropy: np.ndarray
    mutual_info: np.ndarray
    is_mel: np.ndarray  # p_mel >= the threshold applied to the case, as 0/1
    p_other: np.ndarray | None  # None: the version has no out-of-scope head
    thresholds: np.ndarray  # per case: its site's threshold, else the version's pooled one
    review_rule: ReviewRule
    # per case: the out-of-scope threshold that goes with its site's operating point (None: the rule's own)
    scope_thresholds: Sequence[float | None] | None = None

    @property
    def decision_uncertainty(self) -> np.ndarray:
        """Per case, the share of its MC samples of p(MEL) on the other side of its threshold from the
        decision (0: all agree; 0.5: a coin flip): how uncertain the *decision* is, not p(MEL) alone."""
        return decision_uncertainty(self.samples, self.thresholds, self.is_mel)

    def reasons(self, k: int) -> list[str]:
        """Why case k goes to review (empty: it does not)."""
        other = None if self.p_other is None else float(self.p_other[k])
        scope_above = None if self.scope_thresholds is None else self.scope_thresholds[k]
        return review_reasons(float(self.p_mel[k]), float(self.entropy[k]), float(self.thresholds[k]), self.review_rule,
                              other, float(self.decision_uncertainty[k]), scope_above)


def decision_uncertainty(samples: np.ndarray, thresholds: np.ndarray, is_mel: np.ndarray) -> np.ndarray:
    """Per case, the share of its MC samples of p(MEL) on the other side of its threshold from the decision."""
    t = np.asarray(thresholds, dtype=np.float64)[:, None]
    return np.where(is_mel == 1, (samples < t).mean(axis=1), (samples >= t).mean(axis=1))


def review_reasons(p: float, entropy: float, threshold: float, rule: ReviewRule, p_other: float | None = None,
                   decision_uncertainty: float | None = None, scope_above: float | None = None) -> list[str]:
    """The review flags of one case under its version's `rule`. `uncertain` is about the *decision*: more
    than `decision_uncertainty_above` of the case's MC samples fall on the other side of its threshold (a
    case at p(MEL) 0.5 with a threshold of 0.1 is a confident melanoma call, not an uncertain one).
    Versions trained before that rule carry `entropy_above` instead and keep flagging by entropy.
    `near_threshold` is relative to the case's threshold (`ReviewRule.near_threshold`); `scope_above` is the
    out-of-scope threshold of the case's site operating point (None: the rule's own)."""
    reasons = []
    scope_above = rule.out_of_scope_above if scope_above is None else scope_above
    if p_other is not None and scope_above is not None and p_other >= scope_above:
        reasons.append("out_of_scope")
    if p >= threshold and rule.predicted_mel:
        reasons.append("predicted_mel")
    if rule.decision_uncertainty_above is not None:
        if decision_uncertainty is None:
            raise ValueError("this version's review rule flags by decision uncertainty: pass the case's decision_uncertainty")
        uncertain = decision_uncertainty > rule.decision_uncertainty_above
    else:
        uncertain = entropy > rule.entropy_above
    if uncertain:
        reasons.append("uncertain")
    if rule.near_threshold(p, threshold):
        reasons.append("near_threshold")
    return reasons


def scored_reasons(rule: ReviewRule, is_mel: bool, on_lesion: float | None, site_failing: bool) -> list[str]:
    """The review flags scoring adds to `review_reasons`: `attention_off_lesion` for a MEL call whose Grad-CAM mass
    lies mostly off the lesion (MEL calls only: the NV map of a two-class head is where the melanoma evidence is
    absent, the skin around the lesion in almost every case, docs/model.md#grad-cam-attention, so it would flag
    every NV call), and `site_failing` where the version is below a floor at the case's site."""
    below = attention.OFF_LESION_BELOW if rule.attention_on_lesion_below is None else rule.attention_on_lesion_below
    off = bool(is_mel) and on_lesion is not None and on_lesion < below
    return (["attention_off_lesion"] if off else []) + (["site_failing"] if site_failing else [])


def predict(version: ModelVersion, head: mc.HeadWeights, pooled: np.ndarray, image_ids: Sequence[str],
            scope_head: scope.ScopeHead | None = None, mc_samples: int | None = None,
            sites: Sequence[str | None] | None = None,
            points: Mapping[str, tuple[float, float | None]] | None = None) -> Predictions:
    """Version `version`'s predictions for the pooled features of `image_ids` (T = its recorded MC samples
    unless `mc_samples`); masks seeded per (the version's seed, image), so every caller draws the same.
    Each case is decided at its site's threshold (`ModelVersion.threshold_for`; `sites` None: pooled), on
    p_mel calibrated for its site where retraining gave the site a calibration of its own. With `points`
    (scoring: {site: (threshold, out-of-scope threshold)} of the sites' recorded operating points,
    `sites.operating.applied`), a case of such a site is decided at its site's operating point instead."""
    ids = list(image_ids)
    logits = mc.logits_for(head, pooled, ids, version.model_version, mc_samples or version.mc_samples, version.mc_seed)
    sites = list(sites) if sites is not None else [None] * len(ids)
    own = version.site_calibrations_for(sites)
    if own is None:
        samples = head.calibrated(logits)
    else:  # sites calibrated on their own labels; the others' rows unchanged (a = 1, b = 0 in the logits' dtype)
        samples = head.calibrated(logits, own[0][:, None].astype(logits.dtype), own[1][:, None].astype(logits.dtype))
    p, h, mi = mc.summarize(samples)
    points = points or {}
    t = np.array([points[s][0] if s in points else version.threshold_for(s) for s in sites], dtype=np.float64)
    return Predictions(ids, logits, samples, p, h, mi, (p >= t).astype(np.int64),
                       scope_head.p_other(pooled) if scope_head is not None else None, t, version.review_rule,
                       [points[s][1] if s in points else None for s in sites] if points else None)
