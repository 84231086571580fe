"""Labels that arrive after the images: histopathology or expert-panel results (`lesion labels import CSV`).

Columns `image_id,diagnosis[,label_source]` (`isic_id` / `image` accepted for `image_id`). A diagnosis is
an ISIC challenge code (MEL, NV, BCC, AK, BKL, DF, VASC, SCC) or an isic-metadata diagnosis name, or `UNK`:
an out-of-scope lesion of unknown kind (label OTHER). An imported label is recorded on the image like an
ISIC label (`images.label`, `diagnosis`, `label_source` = "import:<its source>"), so it joins the split by
the recorded rule and validates and tests the model at the image's site, not only trains it.

Outcomes per row: `imported`, `unchanged` (the image already has that label) or `rejected` with a reason
code: `duplicate_row` (an image already seen in this file), `unknown_image`, `unknown_diagnosis`,
`conflicts_with_isic` (the image has an ISIC label of another class: recorded, never applied) and
`conflicts_with_label` (an earlier import said otherwise).

One import is one transaction: each row is decided on the image as it is, locked (PostgreSQL: the rows
`FOR UPDATE`, and imports take turns on an advisory lock; SQLite: `BEGIN IMMEDIATE`), and a label is set
only where the image has none, the updated row count checked: a row that found the image labelled after
all is decided again on what it now holds. Of two imports that race for an image, the second says
`conflicts_with_label`, never `imported`.

The log `label_imports` is the provenance of ground truth and is append-only: each import is a run
(`run_id`), and a run logs a row of the file (`file_sha256`, `line`) when that row's outcome is new: its
first run, a label applied (`imported`), or an outcome, reason or label other than the row's latest entry.
The latest entry of each (file, line) therefore says what the row did to the labels and why (a file
imported before its images were ingested: `rejected unknown_image`, then `imported` from the rerun that
applied it), and earlier entries stay as history. A rerun that changes nothing logs nothing (a row's
`imported` followed by `unchanged` is the same state: its label is still on the image).

The file is refused over MAX_BYTES before it is read (a regular file by its size; a pipe or a device is
copied to a temporary file, at most MAX_BYTES + 1 bytes of it), then read twice as a stream: once to hash it
and once, batch by batch, to apply it (the second read is hashed too: a file changed in between applies
nothing). Memory does not grow with the file. Every problem with the file itself is a ValueError naming the
file, the line and what was expected (the CLI's exit 2): lines over MAX_LINE_BYTES, CSV errors, non-UTF-8 text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import stat
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lesion_tasks.core.db import engine_for, take_turns
from lesion_tasks.core.schema import images, label_imports
from lesion_tasks.core.settings import Settings
from lesion_tasks.ingest.labels import label_from_diagnosis

log = logging.getLogger(__name__)
ID_COLUMNS = ("image_id", "isic_id", "image")
IMPORT_PREFIX = "import:"
MAX_BYTES = 200 * 2**20
MAX_LINE_BYTES = 2**17  # csv's own field limit; a label row is a few hundred bytes
BATCH_ROWS = 5000  # rows decided, locked and logged together
BATCH_CHARS = 2**23  # a batch also ends at 8 Mi characters of fields, however long its rows
CHUNK = 2**20

# the image ids already read from the file, per import (a temporary table: memory does not grow with the file)
_seen = sa.Table("label_import_seen", sa.MetaData(), sa.Column("image_id", sa.Text, primary_key=True),
                 prefixes=["TEMPORARY"])


def parse_diagnosis(text: str) -> tuple[str, str]:
    """(label, diagnosis) of an imported diagnosis; ValueError when it is none of the accepted vocabularies."""
    value = (text or "").strip()
    if value.upper() == "UNK":
        return "OTHER", "UNK"
    label, diagnosis = label_from_diagnosis(value)
    if label is None:
        raise ValueError(f"diagnosis {value!r}: blank or unknown (use UNK for an out-of-scope lesion of unknown kind)")
    return label, diagnosis


class _Hashing(io.RawIOBase):
    """A binary file read through a sha256."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw, self.sha = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.sha.update(memoryview(buffer)[:n])
        return n


@contextmanager
def _opened(path: Path) -> Iterator[tuple[io.BufferedReader, _Hashing, str]]:
    """(the file to parse, hashed as it is read, its hasher, the sha256 of the file); ValueError over MAX_BYTES,
    before reading a regular file and after MAX_BYTES + 1 bytes of anything else."""
    too_big = f"labels file {path}: {{}} bytes, expected at most {MAX_BYTES}"
    with ExitStack() as stack:
        try:
            status = path.stat()
            regular = stat.S_ISREG(status.st_mode)
            if regular and status.st_size > MAX_BYTES:
                raise ValueError(too_big.format(status.st_size))
            source = stack.enter_context(path.open("rb"))
            copy = source if regular else stack.enter_context(tempfile.TemporaryFile(prefix="lesion-labels-"))
            sha, size = hashlib.sha256(), 0
            while size <= MAX_BYTES and (chunk := source.read(min(CHUNK, MAX_BYTES + 1 - size))):
                size += len(chunk)
                sha.update(chunk)
                if not regular:
                    copy.write(chunk)
            if size > MAX_BYTES:
                raise ValueError(too_big.format(f"more than {MAX_BYTES}"))
            copy.seek(0)
        except OSError as exc:
            raise ValueError(f"labels file {path}: cannot be read ({exc.strerror or exc})") from exc
        hashing = _Hashing(copy)
        yield io.BufferedReader(hashing, CHUNK), hashing, sha.hexdigest()


def _lines(fh: io.BufferedReader, hashing: _Hashing, sha: str, path: Path) -> Iterator[str]:
    """The file's lines as text, each at most MAX_LINE_BYTES; at the end, the file is still the one hashed."""
    number = 0
    while True:
        try:
            raw = fh.readline(MAX_LINE_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"labels file {path}: cannot be read after line {number} ({exc.strerror or exc})") from exc
        if not raw:
            break
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise ValueError(f"labels file {path}: line {number} is longer than {MAX_LINE_BYTES} bytes; "
                             "expected one row image_id,diagnosis[,label_source] per line")
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"labels file {path}: line {number}: not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start} of the line)") from exc
        yield text
    if hashing.sha.hexdigest() != sha:
        raise ValueError(f"labels file {path}: changed while it was imported (sha256 {sha} when first read); "
                         "expected a file that stays as it is: nothing was applied")


def _rows(lines: Iterator[str], path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {image_id, diagnosis, label_source}) of each row; the header is checked before the first row."""
    reader = csv.DictReader(lines)
    try:
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
    except csv.Error as exc:
        raise ValueError(f"labels file {path}: line {reader.reader.line_num}: {exc}; expected a CSV header") from exc
    id_col = next((fields[c] for c in ID_COLUMNS if c in fields), None)
    if id_col is None or "diagnosis" not in fields:
        raise ValueError(f"labels file {path}: columns {sorted(fields)}; expected image_id,diagnosis[,label_source]")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        try:
            for line, r in enumerate(reader, start=2):  # line 1 is the header; a row's line is its record number
                yield line, {"image_id": (r.get(id_col) or "").strip(),
                             "diagnosis": (r.get(fields["diagnosis"]) or "").strip(),
                             "label_source": (r.get(fields.get("label_source", "")) or "").strip()}
        except csv.Error as exc:
            raise ValueError(f"labels file {path}: line {reader.reader.line_num}: {exc}; expected CSV rows "
                             "image_id,diagnosis[,label_source]") from exc
    return rows()


def _batches(rows: Iterator[tuple[int, dict[str, str]]]) -> Iterator[list[tuple[int, dict[str, str]]]]:
    batch: list[tuple[int, dict[str, str]]] = []
    chars = 0
    for item in rows:
        batch.append(item)
        chars += sum(map(len, item[1].values()))
        if len(batch) >= BATCH_ROWS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def import_labels(path: str | Path, settings: Settings) -> dict[str, Any]:
    """Apply the file's labels to unlabelled images; returns {"imported", "unchanged", "rejected", "reasons"}
    (and "rows", "logged": the log entries this run wrote, "run_id": theirs)."""
    path = Path(path)
    run = {"run_id": uuid.uuid4().hex, "imported_at": datetime.now(UTC),
           "default_source": f"{IMPORT_PREFIX}{path.name}"[:128]}
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    with _opened(path) as (fh, hashing, sha):
        rows = _rows(_lines(fh, hashing, sha, path), path)
        engine = engine_for(settings)
        try:
            with engine.begin() as conn:
                take_turns(conn, "label-import")  # imports take turns: no deadlock between two files' batches
                _seen.create(conn)
                logged = sum(_apply(conn, batch, sha, run, outcomes, reasons) for batch in _batches(rows))
                _seen.drop(conn)
        finally:
            engine.dispose()
    total = sum(outcomes.values())
    result = {"file": str(path), "rows": total, "imported": outcomes["imported"], "unchanged": outcomes["unchanged"],
              "rejected": outcomes["rejected"], "reasons": dict(sorted(reasons.items())), "logged": logged,
              "run_id": run["run_id"]}
    log.info("labels %s: %d rows, imported %d, unchanged %d, rejected %d %s; %d logged (run %s)", path.name, total,
             result["imported"], result["unchanged"], result["rejected"], result["reasons"] or "", logged, run["run_id"])
    return result


def _apply(conn: Connection, batch: list[tuple[int, dict[str, str]]], sha: str, run: dict[str, Any],
           outcomes: Counter[str], reasons: Counter[str]) -> int:
    """Decide, apply and log one batch of rows inside the import's transaction; the number of entries logged."""
    ids = {row["image_id"] for _, row in batch}
    seen = {r[0] for r in conn.execute(sa.select(_seen.c.image_id).where(_seen.c.image_id.in_(ids)))}
    if ids - seen:
        conn.execute(_seen.insert(), [{"image_id": i} for i in ids - seen])
    known = {r.image_id: dict(r._mapping) for r in conn.execute(
        sa.select(images.c.image_id, images.c.label, images.c.diagnosis, images.c.label_source)
        .where(images.c.image_id.in_(sorted(ids - {""}))).order_by(images.c.image_id).with_for_update())}
    latest = {r.line: r for r in conn.execute(  # in id order: the latest entry of each line wins
        sa.select(label_imports.c.line, label_imports.c.outcome, label_imports.c.reason, label_imports.c.label)
        .where(label_imports.c.file_sha256 == sha, label_imports.c.line.between(batch[0][0], batch[-1][0]))
        .order_by(label_imports.c.id))}
    entries = []
    for line, row in batch:
        image_id = row["image_id"]
        source = f"{IMPORT_PREFIX}{row['label_source']}"[:128] if row["label_source"] else run["default_source"]
        outcome, reason, label, diagnosis = _decide(row, image_id, seen, known)
        seen.add(image_id)
        while outcome == "imported" and not _set_label(conn, image_id, label, diagnosis, source, known):
            outcome, reason, label, diagnosis = _decide(row, image_id, set(), known)  # on the image as it now is
        outcomes[outcome] += 1
        if reason:
            reasons[reason] += 1
        if _changed(latest.get(line), outcome, reason, label):
            entries.append({"run_id": run["run_id"], "file_sha256": sha, "line": line, "image_id": image_id[:128] or None,
                            "diagnosis": row["diagnosis"][:2000] or None, "label": label, "label_source": source,
                            "outcome": outcome, "reason": reason, "imported_at": run["imported_at"]})
    if entries:
        conn.execute(label_imports.insert(), entries)
    return len(entries)


def _set_label(conn: Connection, image_id: str, label: str | None, diagnosis: str | None, source: str,
               known: dict[str, Any]) -> bool:
    """Label the image where it has none; False (and `known` re-read) when the update found it labelled or gone."""
    updated = conn.execute(images.update().where(images.c.image_id == image_id, images.c.label.is_(None))
                           .values(label=label, diagnosis=diagnosis, label_source=source)).rowcount
    if updated == 1:
        known[image_id] |= {"label": label, "diagnosis": diagnosis, "label_source": source}
        return True
    now = conn.execute(sa.select(images.c.image_id, images.c.label, images.c.diagnosis, images.c.label_source)
                       .where(images.c.image_id == image_id).with_for_update()).one_or_none()
    known.pop(image_id, None)
    if now is not None:
        known[image_id] = dict(now._mapping)
    return False


def _changed(latest: Any, outcome: str, reason: str | None, label: str | None) -> bool:
    """Whether a row's outcome is news to the log: its first entry, a label applied, or another state."""
    if latest is None or outcome == "imported":
        return True
    if outcome == "unchanged" and latest.outcome == "imported" and latest.label == label:
        return False  # the label this line imported is still on the image
    return (latest.outcome, latest.reason, latest.label) != (outcome, reason, label)


def _decide(row: dict[str, str], image_id: str, seen: set[str], known: dict[str, Any]
            ) -> tuple[str, str | None, str | None, str | None]:
    """(outcome, reason, label, diagnosis) of one row."""
    if image_id in seen:
        return "rejected", "duplicate_row", None, None
    if image_id not in known:
        return "rejected", "unknown_image", None, None
    try:
        label, diagnosis = parse_diagnosis(row["diagnosis"])
    except ValueError:
        return "rejected", "unknown_diagnosis", None, None
    current = known[image_id]
    if current["label"] is None:
        return "imported", None, label, diagnosis
    imported_before = (current["label_source"] or "").startswith(IMPORT_PREFIX)
    if current["label"] == label and (current["diagnosis"] == diagnosis or not imported_before):
        return "unchanged", None, label, diagnosis
    return "rejected", "conflicts_with_label" if imported_before else "conflicts_with_isic", label, diagnosis


def summary(result: dict[str, Any]) -> str:
    line = (f"labels {result['file']}: {result['rows']} rows: imported {result['imported']}  unchanged "
            f"{result['unchanged']}  rejected {result['rejected']}  (log: {result['logged']} new entries, "
            f"run {result['run_id']})")
    if result["reasons"]:
        line += "\n  reasons  " + "  ".join(f"{k} {v}" for k, v in result["reasons"].items())
    return line
