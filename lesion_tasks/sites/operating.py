"""A site's operating point: the threshold its cases are decided at, how it was chosen, and what it promises.

A model version's pooled threshold was chosen on the validation images of the sites it trained on. At a site
it has no validation evidence of (a new clinic), the calibration transfers less well than the ranking
(docs/sites.md), so the pooled threshold lands anywhere: sensitivity 0.61-0.72 at a sharp new clinic, or
specificity 0.23 at another. The site's own unlabelled nights say where its operating point is: with calibrated
p_mel, the expected sensitivity at a threshold t over the site's N scored images is

    sum(p_i : p_i >= t) / sum(p_i)        (specificity: sum(1 - p_i : p_i < t) / sum(1 - p_i))

`choose` takes the highest threshold whose estimate reaches the target plus MARGIN. MARGIN is the calibration
error allowed for at a site never seen, measured leave-one-site-out (`bench/unlabelled_operating_point.py`,
ISIC 2017 and BCN_20000 held out in turn, 5 replicates): the smallest margin at which every replicate at both
sites reached the target AND no more than 5% of BCN_20000's other diagnoses were silently called NV (a higher
threshold releases them; 0.08 reached the target but released 9%). Every scored image of the site enters, its
other diagnoses and out-of-scope flags included: their p_mel counts as melanoma mass, which lowers the
threshold (measured: leaving out the flagged ones changes nothing, the flag catches few of them).

The interval (`interval`) is what the estimate promises about the realised sensitivity over the site's own
melanomas: the spread of that figure were the calibration right (the site's labels drawn from its own p, a
seeded simulation: a small site gets a wide interval), widened on both sides by the allowance for the
calibration's error at an unseen site (SENS_ALLOWANCE = MARGIN; measured errors at the chosen threshold:
+0.018 to +0.051) and, for specificity, SPEC_ALLOWANCE (measured: -0.117 to +0.004; other diagnoses' 1 - p
counts as nevus mass there).

Which sites get which `method` (`method_for`):
- "labelled": the site's labelled validation sample (`sites.sample`) holds MIN_LABELLED_MEL melanomas and as many
  other images, each scored out of sample (`evidence`): its labels correct the calibration of all its scored images
  (`sites.correction`), the threshold is the highest whose stated 95% lower bound of sensitivity reaches the target,
  and `labels` holds the labels' own check (IPW figures with exact intervals) beside it. A version that chose the
  site a threshold on its labels at retraining, with no such sample, keeps that threshold (also "labelled");
- "pooled": the version had validation melanomas of the site (it trained there: the pooled threshold was chosen
  on them), or the site has fewer than MIN_IMAGES scored images / MIN_MASS expected melanomas (too few to estimate);
- "unlabelled": every other site with scored images: the estimate above.
`applied` is what scoring decides each site's cases at; `settle` in `scoring.nightly` re-estimates after each
scoring run and re-decides the run's cases where the point moved.

A point carries its out-of-scope threshold (`scope_for`): the version's for its decision threshold and, where the
point is the site's own, raised by the site's shift in p_other (`model.scope.for_site`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.db import upsert
from lesion_tasks.core.schema import images, prediction_samples, predictions, site_operating_points, site_samples, splits
from lesion_tasks.model import scope
from lesion_tasks.sites import correction
from lesion_tasks.versions import predict
from lesion_tasks.versions.registry import ModelVersion

log = logging.getLogger(__name__)

MARGIN = 0.12
SENS_ALLOWANCE = MARGIN
SPEC_ALLOWANCE = 0.15
MIN_IMAGES = 100  # scored images of a site before its unlabelled estimate replaces the pooled threshold
MIN_MASS = 10.0  # and expected melanomas among them (sum of p_mel)
DRAWS = 1000  # simulated label draws for the sampling part of the interval
MIN_LABELLED_MEL = 5  # labelled melanomas (and as many others) in a site's sample before they correct its calibration
METHODS = ("pooled", "unlabelled", "labelled")


@dataclass(frozen=True)
class Estimate:
    estimate: float | None
    low: float | None
    high: float | None

    def to_json(self) -> dict[str, float | None]:
        return {k: None if v is None else round(float(v), 4) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class OperatingPoint:
    """One (model version, site) operating point (`lesion sites --json`: `operating_point`)."""

    site: str
    threshold: float
    method: str
    images: int  # scored images it rests on
    labelled: int  # labelled images used (0: unlabelled and pooled)
    melanomas: float  # effective melanomas: the labelled ones used, or the expected number (sum of p_mel)
    sensitivity: Estimate
    specificity: Estimate
    out_of_scope_above: float | None  # the out-of-scope threshold that goes with it (None: no out-of-scope head)
    why: str
    labels: Mapping[str, Any] | None = None  # "labelled": what the labels say (`Labelled.summary`)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"operating point method {self.method!r}: expected one of {METHODS}")

    def to_json(self, labels_to_next_status: int | None = None) -> dict[str, Any]:
        return {"threshold": float(self.threshold), "method": self.method, "images": self.images,
                "labelled": self.labelled, "melanomas": round(float(self.melanomas), 1),
                "sensitivity": self.sensitivity.to_json(), "specificity": self.specificity.to_json(),
                "out_of_scope_above": self.out_of_scope_above, "why": self.why, "labels": self.labels,
                "labels_to_next_status": labels_to_next_status}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> OperatingPoint:
        point = row["point"]
        return cls(row["site"], float(row["threshold"]), row["method"], int(point["images"]), int(point["labelled"]),
                   float(point["melanomas"]), Estimate(**point["sensitivity"]), Estimate(**point["specificity"]),
                   row["out_of_scope_above"], point.get("why", ""), point.get("labels"))


def estimated(p: np.ndarray, t: float) -> tuple[float, float]:
    """(sensitivity, specificity) that calibrated `p` expects at threshold `t` over these images."""
    p = np.asarray(p, dtype=np.float64)
    return float(p[p >= t].sum() / p.sum()), float((1 - p[p < t]).sum() / max((1 - p).sum(), 1e-12))


def choose(p: np.ndarray, target: float, margin: float = MARGIN) -> float:
    """The highest threshold (a score of the set) whose estimated sensitivity reaches `target` + `margin`."""
    order = np.sort(np.asarray(p, dtype=np.float64))[::-1]
    covered = np.cumsum(order) / order.sum()
    return float(order[min(int(np.searchsorted(covered, min(target + margin, 1.0) - 1e-12)), len(order) - 1)])


def interval(p: np.ndarray, t: float, seed: int = 0, draws: int = DRAWS) -> tuple[Estimate, Estimate]:
    """(sensitivity, specificity) at `t`: the estimate, and a 95% interval for the realised figure = the
    2.5-97.5% quantiles over `draws` label sets drawn from p itself (seeded: the same images give the same
    interval), widened by SENS_ALLOWANCE / SPEC_ALLOWANCE and clipped to [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    above = p >= t
    rng = np.random.default_rng(seed)
    counts = np.zeros((4, draws))  # MEL above, MEL below, NV below, NV above
    for start in range(0, len(p), 20_000):  # bounded memory on a 100,000-image site
        part, up = p[start : start + 20_000], above[start : start + 20_000]
        mel = rng.random((draws, len(part))) < part
        counts += [(mel & up).sum(1), (mel & ~up).sum(1), (~mel & ~up).sum(1), (~mel & up).sum(1)]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = counts[0] / (counts[0] + counts[1])
        spec = counts[2] / (counts[2] + counts[3])
    est_sens, est_spec = estimated(p, t)

    def widened(value: float, sampled: np.ndarray, allowance: float) -> Estimate:
        sampled = sampled[np.isfinite(sampled)]
        if not len(sampled):
            return Estimate(value, 0.0, 1.0)
        lo, hi = np.quantile(sampled, [0.025, 0.975])
        return Estimate(value, max(0.0, float(lo) - allowance), min(1.0, float(hi) + allowance))

    return widened(est_sens, sens, SENS_ALLOWANCE), widened(est_spec, spec, SPEC_ALLOWANCE)


@dataclass(frozen=True)
class Labelled:
    """A site's labelled validation sample as version `v` scored it out of sample (`evidence`): scores, labels
    (1 = melanoma), other diagnoses (1 = neither melanoma nor nevus), IPW weights (1 / inclusion probability)."""

    p: np.ndarray
    y: np.ndarray
    other: np.ndarray  # 1: another diagnosis than melanoma or nevus
    w: np.ndarray
    source: str  # in words: which scores

    @property
    def enough(self) -> bool:
        return int(self.y.sum()) >= MIN_LABELLED_MEL and int(len(self.y) - self.y.sum()) >= MIN_LABELLED_MEL


def method_for(v: ModelVersion, site: str, p: np.ndarray, labelled: Labelled | None = None) -> tuple[str, str]:
    """(method, why) of `site`'s operating point under version `v`, given its scored p_mel and its labelled
    validation sample (see the module doc)."""
    if labelled is not None and labelled.enough and len(p):
        return "labelled", (f"its {len(labelled.y)} labelled sample images ({int(labelled.y.sum())} melanomas, "
                            f"{labelled.source}) correct the calibration of its {len(p)} scored images: the highest "
                            f"threshold whose 95% lower bound of sensitivity reaches {v.target_sensitivity or 0.85:g}")
    own = v.own_threshold(site)
    if own is not None:
        return "labelled", f"chosen on its labels at retraining ({own.method or 'validation'}, {own.n_mel} melanomas)"
    entry = v.thresholds_by_site.get(site)
    if entry is not None and entry.n_mel > 0:
        return "pooled", (f"the version trained at this site: the pooled threshold was chosen on validation images "
                          f"including its {entry.n_mel} melanomas")
    if len(p) < MIN_IMAGES or float(np.sum(p)) < MIN_MASS:
        return "pooled", (f"too few scored images to estimate its own ({len(p)} images, {float(np.sum(p)):.1f} expected "
                          f"melanomas; at least {MIN_IMAGES} and {MIN_MASS:g} needed): the pooled threshold")
    why = (f"estimated from the calibrated p_mel of its {len(p)} scored images, none labelled: the highest threshold "
           f"whose expected sensitivity reaches the target {v.target_sensitivity or 0.85:g} + margin {MARGIN:g}")
    if labelled is not None and len(labelled.y):
        why += (f" (its {len(labelled.y)} labelled sample images hold {int(labelled.y.sum())} melanomas and "
                f"{int(len(labelled.y) - labelled.y.sum())} others: {MIN_LABELLED_MEL} of each correct the calibration)")
    return "unlabelled", why


def scope_threshold_at(v: ModelVersion, threshold: float) -> float | None:
    """The out-of-scope threshold that goes with decision threshold `threshold`: chosen at training on the
    validation OTHER images for a grid of decision thresholds (`ReviewRule.out_of_scope_by_threshold`), the
    entry at the first grid point at or above it (a higher decision threshold makes fewer MEL calls, so its
    scope threshold is the lower, safer one). Versions without the grid keep their one threshold."""
    grid = v.review_rule.out_of_scope_by_threshold
    if v.scope_threshold is None or not grid or abs(threshold - float(v.threshold)) < 1e-12:
        return v.scope_threshold
    for t, scope_above in grid:
        if t >= threshold:
            return float(scope_above)
    return float(grid[-1][1])


def scope_for(v: ModelVersion, threshold: float, method: str, p_other: np.ndarray | None) -> tuple[float | None, str]:
    """The out-of-scope threshold at a site decided at `threshold`, and what to say of it: the version's for that
    decision threshold (`scope_threshold_at`); where the site's point is its own ("unlabelled", "labelled"),
    raised by the site's shift in p_other (`model.scope.for_site`)."""
    base = scope_threshold_at(v, threshold)
    if method == "pooled" or p_other is None:
        return base, ""
    above, shift = scope.for_site(base, v.review_rule.out_of_scope_site_reference, p_other)
    if not shift:
        return above, ""
    return above, (f"; out of scope at p_other >= {above:.3f}, not {base:.3f}: its images' p_other sit {shift:.2f} logit "
                   f"above the validation in-scope images' at the {scope.SITE_QUANTILE:g} quantile")


def point_for(v: ModelVersion, site: str, p: np.ndarray, labelled: Labelled | None = None,
              p_other: np.ndarray | None = None) -> OperatingPoint:
    """`site`'s operating point under version `v` from the calibrated p_mel (and the p_other) of its scored images
    and, where it has one, its labelled validation sample scored out of sample (`evidence`)."""
    method, why = method_for(v, site, p, labelled)
    target = v.target_sensitivity or 0.85
    own, entry = v.own_threshold(site), v.thresholds_by_site.get(site)
    if method == "labelled" and labelled is not None and labelled.enough:
        corrected = correction.Corrected.fit(p, labelled.p, labelled.y, labelled.w, other=labelled.other)
        t, sens_f, spec_f = corrected.operating_point(target)
        sens, spec = (Estimate(f.estimate, f.low, f.high) for f in (sens_f, spec_f))
        nevi_and_melanomas = labelled.other == 0  # the floors' AUC is melanoma against nevus, as on the test split
        auc, auc_ci = correction.ipw_auc(labelled.p[nevi_and_melanomas], labelled.y[nevi_and_melanomas],
                                         labelled.w[nevi_and_melanomas])
        checks = {"labelled": corrected.labelled, "melanomas": corrected.melanomas,
                  "effective_melanomas": round(corrected.effective_melanomas, 1),
                  "correction": [round(float(c), 4) for c in corrected.beta], "scores": labelled.source,
                  "auc": None if auc is None else round(auc, 4),
                  "auc_ci95": None if auc_ci is None else [round(v, 4) for v in auc_ci],
                  "ipw": correction.ipw_check(labelled.p, labelled.y, labelled.w, t, nevus=labelled.other == 0)}
        above, said = scope_for(v, t, method, p_other)
        return OperatingPoint(site, t, method, len(p), corrected.labelled, corrected.effective_melanomas, sens, spec,
                              above, why + said, checks)
    t = choose(p, target) if method == "unlabelled" else v.threshold_for(site)
    if len(p) and float(np.sum(p)) > 0:
        sens, spec = interval(p, t)
    else:
        sens = spec = Estimate(None, None, None)
    labelled_n = int((own.validation or {}).get("n", 0)) if own else 0
    if method == "unlabelled":  # the melanomas its scores expect
        melanomas = float(np.sum(p))
    else:  # the labelled melanomas its threshold was chosen on
        melanomas = float(entry.n_mel) if entry else 0.0
    above, said = scope_for(v, t, method, p_other)
    return OperatingPoint(site, t, method, len(p), labelled_n, melanomas, sens, spec, above, why + said)


def sampled_sites(conn: sa.Connection) -> set[str]:
    """Sites with a labelled image in their validation sample."""
    return set(conn.scalars(sa.select(site_samples.c.site).join(images, images.c.image_id == site_samples.c.image_id)
                            .where(images.c.label.is_not(None)).distinct()))


def evidence(conn: sa.Connection, v: ModelVersion, sites: list[str]) -> dict[str, Labelled]:
    """{site: its labelled validation sample, each image scored by a model that never trained on it} under `v`:
    - the out-of-fold score retraining recorded (`SiteThreshold.out_of_fold`: cross-fitted) where `v` trained on it;
    - else `v`'s own stored p_mel, where `v` cannot have trained on it: it is in the frozen test split, or `v`
      trained on none of the site's labels (no threshold of its own there, no validation melanoma of the site);
    - else (a version from before out-of-fold scores were recorded) the image is left out.
    Sites without a labelled sample image are left out."""
    rows = conn.execute(sa.select(images.c.site, site_samples.c.image_id, site_samples.c.inclusion_probability,
                                  images.c.label, predictions.c.p_mel, splits.c.split)
                        .join(images, images.c.image_id == site_samples.c.image_id)
                        .join(predictions, sa.and_(predictions.c.image_id == site_samples.c.image_id,
                                                   predictions.c.model_version == v.model_version))
                        .outerjoin(splits, splits.c.image_id == site_samples.c.image_id)
                        .where(site_samples.c.site.in_(sites), images.c.label.is_not(None))
                        .order_by(site_samples.c.site, site_samples.c.rank)).all()
    out: dict[str, tuple[list, list, list, list, set]] = {}
    oofs: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = v.thresholds_by_site.get(r.site)
        if r.site not in oofs:
            oofs[r.site] = dict(zip(entry.out_of_fold["ids"], entry.out_of_fold["p"])) if entry and entry.out_of_fold else {}
        oof = oofs[r.site]
        trained_there = entry is not None and (entry.own or entry.n_mel > 0)
        if r.image_id in oof:
            score, source = oof[r.image_id], "cross-fitted at retraining"
        elif r.split == "test" or not trained_there or oof:
            score, source = r.p_mel, "scored by a model that never trained on them"
        else:
            continue
        p, y, other, w, sources = out.setdefault(r.site, ([], [], [], [], set()))
        p.append(score)
        y.append(int(r.label == "MEL"))
        other.append(int(r.label not in ("MEL", "NV")))
        w.append(1.0 / r.inclusion_probability)
        sources.add(source)
    return {site: Labelled(np.array(p), np.array(y, np.int64), np.array(other, np.int64), np.array(w),
                           " and ".join(sorted(src))) for site, (p, y, other, w, src) in out.items()}


def scored_p(conn: sa.Connection, model_version: str, sites: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{site: (calibrated p_mel, p_other) of every image of the site the version scored}, over `sites` (p_other
    left out where NULL: a version without an out-of-scope head)."""
    out: dict[str, tuple[list[float], list[float]]] = {s: ([], []) for s in sites}
    rows = conn.execute(sa.select(images.c.site, predictions.c.p_mel, predictions.c.p_other)
                        .join(images, images.c.image_id == predictions.c.image_id)
                        .where(predictions.c.model_version == model_version, images.c.site.in_(sites)))
    for site, p, p_other in rows:
        out[site][0].append(p)
        if p_other is not None:
            out[site][1].append(p_other)
    return {s: (np.array(p, dtype=np.float64), np.array(o, dtype=np.float64)) for s, (p, o) in out.items()}


def estimate(conn: sa.Connection, v: ModelVersion, sites: list[str], run_id: str | None = None) -> dict[str, OperatingPoint]:
    """Re-estimate and record the operating point of version `v` at each of `sites` from all its scored images
    there (an upsert per (version, site): the latest estimate is the one applied)."""
    labelled = evidence(conn, v, sorted(sites))
    points = {site: point_for(v, site, p, labelled.get(site), p_other)
              for site, (p, p_other) in scored_p(conn, v.model_version, sorted(sites)).items()}
    now = datetime.now(UTC)
    upsert(conn, site_operating_points, [
        {"model_version": v.model_version, "site": s, "threshold": op.threshold, "method": op.method,
         "out_of_scope_above": op.out_of_scope_above, "point": op.to_json(), "run_id": run_id, "estimated_at": now}
        for s, op in points.items()], ["model_version", "site"])
    for s, op in points.items():
        log.info("operating point of %s at %s: %s threshold %.4f on %d images (sensitivity %s, specificity %s)",
                 v.model_version, s, op.method, op.threshold, op.images, op.sensitivity.to_json(), op.specificity.to_json())
    return points


def recorded(conn: sa.Connection, model_version: str) -> dict[str, OperatingPoint]:
    """{site: its latest recorded operating point} for `model_version`."""
    rows = conn.execute(sa.select(site_operating_points).where(site_operating_points.c.model_version == model_version)).mappings()
    return {r["site"]: OperatingPoint.from_row(r) for r in rows}


def applied(conn: sa.Connection, v: ModelVersion) -> dict[str, tuple[float, float | None]]:
    """What scoring decides each site's cases at under version `v` (`versions.predict.predict`'s `points`):
    {site: (threshold, out-of-scope threshold)} of its recorded operating points; a site without one is decided
    by the version's own rule."""
    return {s: (op.threshold, op.out_of_scope_above) for s, op in recorded(conn, v.model_version).items()}


def redecide(conn: sa.Connection, v: ModelVersion, run_id: str | None,
              points: dict[str, OperatingPoint], failing: frozenset[str]) -> tuple[int, list[str]]:
    """Decide the cases of scoring run `run_id` (None: every case of the version) at their sites' operating
    `points`: where the MEL/NV call stays, update the threshold, the decision uncertainty (from the stored MC
    samples) and the review reasons in place; return (how many rows changed, the ids whose call flips: their
    Grad-CAM map is of the other class, so the caller scores them again)."""
    query = (sa.select(predictions.c.image_id, images.c.site, predictions.c.p_mel, predictions.c.entropy,
                       predictions.c.p_other, predictions.c.predicted_label, predictions.c.threshold,
                       predictions.c.attention_on_lesion, predictions.c.decision_uncertainty, predictions.c.review_reasons,
                       prediction_samples.c.p_mel_samples)
             .join(images, images.c.image_id == predictions.c.image_id)
             .join(prediction_samples, sa.and_(prediction_samples.c.image_id == predictions.c.image_id,
                                               prediction_samples.c.model_version == predictions.c.model_version))
             .where(predictions.c.model_version == v.model_version))
    if run_id is not None:
        query = query.where(predictions.c.run_id == run_id)
    rule = v.review_rule
    flipped, changes = [], []
    for r in conn.execute(query):
        point = points.get(r.site)
        if point is None:
            continue
        t = point.threshold
        is_mel = int(r.p_mel >= t)
        if is_mel != int(r.predicted_label == "MEL"):
            flipped.append(r.image_id)
            continue
        du = float(predict.decision_uncertainty(np.asarray([r.p_mel_samples], dtype=np.float64), np.array([t]),
                                                np.array([is_mel]))[0])
        reasons = (predict.review_reasons(r.p_mel, r.entropy, t, rule, r.p_other, du, point.out_of_scope_above)
                   + predict.scored_reasons(rule, bool(is_mel), r.attention_on_lesion, r.site in failing))
        joined = ",".join(reasons) or None
        if abs(float(r.threshold) - t) > 1e-12 or joined != r.review_reasons:
            changes.append({"k_image_id": r.image_id, "threshold": t, "decision_uncertainty": du,
                            "needs_review": bool(reasons), "review_reasons": joined})
    if changes:
        conn.execute(predictions.update().where(predictions.c.model_version == v.model_version,
                                                predictions.c.image_id == sa.bindparam("k_image_id")), changes)
    return len(changes), flipped
