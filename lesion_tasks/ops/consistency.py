"""`lesion check`: does the database agree with the object store? One report of one home.

The store is listed once (one pass over every key, never one request per row: homes hold 100k+
images) and compared with the references the rows hold (store-relative keys, `store.key_of`).

Problems (any of them: `ok` false, exit code 1):
- `missing_*`: a row whose object is not in the store -- images' original and normalised copies,
  quarantined bytes (`quarantine.raw_uri` where it is a key under `drops/`; a zip bomb or a link
  is referred to inside its raw drop instead), drop manifests, model versions' model / report /
  metrics (a version pruned by `lesion gc` is not expected to have its model any more), Grad-CAM
  maps or overlays (where `gradcam_uri` is not NULL).
- `orphan_*`: an object no row refers to -- under `drops/` the original, normalised and quarantined
  bytes of finished drops (the CSV/JSON/text files under `aux/` and `manifest.json` belong to the drop
  itself; every object of a drop the database does not know is an orphan), `models/<version>/` of an
  unknown version, `predictions/<version>/gradcam/...` that no prediction refers to (an overlay PNG drawn
  from a referenced map, `lesion gradcam-url`, is that map's and not an orphan).
- predictions, reviews or MC samples of an unknown model version; predictions of an unknown image.
- a site's validation sample whose rows cannot come from one draw (`sites.sample.consistency`: ranks not
  0..n-1, or inclusion probabilities of more than one size measure or n): IPW figures would rest on them.
- ISIC-labelled images without a split although their drop finished before the latest split
  assignment (`splits.assign` gives every labelled image it reads a split, and it reads every drop
  finished before its `assigned_at`).

Warnings (reported, `ok` stays true): model versions claimed for training more than 24 h ago and
still `training` (a crashed run: its id is taken, nothing else); objects of drops still running or
failed (a rerun of `lesion ingest` finishes them); what an interrupted `lesion gc` left of a pruned
version (the next run deletes it).

Information: feature caches (objects and bytes per configuration, and the versions using each: they
are caches, never orphans), objects under other prefixes (`incoming/` holds arriving drops).
Run it when no ingestion or scoring is writing: their objects precede their rows by a moment.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core import keys
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import (
    drops,
    images,
    model_versions,
    prediction_samples,
    predictions,
    quarantine,
    reviews,
    splits,
)
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, key_of, open_store
from lesion_tasks.data.splits import SPLIT_LABELS
from lesion_tasks.ops.retention import TRAINING_GRACE, aware
from lesion_tasks.sites import sample
from lesion_tasks.versions import artifacts, registry

log = logging.getLogger(__name__)

PROBLEMS = ("missing_original", "missing_normalized", "missing_quarantined", "missing_manifest", "missing_model_artifact",
            "missing_gradcam", "orphan_drop_object", "orphan_model_object", "orphan_gradcam",
            "prediction_of_unknown_version", "review_of_unknown_version", "samples_of_unknown_version",
            "prediction_of_unknown_image", "labelled_image_without_split", "inconsistent_site_sample")
WARNINGS = ("stale_training_claim", "unfinished_drop_object", "gc_leftover")
MAX_EXAMPLES = 20
DROP_DATA = ("original", "normalized", "quarantine")  # what rows refer to under drops/<drop>/


class Findings:
    def __init__(self, max_examples: int):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[Any]] = defaultdict(list)
        self.max_examples = max_examples

    def add(self, kind: str, example: Any) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(example)

    def bulk(self, kind: str, count: int, examples: list[Any]) -> None:
        self.counts[kind] += count
        self.examples[kind].extend(examples[: self.max_examples - len(self.examples[kind])])


def _listing(store: ObjectStore) -> dict[str, dict[str, int]]:
    """{top-level prefix: {key: size}}: the whole store in one pass."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for o in store.list(""):
        out[o.key.split("/", 1)[0]][o.key] = o.size
    return out


def _key(store: ObjectStore, ref: str) -> str | None:
    try:
        return key_of(store, ref)
    except ValueError:  # an absolute URI of another store: it cannot be here
        return None


def _rows_vs_objects(conn: sa.Connection, store: ObjectStore, present: set[str], f: Findings) -> dict[str, set[str]]:
    """Rows whose object is missing; returns the keys the rows refer to, per top-level prefix."""
    referenced: dict[str, set[str]] = defaultdict(set)

    def expect(kind: str, ref: str, row: dict[str, Any]) -> None:
        key = _key(store, ref)
        if key is not None:
            referenced[key.split("/", 1)[0]].add(key)
        if key is None or key not in present:
            f.add(kind, {**row, "key": ref})

    for image_id, original, normalized in conn.execute(
            sa.select(images.c.image_id, images.c.original_uri, images.c.normalized_uri)):
        expect("missing_original", original, {"image_id": image_id})
        expect("missing_normalized", normalized, {"image_id": image_id})
    for qid, drop_id, raw in conn.execute(sa.select(quarantine.c.id, quarantine.c.drop_id, quarantine.c.raw_uri)
                                          .where(quarantine.c.raw_uri.is_not(None))):
        key = _key(store, raw)
        if key is not None and key.startswith("drops/"):  # else: inside the raw drop (zip bomb, link)
            expect("missing_quarantined", raw, {"quarantine_id": qid, "drop_id": drop_id})
    for drop_id, manifest in conn.execute(sa.select(drops.c.drop_id, drops.c.manifest_uri)
                                          .where(drops.c.manifest_uri.is_not(None))):
        expect("missing_manifest", manifest, {"drop_id": drop_id})
    for v in registry.versions(conn):
        for column in ("report_uri", "metrics_uri") + (("model_uri",) if v.artifacts_pruned_at is None else ()):
            if getattr(v, column):
                expect("missing_model_artifact", getattr(v, column), {"model_version": v.model_version, "column": column})
    for image_id, version, ref in conn.execute(
            sa.select(predictions.c.image_id, predictions.c.model_version, predictions.c.gradcam_uri)
            .where(predictions.c.gradcam_uri.is_not(None))):
        expect("missing_gradcam", ref, {"image_id": image_id, "model_version": version})
    return referenced


def _orphans(listing: dict[str, dict[str, int]], referenced: dict[str, set[str]], drop_status: dict[str, str],
             versions: dict[str, registry.ModelVersion], f: Findings) -> None:
    for key in listing.get("drops", {}):
        parts = key.split("/")
        drop_id, kind = parts[1], parts[2] if len(parts) > 3 else None
        if drop_id not in drop_status:
            f.add("orphan_drop_object", key)
        elif kind in DROP_DATA and key not in referenced["drops"]:
            f.add("orphan_drop_object" if drop_status[drop_id] == "complete" else "unfinished_drop_object", key)
    for key in listing.get("models", {}):
        version, _, name = key[len("models/"):].partition("/")
        row = versions.get(version)
        if row is None:
            f.add("orphan_model_object", key)
        elif row.artifacts_pruned_at is not None and name not in artifacts.KEPT_AFTER_PRUNING:
            f.add("gc_leftover", key)
    for key in listing.get("predictions", {}):
        drawn = key.endswith(".png") and key[: -len(".png")] + ".npy" in referenced["predictions"]
        if key not in referenced["predictions"] and not drawn:  # an overlay drawn from a referenced map is its cache
            version = keys.gradcam_version(key) or key.split("/")[1]
            pruned = version in versions and versions[version].artifacts_pruned_at is not None
            f.add("gc_leftover" if pruned else "orphan_gradcam", key)


def _unknown(conn: sa.Connection, f: Findings, kind: str, table: sa.Table, column: str, parent: sa.Table,
             parent_column: str, shown: tuple[str, ...]) -> None:
    """Rows of `table` whose `column` matches no `parent` row (counted and sampled in SQL)."""
    orphan = ~sa.exists().where(parent.c[parent_column] == table.c[column])
    count = conn.execute(sa.select(sa.func.count()).select_from(table).where(orphan)).scalar()
    if count:
        sample = conn.execute(sa.select(*(table.c[c] for c in shown)).where(orphan).limit(f.max_examples)).mappings()
        f.bulk(kind, count, [dict(r) for r in sample])


def _without_split(conn: sa.Connection, f: Findings) -> None:
    latest = sa.select(sa.func.max(splits.c.assigned_at)).scalar_subquery()
    query = (sa.select(images.c.image_id, images.c.drop_id, images.c.label)
             .join(drops, drops.c.drop_id == images.c.drop_id)
             .where(images.c.label.in_(SPLIT_LABELS), drops.c.finished_at.is_not(None), drops.c.finished_at < latest,
                    ~sa.exists().where(splits.c.image_id == images.c.image_id)))
    count = conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar()
    if count:
        sample = conn.execute(query.order_by(images.c.image_id).limit(f.max_examples)).mappings()
        f.bulk("labelled_image_without_split", count, [dict(r) for r in sample])


def check(settings: Settings, max_examples: int = MAX_EXAMPLES, now: datetime | None = None) -> dict[str, Any]:
    """The consistency report of one home (module doc); what `lesion check --json` prints."""
    now = now or datetime.now(UTC)
    store, engine = open_store(settings), engine_for(settings)
    f = Findings(max_examples)
    try:
        listing = _listing(store)
        present = {k for objects in listing.values() for k in objects}
        with engine.connect() as conn:
            referenced = _rows_vs_objects(conn, store, present, f)
            drop_status = dict(conn.execute(sa.select(drops.c.drop_id, drops.c.status)).all())
            versions = {v.model_version: v for v in registry.versions(conn)}
            for kind, table, shown in (("prediction_of_unknown_version", predictions, ("image_id", "model_version")),
                                       ("review_of_unknown_version", reviews, ("id", "image_id", "model_version")),
                                       ("samples_of_unknown_version", prediction_samples, ("image_id", "model_version"))):
                _unknown(conn, f, kind, table, "model_version", model_versions, "model_version", shown)
            _unknown(conn, f, "prediction_of_unknown_image", predictions, "image_id", images, "image_id",
                     ("image_id", "model_version"))
            _without_split(conn, f)
            for site, problem in sample.consistency(conn):
                f.add("inconsistent_site_sample", {"site": site, "problem": problem})
        _orphans(listing, referenced, drop_status, versions, f)
        for version, v in sorted(versions.items()):
            if v.status == "training" and aware(v.created_at) < now - TRAINING_GRACE:
                f.add("stale_training_claim", {"model_version": version, "claimed_at": aware(v.created_at).isoformat()})
    finally:
        engine.dispose()
    users: dict[str, list[str]] = defaultdict(list)
    for version, v in sorted(versions.items()):
        key = artifacts.feature_key(v)
        if key:
            users[key].append(version)
    features: dict[str, dict[str, Any]] = {}
    for key, size in listing.get("features", {}).items():
        config = key.split("/")[1]
        entry = features.setdefault(config, {"objects": 0, "bytes": 0, "used_by": users.get(config, [])})
        entry["objects"] += 1
        entry["bytes"] += size
    problems = {k: f.counts[k] for k in PROBLEMS}
    report = {"ok": not any(problems.values()), "problems": problems,
              "warnings": {k: f.counts[k] for k in WARNINGS},
              "examples": {k: v for k, v in f.examples.items() if v},
              "info": {"objects": len(present), "bytes": sum(sum(o.values()) for o in listing.values()),
                       "features": features,
                       "other_prefixes": {p: len(o) for p, o in sorted(listing.items())
                                          if p not in ("drops", "models", "predictions", "features")}}}
    log.info("check: %s", "consistent" if report["ok"] else f"{sum(problems.values())} problems: "
             + ", ".join(f"{k} {v}" for k, v in problems.items() if v))
    return report


def summary(report: dict[str, Any]) -> str:
    """The human lines of `lesion check`: one per finding kind, then the verdict."""
    lines = [f"  {kind:<32} {count}" for kind, count in report["problems"].items()]
    lines += [f"  {kind:<32} {count}  (warning)" for kind, count in report["warnings"].items()]
    for kind, examples in report["examples"].items():
        lines.append(f"  e.g. {kind}: {examples[0]}")
    info = report["info"]
    lines.append(f"  store: {info['objects']} objects, {info['bytes'] / 1e6:.1f} MB; feature caches: "
                 + (", ".join(f"{k} {v['objects']} objects {v['bytes'] / 1e6:.1f} MB" for k, v in info["features"].items())
                    or "none"))
    n = sum(report["problems"].values())
    lines.append("consistent" if report["ok"] else f"{n} problem{'s' if n != 1 else ''}")
    return "\n".join(lines)
