"""A site's decision threshold and calibration, and the pooled threshold that must hold at every gated site.

`choose` picks the pooled threshold (the highest reaching the sensitivity target on the pooled validation
split and on every gated site's validation images) and each site's own, where the site has the evidence for
one; `thresholds_by_site` is what a version records for every site. A site that labelled a validation sample
is chosen for on out-of-fold scores over all its labelled images (`training.crossfit` computes them), with its
own Platt scaling where that measurably helps (`site_calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lesion_tasks.model import evaluation, mc
from lesion_tasks.model.config import TrainConfig
from lesion_tasks.versions.registry import SiteThreshold

# a site with at least this many melanomas in test is gated on its own as well as pooled, and the pooled
# threshold must reach the sensitivity target on its validation images too
MIN_SITE_MEL = 30
# a site with this many validation melanomas of its own gets its own threshold (its margin grows as they shrink)
MIN_SITE_THRESHOLD_MEL = 10


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold calibrated p_mel of a site's labelled train+val images (train first, then val), with the
    per-sample calibrated logits (N, T) behind it and each image's fold."""

    ids: list[str]
    y: np.ndarray
    p: np.ndarray
    lesions: np.ndarray
    folds: int
    logits: np.ndarray
    fold_of: np.ndarray



def gated_sites(split_summary: dict[str, Any]) -> list[str]:
    """Sites with at least MIN_SITE_MEL melanomas in test: the gate's floors and the pooled threshold's
    sensitivity apply to each of them, not only pooled (`by_source` for summaries from before sites)."""
    return sorted(site for site, parts in _by_site(split_summary).items() if parts["test"]["MEL"] >= MIN_SITE_MEL)


def _by_site(split_summary: dict[str, Any]) -> dict[str, Any]:
    return split_summary.get("by_site", split_summary.get("by_source", {}))


def reaching_target(y: np.ndarray, p: np.ndarray, lesions: np.ndarray, config: TrainConfig, n_test: int | None,
                    w: np.ndarray | None = None) -> float:
    """The highest threshold reaching the sensitivity target on (y, p), the target raised by the margin its
    evidence needs (`evaluation.target_with_margin`; weighted evidence counts by its effective size)."""
    mel = y == 1
    per_lesion = mel.sum() / max(len(set(lesions[mel].tolist())), 1)
    n_val = evaluation.effective_size(w[mel]) if w is not None else int(mel.sum())
    target = max(config.target_sensitivity,
                 evaluation.target_with_margin(config.floors.mel_sensitivity, n_val, n_test, per_lesion))
    return evaluation.threshold_for_sensitivity(y, p, min(target, 1.0), w)


def choose(y: np.ndarray, p: np.ndarray, sites: np.ndarray, lesions: list[str], split_summary: dict[str, Any],
           config: TrainConfig, weights: np.ndarray | None = None,
           crossfitted: dict[str, tuple[OutOfFold, np.ndarray]] | None = None
           ) -> tuple[float, dict[str, float], dict[str, SiteThreshold]]:
    """(pooled threshold, each validation target's threshold, the sites' own thresholds).

    The pooled threshold is the highest reaching the melanoma sensitivity target on the pooled validation
    split AND on the validation images of every gated site (a pooled threshold dominated by one site must
    not fail another); it applies at every site without a threshold of its own. Each target is the configured
    one, or higher where the sample sizes need it: the gate's floor plus a margin for a validation-vs-test
    difference (`evaluation.target_with_margin`), so that a site with 84 validation and 104 test melanomas
    still reaches the floor on test, and one with 12 aims much higher.

    A site gets its own threshold, chosen the same way on its images alone, from
    - `crossfitted` (sites with a validation sample): out-of-fold scores over all of its labelled train+val
      images (`training.crossfit`), IPW-weighted, the margin for its effective number of melanomas against its
      whole population (its next nights), where they hold MIN_SITE_THRESHOLD_MEL melanomas;
    - else its validation split, where that holds MIN_SITE_THRESHOLD_MEL melanomas.
    A cross-fitted site also gets its own calibration where that measurably helps (`site_calibration`:
    cross-validated log-loss); its threshold is then chosen on the recalibrated scores."""
    lesions_arr = np.asarray(lesions, dtype=object)
    crossfitted = crossfitted or {}
    by_site = _by_site(split_summary)

    def n_test(site: str) -> int:
        return by_site.get(site, {}).get("test", {}).get("MEL", 0)

    def on_val(mask: np.ndarray, tested: int, w: np.ndarray | None = None) -> float:
        return reaching_target(y[mask], p[mask], lesions_arr[mask], config, tested, None if w is None else w[mask])

    per_site = {site: on_val(sites == site, n_test(site)) for site in gated_sites(split_summary) if y[sites == site].sum()}
    pooled = on_val(np.ones(len(y), bool), split_summary["counts"]["test"]["MEL"])
    chosen = min([pooled, *per_site.values()])
    own = {}
    for site in sorted(set(sites.tolist()) | set(crossfitted)):
        if site in crossfitted:
            oof, w = crossfitted[site]
            if oof.y.sum() < MIN_SITE_THRESHOLD_MEL:  # the pooled threshold, its out-of-fold scores recorded
                own[site] = SiteThreshold(chosen, "pooled", int(oof.y.sum()), out_of_fold=_scores(oof, oof.p))
                continue
            calibration = site_calibration(oof, w)
            p_site = recalibrated(oof, calibration)
            t = reaching_target(oof.y, p_site, oof.lesions, config, None, w)
            own[site] = SiteThreshold(t, "site", int(oof.y.sum()),
                                      f"cross-fitted ({oof.folds} folds over {len(oof.y)} labelled train+val images)"
                                      + ("; calibrated per site" if calibration["applied"] else ""), True, calibration,
                                      evaluation.binary_metrics(oof.y, p_site, t, w),
                                      _scores(oof, p_site))
            continue
        n_mel = int(y[sites == site].sum())
        if n_mel >= MIN_SITE_THRESHOLD_MEL:
            w = None if weights is None or np.all(weights[sites == site] == 1.0) else weights
            own[site] = SiteThreshold(on_val(sites == site, n_test(site), w), "site", n_mel, "validation split", w is not None)
    return chosen, {"pooled": pooled, **per_site}, own


def _scores(oof: OutOfFold, p: np.ndarray) -> dict[str, list]:
    """`SiteThreshold.out_of_fold`: the site's labelled images' out-of-fold p_mel (`sites.operating.evidence`)."""
    return {"ids": list(oof.ids), "p": [round(float(q), 6) for q in p]}


def thresholds_by_site(own: dict[str, SiteThreshold], pooled: float, sites: list[str],
                       val_mel: dict[str, int]) -> dict[str, SiteThreshold]:
    """`thresholds_by_site` for every site with images: its own where `choose` chose one (or recorded a
    cross-fitted site's scores under the pooled one), else the pooled."""
    return {site: own.get(site) or SiteThreshold(pooled, "pooled", int(val_mel.get(site, 0)))
            for site in sorted(set(sites) | set(own))}


def site_calibration(oof: OutOfFold, w: np.ndarray) -> dict[str, Any]:
    """A site's own Platt scaling on top of the pooled one, and whether it measurably helps.

    (a, b) are fitted on the out-of-fold calibrated logits, IPW-weighted. Whether to apply them is itself
    cross-validated over the same folds: fitted without fold k, scored on fold k, each image's log-loss
    against the pooled calibration alone. Applied only when the weighted mean improvement exceeds 1.645
    standard errors of the paired differences (one-sided 95%): with a couple of hundred labels a site's own
    scaling is often noise, and then the pooled one stays."""
    def loss(q: np.ndarray, y: np.ndarray) -> np.ndarray:
        q = np.clip(q, 1e-7, 1 - 1e-7)
        return -(y * np.log(q) + (1 - y) * np.log(1 - q))

    pooled = loss(oof.p, oof.y)
    site = np.empty(len(oof.y))
    for k in range(oof.folds):
        out = oof.fold_of == k
        rest = ~out
        if oof.y[rest].min() == oof.y[rest].max():  # cannot be cross-validated: the pooled calibration stays
            return {"applied": False, "a": 1.0, "b": 0.0, "log_loss": {"pooled": float(np.average(pooled, weights=w)),
                                                                      "site": None},
                    "gain": None, "gain_se": None, "why": f"fold {k} leaves one class only: not cross-validated"}
        a, b = mc.fit_calibration(oof.logits[rest], oof.y[rest], w[rest])
        site[out] = loss(mc.sigmoid(a * oof.logits[out] + b).mean(axis=1), oof.y[out])
    diff = (pooled - site) * w / w.mean()  # > 0: the site's own scaling does better
    gain, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
    a, b = mc.fit_calibration(oof.logits, oof.y, w)
    applied = gain > 1.645 * se
    return {"applied": bool(applied), "a": a, "b": b,
            "log_loss": {"pooled": float(np.average(pooled, weights=w)), "site": float(np.average(site, weights=w))},
            "gain": gain, "gain_se": se,
            "why": ("cross-validated log-loss better than the pooled calibration's by more than 1.645 standard errors"
                    if applied else "no measurable gain over the pooled calibration (cross-validated log-loss)")}


def recalibrated(oof: OutOfFold, calibration: dict[str, Any]) -> np.ndarray:
    """The out-of-fold p_mel under the site's own scaling (`site_calibration`) where it is applied."""
    if not calibration.get("applied"):
        return oof.p
    return mc.summarize(mc.sigmoid(calibration["a"] * oof.logits + calibration["b"]))[0]
