"""What each entry of a drop is: planning (images, auxiliary files, junk, label evidence) and the
examination of one entry's bytes (archive signatures, image checks), before anything is written.

`ingest.py` runs a drop with these: state, rows, store writes and the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath

from lesion_tasks.core.reasons import Reason
from lesion_tasks.ingest import labels as lbl
from lesion_tasks.ingest.images import Accepted, Rejected, inspect_image
from lesion_tasks.ingest.sources import READY_MARKER, DropSource, Entry, EntryTooLarge, Limits

log = logging.getLogger(__name__)

# the whole id, no whitespace or control character anywhere (fullmatch: `$` would admit a final newline)
IMAGE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
TEXT_SUFFIXES = {".csv", ".json", ".txt", ".md", ".html", ".pdf", ".tsv", ".xml", ".yaml", ".yml"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", READY_MARKER}
ARCHIVE_SIGNATURES = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"),
                      (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"), (b"BZh", "bzip2"))
MAX_ENTRY_LENGTH = 512  # quarantine.entry is indexed: Postgres caps index rows at ~2.7 kB


def valid_image_id(image_id: str | None) -> bool:
    return bool(image_id) and IMAGE_ID_RE.fullmatch(image_id) is not None


@dataclass
class Examined:
    entry: Entry
    image_id: str
    data: bytes | None = None
    sha256: str | None = None
    check: Accepted | Rejected | None = None


@dataclass
class Plan:
    images: list[Entry]
    aux: list[Entry]
    ignored: list[Entry]
    evidence: dict[str, list[lbl.Evidence]]
    bad_aux: dict[str, tuple[Reason, str]]  # aux entries that are themselves invalid (unreadable CSV)
    layout: str


def entry_key(name: str) -> str:
    """How an entry is recorded: names past MAX_ENTRY_LENGTH are cut, with a hash to stay unique."""
    if len(name) <= MAX_ENTRY_LENGTH:
        return name
    return name[: MAX_ENTRY_LENGTH - 20] + "..." + hashlib.sha256(name.encode()).hexdigest()[:16]


def plan(src: DropSource, entries: list[Entry], limits: Limits) -> Plan:
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
    return Plan(image_entries, aux, ignored, dict(evidence), bad_aux, "+".join(sorted(kinds)) or "images-only")


def examine(src: DropSource, entry: Entry, limits: Limits, size: int) -> Examined:
    """Read and check one image entry (runs in a worker thread)."""
    image_id = PurePosixPath(entry.name).stem
    ex = Examined(entry, image_id)
    if entry.problem:  # a bomb or an unsafe path (a link, an escaping name): never opened or expanded
        return ex
    try:
        ex.data = src.read(entry, limits.max_bytes)
    except EntryTooLarge:
        ex.check = Rejected(Reason.FILE_TOO_LARGE, f"more than {limits.max_bytes} bytes")
        return ex
    ex.sha256 = hashlib.sha256(ex.data).hexdigest()
    archive = next((kind for magic, kind in ARCHIVE_SIGNATURES if ex.data.startswith(magic)), None)
    if archive is None and ex.data[257:262] == b"ustar":
        archive = "tar"
    if archive:
        ex.check = Rejected(Reason.NESTED_ARCHIVE, f"a {archive} archive inside the drop: not expanded")
    elif entry.problem is None and valid_image_id(image_id):
        ex.check = inspect_image(ex.data, limits, size)
    return ex
