"""Ingest one ISIC drop: validate every file and row, accept or quarantine each with a reason code.

Guarantees:
- nothing is lost: accepted originals, their normalised copies, quarantined raw bytes and the drop's
  CSV/JSON/text files all go to the store under `drops/<drop_id>/`, plus a manifest of every entry;
- idempotent: entries already recorded for the drop are skipped, objects have deterministic keys and
  rows are inserted with ON CONFLICT DO NOTHING, so a crash mid-drop followed by a rerun ends in the
  same state as one clean run, and a rerun of a finished drop changes nothing;
- bounded memory: images are read, checked, written and recorded one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core import keys
from lesion_tasks.core.db import engine_for, insert_ignore
from lesion_tasks.core.reasons import DUPLICATE_REASONS, Reason
from lesion_tasks.core.schema import drops, images, quarantine
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, StoreError, open_store
from lesion_tasks.ingest import labels as lbl
from lesion_tasks.ingest.entries import Examined, Plan, entry_key, examine, plan, valid_image_id
from lesion_tasks.ingest.images import Accepted, Rejected
from lesion_tasks.ingest.neardup import NearDupIndex
from lesion_tasks.ingest.sources import (
    DropSource,
    Entry,
    Limits,
    SiteConflict,
    layout_site,
    open_source,
    read_site_file,
    resolve_site,
    stored_site,
)

log = logging.getLogger(__name__)

@dataclass
class IngestResult:
    drop_id: str
    source: str
    layout: str
    site: str = ""
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    already_ingested: int = 0  # entries recorded by an earlier run of this drop and skipped now
    totals: dict[str, Any] = field(default_factory=dict)  # the drop's state after this run

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _DropIngestion:
    """State of one run over one drop. Use `ingest()`."""

    def __init__(self, src: DropSource, drop_id: str, settings: Settings, store: ObjectStore, engine: sa.Engine,
                 limits: Limits, workers: int, batch_size: int, site: str):
        self.src, self.drop_id, self.settings, self.store, self.engine = src, drop_id, settings, store, engine
        self.site = site
        self.limits, self.workers, self.batch_size = limits, workers, batch_size
        self.size = settings.image_size
        self.now = datetime.now(UTC)
        self.seen_sha: dict[str, str] = {}
        self.seen_ids: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.label_counts: Counter[str] = Counter()
        # this run's writes are bounded by the drop's own size: a small archive cannot fill the store
        self.budget = limits.write_budget(src.nbytes)
        self.written = 0

    def _spend(self, n: int) -> bool:
        """Whether `n` more bytes fit in the drop's write budget (and count them when they do)."""
        if self.written + n > self.budget:
            return False
        self.written += n
        return True

    def _raw_location(self, name: str) -> str:
        return f"{self.src.uri}!{name}"

    def _merged(self, image_id: str) -> lbl.Merged:
        return lbl.merge(image_id, self.plan.evidence.get(image_id, []))

    def run(self, entries: list[Entry], fingerprint: str) -> IngestResult:
        self.plan: Plan = plan(self.src, entries, self.limits)
        result = IngestResult(self.drop_id, self.src.uri, self.plan.layout, self.site)
        with self.engine.begin() as conn:
            insert_ignore(conn, drops, [{
                "drop_id": self.drop_id, "source": self.src.uri, "layout": self.plan.layout,
                "fingerprint": fingerprint, "status": "running", "n_entries": len(entries), "started_at": self.now,
                "site": self.site,
            }], ["drop_id"])
            done = set(conn.scalars(sa.select(images.c.source_entry).where(images.c.drop_id == self.drop_id)))
            done |= set(conn.scalars(sa.select(quarantine.c.entry).where(quarantine.c.drop_id == self.drop_id)))
            self.index = self._load_index(conn)
        result.already_ingested = len(done)
        self._copy_aux(done)
        self._quarantine_rows_without_images(done)
        todo = [e for e in self.plan.images if entry_key(e.name) not in done]
        log.info("drop %s: %d entries, %d image files (%d already recorded), layout %s",
                 self.drop_id, len(entries), len(self.plan.images), len(self.plan.images) - len(todo), self.plan.layout)
        started = last_log = time.monotonic()
        processed = 0
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ingest") as pool:
            for batch in _chunks(todo, self.batch_size):
                self._batch(pool, batch)
                processed += len(batch)
                now = time.monotonic()
                if now - last_log < 5 and processed < len(todo):
                    continue
                last_log, rate = now, processed / max(now - started, 1e-9)
                log.info("drop %s: %s", self.drop_id, self.progress(processed, len(todo), rate))
        result.accepted = self.counts.pop("accepted", 0)  # (the counts' keys are reasons from here on)
        result.duplicates = sum(self.counts[r] for r in DUPLICATE_REASONS)
        result.quarantined = sum(self.counts.values()) - result.duplicates
        result.reasons = dict(sorted(self.counts.items()))
        result.labels = dict(sorted(self.label_counts.items()))
        result.totals = self._finish()
        return result

    def _load_index(self, conn: sa.Connection) -> NearDupIndex:
        index = NearDupIndex()
        rows = conn.execute(sa.select(images.c.image_id, images.c.phash, images.c.near_dup_group, images.c.lesion_id,
                                      images.c.drop_id).order_by(images.c.ingested_at, images.c.image_id))
        for image_id, phash, group, lesion_id, drop_id in rows:
            label = self._merged(image_id).near_dup_label if drop_id == self.drop_id else None
            index.add(int(phash, 16), group, lesion_id, label)
        return index

    def _copy_aux(self, done: set[str]) -> None:
        rows = [self._qrow(name, reason, detail) for name, (reason, detail) in self.plan.bad_aux.items()
                if entry_key(name) not in done]
        copied = []
        for e in self.plan.aux:
            if entry_key(e.name) in done:  # recorded over budget by an earlier run
                continue
            if self._spend(e.size):
                self.store.put(keys.aux(self.drop_id, e.name), self.src.read(e, self.limits.max_bytes))
                copied.append(e)
            else:
                rows.append(self._qrow(e.name, Reason.WRITE_BUDGET, self._over_budget(e.size),
                                       raw_uri=self._raw_location(e.name)))
        self.plan.aux = copied
        self._record([], rows)

    def _over_budget(self, size: int) -> str:
        return (f"{size} bytes not copied: the drop may write {self.budget} bytes "
                f"({self.limits.write_factor:g}x its {self.src.nbytes} + {self.limits.write_allowance}) and wrote "
                f"{self.written}; the bytes stay in the raw drop {self.src.uri}")

    def _quarantine_rows_without_images(self, done: set[str]) -> None:
        stems = {PurePosixPath(e.name).stem for e in self.plan.images}
        rows = []
        for image_id, items in sorted(self.plan.evidence.items()):
            if image_id in stems:
                continue
            for source in dict.fromkeys(ev.source for ev in items):
                entry = f"{source}#{image_id}"
                if entry_key(entry) not in done:
                    rows.append(self._qrow(entry, Reason.MISSING_IMAGE, f"{source} has a row for {image_id} but the drop has no such image", image_id=image_id))
        self._record([], rows)

    def _qrow(self, entry: str, reason: Reason, detail: str, image_id: str | None = None, sha: str | None = None,
              raw_uri: str | None = None) -> dict[str, Any]:
        self.counts[str(reason)] += 1
        return {"drop_id": self.drop_id, "entry": entry_key(entry), "reason": str(reason), "detail": detail[:2000],
                "image_id": image_id if valid_image_id(image_id) else None, "sha256": sha,
                "raw_uri": raw_uri, "quarantined_at": self.now}

    def progress(self, processed: int, total: int, rate: float) -> str:
        """The progress line, in the result's own terms: duplicates are not counted as quarantined."""
        duplicates = sum(self.counts.get(r, 0) for r in DUPLICATE_REASONS)
        quarantined = sum(v for k, v in self.counts.items() if k != "accepted") - duplicates
        return (f"{processed}/{total} images (accepted {self.counts.get('accepted', 0)}, duplicates {duplicates}, "
                f"quarantined {quarantined}) {rate:.0f} images/s")

    def _batch(self, pool: ThreadPoolExecutor, batch: Sequence[Entry]) -> None:
        examined = list(pool.map(lambda e: examine(self.src, e, self.limits, self.size), batch))
        shas = [ex.sha256 for ex in examined if ex.sha256]
        ids = [ex.image_id for ex in examined]
        with self.engine.connect() as conn:
            known_sha = dict(conn.execute(sa.select(images.c.sha256, images.c.image_id).where(images.c.sha256.in_(shas))).all())
            known_ids = dict(conn.execute(sa.select(images.c.image_id, images.c.sha256).where(images.c.image_id.in_(ids))).all())
        rows: dict[str, list[dict]] = {"image": [], "quarantine": []}
        writes: list[tuple[str, bytes, str]] = []
        for ex in examined:
            kind, row, objects = self._decide(ex, known_sha, known_ids)
            rows[kind].append(row)
            writes.extend(objects)
        # objects first, rows second: a crash in between leaves only objects that a rerun rewrites
        list(pool.map(lambda kd: self.store.put(*kd), writes))
        self._record(rows["image"], rows["quarantine"])

    def _decide(self, ex: Examined, known_sha: dict[str, str], known_ids: dict[str, str]):
        """("image" | "quarantine", row, [(key, bytes, content type)]) for one entry, in drop order."""
        name, image_id = ex.entry.name, ex.image_id

        def reject(reason: Reason, detail: str):
            key = keys.quarantined(self.drop_id, name)
            if ex.data is None:  # zip bomb or link: the bytes stay only inside the raw drop
                return "quarantine", self._qrow(name, reason, detail, image_id, ex.sha256, self._raw_location(name)), []
            if not self._spend(len(ex.data)):  # recorded (name, size, sha256, reason), the bytes left where they are
                detail = f"{detail}; {self._over_budget(len(ex.data))}"
                return "quarantine", self._qrow(name, reason, detail, image_id, ex.sha256, self._raw_location(name)), []
            row = self._qrow(name, reason, detail, image_id, ex.sha256, key)
            return "quarantine", row, [(key, ex.data, "application/octet-stream")]

        if ex.entry.problem:
            return reject(*ex.entry.problem)
        if not valid_image_id(image_id):
            return reject(Reason.INVALID_IMAGE_ID, f"file name {PurePosixPath(name).name!r}: expected an id of letters, digits, '_', '.', '-'")
        if isinstance(ex.check, Rejected):
            return reject(ex.check.reason, ex.check.detail)
        first = self.seen_sha.get(ex.sha256) or known_sha.get(ex.sha256)
        if first:
            return reject(Reason.DUPLICATE, f"same sha256 as image {first}")
        if image_id in self.seen_ids or image_id in known_ids:
            return reject(Reason.IMAGE_ID_CONFLICT, f"image id {image_id} already used by an image with different bytes")
        merged = self._merged(image_id)
        if merged.problem:
            return reject(*merged.problem)
        check: Accepted = ex.check
        if not self._spend(len(ex.data) + len(check.normalized)):
            return reject(Reason.WRITE_BUDGET, f"a valid image of {len(ex.data)} bytes")
        self.seen_sha[ex.sha256] = image_id
        self.seen_ids[image_id] = ex.sha256
        suffix = PurePosixPath(name).suffix
        original_key = keys.original(self.drop_id, image_id, suffix)
        normalized_key = keys.normalized(self.drop_id, self.size, image_id)
        group = self.index.assign(image_id, check.phash, merged.lesion_id, merged.near_dup_label)
        self.counts["accepted"] += 1
        self.label_counts[merged.label or "unlabelled"] += 1
        metadata = dict(merged.metadata)
        if merged.near_dup_label:
            metadata["near_dup_label"] = merged.near_dup_label
        row = {
            "image_id": image_id, "drop_id": self.drop_id, "site": self.site, "source_entry": name, "sha256": ex.sha256,
            "label": merged.label, "diagnosis": merged.diagnosis, "label_source": (merged.label_source or "")[:128] or None,
            "lesion_id": merged.lesion_id, "patient_id": merged.patient_id, "near_dup_group": group,
            "phash": f"{check.phash:016x}", "width": check.width, "height": check.height, "n_bytes": len(ex.data),
            "format": check.format, "conversions": ",".join(check.conversions) or None,
            "original_uri": original_key, "normalized_uri": normalized_key,
            "normalized_size": self.size, "metadata": metadata or None, "ingested_at": self.now,
        }
        return "image", row, [(original_key, ex.data, "application/octet-stream"),
                              (normalized_key, check.normalized, "image/jpeg")]

    def _record(self, image_rows: list[dict], quarantine_rows: list[dict]) -> None:
        with self.engine.begin() as conn:
            insert_ignore(conn, images, image_rows, ["image_id"])
            insert_ignore(conn, quarantine, quarantine_rows, ["drop_id", "entry"])

    def _finish(self) -> dict[str, Any]:
        """Record the drop's totals and manifest (both derived from the database, so reruns agree)."""
        with self.engine.connect() as conn:
            accepted = conn.execute(sa.select(images.c.source_entry, images.c.image_id).where(images.c.drop_id == self.drop_id)).all()
            rejected = conn.execute(sa.select(quarantine.c.entry, quarantine.c.reason, quarantine.c.image_id).where(quarantine.c.drop_id == self.drop_id)).all()
        reasons = dict(sorted(Counter(r.reason for r in rejected).items()))
        duplicates = sum(n for r, n in reasons.items() if r in DUPLICATE_REASONS)
        manifest = {
            "drop_id": self.drop_id, "source": self.src.uri, "layout": self.plan.layout,
            "entries": sorted(
                [{"entry": e, "outcome": "accepted", "image_id": i} for e, i in accepted]
                + [{"entry": e, "outcome": "quarantined", "reason": r, "image_id": i} for e, r, i in rejected]
                + [{"entry": e.name, "outcome": "auxiliary", "key": keys.aux(self.drop_id, e.name)} for e in self.plan.aux]
                + [{"entry": e.name, "outcome": "ignored"} for e in self.plan.ignored],
                key=lambda d: d["entry"]),
        }
        manifest_uri = self.store.put(keys.manifest(self.drop_id), json.dumps(manifest, indent=1).encode(), "application/json")
        totals = {"accepted": len(accepted), "quarantined": len(rejected) - duplicates, "duplicates": duplicates, "reasons": reasons}
        with self.engine.begin() as conn:
            conn.execute(drops.update().where(drops.c.drop_id == self.drop_id).values(
                status="complete", layout=self.plan.layout, n_entries=len(manifest["entries"]), reasons=reasons,
                accepted=totals["accepted"], quarantined=totals["quarantined"], duplicates=duplicates,
                manifest_uri=manifest_uri, finished_at=datetime.now(UTC), error=None))
        return totals


def ingest(
    source: str,
    settings: Settings,
    drop_id: str | None = None,
    limits: Limits | None = None,
    site: str | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    store: ObjectStore | None = None,
) -> IngestResult:
    """Ingest the drop at `source` (local folder or .zip, or a folder/.zip in the store), from `site`
    (else its `site.txt`, else the store layout `incoming/<site>/<drop>`, else the drop id)."""
    limits = limits or Limits()
    store = store or open_store(settings)
    engine = engine_for(settings)
    src = open_source(source, store, limits)
    try:
        entries = src.entries()
        layout = layout_site(source)
        drop_id = keys.slug(drop_id, "--drop-id") if drop_id else keys.drop_key(*(layout or (src.name,)))
        site = resolve_site(site, read_site_file(src, entries), layout[0] if layout else None, drop_id)
        fingerprint = hashlib.sha256("\n".join(f"{e.name}\t{e.size}" for e in entries).encode()).hexdigest()
        with engine.connect() as conn:
            site = stored_site(conn, site)  # names that differ only by case are one site: its first spelling
            existing = conn.execute(sa.select(drops).where(drops.c.drop_id == drop_id)).mappings().first()
        if existing and existing["fingerprint"] != fingerprint:
            raise ValueError(
                f"drop id {drop_id!r} was already used for {existing['source']} with different content "
                f"(fingerprint {existing['fingerprint'][:12]} != {fingerprint[:12]}): pass another --drop-id"
            )
        if existing and existing.get("site") not in (None, site):
            raise SiteConflict(f"site_conflict: drop {drop_id!r} was ingested from site {existing['site']!r}, "
                               f"now named {site!r}: pass the same site or another --drop-id")
        if existing and existing["status"] == "complete":
            log.info("drop %s: already ingested completely from %s, nothing to do", drop_id, existing["source"])
            totals = {k: existing[k] for k in ("accepted", "quarantined", "duplicates")} | {"reasons": existing["reasons"] or {}}
            return IngestResult(drop_id, src.uri, existing["layout"], site, already_ingested=existing["n_entries"], totals=totals)
        run = _DropIngestion(src, drop_id, settings, store, engine, limits,
                             workers or min(4, 2 * (os.cpu_count() or 1)), batch_size, site)
        try:
            return run.run(entries, fingerprint)
        except Exception as exc:
            _mark_failed(engine, drop_id, exc)
            raise
    finally:
        src.close()
        engine.dispose()


def _mark_failed(engine: sa.Engine, drop_id: str, exc: Exception) -> None:
    """Record why a drop failed (a rerun resumes it: entries already recorded are skipped)."""
    reason = f"{type(exc).__name__}: {exc}"[:2000]
    log.error("drop %s FAILED: %s", drop_id, reason)
    try:
        with engine.begin() as conn:
            conn.execute(drops.update().where(drops.c.drop_id == drop_id)
                         .values(status="failed", error=reason, finished_at=datetime.now(UTC)))
    except sa.exc.SQLAlchemyError as db_exc:  # the database itself is what failed: the original error counts
        log.warning("drop %s: could not record the failure (%s)", drop_id, db_exc)


# the object store or the database is unreachable: worth a retry, not a verdict on the drop
INFRASTRUCTURE_ERRORS = (StoreError, sa.exc.OperationalError, sa.exc.InterfaceError)


def ingest_one_of_many(source: str, settings: Settings) -> dict[str, Any]:
    """One drop of a scheduled run: the drop's result, or `{"drop_id", "source", "failed": reason}`
    when the drop itself is bad (recorded as `failed` on the drop), so that one drop never blocks
    the others. An unreachable store or database is raised (the scheduler retries)."""
    try:
        return ingest(source, settings).as_json()
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad drop: recorded, reported, the others go on
        log.exception("drop %s failed", source)
        return {"drop_id": None, "source": source, "failed": f"{type(exc).__name__}: {exc}"[:2000],
                "accepted": 0, "quarantined": 0, "duplicates": 0, "reasons": {}}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over several drops' `IngestResult.as_json()` (and `ingest_one_of_many` failures)."""
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r.get("reasons") or {})
    return {
        "drops": [r["drop_id"] for r in results if not r.get("failed")],
        "failed": {r["source"]: r["failed"] for r in results if r.get("failed")},
        "accepted": sum(r["accepted"] for r in results),
        "quarantined": sum(r["quarantined"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "reasons": dict(sorted(reasons.items())),
    }
