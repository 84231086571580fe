"""Sites: the clinics, hospitals or collections images come from, and how a model version does at each.

A site's status rests on evidence (DESIGN.md, "Sites"): `unvalidated` (no labelled image of its own),
`provisional` (labelled images, but fewer than `GateFloors.min_melanomas` melanomas in the out-of-sample
predictions its figures rest on), `validated` (that many, and the version passes the gate's floors there),
`failing` (that many, and the upper end of a metric's 95% interval is under its floor). With enough melanomas
and a point estimate under a floor whose interval still reaches it, the site stays `provisional`: more labels
decide. The out-of-sample predictions (`evidence_for`, whichever holds more melanomas, and it says which):
- "test": its test split, as the version was evaluated at retraining;
- "labels": its whole labelled validation sample, scored out of sample, with the calibration its labels correct
  (`sites.operating`, method "labelled"): every label counts, melanomas counted effectively (IPW, Kish).
`record_evaluations` writes one `site_evaluations` row per site for a version as it is evaluated, `record_labels`
the rows a settling moves onto labels; `v_sites` (and `site_status` in the prediction views) reads the
champion's rows; `overview` is `lesion sites`.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.db import engine_for, upsert
from lesion_tasks.core.schema import images, predictions, site_evaluations, site_samples, splits
from lesion_tasks.core.settings import Settings
from lesion_tasks.data.splits import TEST_FRAC
from lesion_tasks.model.config import GateFloors
from lesion_tasks.sites import operating
from lesion_tasks.versions import registry

log = logging.getLogger(__name__)
FLOOR_METRICS = ("mel_sensitivity", "auc", "balanced_accuracy")
EVIDENCE_TEXT = {"test": "its test split", "labels": "its labelled sample, effective"}
# what each status means, where the UI shows one
STATUS_TEXT = {
    "unvalidated": "no labelled images of its own: its cases are decided at an operating point estimated from its own "
                   "unlabelled images (the pooled threshold until it has enough), and no label from this site vouches "
                   "for them",
    "provisional": "labelled images of its own, but too few melanomas among them to decide (or a floor still inside "
                   "the interval): its figures are estimates",
    "validated": "enough labelled melanomas of its own, and the champion passes every floor there",
    "failing": "enough labelled melanomas of its own, and the champion is below a floor there: every case goes to review",
}


def status_of(part: dict[str, Any] | None, labelled: int, floors: GateFloors, evidence: str = "test") -> tuple[str, str]:
    """(status, what it still needs) from a site's out-of-sample metrics `part` (None: none): its test split's
    (`evidence` "test"), or its labelled sample's with the calibration they correct ("labels": `labels_part`;
    `n_mel` counts effective melanomas there)."""
    n_mel = int((part or {}).get("n_mel") or 0)
    if not labelled:
        return "unvalidated", "labelled images of its own: draw its validation sample (lesion sites sample) and import their labels"
    if n_mel < floors.min_melanomas:
        if evidence == "labels":
            return "provisional", (f"{floors.min_melanomas - n_mel} more effective melanomas among its labelled sample "
                                   f"({n_mel} of {floors.min_melanomas}): label more of its validation sample")
        return "provisional", (f"{floors.min_melanomas - n_mel} more melanomas in its test split "
                               f"({n_mel} of {floors.min_melanomas}): label more of its validation sample and retrain")
    ci = part.get("ci95") or {}
    below = [m for m in FLOOR_METRICS if part.get(m) is None or part[m] < getattr(floors, m)]
    failing = [m for m in below if (ci.get(m) or [None, None])[1] is not None and ci[m][1] < getattr(floors, m)]
    if failing:
        return "failing", ("the champion is below its floor here (" + ", ".join(
            f"{m} 95% CI up to {ci[m][1]:.3f} < {getattr(floors, m)}" for m in failing) + "): its cases need review")
    if below:
        return "provisional", ("more melanomas: " + ", ".join(f"{m} {part.get(m)} under its floor {getattr(floors, m)}"
                                                            for m in below) + " but its interval reaches the floor")
    return "validated", "nothing: it passes every floor on enough melanomas"


def status_at(conn: sa.Connection, model_version: str, names: set[str]) -> dict[str, str]:
    """{site: status} of `model_version` at each of `names`, by the rule of `v_sites` (migration 0011): its
    `validated` / `failing` as evaluated, else `provisional` where the site has labelled images of its own,
    else `unvalidated` (what `site_status` in the prediction views says for the champion)."""
    if not names:
        return {}
    evaluated = dict(conn.execute(sa.select(site_evaluations.c.site, site_evaluations.c.status).where(
        site_evaluations.c.model_version == model_version, site_evaluations.c.site.in_(names))).all())
    labelled = dict(conn.execute(sa.select(images.c.site, sa.func.count(images.c.label))
                                 .where(images.c.site.in_(names)).group_by(images.c.site)).all())
    return {name: evaluated[name] if evaluated.get(name) in ("validated", "failing")
            else "provisional" if labelled.get(name) else "unvalidated" for name in names}


def labelled_counts(conn: sa.Connection) -> dict[str, dict[str, Any]]:
    """{site: {"images", "labelled", "labelled_by_split": {"train", "val", "test"}}} over every site."""
    out: dict[str, dict[str, Any]] = {}
    melanomas = sa.func.sum(sa.case((images.c.label == "MEL", 1), else_=0))
    for site, n, labelled, mel in conn.execute(sa.select(images.c.site, sa.func.count(), sa.func.count(images.c.label), melanomas)
                                               .group_by(images.c.site)):
        out[site] = {"images": int(n), "labelled": int(labelled), "labelled_melanomas": int(mel or 0),
                     "labelled_by_split": dict.fromkeys(("train", "val", "test"), 0)}
    rows = conn.execute(sa.select(images.c.site, splits.c.split, sa.func.count()).join(splits, splits.c.image_id == images.c.image_id)
                        .where(images.c.label.is_not(None)).group_by(images.c.site, splits.c.split))
    for site, split, n in rows:
        out[site]["labelled_by_split"][split] = int(n)
    return out


def record_evaluations(engine: sa.Engine, v: registry.ModelVersion, metrics: dict[str, Any]) -> dict[str, str]:
    """One `site_evaluations` row per site for version `v`, from its stored metrics; returns {site: status}.
    A rerun overwrites the version's rows with the same values."""
    by_site = (metrics.get("test") or {}).get("by_site") or {}
    now = datetime.now(UTC)
    with engine.begin() as conn:
        counts = labelled_counts(conn)
        rows = []
        for site, c in sorted(counts.items()):
            part = by_site.get(site)
            status, _ = status_of(part, c["labelled"], v.floors)
            entry = v.thresholds_by_site.get(site)
            rows.append({"model_version": v.model_version, "site": site, "status": status, "evidence": "test",
                         "melanomas_evidence": int((part or {}).get("n_mel") or 0), "threshold": v.threshold_for(site),
                         "chosen_on": entry.chosen_on if entry else "pooled", "metrics": part, "evaluated_at": now})
        upsert(conn, site_evaluations, rows, ["model_version", "site"])
    statuses = {r["site"]: r["status"] for r in rows}
    log.info("sites of %s: %s", v.model_version, ", ".join(f"{s} {st}" for s, st in statuses.items()) or "none")
    return statuses


def overview(settings: Settings) -> dict[str, Any]:
    """`lesion sites`: every site, its status for the champion, its labelled images per split, the
    melanomas its figures rest on, the threshold applied there, its metrics and what it still needs."""
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            return overview_of(conn)
    finally:
        engine.dispose()


def overview_of(conn: sa.Connection) -> dict[str, Any]:
    """`overview` on an open connection (the review UI's Sites page)."""
    champion = registry.version(conn, None, required=False)
    counts = labelled_counts(conn)
    evaluated = {r.site: r for r in conn.execute(sa.select(site_evaluations).where(
        site_evaluations.c.model_version == champion.model_version))} if champion else {}
    sampled = dict(conn.execute(sa.select(site_samples.c.site, sa.func.count()).group_by(site_samples.c.site)).all())
    floors = champion.floors if champion else GateFloors()
    points = operating.recorded(conn, champion.model_version) if champion else {}
    out = []
    for site, c in sorted(counts.items()):
        row = evaluated.get(site)
        op = None
        if champion is not None:
            op = points.get(site) or operating.point_for(champion, site, np.zeros(0))  # not scored yet: pooled
        part, evidence, melanomas = evidence_for(row, op)
        status, needed = status_of(part, c["labelled"], floors, evidence or "test")
        if champion is not None and evidence is None and c["labelled"]:  # labelled after the champion's evaluation
            status, needed = "provisional", ("a retrain or the next night: its labelled images are newer than the "
                                             "champion's evaluation")
        point = None
        if op is None:  # before any champion every site says so, labelled or not
            threshold = {"value": None, "chosen_on": None}
            needed = "a champion: none is trained yet (lesion train); then its figures"
        else:
            entry = champion.thresholds_by_site.get(site)
            threshold = {"value": op.threshold, "chosen_on": "site" if op.method == "labelled" else
                         entry.chosen_on if entry else "pooled",
                         "method": entry.method if entry else None, "n_mel": entry.n_mel if entry else None}
            point = op.to_json(labels_to_next_status(status, int(melanomas), op, floors, c["labelled"],
                                                     c["labelled_melanomas"]))
        out.append({"site": site, "status": status, "images": c["images"], "labelled": c["labelled"],
                    "labelled_by_split": c["labelled_by_split"], "validation_sample": int(sampled.get(site, 0)),
                    "melanomas_evidence": int(melanomas), "evidence": evidence, "threshold": threshold,
                    "operating_point": point, "metrics": _headline(part) if part else None, "needed": needed})
    return {"champion": champion.model_version if champion else None, "sites": out}


def labels_part(point: operating.OperatingPoint | None) -> dict[str, Any] | None:
    """A labelled operating point's evidence as site metrics (`status_of`'s `part`, evidence "labels"): its
    effective melanomas, the corrected sensitivity and specificity with their intervals, balanced accuracy from
    them, and the labelled sample's IPW AUC (bootstrap interval). None for other methods."""
    if point is None or point.method != "labelled" or not point.labels or point.sensitivity.estimate is None:
        return None
    sens, spec, labels = point.sensitivity, point.specificity, point.labels
    return {"n": point.labelled, "n_mel": round(point.melanomas, 1), "evidence": "labels",
            "mel_sensitivity": sens.estimate, "mel_specificity": spec.estimate,
            "balanced_accuracy": (sens.estimate + spec.estimate) / 2, "auc": labels.get("auc"),
            "ci95": {"mel_sensitivity": [sens.low, sens.high], "mel_specificity": [spec.low, spec.high],
                     "balanced_accuracy": [(sens.low + spec.low) / 2, (sens.high + spec.high) / 2],
                     "auc": labels.get("auc_ci95")},
            "ci95_method": {"mel_sensitivity": "corrected-calibration bootstrap", "mel_specificity":
                            "corrected-calibration bootstrap", "balanced_accuracy": "from those two",
                            "auc": "bootstrap over the labelled sample"}}


def evidence_for(row: Any, point: operating.OperatingPoint | None) -> tuple[dict[str, Any] | None, str | None, float]:
    """(metrics, evidence, melanomas) a site's status rests on: its labelled sample's (`labels_part`) where that
    holds more (effective) melanomas than the evaluated row's, else the row's (its test split, or labels recorded
    by an earlier settling)."""
    part = labels_part(point)
    recorded = float(row.melanomas_evidence) if row is not None else 0.0
    if part is not None and (part["n_mel"] > recorded or (row is not None and row.evidence == "labels")):
        return part, "labels", part["n_mel"]
    return (row.metrics if row is not None else None), (row.evidence if row is not None else None), recorded


def record_labels(conn: sa.Connection, v: registry.ModelVersion, points: dict[str, operating.OperatingPoint]) -> dict[str, str]:
    """After a settling: the `site_evaluations` row of each site whose status now rests on its labels
    (`evidence_for`), so that `v_sites` and the prediction views say what `lesion sites` says; {site: status} of the
    rows written (a rerun writes none)."""
    labelled = {s: op for s, op in points.items() if labels_part(op) is not None}
    if not labelled:
        return {}
    rows = {r.site: r for r in conn.execute(sa.select(site_evaluations).where(
        site_evaluations.c.model_version == v.model_version, site_evaluations.c.site.in_(labelled)))}
    counts, now, out = labelled_counts(conn), datetime.now(UTC), []
    for site, op in sorted(labelled.items()):
        part, evidence, melanomas = evidence_for(rows.get(site), op)
        if evidence != "labels":
            continue
        status, _ = status_of(part, counts.get(site, {}).get("labelled", 0), v.floors, "labels")
        row = {"model_version": v.model_version, "site": site, "status": status, "evidence": "labels",
               "melanomas_evidence": int(melanomas), "threshold": op.threshold, "chosen_on": "site", "metrics": part}
        old = rows.get(site)
        if old is not None and all(json.dumps(getattr(old, k), sort_keys=True) == json.dumps(row[k], sort_keys=True)
                                   for k in ("status", "evidence", "melanomas_evidence", "threshold", "metrics")):
            continue  # a rerun: nothing new, the row (and its time) stays
        out.append({**row, "evaluated_at": now})
    upsert(conn, site_evaluations, out, ["model_version", "site"])
    return {r["site"]: r["status"] for r in out}


def labels_to_next_status(status: str, test_melanomas: int, point: operating.OperatingPoint, floors: GateFloors,
                          labelled: int = 0, labelled_melanomas: int = 0) -> int | None:
    """About how many more labels of the site bring `floors.min_melanomas` melanomas into its test split (what
    `validated` or `failing` rests on): the missing melanomas over the share of labels that reach the test split
    (`splits.TEST_FRAC`) times the site's yield of melanomas per label: its own labels' where it has melanomas
    among them (its validation sample's yield, likely melanomas over-represented), else the rate its scored images
    expect (the mean calibrated p_mel). None once the site has that evidence, or when nothing estimates a yield."""
    if status in ("validated", "failing"):
        return None
    if labels_part(point) is not None:  # every label counts: effective melanomas per label of its sample
        missing = floors.min_melanomas - point.melanomas
        return None if missing <= 0 else int(math.ceil(missing / (point.melanomas / max(point.labelled, 1))))
    missing = floors.min_melanomas - test_melanomas
    if missing <= 0:
        return None
    if labelled_melanomas > 0:
        rate = labelled_melanomas / labelled
    elif point.method == "unlabelled" and point.images and point.melanomas > 0:
        rate = point.melanomas / point.images
    else:
        return None
    return int(math.ceil(missing / (TEST_FRAC * rate)))


def _headline(part: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "n_mel", "auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "ppv", "npv", "ci95",
            "ci95_method", "evidence")
    return {k: part[k] for k in keys if k in part}


def summary(result: dict[str, Any]) -> str:
    lines = [f"champion {result['champion'] or '(none)'}; {len(result['sites'])} sites"]
    for s in result["sites"]:
        t = s["threshold"]
        shown = "none" if t["value"] is None else f"{t['value']:.4f} ({t['chosen_on']})"
        lines.append(f"  {s['site']}: {s['status'].upper()}  images {s['images']}  labelled {s['labelled']} "
                     f"(train {s['labelled_by_split']['train']}, val {s['labelled_by_split']['val']}, "
                     f"test {s['labelled_by_split']['test']})  melanomas {s['melanomas_evidence']}"
                     f"{' (' + EVIDENCE_TEXT[s['evidence']] + ')' if s['evidence'] else ''}  threshold {shown}")
        op = s.get("operating_point")
        if op:
            sens = op["sensitivity"]
            shown_sens = ("" if sens["estimate"] is None else
                          f", sensitivity {sens['estimate']:.3f} [{sens['low']:.3f}, {sens['high']:.3f}]")
            lines.append(f"      operating point: {op['method']} {op['threshold']:.4f} on {op['images']} scored images{shown_sens}")
            labels = op.get("labels")
            if labels and labels["ipw"]["sensitivity_ci95"]:
                ipw = labels["ipw"]
                lines.append(f"      its labels alone: sensitivity {ipw['sensitivity']:.3f} [{ipw['sensitivity_ci95'][0]:.3f}, "
                             f"{ipw['sensitivity_ci95'][1]:.3f}] on {labels['melanomas']} labelled melanomas "
                             f"({labels['effective_melanomas']} effective)")
        more = (op or {}).get("labels_to_next_status")
        lines.append(f"      needs: {s['needed']}" + (f" (about {more} more labels at its yield of melanomas)" if more else ""))
    return "\n".join(lines)


def validation_queue(conn: sa.Connection, site: str) -> dict[str, Any]:
    """SITE's validation sample in its drawn order, with each image's label so far and the champion's
    prediction: the review UI's validation queue, and its progress ("37 of 200 labelled, 9 melanomas")."""
    champion = registry.version(conn, None, required=False)
    joined = (sa.select(site_samples.c.image_id, site_samples.c.rank, site_samples.c.stratum,
                        site_samples.c.inclusion_probability, images.c.label, images.c.diagnosis, images.c.label_source,
                        predictions.c.p_mel, predictions.c.predicted_label)
              .join(images, images.c.image_id == site_samples.c.image_id)
              .outerjoin(predictions, sa.and_(predictions.c.image_id == site_samples.c.image_id,
                                              predictions.c.model_version == (champion.model_version if champion else None)))
              .where(site_samples.c.site == site).order_by(site_samples.c.rank))
    rows = [dict(r) for r in conn.execute(joined).mappings()]
    if not rows and not conn.scalar(sa.select(sa.func.count()).select_from(images).where(images.c.site == site)):
        raise LookupError(f"site {site!r} not found")
    labelled = [r for r in rows if r["label"]]
    return {"site": site, "champion": champion.model_version if champion else None, "size": len(rows),
            "labelled": len(labelled), "melanomas": sum(r["label"] == "MEL" for r in labelled), "images": rows}
