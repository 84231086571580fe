"""Where a drop's bytes come from: a local folder, a local or stored `.zip`, or a folder in the store;
and which drops under `incoming/` in the store are ready to ingest (`discover_incoming`).

Nothing is ever extracted to disk: entries are read into memory one at a time, so a hostile archive
cannot write outside the store. Entries that are unsafe to read carry their problem up front. A drop
in the store is recorded by its key (`incoming/<drop>`), a local one by its file URI.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

import sqlalchemy as sa

from lesion_tasks.core.db import engine_for
from lesion_tasks.core.reasons import Reason
from lesion_tasks.core.schema import drops
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectNotFound, ObjectStore, is_relative, key_of, open_store

log = logging.getLogger(__name__)
INCOMING_PREFIX = "incoming/"
READY_MARKER = "_READY"
SITE_FILE = "site.txt"  # at a drop's root: the site the drop comes from (one line)


class SiteConflict(ValueError):
    """Two statements of a drop's site disagree (`--site`, its `site.txt`, the store layout): the drop fails."""

    reason = "site_conflict"


def layout_site(source: str) -> tuple[str, str] | None:
    """(site, drop name) for a store key `incoming/<site>/<drop>[/|.zip]`, else None: the store layout
    names the site of every drop inside a site folder (`discover_incoming` finds them)."""
    if not source.startswith(INCOMING_PREFIX):
        return None
    parts = [p for p in source[len(INCOMING_PREFIX):].split("/") if p]
    if len(parts) != 2:
        return None
    drop = parts[1][:-4] if parts[1].lower().endswith(".zip") else parts[1]
    return parts[0], drop


def resolve_site(given: str | None, site_file: str | None, layout: str | None, drop_id: str) -> str:
    """The drop's site by DESIGN.md's precedence: `--site`, then `site.txt`, then the store layout, then
    the drop id, each named by `keys.site_key` (NFC, case-blind, a hash where a name's readable form loses
    anything). The explicit statements must agree where there are several: a conflict fails the drop.
    An empty or blank `--site` is refused, never ignored."""
    from lesion_tasks.core import keys

    stated = [(what, v, keys.site_key(v, what)) for what, v in
              (("--site", given), (SITE_FILE, site_file), ("store layout", layout)) if v is not None]
    if len({key.lower() for _, _, key in stated}) > 1:
        raise SiteConflict("site_conflict: the drop's site is stated differently: "
                           + ", ".join(f"{what} {v!r}" for what, v, _ in stated) + "; make them agree (or drop one)")
    return stated[0][2] if stated else drop_id


def stored_site(conn: sa.Connection, key: str) -> str:
    """The site `key` (from `keys.site_key`) as it is stored: names that differ only by case are one site, and
    the first spelling ingested stays (an exact match first: sites split by case before this rule stay apart)."""
    spellings = list(conn.scalars(sa.select(drops.c.site).where(sa.func.lower(drops.c.site) == key.lower())
                                  .group_by(drops.c.site).order_by(sa.func.min(drops.c.started_at), drops.c.site)))
    if not spellings or key in spellings:
        return key
    if len(spellings) > 1:
        log.warning("site %r: stored as %s (split by case before sites were matched case-blind); using %r",
                    key, ", ".join(map(repr, spellings)), spellings[0])
    return spellings[0]


def read_site_file(src: "DropSource", entries: list[Entry]) -> str | None:
    """The first non-empty line of the drop's root `site.txt`, or None when there is none."""
    entry = next((e for e in entries if e.name == SITE_FILE and e.problem is None), None)
    if entry is None:
        return None
    try:
        text = src.read(entry, 4096).decode("utf-8-sig")
    except (EntryTooLarge, UnicodeDecodeError) as exc:
        raise SiteConflict(f"site_conflict: {SITE_FILE} is not a short UTF-8 text ({type(exc).__name__}); "
                           "expected one line naming the site") from exc
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


@dataclass(frozen=True)
class Limits:
    """Bounds on what a drop may contain. Anything past them is quarantined, never decoded."""

    max_bytes: int = 100 * 2**20  # one file
    max_pixels: int = 64_000_000  # ISIC originals reach 6000x4000 = 24 MP
    min_side: int = 32
    max_aspect: float = 8.0
    zip_max_ratio: float = 100.0  # expanded/compressed, for entries above 1 MiB and for the whole archive
    zip_max_total: int = 50 * 2**30  # expanded bytes of a whole archive
    # what one drop may write to the store (copies, normalised images, quarantined bytes):
    # write_factor x the drop's own bytes + write_allowance. Past it, entries are recorded, not copied.
    write_factor: float = 20.0
    write_allowance: int = 5 * 10**6

    def write_budget(self, drop_bytes: int) -> int:
        return int(self.write_factor * drop_bytes) + self.write_allowance


@dataclass(frozen=True)
class Entry:
    name: str  # path relative to the drop root, '/'-separated
    size: int
    problem: tuple[Reason, str] | None = None


class EntryTooLarge(Exception):
    pass


class DropSource(Protocol):
    uri: str
    name: str
    nbytes: int  # the drop's own size: the archive's bytes, or a folder's files added up

    def entries(self) -> list[Entry]: ...

    def read(self, entry: Entry, max_bytes: int) -> bytes: ...

    def close(self) -> None: ...


def _unsafe(name: str) -> str | None:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    if any(part == ".." for part in PurePosixPath(name).parts):
        return "'..' escapes the drop"
    return None


class DirSource:
    """A folder on the local file system. Symbolic links are never followed."""

    def __init__(self, root: Path, limits: Limits):
        self.root = root.resolve()
        self.uri = self.root.as_uri()
        self.name = self.root.name
        self.limits = limits
        self.nbytes = 0

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            for name in sorted(filenames) + sorted(d for d in dirnames if (here / d).is_symlink()):  # never opened
                path = here / name
                rel = path.relative_to(self.root).as_posix()
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    out.append(Entry(rel, 0, (Reason.UNSAFE_PATH, f"{rel}: symbolic link to {os.readlink(path)!r}")))
                elif stat.S_ISREG(info.st_mode):
                    out.append(Entry(rel, info.st_size))
        self.nbytes = sum(e.size for e in out)
        return sorted(out, key=lambda e: e.name)

    def read(self, entry: Entry, max_bytes: int) -> bytes:
        fd = os.open(self.root / entry.name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # never follow a link
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise EntryTooLarge(entry.name)
        return data

    def close(self) -> None:
        pass


class ZipSource:
    """A `.zip` archive, checked entry by entry for path escapes and bombs."""

    def __init__(self, fileobj: BinaryIO | Path, uri: str, name: str, limits: Limits):
        self.uri = uri
        self.name = name
        self.limits = limits
        self._fileobj = fileobj
        try:
            self._zip = zipfile.ZipFile(fileobj)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"drop {uri}: not a readable zip archive ({exc})") from None
        if isinstance(fileobj, Path):
            self.nbytes = fileobj.stat().st_size
        else:
            self.nbytes = fileobj.seek(0, os.SEEK_END)
            fileobj.seek(0)

    def entries(self) -> list[Entry]:
        infos = [i for i in self._zip.infolist() if not i.is_dir()]
        # the whole archive's ratio too: many entries just under the per-entry floor are one bomb
        expanded = sum(i.file_size for i in infos)
        overall = expanded / max(self.nbytes, 1)
        whole = (Reason.ZIP_BOMB, f"the archive expands {overall:.0f}x as a whole ({self.nbytes} -> {expanded} bytes): "
                 f"no entry expanded") if overall > self.limits.zip_max_ratio and expanded > 2**20 else None
        out: list[Entry] = []
        total = 0
        for info in infos:
            name = info.filename
            mode = info.external_attr >> 16
            why = _unsafe(name)
            if why:
                out.append(Entry(name, info.file_size, (Reason.UNSAFE_PATH, f"{name!r}: {why}")))
                continue
            if stat.S_ISLNK(mode):
                out.append(Entry(name, info.file_size, (Reason.UNSAFE_PATH, f"{name}: symbolic link entry")))
                continue
            total += info.file_size
            ratio = info.file_size / max(info.compress_size, 1)
            if whole:
                problem = whole
            elif total > self.limits.zip_max_total:
                problem = (Reason.ZIP_BOMB, f"{name}: archive expands past {self.limits.zip_max_total} bytes")
            elif ratio > self.limits.zip_max_ratio and info.file_size > 2**20:
                problem = (Reason.ZIP_BOMB, f"{name}: expands {ratio:.0f}x ({info.compress_size} -> {info.file_size} bytes)")
            else:
                problem = None
            out.append(Entry(name, info.file_size, problem))
        return sorted(out, key=lambda e: e.name)

    def read(self, entry: Entry, max_bytes: int) -> bytes:
        with self._zip.open(entry.name) as fh:  # reads at most max_bytes+1: declared sizes can lie
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise EntryTooLarge(entry.name)
        return data

    def close(self) -> None:
        self._zip.close()
        if not isinstance(self._fileobj, Path):
            self._fileobj.close()


class StoreDirSource:
    """A folder of objects in the store, e.g. `incoming/<drop>/`."""

    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/") + "/"
        self.uri = self.prefix.rstrip("/")
        self.name = PurePosixPath(self.prefix).name
        self.nbytes = 0

    def entries(self) -> list[Entry]:
        out = []
        for o in self.store.list(self.prefix):
            name = o.key[len(self.prefix):]
            if o.link is not None:  # a local store's symbolic link (file or folder): never opened
                out.append(Entry(name, 0, (Reason.UNSAFE_PATH, f"{name}: symbolic link to {o.link!r}")))
            else:
                out.append(Entry(name, o.size))
        self.nbytes = sum(e.size for e in out)
        return out

    def read(self, entry: Entry, max_bytes: int) -> bytes:
        if entry.size > max_bytes:
            raise EntryTooLarge(entry.name)
        return self.store.get(self.prefix + entry.name)

    def close(self) -> None:
        pass


def drop_name(source: str) -> str:
    """The drop's name as given by its path or key: the last segment without `.zip`."""
    name = PurePosixPath(source.rstrip("/")).name
    return name[:-4] if name.lower().endswith(".zip") else name


def open_source(source: str, store: ObjectStore, limits: Limits) -> DropSource:
    """A local folder or `.zip`, else a key or folder in the store (`incoming/...` or the store's URI)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return DirSource(path, limits)
    if path.is_file():
        return ZipSource(path, path.resolve().as_uri(), drop_name(source), limits)
    key = source.strip("/") if is_relative(source) else key_of(store, source)
    if key.lower().endswith(".zip"):
        spool = tempfile.TemporaryFile()  # unlinked at once: nothing left behind on disk
        try:
            store.download(key, spool)
        except ObjectNotFound:
            spool.close()
            raise ValueError(f"drop source {source!r}: no such folder, zip file, or object in {store.url}") from None
        spool.seek(0)
        return ZipSource(spool, key, drop_name(key), limits)
    if key and any(True for _ in store.list(key + "/")):
        return StoreDirSource(store, key)
    raise ValueError(f"drop source {source!r}: no such folder, zip file, or object in {store.url}")


@dataclass(frozen=True)
class Incoming:
    """What is under `incoming/`: drops ready to ingest, drops already ingested, drops still settling (key ->
    seconds until they count as settled, unless a `_READY` marker comes first) and loose files ignored."""
    ready: list[str]
    ingested: list[str]
    settling: dict[str, float]
    loose: list[str]


def survey_incoming(settings: Settings, store: ObjectStore | None = None, now: datetime | None = None) -> Incoming:
    """Every drop under `incoming/` and where it stands. A `.zip` is ready as soon as it exists (S3 writes are
    atomic); a folder once it holds `_READY` or nothing in it changed for `settings.incoming_settle_seconds`."""
    store = store or open_store(settings)
    now = now or datetime.now(UTC)
    children: dict[str, list[tuple[str, Any]]] = {}
    loose = []
    for obj in store.list(INCOMING_PREFIX):
        first, _, rest = obj.key[len(INCOMING_PREFIX):].partition("/")
        if obj.link is not None and not rest:
            log.warning("incoming: ignoring %s, a symbolic link to %r (links are never followed)", obj.key, obj.link)
            continue
        if not rest and not first.lower().endswith(".zip"):
            log.warning("incoming: ignoring loose file %s (a drop is a folder or a .zip)", obj.key)
            loose.append(obj.key)
            continue
        children.setdefault(first, []).append((rest, obj))
    candidates: dict[str, dict[str, Any]] = {}

    def add(key: str, is_zip: bool, rest: str, obj) -> None:
        info = candidates.setdefault(key, {"zip": is_zip, "newest": obj.modified, "ready": False})
        info["newest"] = max(info["newest"], obj.modified)
        info["ready"] |= PurePosixPath(rest).name == READY_MARKER

    for first, objs in children.items():
        if _is_site_folder([rest for rest, _ in objs]):  # incoming/<site>/<drop>/ or incoming/<site>/<drop>.zip
            for rest, obj in objs:
                drop, _, inner = rest.partition("/")
                add(f"{INCOMING_PREFIX}{first}/{drop}", not inner, inner, obj)
        else:
            for rest, obj in objs:
                add(INCOMING_PREFIX + first, not rest, rest, obj)
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            complete = set(conn.scalars(sa.select(drops.c.source).where(drops.c.status == "complete")))
    finally:
        engine.dispose()
    found = Incoming([], sorted(k for k in candidates if k in complete), {}, sorted(loose))
    for key, info in sorted(candidates.items()):
        if key in complete:
            continue
        left = settings.incoming_settle_seconds - (now - info["newest"]).total_seconds()
        if info["zip"] or info["ready"] or left <= 0:
            found.ready.append(key)
        else:
            found.settling[key] = left
            log.info("incoming: %s still changing (newest object %s), waiting %.0f s more or for %s", key,
                     info["newest"].isoformat(), left, READY_MARKER)
    return found


def discover_incoming(settings: Settings, store: ObjectStore | None = None, now: datetime | None = None) -> list[str]:
    """Keys of drops under `incoming/` that are ready and not yet ingested completely (`survey_incoming`)."""
    return survey_incoming(settings, store, now).ready


def _is_site_folder(rests: list[str]) -> bool:
    """A first-level folder under `incoming/` is a site when it holds only folders or zips (no images, no
    CSV/JSON), and is not a challenge drop (whose images sit in an `images/` subfolder)."""
    if not rests or any(not r for r in rests):  # a .zip directly under incoming/ is a drop
        return False
    direct = {r.partition("/")[0] for r in rests if "/" not in r}
    folders = {r.partition("/")[0] for r in rests if "/" in r}
    if any(not d.lower().endswith(".zip") for d in direct):
        return False
    return folders != {"images"}
