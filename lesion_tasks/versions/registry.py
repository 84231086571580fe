"""The model registry (`model_versions`): a model version's record and champion promotion.

This module owns a model version: `ModelVersion` is the typed, frozen view every other module reads (its row
and recorded config are read by key here and nowhere else), with its review rule (`ReviewRule`) and each
site's threshold (`SiteThreshold`) typed too; every write of a `model_versions` row is one of its functions:
`claim`, `record_trained`, `record_metrics`, `record_report`, `record_gate`, `promote`, `mark_pruned`.
`resolve` is the one champion resolver. One champion at a time (a unique partial index); every promotion,
including a manual override, is recorded in `champion_history`. The gate that decides a promotion is
`assessment.gate`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.db import insert_ignore
from lesion_tasks.core.schema import champion_history, model_versions
from lesion_tasks.model.config import GateFloors
from lesion_tasks.model.mc import logit

log = logging.getLogger(__name__)

# "uncertain": more than this share of a case's MC samples on the other side of its threshold
REVIEW_DECISION_UNCERTAINTY = 0.3
# "near_threshold": |logit(p_mel) - logit(threshold)| at most this (relative: it follows a site's threshold)
NEAR_THRESHOLD_LOGIT = 0.15


@dataclass(frozen=True)
class SiteThreshold:
    """One site's entry of `thresholds_by_site` (DESIGN.md, "Sites"): the threshold applied there, chosen on the
    site's own labelled images ("site") or the pooled one ("pooled"), and the validation melanomas it rests on.
    A site's own also says how (`method`), whether IPW-weighted, and where cross-fitted its calibration
    (`calibration.applied`, a, b, and why) and its out-of-fold validation figures."""

    threshold: float
    chosen_on: str  # "site" | "pooled"
    n_mel: int
    method: str | None = None
    weighted: bool | None = None
    calibration: Mapping[str, Any] | None = None
    validation: Mapping[str, Any] | None = None
    # {"ids", "p"}: the out-of-fold p_mel of the site's labelled train+val images (cross-fitted, under the site's
    # own calibration where applied): what `sites.operating.evidence` scores them by, the version having trained on them
    out_of_fold: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.chosen_on not in ("site", "pooled"):
            raise ValueError(f"thresholds_by_site chosen_on {self.chosen_on!r}: expected 'site' or 'pooled'")

    @property
    def own(self) -> bool:
        return self.chosen_on == "site"

    @property
    def own_calibration(self) -> tuple[float, float] | None:
        """(a, b) of the site's own Platt scaling where retraining applied one, else None."""
        cal = self.calibration or {}
        return (float(cal["a"]), float(cal["b"])) if self.own and cal.get("applied") else None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> SiteThreshold:
        return cls(float(entry["threshold"]), entry["chosen_on"], int(entry.get("n_mel") or 0), entry.get("method"),
                   entry.get("weighted"), entry.get("calibration"), entry.get("validation"), entry.get("out_of_fold"))


@dataclass(frozen=True)
class ReviewRule:
    """Which cases of a version go to review, and the thresholds its cases are decided at (`review_rule`)."""

    predicted_mel: bool = True  # a MEL call goes to review
    # "uncertain": more than this share of MC samples across the case's threshold; None for versions trained
    # before that rule, which flag by entropy above `entropy_above`
    decision_uncertainty_above: float | None = None
    entropy_above: float | None = None
    attention_on_lesion_below: float | None = None  # a MEL call mostly off the lesion (Grad-CAM) is flagged
    out_of_scope_above: float | None = None  # p_other at or above it: out of scope; None: no out-of-scope head
    out_of_scope_validation_targets: Mapping[str, Any] | None = None
    # each validation target's threshold ("pooled", and every gated site's): the pooled threshold is their lowest
    threshold_by_target: Mapping[str, float] = field(default_factory=dict)
    thresholds_by_site: Mapping[str, SiteThreshold] = field(default_factory=dict)
    # "near_threshold" on the logit scale (None: versions from before it, ±0.05 in probability)
    near_threshold_logit: float | None = None
    # [(decision threshold, out-of-scope threshold)] ascending: the scope threshold chosen on validation OTHER
    # images for each decision threshold of a grid, for sites whose operating point moves (`sites.operating`)
    out_of_scope_by_threshold: tuple[tuple[float, float], ...] = ()
    out_of_scope_site_reference: float | None = None  # validation in-scope logit p_other quantile (model.scope.for_site)

    def near_threshold(self, p: float, threshold: float) -> bool:
        """Whether p(MEL) `p` is near `threshold`: within NEAR_THRESHOLD_LOGIT on the logit scale, so the band
        follows the threshold (around 0.05 it spans 0.044-0.057, around 0.5 0.463-0.537); versions from before
        that rule keep their ±0.05 in probability."""
        if self.near_threshold_logit is None:
            return max(0.0, threshold - 0.05) <= p <= min(1.0, threshold + 0.05)
        return abs(float(logit(p) - logit(threshold))) <= self.near_threshold_logit

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("predicted_mel", "decision_uncertainty_above", "entropy_above",
                                              "attention_on_lesion_below", "out_of_scope_above",
                                              "out_of_scope_validation_targets", "near_threshold_logit",
                                              "out_of_scope_site_reference")
               if getattr(self, k) is not None}
        if self.out_of_scope_by_threshold:
            out["out_of_scope_by_threshold"] = [list(pair) for pair in self.out_of_scope_by_threshold]
        return out | {"threshold_by_target": dict(self.threshold_by_target),
                      "thresholds_by_site": {s: t.to_json() for s, t in self.thresholds_by_site.items()}}

    @classmethod
    def from_json(cls, rule: Mapping[str, Any] | None) -> ReviewRule:
        rule = rule or {}
        return cls(bool(rule.get("predicted_mel", True)), rule.get("decision_uncertainty_above"), rule.get("entropy_above"),
                   rule.get("attention_on_lesion_below"), rule.get("out_of_scope_above"),
                   rule.get("out_of_scope_validation_targets"), dict(rule.get("threshold_by_target") or {}),
                   {s: SiteThreshold.from_json(t) for s, t in (rule.get("thresholds_by_site") or {}).items()},
                   rule.get("near_threshold_logit"),
                   tuple((float(t), float(o)) for t, o in rule.get("out_of_scope_by_threshold") or ()),
                   rule.get("out_of_scope_site_reference"))

    def setter(self, threshold: float | None) -> str | None:
        """Whose validation target set the pooled `threshold`: "pooled", a gated site whose stricter target it had
        to reach, or None where the rule does not say."""
        return next((name for name, value in sorted(self.threshold_by_target.items(), key=lambda kv: kv[0] != "pooled")
                     if threshold is not None and abs(float(value) - float(threshold)) < 1e-12), None)


@dataclass(frozen=True)
class ModelVersion:
    """A model version as every module but this one reads it: its row and recorded config, typed."""

    model_version: str
    status: str
    is_champion: bool
    profile: str
    backbone: str
    image_size: int
    threshold: float | None  # pooled decision threshold on calibrated p_mel
    mc_samples: int
    created_at: Any
    weights_source: str | None  # in words: which weights were used, fallbacks included
    weights_used: str  # the weights spec to resolve again ("none" for random initialisation)
    weights_sha256: str | None
    # why the version was not trained on the weights asked for (the demo profile's loud fallback), else None
    weights_fallback: str | None
    last_activation: str | None  # Grad-CAM's layer
    seed: int
    mc_seed: int | None  # None: masks per (version, image), for versions that recorded no seed
    bootstrap: int
    effective_resolution: int
    color_constancy: str
    precision: str  # the backbone's, in training (`model.precision`; "float32" for versions from before it)
    target_sensitivity: float | None
    floors: GateFloors
    floors_recorded: Mapping[str, Any]  # the floors as recorded (what the gate's record says it used)
    review_rule: ReviewRule
    lineage: Mapping[str, Any]
    config: Mapping[str, Any]  # the recorded config ({} while a claim trains), for display and lineage
    environment: Mapping[str, Any]
    metrics: Mapping[str, Any] | None
    gate: Mapping[str, Any] | None  # the gate's stored decision (`assessment.gate.Decision.from_json` reads it)
    metrics_uri: str | None
    model_uri: str | None
    report_uri: str | None
    artifacts_pruned_at: Any

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ModelVersion:
        """A row of `model_versions`; the columns a decision rests on are required, the rest (what is shown, and
        what a claim has not recorded yet) may be absent."""
        cfg = row.get("config") or {}
        lineage = row.get("lineage") or {}
        return cls(
            model_version=row["model_version"], status=row["status"], is_champion=bool(row["is_champion"]),
            profile=row.get("profile") or "", backbone=row["backbone"], image_size=row["image_size"],
            threshold=row["threshold"], mc_samples=row["mc_samples"], created_at=row.get("created_at"),
            weights_source=row.get("weights_source"), weights_used=cfg.get("weights_used", "none"),
            weights_sha256=row.get("weights_sha256"), weights_fallback=lineage.get("weights_fallback"),
            last_activation=cfg.get("last_activation"), seed=int(cfg.get("seed", 0)),
            mc_seed=None if cfg.get("mc_seed") is None else int(cfg["mc_seed"]),
            bootstrap=int(cfg.get("bootstrap", 0)), effective_resolution=int(cfg.get("effective_resolution", 0)),
            color_constancy=cfg.get("color_constancy", ""),
            precision=(lineage.get("backbone_precision") or {}).get("precision", "float32"),
            target_sensitivity=cfg.get("target_sensitivity"),
            floors=GateFloors(**cfg.get("floors", {})), floors_recorded=dict(cfg.get("floors") or {}),
            review_rule=ReviewRule.from_json(row.get("review_rule")), lineage=lineage, config=cfg,
            environment=row.get("environment") or {}, metrics=row.get("metrics"), gate=row.get("gate"),
            metrics_uri=row.get("metrics_uri"), model_uri=row.get("model_uri"), report_uri=row.get("report_uri"),
            artifacts_pruned_at=row.get("artifacts_pruned_at"))

    @property
    def thresholds_by_site(self) -> Mapping[str, SiteThreshold]:
        return self.review_rule.thresholds_by_site

    @property
    def scope_threshold(self) -> float | None:
        """p_other at or above which a case is out of scope; None: the version has no out-of-scope head."""
        return self.review_rule.out_of_scope_above

    def own_threshold(self, site: str | None) -> SiteThreshold | None:
        """`site`'s own threshold entry where retraining chose one on its labelled images, else None."""
        own = self.thresholds_by_site.get(site) if site is not None else None
        return own if own is not None and own.own else None

    def threshold_for(self, site: str | None) -> float:
        """The decision threshold applied at `site`: its own where retraining chose one on the site's
        labelled images (`chosen_on` "site"), else the pooled one."""
        own = self.own_threshold(site)
        return own.threshold if own else float(self.threshold)

    def threshold_note(self, site: str | None) -> str:
        """In words: the threshold `site`'s cases are decided at and which validation target set it."""
        own = self.own_threshold(site)
        if own:
            return f"at its own threshold {own.threshold:.4f}, chosen on its {own.n_mel} validation melanomas"
        setter = self.review_rule.setter(self.threshold)
        by = ("the pooled validation target" if setter in (None, "pooled") else
              "this site's target" if setter == site else f"site {setter}'s target")
        return f"at the pooled threshold {float(self.threshold):.4f}, set by {by}"

    def thresholds_for(self, sites: Sequence[str | None]) -> np.ndarray:
        return np.array([self.threshold_for(s) for s in sites], dtype=np.float64)

    def site_calibration(self, site: str | None) -> tuple[float, float] | None:
        """(a, b) of `site`'s own Platt scaling on top of the pooled one, where retraining applied one
        (`thresholds_by_site.<site>.calibration.applied`), else None."""
        own = self.own_threshold(site)
        return own.own_calibration if own else None

    def site_calibrations_for(self, sites: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray] | None:
        """Per case (a, b) of its site's own calibration (1, 0 where none), None where no case has one."""
        cals = [self.site_calibration(s) for s in sites]
        if not any(cals):
            return None
        return (np.array([c[0] if c else 1.0 for c in cals]), np.array([c[1] if c else 0.0 for c in cals]))


CHAMPION_NAMES = (None, "", "champion")  # what names the champion wherever a model version is asked for


def version(conn: sa.Connection, model_version: str | None, required: bool = True) -> ModelVersion | None:
    """The champion (`model_version` None, "" or "champion") or a version id, typed: the one resolver. With no
    champion yet: a ValueError saying what to do, or None when not `required`; an unknown id is always an error."""
    row = _resolve(conn, model_version, required)
    return None if row is None else ModelVersion.from_row(row)


def get(conn: sa.Connection, model_version: str) -> dict[str, Any]:
    """The row of `model_version` as stored (what a test or a migration checks); read it through `version`."""
    row = conn.execute(sa.select(model_versions).where(model_versions.c.model_version == model_version)).mappings().first()
    if row is None:
        raise ValueError(f"model version {model_version!r}: not in the registry")
    return dict(row)


def versions(conn: sa.Connection) -> list[ModelVersion]:
    """Every model version, typed, newest first (claims still training included)."""
    rows = conn.execute(sa.select(model_versions).order_by(model_versions.c.created_at.desc(),
                                                            model_versions.c.model_version)).mappings()
    return [ModelVersion.from_row(r) for r in rows]


def evaluated_ids(conn: sa.Connection) -> list[str]:
    """The ids of the versions with metrics, newest first (a filter menu: no row is read whole)."""
    return list(conn.scalars(sa.select(model_versions.c.model_version).where(model_versions.c.metrics.is_not(None))
                             .order_by(model_versions.c.created_at.desc())))


def _champion(conn: sa.Connection) -> dict[str, Any] | None:
    row = conn.execute(sa.select(model_versions).where(model_versions.c.is_champion)).mappings().first()
    return dict(row) if row else None


def _resolve(conn: sa.Connection, model_version: str | None, required: bool = True) -> dict[str, Any] | None:
    if model_version in CHAMPION_NAMES:
        row = _champion(conn)
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


def promote(engine: sa.Engine, model_version: str, reason: str, actor: str, override: bool = False) -> str | None:
    """Make `model_version` the champion; return the previous champion. Idempotent."""
    with engine.begin() as conn:
        current = _champion(conn)
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
