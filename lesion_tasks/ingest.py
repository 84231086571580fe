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
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

import sqlalchemy as sa

from lesion_tasks import labels as lbl
from lesion_tasks.db import engine_for, insert_ignore
from lesion_tasks.images import Accepted, Rejected, inspect_image
from lesion_tasks.neardup import NearDupIndex
from lesion_tasks.reasons import DUPLICATE_REASONS, Reason
from lesion_tasks.schema import drops, images, quarantine
from lesion_tasks.settings import Settings
from lesion_tasks.sources import INCOMING_PREFIX, DropSource, Entry, EntryTooLarge, Limits, open_source
from lesion_tasks.store import ObjectStore, open_store

log = logging.getLogger(__name__)

IMAGE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TEXT_SUFFIXES = {".csv", ".json", ".txt", ".md", ".html", ".pdf", ".tsv", ".xml", ".yaml", ".yml"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "_READY"}
READY_MARKER = "_READY"
ARCHIVE_SIGNATURES = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"),
                      (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"), (b"BZh", "bzip2"))
MAX_ENTRY_LENGTH = 512  # quarantine.entry is indexed: Postgres caps index rows at ~2.7 kB


@dataclass
class IngestResult:
    drop_id: str
    source: str
    layout: str
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    already_ingested: int = 0  # entries recorded by an earlier run of this drop and skipped now
    totals: dict[str, Any] = field(default_factory=dict)  # the drop's state after this run

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Examined:
    entry: Entry
    image_id: str
    data: bytes | None = None
    sha256: str | None = None
    check: Accepted | Rejected | None = None


@dataclass
class _Plan:
    images: list[Entry]
    aux: list[Entry]
    ignored: list[Entry]
    evidence: dict[str, list[lbl.Evidence]]
    bad_aux: dict[str, tuple[Reason, str]]  # aux entries that are themselves invalid (unreadable CSV)
    layout: str


def slug(name: str) -> str:
    """A drop id from a folder or file name."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:128]
    if not out:
        raise ValueError(f"drop name {name!r}: cannot derive a drop id, pass --drop-id")
    return out


def _safe_segment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip(".") or "_"


def _quarantine_key(drop_id: str, entry: str) -> str:
    digest = hashlib.sha256(entry.encode()).hexdigest()[:10]
    return f"drops/{drop_id}/quarantine/{digest}-{_safe_segment(PurePosixPath(entry).name)}"


def _aux_key(drop_id: str, entry: str) -> str:
    return f"drops/{drop_id}/aux/" + "/".join(_safe_segment(p) for p in PurePosixPath(entry).parts)


def _entry_key(name: str) -> str:
    """How an entry is recorded: names past MAX_ENTRY_LENGTH are cut, with a hash to stay unique."""
    if len(name) <= MAX_ENTRY_LENGTH:
        return name
    return name[: MAX_ENTRY_LENGTH - 20] + "..." + hashlib.sha256(name.encode()).hexdigest()[:16]


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _plan(src: DropSource, entries: list[Entry], limits: Limits) -> _Plan:
    """Sort entries into images, auxiliary files and ignored junk; read the label sources."""
    image_entries, aux, ignored = [], [], []
    for e in entries:
        parts = PurePosixPath(e.name).parts
        base = parts[-1] if parts else e.name
        if e.problem is None and (base in IGNORED_NAMES or base.startswith(".") or "__MACOSX" in parts):
            ignored.append(e)
        elif e.problem is None and ("licenses" in (p.lower() for p in parts[:-1]) or PurePosixPath(base).suffix.lower() in TEXT_SUFFIXES):
            aux.append(e)
        else:
            image_entries.append(e)
    stems = {PurePosixPath(e.name).stem for e in image_entries}
    evidence: dict[str, list[lbl.Evidence]] = defaultdict(list)
    bad_aux: dict[str, tuple[Reason, str]] = {}
    kinds: set[str] = set()
    for e in aux:
        suffix = PurePosixPath(e.name).suffix.lower()
        if suffix not in (".csv", ".json"):
            continue
        try:
            data = src.read(e, limits.max_bytes)
        except EntryTooLarge:
            bad_aux[e.name] = (Reason.FILE_TOO_LARGE, f"{e.name}: more than {limits.max_bytes} bytes")
            continue
        if suffix == ".csv":
            try:
                kind, rows = lbl.read_csv(e.name, data)
            except ValueError as exc:
                bad_aux[e.name] = (Reason.INVALID_METADATA, str(exc))
                continue
            if kind:
                kinds.add(kind)
                for ev in rows:
                    evidence[ev.image_id].append(ev)
        elif PurePosixPath(e.name).stem in stems:
            kinds.add("json-sidecars")
            ev = lbl.read_sidecar(e.name, data, PurePosixPath(e.name).stem)
            evidence[ev.image_id].append(ev)
    return _Plan(image_entries, aux, ignored, dict(evidence), bad_aux, "+".join(sorted(kinds)) or "images-only")


def _examine(src: DropSource, entry: Entry, limits: Limits, size: int) -> _Examined:
    """Read and check one image entry (runs in a worker thread)."""
    image_id = PurePosixPath(entry.name).stem
    ex = _Examined(entry, image_id)
    if entry.problem and entry.problem[0] == Reason.ZIP_BOMB:
        return ex  # never expand it
    try:
        ex.data = src.read(entry, limits.max_bytes)
    except EntryTooLarge:
        ex.check = Rejected(Reason.FILE_TOO_LARGE, f"more than {limits.max_bytes} bytes")
        return ex
    except OSError as exc:  # e.g. a symbolic link, which sources refuse to follow
        if entry.problem is None:
            raise
        log.debug("not reading %s: %s", entry.name, exc)
        return ex
    ex.sha256 = hashlib.sha256(ex.data).hexdigest()
    archive = next((kind for magic, kind in ARCHIVE_SIGNATURES if ex.data.startswith(magic)), None)
    if archive is None and ex.data[257:262] == b"ustar":
        archive = "tar"
    if archive:
        ex.check = Rejected(Reason.NESTED_ARCHIVE, f"a {archive} archive inside the drop: not expanded")
    elif entry.problem is None and IMAGE_ID_RE.match(image_id):
        ex.check = inspect_image(ex.data, limits, size)
    return ex


class _DropIngestion:
    """State of one run over one drop. Use `ingest()`."""

    def __init__(self, src: DropSource, drop_id: str, settings: Settings, store: ObjectStore, engine: sa.Engine,
                 limits: Limits, workers: int, batch_size: int):
        self.src, self.drop_id, self.settings, self.store, self.engine = src, drop_id, settings, store, engine
        self.limits, self.workers, self.batch_size = limits, workers, batch_size
        self.size = settings.image_size
        self.now = datetime.now(UTC)
        self.seen_sha: dict[str, str] = {}
        self.seen_ids: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.label_counts: Counter[str] = Counter()

    def _merged(self, image_id: str) -> lbl.Merged:
        return lbl.merge(image_id, self.plan.evidence.get(image_id, []))

    def run(self, entries: list[Entry], fingerprint: str) -> IngestResult:
        self.plan = _plan(self.src, entries, self.limits)
        result = IngestResult(self.drop_id, self.src.uri, self.plan.layout)
        with self.engine.begin() as conn:
            insert_ignore(conn, drops, [{
                "drop_id": self.drop_id, "source": self.src.uri, "layout": self.plan.layout,
                "fingerprint": fingerprint, "status": "running", "n_entries": len(entries), "started_at": self.now,
            }], ["drop_id"])
            done = set(conn.scalars(sa.select(images.c.source_entry).where(images.c.drop_id == self.drop_id)))
            done |= set(conn.scalars(sa.select(quarantine.c.entry).where(quarantine.c.drop_id == self.drop_id)))
            self.index = self._load_index(conn)
        result.already_ingested = len(done)
        self._copy_aux(done)
        self._quarantine_rows_without_images(done)
        todo = [e for e in self.plan.images if _entry_key(e.name) not in done]
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
                log.info("drop %s: %d/%d images (accepted %d, quarantined %d) %.0f images/s",
                         self.drop_id, processed, len(todo), self.counts["accepted"],
                         sum(v for k, v in self.counts.items() if k != "accepted"), rate)
        result.accepted = self.counts.pop("accepted", 0)
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
        for e in self.plan.aux:
            self.store.put(_aux_key(self.drop_id, e.name), self.src.read(e, self.limits.max_bytes))
        rows = [self._qrow(name, reason, detail) for name, (reason, detail) in self.plan.bad_aux.items()
                if _entry_key(name) not in done]
        self._record([], rows)

    def _quarantine_rows_without_images(self, done: set[str]) -> None:
        stems = {PurePosixPath(e.name).stem for e in self.plan.images}
        rows = []
        for image_id, items in sorted(self.plan.evidence.items()):
            if image_id in stems:
                continue
            for source in dict.fromkeys(ev.source for ev in items):
                entry = f"{source}#{image_id}"
                if _entry_key(entry) not in done:
                    rows.append(self._qrow(entry, Reason.MISSING_IMAGE, f"{source} has a row for {image_id} but the drop has no such image", image_id=image_id))
        self._record([], rows)

    def _qrow(self, entry: str, reason: Reason, detail: str, image_id: str | None = None, sha: str | None = None,
              raw_uri: str | None = None) -> dict[str, Any]:
        self.counts[str(reason)] += 1
        return {"drop_id": self.drop_id, "entry": _entry_key(entry), "reason": str(reason), "detail": detail[:2000],
                "image_id": image_id if image_id and IMAGE_ID_RE.match(image_id) else None, "sha256": sha,
                "raw_uri": raw_uri, "quarantined_at": self.now}

    def _batch(self, pool: ThreadPoolExecutor, batch: Sequence[Entry]) -> None:
        examined = list(pool.map(lambda e: _examine(self.src, e, self.limits, self.size), batch))
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

    def _decide(self, ex: _Examined, known_sha: dict[str, str], known_ids: dict[str, str]):
        """("image" | "quarantine", row, [(key, bytes, content type)]) for one entry, in drop order."""
        name, image_id = ex.entry.name, ex.image_id

        def reject(reason: Reason, detail: str):
            key = _quarantine_key(self.drop_id, name)
            if ex.data is None:  # zip bomb or link: the bytes stay only inside the raw drop
                return "quarantine", self._qrow(name, reason, detail, image_id, ex.sha256, f"{self.src.uri}!{name}"), []
            row = self._qrow(name, reason, detail, image_id, ex.sha256, self.store.uri(key))
            return "quarantine", row, [(key, ex.data, "application/octet-stream")]

        if ex.entry.problem:
            return reject(*ex.entry.problem)
        if not IMAGE_ID_RE.match(image_id):
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
        self.seen_sha[ex.sha256] = image_id
        self.seen_ids[image_id] = ex.sha256
        suffix = PurePosixPath(name).suffix.lower() or ".bin"
        original_key = f"drops/{self.drop_id}/original/{image_id}{suffix}"
        normalized_key = f"drops/{self.drop_id}/normalized/{self.size}/{image_id}.jpg"
        group = self.index.assign(image_id, check.phash, merged.lesion_id, merged.near_dup_label)
        self.counts["accepted"] += 1
        self.label_counts[merged.label or "unlabelled"] += 1
        metadata = dict(merged.metadata)
        if merged.near_dup_label:
            metadata["near_dup_label"] = merged.near_dup_label
        row = {
            "image_id": image_id, "drop_id": self.drop_id, "source_entry": name, "sha256": ex.sha256,
            "label": merged.label, "diagnosis": merged.diagnosis, "label_source": (merged.label_source or "")[:128] or None,
            "lesion_id": merged.lesion_id, "patient_id": merged.patient_id, "near_dup_group": group,
            "phash": f"{check.phash:016x}", "width": check.width, "height": check.height, "n_bytes": len(ex.data),
            "format": check.format, "conversions": ",".join(check.conversions) or None,
            "original_uri": self.store.uri(original_key), "normalized_uri": self.store.uri(normalized_key),
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
                + [{"entry": e.name, "outcome": "auxiliary", "key": _aux_key(self.drop_id, e.name)} for e in self.plan.aux]
                + [{"entry": e.name, "outcome": "ignored"} for e in self.plan.ignored],
                key=lambda d: d["entry"]),
        }
        manifest_key = f"drops/{self.drop_id}/manifest.json"
        manifest_uri = self.store.put(manifest_key, json.dumps(manifest, indent=1).encode(), "application/json")
        totals = {"accepted": len(accepted), "quarantined": len(rejected) - duplicates, "duplicates": duplicates, "reasons": reasons}
        with self.engine.begin() as conn:
            conn.execute(drops.update().where(drops.c.drop_id == self.drop_id).values(
                status="complete", layout=self.plan.layout, n_entries=len(manifest["entries"]), reasons=reasons,
                accepted=totals["accepted"], quarantined=totals["quarantined"], duplicates=duplicates,
                manifest_uri=manifest_uri, finished_at=datetime.now(UTC)))
        return totals


def ingest(
    source: str,
    settings: Settings,
    drop_id: str | None = None,
    limits: Limits | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    store: ObjectStore | None = None,
) -> IngestResult:
    """Ingest the drop at `source` (local folder or .zip, or a folder/.zip in the store)."""
    limits = limits or Limits()
    store = store or open_store(settings)
    engine = engine_for(settings)
    src = open_source(source, store, limits)
    try:
        entries = src.entries()
        drop_id = slug(drop_id or src.name)
        fingerprint = hashlib.sha256("\n".join(f"{e.name}\t{e.size}" for e in entries).encode()).hexdigest()
        with engine.connect() as conn:
            existing = conn.execute(sa.select(drops).where(drops.c.drop_id == drop_id)).mappings().first()
        if existing and existing["fingerprint"] != fingerprint:
            raise ValueError(
                f"drop id {drop_id!r} was already used for {existing['source']} with different content "
                f"(fingerprint {existing['fingerprint'][:12]} != {fingerprint[:12]}): pass another --drop-id"
            )
        if existing and existing["status"] == "complete":
            log.info("drop %s: already ingested completely from %s, nothing to do", drop_id, existing["source"])
            totals = {k: existing[k] for k in ("accepted", "quarantined", "duplicates")} | {"reasons": existing["reasons"] or {}}
            return IngestResult(drop_id, src.uri, existing["layout"], already_ingested=existing["n_entries"], totals=totals)
        run = _DropIngestion(src, drop_id, settings, store, engine, limits,
                             workers or min(4, 2 * (os.cpu_count() or 1)), batch_size)
        return run.run(entries, fingerprint)
    finally:
        src.close()
        engine.dispose()


def discover_incoming(settings: Settings, store: ObjectStore | None = None, now: datetime | None = None) -> list[str]:
    """URIs of drops under `incoming/` that are ready and not yet ingested completely.

    A `.zip` is ready as soon as it exists (S3 writes are atomic); a folder once it holds `_READY`
    or nothing in it changed for `settings.incoming_settle_seconds`.
    """
    store = store or open_store(settings)
    now = now or datetime.now(UTC)
    candidates: dict[str, dict[str, Any]] = {}
    for obj in store.list(INCOMING_PREFIX):
        first, _, rest = obj.key[len(INCOMING_PREFIX):].partition("/")
        if not rest and not first.lower().endswith(".zip"):
            log.warning("incoming: ignoring loose file %s (a drop is a folder or a .zip)", obj.key)
            continue
        info = candidates.setdefault(INCOMING_PREFIX + first, {"zip": not rest, "newest": obj.modified, "ready": False})
        info["newest"] = max(info["newest"], obj.modified)
        info["ready"] |= PurePosixPath(rest).name == READY_MARKER
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            complete = set(conn.scalars(sa.select(drops.c.source).where(drops.c.status == "complete")))
    finally:
        engine.dispose()
    ready = []
    for key, info in sorted(candidates.items()):
        uri = store.uri(key)
        if uri in complete:
            continue
        settled = (now - info["newest"]).total_seconds() >= settings.incoming_settle_seconds
        if info["zip"] or info["ready"] or settled:
            ready.append(uri)
        else:
            log.info("incoming: %s still changing (newest object %s), waiting", key, info["newest"].isoformat())
    return ready


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over several drops' `IngestResult.as_json()`."""
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r.get("reasons") or {})
    return {
        "drops": [r["drop_id"] for r in results],
        "accepted": sum(r["accepted"] for r in results),
        "quarantined": sum(r["quarantined"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "reasons": dict(sorted(reasons.items())),
    }
