"""The model registry (`model_versions`), the quality gate and champion promotion.

Gate = enough evidence to decide at all (at least `GateFloors.min_melanomas` melanomas in the test and
in the validation split, validation AUC above chance) AND absolute floors on the frozen test split
(melanoma sensitivity at the chosen threshold, AUC, balanced accuracy; pooled and per source drop;
out-of-scope recall) AND no significant regression against the current champion on the same test
images (paired bootstrap, 95%). Reasons show numbers rounded toward the side of the bound they are on.
One champion at a time (a unique partial index); every promotion, including a manual override, is
recorded in `champion_history`.

This module owns a model version: `ModelVersion` is the typed, frozen view every other module reads
(its config is read by key here and nowhere else), and every write of a `model_versions` row is one of
its functions: `claim`, `record_trained`, `record_metrics`, `record_report`, `record_gate`, `promote`,
`mark_pruned`. `resolve` is the one champion resolver.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.db import insert_ignore
from lesion_tasks.lifecycle.config import GateFloors
from lesion_tasks.core.schema import champion_history, model_versions

log = logging.getLogger(__name__)


# a site with at least this many melanomas in test is gated on its own as well as pooled
MIN_SOURCE_MEL = 30
# out-of-scope floors apply when the test split has at least this many such images
MIN_OUT_OF_SCOPE = 30


def shown(value: float, digits: int = 4, sign: bool = False, up: bool = False) -> str:
    """`value` with `digits` decimals, rounded down (toward -inf; `up`: toward +inf), so that against a
    bound of at most `digits` decimals the shown number is on the same side as the real one: rounded
    down for `value >= bound` ("0.5999 < floor 0.60", never "0.600 < 0.60"), up for `value > bound`."""
    q = Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_CEILING if up else ROUND_FLOOR)
    q = abs(q) if q == 0 else q  # no "-0.0000"
    return f"{q:+f}" if sign else f"{q:f}"


def bound(value: float) -> str:
    """A floor as written: two decimals when that is exact, else every digit it has."""
    return f"{value:.2f}" if float(f"{value:.2f}") == value else repr(float(value))


@dataclass(frozen=True)
class ModelVersion:
    """A model version as every module but this one reads it: columns and the recorded config, typed."""

    model_version: str
    status: str
    is_champion: bool
    backbone: str
    image_size: int
    threshold: float | None  # pooled decision threshold on calibrated p_mel
    mc_samples: int
    weights_used: str  # the weights spec to resolve again ("none" for random initialisation)
    weights_sha256: str | None
    last_activation: str | None  # Grad-CAM's layer
    seed: int
    mc_seed: int | None  # None: masks per (version, image), for versions that recorded no seed
    bootstrap: int
    effective_resolution: int
    color_constancy: str
    floors: GateFloors
    review_rule: Mapping[str, Any]
    thresholds_by_source: Mapping[str, Any]  # versions before sites: the per-drop thresholds the pooled one honours
    thresholds_by_site: Mapping[str, Any]  # {site: {"threshold", "chosen_on": "site"|"pooled", "n_mel"}}
    scope_threshold: float | None  # p_other above which a case is out of scope; None: no out-of-scope head
    lineage: Mapping[str, Any]
    metrics: Mapping[str, Any] | None
    model_uri: str | None
    report_uri: str | None
    artifacts_pruned_at: Any
    row: Mapping[str, Any] = field(repr=False, compare=False)  # the raw row, for display

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ModelVersion:
        cfg = row.get("config") or {}
        rule = row.get("review_rule") or {}
        return cls(
            model_version=row["model_version"], status=row["status"], is_champion=bool(row["is_champion"]),
            backbone=row["backbone"], image_size=row["image_size"], threshold=row["threshold"],
            mc_samples=row["mc_samples"], weights_used=cfg.get("weights_used", "none"),
            weights_sha256=row.get("weights_sha256"), last_activation=cfg.get("last_activation"),
            seed=int(cfg.get("seed", 0)), mc_seed=None if cfg.get("mc_seed") is None else int(cfg["mc_seed"]),
            bootstrap=int(cfg.get("bootstrap", 0)), effective_resolution=int(cfg.get("effective_resolution", 0)),
            color_constancy=cfg.get("color_constancy", ""), floors=GateFloors(**cfg.get("floors", {})),
            review_rule=rule, thresholds_by_source=rule.get("threshold_by_source") or {},
            thresholds_by_site=rule.get("thresholds_by_site") or {},
            scope_threshold=rule.get("out_of_scope_above"), lineage=row.get("lineage") or {},
            metrics=row.get("metrics"), model_uri=row.get("model_uri"), report_uri=row.get("report_uri"),
            artifacts_pruned_at=row.get("artifacts_pruned_at"), row=dict(row))

    def threshold_for(self, site: str | None) -> float:
        """The decision threshold applied at `site`: its own where retraining chose one on the site's
        labelled images (`chosen_on` "site"), else the pooled one."""
        own = self.thresholds_by_site.get(site) if site is not None else None
        return float(own["threshold"]) if own and own.get("chosen_on") == "site" else float(self.threshold)

    def threshold_note(self, site: str | None) -> str:
        """In words: the threshold `site`'s cases are decided at and which validation target set it."""
        own = self.thresholds_by_site.get(site) if site is not None else None
        if own and own.get("chosen_on") == "site":
            return f"at its own threshold {float(own['threshold']):.4f}, chosen on its {own.get('n_mel')} validation melanomas"
        setter = threshold_setter(self.review_rule, self.threshold)
        by = ("the pooled validation target" if setter in (None, "pooled") else
              "this site's target" if setter == site else f"site {setter}'s target")
        return f"at the pooled threshold {float(self.threshold):.4f}, set by {by}"

    def thresholds_for(self, sites: Sequence[str | None]) -> np.ndarray:
        return np.array([self.threshold_for(s) for s in sites], dtype=np.float64)

    def site_calibration(self, site: str | None) -> tuple[float, float] | None:
        """(a, b) of `site`'s own Platt scaling on top of the pooled one, where retraining applied one
        (`thresholds_by_site.<site>.calibration.applied`), else None."""
        own = self.thresholds_by_site.get(site) if site is not None else None
        cal = (own or {}).get("calibration") or {}
        return (float(cal["a"]), float(cal["b"])) if own and own.get("chosen_on") == "site" and cal.get("applied") else None

    def site_calibrations_for(self, sites: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray] | None:
        """Per case (a, b) of its site's own calibration (1, 0 where none), None where no case has one."""
        cals = [self.site_calibration(s) for s in sites]
        if not any(cals):
            return None
        return (np.array([c[0] if c else 1.0 for c in cals]), np.array([c[1] if c else 0.0 for c in cals]))

    @property
    def floors_recorded(self) -> dict[str, Any]:
        return dict((self.row.get("config") or {}).get("floors") or {})


def version(conn: sa.Connection, model_version: str | None, required: bool = True) -> ModelVersion | None:
    """`resolve`, typed."""
    row = resolve(conn, model_version, required)
    return None if row is None else ModelVersion.from_row(row)


def get(conn: sa.Connection, model_version: str) -> dict[str, Any]:
    row = conn.execute(sa.select(model_versions).where(model_versions.c.model_version == model_version)).mappings().first()
    if row is None:
        raise ValueError(f"model version {model_version!r}: not in the registry")
    return dict(row)


def champion(conn: sa.Connection) -> dict[str, Any] | None:
    row = conn.execute(sa.select(model_versions).where(model_versions.c.is_champion)).mappings().first()
    return dict(row) if row else None


def resolve(conn: sa.Connection, model_version: str | None, required: bool = True) -> dict[str, Any] | None:
    """`champion` (or None / "") or a version id -> its registry row. With no champion yet: a
    ValueError saying what to do, or None when not `required`. An unknown version id is always an error."""
    if model_version in (None, "", "champion"):
        row = champion(conn)
        if row is None and required:
            raise ValueError("no champion model yet: run `lesion train` (or trigger lesion_retrain) first")
        return row
    return get(conn, model_version)


# statuses whose artifacts the run that claimed the version may still (re)write
WRITABLE = ("training", "candidate", "rejected")


class VersionConflict(ValueError):
    """A model version id is taken by another run, or its artifacts are frozen (promoted)."""


def claim(engine: sa.Engine, model_version: str, run_id: str, placeholder: dict[str, Any]) -> None:
    """Reserve `model_version` for `run_id` before anything is written under it.

    The first claim inserts a `training` row; a retried task of the same run finds its own row and
    goes on. Another run's version, or one that was ever promoted (champion or retired), is refused:
    nothing may overwrite a champion's artifacts."""
    with engine.begin() as conn:
        insert_ignore(conn, model_versions, [{**placeholder, "model_version": model_version, "run_id": run_id,
                                              "status": "training", "is_champion": False}], ["model_version"])
        owner = conn.execute(sa.select(model_versions.c.run_id, model_versions.c.status, model_versions.c.is_champion,
                                       model_versions.c.artifacts_pruned_at)
                             .where(model_versions.c.model_version == model_version)).one()
    if owner.run_id != run_id:
        raise VersionConflict(f"model version {model_version!r} belongs to run {owner.run_id!r}, not {run_id!r}: "
                              "refusing to write over it (use another run id)")
    if owner.artifacts_pruned_at is not None:
        raise VersionConflict(f"{pruned_message(model_version, owner.artifacts_pruned_at)}: refusing to write under it "
                              "again (use another run id)")
    ensure_writable(owner.status, owner.is_champion, model_version)


def pruned_message(model_version: str, pruned_at: Any) -> str:
    """What a refusal says about a version whose artifacts `lesion gc` deleted."""
    when = pruned_at.isoformat(timespec="seconds") if hasattr(pruned_at, "isoformat") else str(pruned_at)
    return (f"model version {model_version!r}: its artifacts (model, head, Grad-CAM overlays) were pruned by "
            f"`lesion gc` at {when}; its registry row, metrics, report and predictions are kept")


def ensure_writable(status: str, is_champion: bool, model_version: str) -> None:
    if is_champion or status not in WRITABLE:
        raise VersionConflict(f"model version {model_version!r} is {status}: its artifacts are write-once after "
                              "promotion (train a new version instead)")


def record_trained(engine: sa.Engine, model_version: str, run_id: str, row: dict[str, Any]) -> None:
    """A trained version's row, written only by the run that claimed it and only while it is not promoted."""
    with engine.begin() as conn:
        written = conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                               .where(model_versions.c.run_id == run_id)
                               .where(model_versions.c.status.in_(WRITABLE))
                               .where(model_versions.c.is_champion == sa.false()).values(row)).rowcount
    if written != 1:
        raise VersionConflict(f"model version {model_version!r} changed owner or was promoted while run "
                              f"{run_id!r} trained it: its row was left as it was")


def _update(engine: sa.Engine, model_version: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(model_versions.update().where(model_versions.c.model_version == model_version).values(**values))


def record_metrics(engine: sa.Engine, model_version: str, metrics: dict[str, Any], metrics_uri: str) -> None:
    _update(engine, model_version, metrics=metrics, metrics_uri=metrics_uri)


def record_report(engine: sa.Engine, model_version: str, report_uri: str) -> None:
    _update(engine, model_version, report_uri=report_uri)


def record_gate(engine: sa.Engine, model_version: str, gate: dict[str, Any], passed: bool) -> None:
    """The gate's decision; a refusal makes the version `rejected` (a pass stays `candidate` until promoted)."""
    _update(engine, model_version, gate=gate, status="candidate" if passed else "rejected")


def mark_pruned(conn: sa.Connection, model_version: str, now: datetime) -> bool:
    """Record (in the caller's transaction) that `lesion gc` prunes the version's artifacts; False when it
    became the champion meanwhile (left alone). Marked once: a rerun keeps the first time."""
    row = conn.execute(sa.select(model_versions.c.is_champion, model_versions.c.artifacts_pruned_at)
                       .where(model_versions.c.model_version == model_version)).one()
    if row.is_champion:
        return False
    if row.artifacts_pruned_at is None:
        conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                     .values(artifacts_pruned_at=now))
    return True


def threshold_setter(review_rule: Mapping[str, Any], threshold: float | None) -> str | None:
    """Whose validation target set the pooled threshold: "pooled", a gated site whose stricter target it had to
    reach (`review_rule.threshold_by_source`), or None where the rule does not say."""
    targets = review_rule.get("threshold_by_source") or {}
    return next((name for name, value in sorted(targets.items(), key=lambda kv: kv[0] != "pooled")
                 if threshold is not None and abs(float(value) - float(threshold)) < 1e-12), None)


def _floor_checks(label: str, metrics: dict[str, Any], floors: GateFloors, note: str = "") -> tuple[bool, list[str]]:
    """The floors of one test split; `note` (which threshold applied, and what set it) follows the
    threshold-dependent ones."""
    passed, reasons = True, []
    for name, floor in (("mel_sensitivity", floors.mel_sensitivity), ("auc", floors.auc),
                        ("balanced_accuracy", floors.balanced_accuracy)):
        value = metrics.get(name)
        if value is None:  # undefined (e.g. a test split with one class): never a pass
            passed = False
            reasons.append(f"FAIL: {label} {name} is undefined on this test split (floor {bound(floor)})")
            continue
        ok = value >= floor
        passed &= ok
        at = f" ({note})" if note and name != "auc" else ""
        reasons.append(f"{'PASS' if ok else 'FAIL'}: {label} {name} {shown(value)} {'>=' if ok else '<'} floor {bound(floor)}{at}")
    return passed, reasons


def _evidence_checks(metrics: dict[str, Any], floors: GateFloors) -> tuple[bool, list[str]]:
    """Is there enough to decide on? Melanomas in test and validation (pooled), validation AUC above chance."""
    passed, reasons = True, []
    for split, name in (("test", "test"), ("val", "validation")):
        n = (metrics.get(split) or {}).get("n_mel")
        ok = n is not None and n >= floors.min_melanomas
        passed &= ok
        reasons.append(f"PASS: evidence: {n} melanomas in {name} (>= {floors.min_melanomas})" if ok else
                       f"FAIL: too little evidence: {n if n is not None else 'no'} melanomas in {name} "
                       f"(need >= {floors.min_melanomas})")
    val = metrics.get("val") or {}
    low = ((val.get("ci95") or {}).get("auc") or [None])[0]
    value, what = (low, "validation AUC 95% CI lower bound") if low is not None else (val.get("auc"), "validation AUC")
    ok = value is not None and value > floors.val_auc_above
    passed &= ok
    if value is None:
        reasons.append(f"FAIL: too little evidence: {what} is undefined")
    else:
        reasons.append(f"PASS: evidence: {what} {shown(value, up=True)} > {bound(floors.val_auc_above)} (chance)" if ok
                       else f"FAIL: too little evidence: {what} {shown(value, up=True)} <= {bound(floors.val_auc_above)} (chance)")
    return passed, reasons


def decide(metrics: dict[str, Any], comparison: dict[str, Any] | None, floors: GateFloors,
           version: ModelVersion | None = None) -> tuple[bool, list[str]]:
    """(passed, reasons): every evidence, floor and regression check, passed or failed, in words. Too
    little evidence (`_evidence_checks`) is never a pass. The floors apply to the pooled test split, to
    every site with at least MIN_SOURCE_MEL melanomas in test, and (with at least MIN_OUT_OF_SCOPE
    such test images) to the out-of-scope recall; the regression check vs the champion to the pooled test
    split and to each such site (`comparison["by_site"]`). With `version`, sensitivity and balanced accuracy
    say which threshold applied and whose target set it."""
    test = metrics["test"]
    passed, reasons = _evidence_checks(metrics, floors)
    pooled_note = version.threshold_note(None) if version is not None and version.threshold is not None else ""
    if pooled_note and test.get("thresholds_applied") == "per site":
        pooled_note = "each site at its own threshold where it has one, else " + pooled_note
    ok, more = _floor_checks("test", test, floors, pooled_note)
    passed &= ok
    reasons += more
    # per site (each at its own threshold where it has one; `by_source` in metrics from before sites)
    for source, part in sorted((test.get("by_site") or test.get("by_source") or {}).items()):
        if (part.get("n_mel") or 0) >= MIN_SOURCE_MEL:
            note = version.threshold_note(source) if version is not None and version.threshold is not None else ""
            ok, more = _floor_checks(f"test[{source}]", part, floors, note)
            passed &= ok
            reasons += more
    oos = (metrics.get("out_of_scope") or {}).get("test")
    if oos:
        for group, floor in (("all", floors.out_of_scope_flagged), ("malignant", floors.malignant_flagged)):
            part = oos[group]
            if part["n"] >= MIN_OUT_OF_SCOPE:
                ok = part["flagged"] >= floor
                passed &= ok
                reasons.append(f"{'PASS' if ok else 'FAIL'}: test out-of-scope ({group}, n={part['n']}) flagged "
                               f"{shown(part['flagged'])} {'>=' if ok else '<'} floor {bound(floor)}")
    if comparison is None:
        reasons.append("PASS: no champion to compare with")
    else:
        ok, more = _regression_checks("", comparison, comparison["champion"])
        passed &= ok
        reasons += more
        # no significant regression at any site with enough test melanomas of its own either
        for site, part in sorted((comparison.get("by_site") or {}).items()):
            ok, more = _regression_checks(f"test[{site}] ", part, comparison["champion"])
            passed &= ok
            reasons += more
    return passed, reasons


def _regression_checks(where: str, delta: dict[str, Any], champion: str) -> tuple[bool, list[str]]:
    """AUC and melanoma sensitivity vs the champion on the same cases: FAIL when the paired 95% interval of
    the difference lies wholly below 0, or when it is undefined."""
    passed, reasons = True, []
    for name in ("auc", "mel_sensitivity"):
        lo, hi = delta[f"{name}_delta_ci95"]
        if lo is None or hi is None or delta[f"{name}_delta"] is None:
            passed = False
            reasons.append(f"FAIL: {where}{name} vs champion {champion} is undefined on this test split")
            continue
        worse = hi < 0
        passed &= not worse
        reasons.append(f"{'FAIL' if worse else 'PASS'}: {where}{name} vs champion {champion} "
                       f"delta {shown(delta[f'{name}_delta'], sign=True)} (95% CI {shown(lo, sign=True)}.."
                       f"{shown(hi, sign=True)})"
                       f"{' significantly worse' if worse else ''}")
    return passed, reasons


def promote(engine: sa.Engine, model_version: str, reason: str, actor: str, override: bool = False) -> str | None:
    """Make `model_version` the champion; return the previous champion. Idempotent."""
    with engine.begin() as conn:
        current = champion(conn)
        if current and current["model_version"] == model_version:
            return current["model_version"]
        row = get(conn, model_version)
        if row["artifacts_pruned_at"] is not None:
            raise ValueError(f"{pruned_message(model_version, row['artifacts_pruned_at'])}: it cannot be promoted "
                             "(promote a version that still has its artifacts, or retrain)")
        previous = current["model_version"] if current else None
        if previous:
            conn.execute(model_versions.update().where(model_versions.c.model_version == previous)
                         .values(is_champion=False, status="retired"))
        conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                     .values(is_champion=True, status="champion"))
        conn.execute(champion_history.insert().values(
            model_version=model_version, event="override" if override else "promoted", previous=previous,
            reason=reason, actor=actor, at=datetime.now(UTC)))
    log.info("champion is now %s (was %s): %s", model_version, previous, reason)
    return previous
