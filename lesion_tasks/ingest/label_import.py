"""Labels that arrive after the images: histopathology or expert-panel results (`lesion labels import CSV`).

Columns `image_id,diagnosis[,label_source]` (`isic_id` / `image` accepted for `image_id`). A diagnosis is
an ISIC challenge code (MEL, NV, BCC, AK, BKL, DF, VASC, SCC) or an isic-metadata diagnosis name, or `UNK`:
an out-of-scope lesion of unknown kind (label OTHER). An imported label is recorded on the image like an
ISIC label (`images.label`, `diagnosis`, `label_source` = "import:<its source>"), so it joins the split by
the recorded rule and validates and tests the model at the image's site, not only trains it.

Every row is logged in `label_imports` with its outcome, once per (file, line): a rerun of the same file
adds and changes nothing. Rejected, with a reason code: `duplicate_row` (an image already seen in this
file), `unknown_image`, `unknown_diagnosis`, `conflicts_with_isic` (the image has an ISIC label of another
class: recorded, never applied) and `conflicts_with_label` (an earlier import said otherwise). A row whose
image already has that label is `unchanged`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core.db import engine_for, insert_ignore
from lesion_tasks.core.schema import images, label_imports
from lesion_tasks.core.settings import Settings
from lesion_tasks.ingest.labels import label_from_diagnosis

log = logging.getLogger(__name__)
ID_COLUMNS = ("image_id", "isic_id", "image")
IMPORT_PREFIX = "import:"
MAX_BYTES = 200 * 2**20


def parse_diagnosis(text: str) -> tuple[str, str]:
    """(label, diagnosis) of an imported diagnosis; ValueError when it is none of the accepted vocabularies."""
    value = (text or "").strip()
    if value.upper() == "UNK":
        return "OTHER", "UNK"
    label, diagnosis = label_from_diagnosis(value)
    if label is None:
        raise ValueError(f"diagnosis {value!r}: blank or unknown (use UNK for an out-of-scope lesion of unknown kind)")
    return label, diagnosis


def _read(path: Path) -> tuple[str, list[dict[str, str]], str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"labels file {path}: cannot be read ({exc.strerror or exc})") from exc
    if len(data) > MAX_BYTES:
        raise ValueError(f"labels file {path}: {len(data)} bytes, expected at most {MAX_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"labels file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    reader = csv.DictReader(io.StringIO(text))
    fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
    id_col = next((fields[c] for c in ID_COLUMNS if c in fields), None)
    if id_col is None or "diagnosis" not in fields:
        raise ValueError(f"labels file {path}: columns {sorted(fields)}; expected image_id,diagnosis[,label_source]")
    rows = [{"image_id": (r.get(id_col) or "").strip(), "diagnosis": (r.get(fields["diagnosis"]) or "").strip(),
             "label_source": (r.get(fields.get("label_source", "")) or "").strip()} for r in reader]
    return hashlib.sha256(data).hexdigest(), rows, id_col


def import_labels(path: str | Path, settings: Settings) -> dict[str, Any]:
    """Apply the file's labels to unlabelled images; returns {"imported", "unchanged", "rejected", "reasons"}."""
    path = Path(path)
    sha, rows, _ = _read(path)
    default_source = f"{IMPORT_PREFIX}{path.name}"[:128]
    now = datetime.now(UTC)
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    engine = engine_for(settings)
    try:
        with engine.begin() as conn:
            ids = sorted({r["image_id"] for r in rows if r["image_id"]})
            known = {r.image_id: dict(r._mapping) for r in conn.execute(
                sa.select(images.c.image_id, images.c.label, images.c.diagnosis, images.c.label_source)
                .where(images.c.image_id.in_(ids)))} if ids else {}
            seen: set[str] = set()
            log_rows = []
            for line, row in enumerate(rows, start=2):  # line 1 is the header
                image_id, source = row["image_id"], (f"{IMPORT_PREFIX}{row['label_source']}"[:128]
                                                      if row["label_source"] else default_source)
                outcome, reason, label, diagnosis = _decide(row, image_id, seen, known)
                seen.add(image_id)
                if outcome == "imported":
                    conn.execute(images.update().where(images.c.image_id == image_id, images.c.label.is_(None))
                                 .values(label=label, diagnosis=diagnosis, label_source=source))
                    known[image_id] |= {"label": label, "diagnosis": diagnosis, "label_source": source}
                outcomes[outcome] += 1
                if reason:
                    reasons[reason] += 1
                log_rows.append({"file_sha256": sha, "line": line, "image_id": image_id[:128] or None,
                                 "diagnosis": row["diagnosis"][:2000] or None, "label": label, "label_source": source,
                                 "outcome": outcome, "reason": reason, "imported_at": now})
            insert_ignore(conn, label_imports, log_rows, ["file_sha256", "line"])
    finally:
        engine.dispose()
    result = {"file": str(path), "rows": len(rows), "imported": outcomes["imported"], "unchanged": outcomes["unchanged"],
              "rejected": outcomes["rejected"], "reasons": dict(sorted(reasons.items()))}
    log.info("labels %s: %d rows, imported %d, unchanged %d, rejected %d %s", path.name, len(rows), result["imported"],
             result["unchanged"], result["rejected"], result["reasons"] or "")
    return result


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
            f"{result['unchanged']}  rejected {result['rejected']}")
    if result["reasons"]:
        line += "\n  reasons  " + "  ".join(f"{k} {v}" for k, v in result["reasons"].items())
    return line
