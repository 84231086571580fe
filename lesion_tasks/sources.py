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

from lesion_tasks.db import engine_for
from lesion_tasks.reasons import Reason
from lesion_tasks.schema import drops
from lesion_tasks.settings import Settings
from lesion_tasks.store import ObjectNotFound, ObjectStore, is_relative, key_of, open_store

log = logging.getLogger(__name__)
INCOMING_PREFIX = "incoming/"
READY_MARKER = "_READY"


@dataclass(frozen=True)
class Limits:
    """Bounds on what a drop may contain. Anything past them is quarantined, never decoded."""

    max_bytes: int = 100 * 2**20  # one file
    max_pixels: int = 64_000_000  # ISIC originals reach 6000x4000 = 24 MP
    min_side: int = 32
    max_aspect: float = 8.0
    zip_max_ratio: float = 100.0  # expanded/compressed, for entries above 1 MiB
    zip_max_total: int = 50 * 2**30  # expanded bytes of a whole archive


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

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            for name in sorted(filenames) + sorted(d for d in dirnames if (here / d).is_symlink()):
                path = here / name
                rel = path.relative_to(self.root).as_posix()
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    out.append(Entry(rel, 0, (Reason.UNSAFE_PATH, f"{rel}: symbolic link to {os.readlink(path)!r}")))
                elif stat.S_ISREG(info.st_mode):
                    out.append(Entry(rel, info.st_size))
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

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        total = 0
        for info in self._zip.infolist():
            if info.is_dir():
                continue
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
            if total > self.limits.zip_max_total:
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

    def entries(self) -> list[Entry]:
        return [Entry(o.key[len(self.prefix):], o.size) for o in self.store.list(self.prefix)]

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


def discover_incoming(settings: Settings, store: ObjectStore | None = None, now: datetime | None = None) -> list[str]:
    """Keys of drops under `incoming/` that are ready and not yet ingested completely.

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
        if key in complete:
            continue
        settled = (now - info["newest"]).total_seconds() >= settings.incoming_settle_seconds
        if info["zip"] or info["ready"] or settled:
            ready.append(key)
        else:
            log.info("incoming: %s still changing (newest object %s), waiting", key, info["newest"].isoformat())
    return ready
