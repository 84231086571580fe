"""Retention (`lesion gc`): what old model versions may lose, and what never goes.

The rule:
- Rows stay. `model_versions` rows are never deleted (gate decisions, lineage, champion history,
  reviews and predictions refer to them: the audit trail), and `predictions` rows are never deleted
  (people query them with SQL). Nor is anything under `drops/` (ingested images), `incoming/`, or
  any other prefix.
- Kept, artifacts untouched: the champion; the N most recently created versions (`--keep-versions`,
  default 3, the champion may be one of them); a version in status `training` claimed less than
  24 h ago (a run in progress; an older claim is an abandoned run).
- Every other version is *pruned*: everything under `models/<version>/` except the small
  `report.html` and `metrics.json` (the model, head, out-of-scope head, figures, CSVs), and its
  Grad-CAM maps and overlays `predictions/<version>/gradcam/...`. Its predictions keep their numbers with
  `gradcam_uri` set to NULL, and `model_versions.artifacts_pruned_at` records when: from then on
  such a version can neither score nor be promoted (`artifacts.of` and `registry.promote` refuse,
  naming it), and `lesion check` does not expect its removed files.
- Feature caches: `features/<config>/` is deleted when no kept version was trained on that
  configuration (`lineage.feature_config`) -- never the champion's -- and not at all while a young
  `training` claim exists (its configuration is recorded only when its training ends).

Order: the rows first (pruning mark and NULL overlays, one transaction per version), then the
objects, so a crash half-way never leaves a row pointing at a deleted object; the next run deletes
what is left. A second run deletes nothing. `dry_run` computes the same plan and writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core import keys
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectInfo, ObjectStore, open_store
from lesion_tasks.versions import artifacts, registry

log = logging.getLogger(__name__)

KEEP_VERSIONS = 3
TRAINING_GRACE = timedelta(hours=24)  # a `training` claim older than this is an abandoned run
PROGRESS_EVERY_S = 5.0


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored in UTC): make them comparable with aware ones."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def young_claim(v: registry.ModelVersion, now: datetime) -> bool:
    return v.status == "training" and aware(v.created_at) > now - TRAINING_GRACE


def decide(versions: list[registry.ModelVersion], keep_versions: int, now: datetime) -> tuple[dict[str, list[str]], list[str]]:
    """({kept version: why}, [versions to prune]) for the registry's versions."""
    if keep_versions < 0:
        raise ValueError(f"--keep-versions {keep_versions}: expected 0 or more")
    newest = sorted(versions, key=lambda v: (aware(v.created_at), v.model_version), reverse=True)
    recent = {v.model_version for v in newest[:keep_versions]}
    kept: dict[str, list[str]] = {}
    prune: list[str] = []
    for v in newest:
        why = (["champion"] if v.is_champion else []) + (["recent"] if v.model_version in recent else []) \
            + (["training"] if young_claim(v, now) else [])
        if why:
            kept[v.model_version] = why
        else:
            prune.append(v.model_version)
    return kept, prune


def _doomed_model_files(store: ObjectStore, version: str) -> list[ObjectInfo]:
    prefix = keys.model_prefix(version)
    return [o for o in store.list(prefix) if o.key[len(prefix):] not in artifacts.KEPT_AFTER_PRUNING]


def _overlays(store: ObjectStore, version: str) -> list[ObjectInfo]:
    return list(store.list(keys.gradcam_prefix(version)))


def _feature_objects(store: ObjectStore) -> dict[str, list[ObjectInfo]]:
    by_key: dict[str, list[ObjectInfo]] = defaultdict(list)
    for o in store.list("features/"):
        by_key[o.key.split("/", 2)[1]].append(o)
    return dict(by_key)


def _tally(objects: list[ObjectInfo]) -> dict[str, int]:
    return {"objects": len(objects), "bytes": sum(o.size for o in objects)}


def _delete(store: ObjectStore, objects: list[ObjectInfo], what: str) -> None:
    """Delete `objects`, logging progress every few seconds (a pruned version may have 100k overlays)."""
    if not objects:
        return
    started = last = time.monotonic()
    done = 0
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="gc") as pool:
        for start in range(0, len(objects), 256):
            part = objects[start : start + 256]
            list(pool.map(lambda o: store.delete(o.key), part))
            done += len(part)
            if time.monotonic() - last >= PROGRESS_EVERY_S and done < len(objects):
                last = time.monotonic()
                log.info("gc: %s: deleted %d/%d objects (%.0f/s)", what, done, len(objects), done / (last - started))
    log.info("gc: %s: deleted %d objects (%.1f MB)", what, len(objects), sum(o.size for o in objects) / 1e6)


def _mark_pruned(engine: sa.Engine, version: str, now: datetime) -> tuple[bool, int]:
    """(still prunable, overlay references cleared): the rows' half of pruning one version. A version
    promoted meanwhile is left alone."""
    with engine.begin() as conn:
        if not registry.mark_pruned(conn, version, now):
            return False, 0
        cleared = conn.execute(predictions.update().where(predictions.c.model_version == version)
                               .where(predictions.c.gradcam_uri.is_not(None)).values(gradcam_uri=None)).rowcount
    return True, cleared


def collect_garbage(settings: Settings, keep_versions: int = KEEP_VERSIONS, dry_run: bool = False,
                    now: datetime | None = None) -> dict[str, Any]:
    """Apply the retention rule (module doc) to one home; what `lesion gc --json` prints."""
    now = now or datetime.now(UTC)
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            versions = registry.versions(conn)
            refs = dict(conn.execute(sa.select(predictions.c.model_version, sa.func.count())
                                     .where(predictions.c.gradcam_uri.is_not(None))
                                     .group_by(predictions.c.model_version)).all())
        kept, prune = decide(versions, keep_versions, now)
        by_version = {v.model_version: v for v in versions}
        deleted = {"models": {"objects": 0, "bytes": 0}, "gradcam": {"objects": 0, "bytes": 0},
                   "features": {"objects": 0, "bytes": 0}, "gradcam_refs_cleared": 0}
        newly = [v for v in prune if by_version[v].artifacts_pruned_at is None]
        for version in prune:
            if dry_run:
                cleared, go_on = refs.get(version, 0), True
            else:
                go_on, cleared = _mark_pruned(engine, version, now)
            if not go_on:
                log.warning("gc: %s was promoted meanwhile: left alone", version)
                continue
            models, overlays = _doomed_model_files(store, version), _overlays(store, version)
            for kind, objects in (("models", models), ("gradcam", overlays)):
                for k, v in _tally(objects).items():
                    deleted[kind][k] += v
            deleted["gradcam_refs_cleared"] += cleared
            if not dry_run:
                _delete(store, models, f"model {version} artifacts")
                _delete(store, overlays, f"model {version} Grad-CAM overlays")
        features, cached = _plan_features(store, versions, kept, now)
        for key in features["dropped"]:
            objects = cached[key]
            for k, v in _tally(objects).items():
                deleted["features"][k] += v
            if not dry_run:
                _delete(store, objects, f"feature cache {key}")
        deleted["objects"] = sum(deleted[k]["objects"] for k in ("models", "gradcam", "features"))
        deleted["bytes"] = sum(deleted[k]["bytes"] for k in ("models", "gradcam", "features"))
    finally:
        engine.dispose()
    result = {"dry_run": dry_run, "keep_versions": keep_versions, "kept": kept, "pruned": prune,
              "newly_pruned": newly, "deleted": deleted, "feature_configs": features}
    log.info("gc%s: kept %s; pruned %s; %s %d objects (%.1f MB)", " (dry run)" if dry_run else "", kept, prune,
             "would delete" if dry_run else "deleted", deleted["objects"], deleted["bytes"] / 1e6)
    return result


def _plan_features(store: ObjectStore, versions: list[registry.ModelVersion], kept: dict[str, list[str]],
                   now: datetime) -> tuple[dict[str, Any], dict[str, list[ObjectInfo]]]:
    """({"kept": [config keys], "dropped": [config keys], "note"}, the cache's objects by config key):
    caches no kept version uses go."""
    cached = _feature_objects(store)
    present = sorted(cached)
    if any(young_claim(v, now) for v in versions):
        return {"kept": present, "dropped": [], "note": "a training run is in progress (its feature configuration is "
                                                        "recorded only when it ends): feature caches left alone"}, cached
    used = {artifacts.feature_key(v) for v in versions if v.model_version in kept} - {None}
    return {"kept": [k for k in present if k in used], "dropped": [k for k in present if k not in used], "note": None}, cached


def summary(result: dict[str, Any]) -> str:
    """The human lines of `lesion gc`."""
    d = result["deleted"]
    verb = "would delete" if result["dry_run"] else "deleted"
    kept = ", ".join(f"{v} ({'+'.join(why)})" for v, why in result["kept"].items()) or "none"
    lines = [f"gc{' (dry run: nothing deleted)' if result['dry_run'] else ''}: keep the champion, the "
             f"{result['keep_versions']} newest versions and training runs younger than 24 h",
             f"  kept     {kept}",
             f"  pruned   {', '.join(result['pruned']) or 'none'}"
             + (f" (newly: {', '.join(result['newly_pruned'])})" if result["newly_pruned"] else ""),
             f"  {verb} {d['objects']} objects, {d['bytes'] / 1e6:.1f} MB: model artifacts {d['models']['objects']}, "
             f"Grad-CAM overlays {d['gradcam']['objects']} ({d['gradcam_refs_cleared']} references cleared), "
             f"feature caches {d['features']['objects']}",
             f"  feature configs dropped: {', '.join(result['feature_configs']['dropped']) or 'none'}"]
    if result["feature_configs"]["note"]:
        lines.append(f"  note: {result['feature_configs']['note']}")
    return "\n".join(lines)
