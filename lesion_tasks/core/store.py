"""Object store: one small interface, two implementations (local directory, S3/MinIO).

The rest of the code only sees `ObjectStore`. Keys are `/`-separated relative paths; writes are
atomic (a reader never sees half an object) and overwriting a key with the same bytes is harmless,
which is what makes reruns idempotent. The database stores keys (references relative to the
configured store), never absolute URIs: a home copied elsewhere or a bucket restored under another
name or prefix keeps working. `uri(key)` is for people (logs, CLI output).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from lesion_tasks.core.settings import Settings

log = logging.getLogger(__name__)


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


class StoreError(Exception):
    """The store could not be read or written (server down, disk full, permission denied...)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime
    etag: str | None = None
    link: str | None = None  # a symbolic link in a local store: its target, never followed (S3 has none)


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write `data` at `key` atomically; return the key."""

    def get(self, key: str) -> bytes:
        """Read a whole object; raise ObjectNotFound when absent."""

    def download(self, key: str, fileobj: BinaryIO) -> None:
        """Stream an object into an open binary file."""

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> ObjectInfo:
        """Size, modification time (and ETag where there is one); ObjectNotFound when absent."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, sorted by key."""

    def delete(self, key: str) -> None:
        """Remove `key`; removing an absent key is not an error."""

    def uri(self, key: str) -> str: ...


def check_key(key: str) -> str:
    """Validate a store key: relative, `/`-separated, no empty, `.` or `..` segments."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r}: expected a non-empty relative path")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key {key!r}: expected a relative path without '', '.', '..' or '\\'")
    return key


class LocalStore:
    """A directory on the local file system (the embedded default)."""

    _TMP_PREFIX = ".tmp-"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _regular(self, key: str) -> Path:
        """The path of `key` when it is a regular file reached through no symbolic link (below the root);
        ObjectNotFound otherwise: a link in the store is never an object, whatever it points to."""
        path = self._path(key)
        here = self.root
        for part in PurePosixPath(key).parts:
            here = here / part
            try:
                mode = here.lstat().st_mode
            except (FileNotFoundError, NotADirectoryError):
                raise ObjectNotFound(key) from None
            if stat.S_ISLNK(mode):
                raise ObjectNotFound(f"{key} (a symbolic link at {here.relative_to(self.root).as_posix()}: never followed)")
        if not stat.S_ISREG(mode):
            raise ObjectNotFound(key)
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self._TMP_PREFIX, dir=path.parent)
        except OSError as exc:
            raise StoreError(f"cannot write {key!r} under {self.root}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic: readers see the old object or the whole new one
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write {key!r} under {self.root}: {exc.strerror or exc}") from exc
            raise
        return key

    def _open(self, key: str) -> BinaryIO:
        try:  # O_NOFOLLOW: a link swapped in after the check is refused too
            fd = os.open(self._regular(key), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ObjectNotFound(f"{key} (a symbolic link: never followed)") from None
            raise StoreError(f"cannot read {key!r} under {self.root}: {exc.strerror or exc}") from exc
        return os.fdopen(fd, "rb")

    def get(self, key: str) -> bytes:
        with self._open(key) as fh:
            return fh.read()

    def download(self, key: str, fileobj: BinaryIO) -> None:
        with self._open(key) as fh:
            while chunk := fh.read(1 << 20):
                fileobj.write(chunk)

    def exists(self, key: str) -> bool:
        try:
            self._regular(key)
        except ObjectNotFound:
            return False
        return True

    def stat(self, key: str) -> ObjectInfo:
        st = self._regular(key).lstat()
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root
        # walk only the folder the prefix names (e.g. models/<version>/), not the whole store
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base / folder if folder and all(p not in ("", ".", "..") for p in folder.split("/")) else base
        if any((base / "/".join(start.relative_to(base).parts[: i + 1])).is_symlink()
               for i in range(len(start.relative_to(base).parts))):
            return  # below a link: not the store's (the link itself is listed with its parent)
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):  # never descends into a linked folder
            dirnames.sort()
            for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                if name.startswith(self._TMP_PREFIX):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    st = path.lstat()
                    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                    found.append(ObjectInfo(key, 0 if link else st.st_size,
                                            datetime.fromtimestamp(st.st_mtime, UTC), link=link))
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Store:
    """A bucket (and optional prefix) on an S3-protocol server, through the `minio` SDK."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        create_bucket: bool = True,
    ):
        from minio import Minio

        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
        self.bucket = bucket
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = Minio(
            parts.netloc, access_key=access_key, secret_key=secret_key, secure=parts.scheme == "https"
        )
        if create_bucket:
            from minio.error import S3Error

            try:
                if not self.client.bucket_exists(bucket):
                    log.info("creating bucket %s on %s", bucket, parts.netloc)
                    self.client.make_bucket(bucket)
            except S3Error as exc:  # wrong credentials, no permission
                raise StoreError(f"S3 {self.endpoint} refused access to bucket {bucket!r}: {exc.code} {exc.message}") from exc
            except Exception as exc:  # noqa: BLE001
                raise self._unreachable("open", bucket, exc) from exc

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unreachable(self, op: str, key: str, exc: Exception) -> StoreError:
        return StoreError(f"S3 {op} {self.url}/{key} failed: {self.endpoint} unreachable ({type(exc).__name__}: {exc})")

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A time-limited GET link to hand to a person (the bucket stays private)."""
        from datetime import timedelta

        return self.client.presigned_get_object(self.bucket, self._name(key), expires=timedelta(seconds=expires_s))

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        from minio.error import S3Error

        name = self._name(key)
        try:
            self.client.put_object(self.bucket, name, io.BytesIO(data), len(data), content_type=content_type)
        except S3Error as exc:
            raise StoreError(f"S3 put {self.url}/{key} refused: {exc.code} {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001 - urllib3/socket errors: the server is gone
            raise self._unreachable("put", key, exc) from exc
        return key

    def get(self, key: str) -> bytes:
        response = self._get(key)
        try:
            return response.read()
        except Exception as exc:  # noqa: BLE001 - the connection died mid-body
            raise self._unreachable("get", key, exc) from exc
        finally:
            response.close()
            response.release_conn()

    def download(self, key: str, fileobj: BinaryIO) -> None:
        response = self._get(key)
        try:
            for chunk in response.stream(1 << 20):
                fileobj.write(chunk)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the connection died mid-body
            raise self._unreachable("download", key, exc) from exc
        finally:
            response.close()
            response.release_conn()

    def _get(self, key: str):
        from minio.error import S3Error

        name = self._name(key)
        try:
            return self.client.get_object(self.bucket, name)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise StoreError(f"S3 get {self.url}/{key} refused: {exc.code} {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("get", key, exc) from exc

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        name = self._name(key)
        try:
            self.client.stat_object(self.bucket, name)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise StoreError(f"S3 stat {self.url}/{key} refused: {exc.code} {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("stat", key, exc) from exc

    def stat(self, key: str) -> ObjectInfo:
        from minio.error import S3Error

        try:
            st = self.client.stat_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise ObjectNotFound(key) from None
            raise StoreError(f"S3 stat {self.url}/{key} refused: {exc.code} {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("stat", key, exc) from exc
        return ObjectInfo(key, st.size or 0, st.last_modified or datetime.now(UTC), st.etag)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        stem = prefix.rstrip("/")
        full = self._name(stem) if stem else ""
        if not stem and self.prefix:
            full = self.prefix
        if prefix.endswith("/") or not stem:
            full = full + "/" if full else ""
        cut = len(self.prefix) + 1 if self.prefix else 0
        from minio.error import S3Error

        try:
            found = [
                ObjectInfo(o.object_name[cut:], o.size or 0, o.last_modified or datetime.now(UTC))
                for o in self.client.list_objects(self.bucket, prefix=full, recursive=True)
                if not o.is_dir
            ]
        except S3Error as exc:
            raise StoreError(f"S3 list {self.url}/{prefix} refused: {exc.code} {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("list", prefix, exc) from exc
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        from minio.error import S3Error

        name = self._name(key)
        try:
            self.client.remove_object(self.bucket, name)
        except S3Error as exc:
            raise StoreError(f"S3 delete {self.url}/{key} refused: {exc.code} {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable("delete", key, exc) from exc

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"


def open_store(settings: Settings) -> ObjectStore:
    """The store named by `settings.store_url` (`file:///dir` or `s3://bucket[/prefix]`)."""
    parts = urlsplit(settings.store_url)
    if parts.scheme == "file":
        return LocalStore(unquote(parts.path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"LESION_STORE_URL={settings.store_url!r}: expected s3://bucket[/prefix]")
        if not settings.s3_endpoint:
            raise ValueError(
                f"LESION_STORE_URL={settings.store_url!r} needs an S3 endpoint: set LESION_S3_ENDPOINT "
                "(or the lesion_s3 Airflow Connection)"
            )
        return S3Store(
            parts.netloc, parts.path, settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key
        )
    raise ValueError(f"LESION_STORE_URL={settings.store_url!r}: expected file:///dir or s3://bucket[/prefix]")


def is_relative(ref: str) -> bool:
    """A reference relative to the store (a key), as the database holds them."""
    return "://" not in ref


def key_of(store: ObjectStore, ref: str) -> str:
    """The key of a stored reference: a key as it is, or an absolute URI of `store` (`store.uri(key)`,
    e.g. a weights file given as s3://bucket/prefix/weights/x.h5)."""
    if is_relative(ref):
        return check_key(ref)
    base = store.url.rstrip("/") + "/"
    if not ref.startswith(base):
        raise ValueError(f"object URI {ref!r}: not in store {store.url}")
    return check_key(unquote(ref[len(base):]))


def base_uri(store_url: str) -> str:
    """What `open_store(...).url` would be for `store_url`, without opening it (no server needed)."""
    parts = urlsplit(store_url)
    if parts.scheme == "file":
        return Path(unquote(parts.path)).resolve().as_uri()
    if parts.scheme == "s3" and parts.netloc:
        prefix = parts.path.strip("/")
        return f"s3://{parts.netloc}" + (f"/{prefix}" if prefix else "")
    raise ValueError(f"LESION_STORE_URL={store_url!r}: expected file:///dir or s3://bucket[/prefix]")
