"""Deployment settings: environment variables, with overrides from the caller (Airflow Connections).

| variable              | meaning                                                        | default                       |
|-----------------------|----------------------------------------------------------------|-------------------------------|
| `LESION_HOME`         | root of the embedded defaults                                  | `~/.lesion`                   |
| `LESION_DB_URL`       | SQLAlchemy URL of the results database                         | `sqlite:///$LESION_HOME/lesion.db` |
| `LESION_STORE_URL`    | object store: `file:///dir` or `s3://bucket[/prefix]`          | `file://$LESION_HOME/store`   |
| `LESION_S3_ENDPOINT`  | S3/MinIO endpoint, `http(s)://host:port` (https if no scheme)  | none                          |
| `LESION_S3_ACCESS_KEY`, `LESION_S3_SECRET_KEY` | S3 credentials (never logged)         | none                          |
| `LESION_IMAGE_SIZE`   | side of the normalised model-input copy made at ingestion      | `224`                         |
| `LESION_INCOMING_SETTLE_SECONDS` | a folder drop under `incoming/` is taken once untouched this long (or when it holds `_READY`) | `300` |
| `LESION_GRADCAM_MATERIALIZE` | `1`: nightly scoring also writes each Grad-CAM overlay as a PNG (the files a team may want); `0`: it stores the low-resolution map only and overlays are rendered on demand | `0` |
| `LESION_VERDICTS_VALIDATE` | `1`: reviewer verdicts join the validation and test splits like imported labels (`lesion labels import`); `0`: training data only, since a verdict is not histopathology | `0` |
| `LESION_BACKBONE_PRECISION` | the backbone's precision: `auto` (bfloat16 where the CPU has bfloat16 units, else float32), `float32` or `bfloat16` (`model.precision`) | `auto` |

Weights (read per call by `weights_settings()`, so a process can be pointed elsewhere without restarting):

| variable              | meaning                                                        | default                       |
|-----------------------|----------------------------------------------------------------|-------------------------------|
| `LESION_WEIGHTS_DIR`  | folder of local ImageNet weight files (also searched for `imagenet`) | none                    |
| `KERAS_HOME`          | Keras' cache; `models/` in it is searched too                  | `~/.keras`                    |
| `LESION_WEIGHTS_ANY_PATH` | `1`: a weights path may be anywhere (operators only)       | off                           |
| `LESION_WEIGHTS_DOWNLOAD` | `0`: never try the Keras download                          | `1`                           |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    store_url: str
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    image_size: int = 224
    incoming_settle_seconds: int = 300
    verdicts_validate: bool = False
    gradcam_materialize: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from `env` (default: the process environment); non-None overrides win."""
        env = os.environ if env is None else env
        home = Path(overrides.get("home") or env.get("LESION_HOME") or Path.home() / ".lesion").expanduser()
        values: dict[str, Any] = {
            "home": home,
            "db_url": env.get("LESION_DB_URL") or f"sqlite:///{home / 'lesion.db'}",
            "store_url": env.get("LESION_STORE_URL") or (home / "store").as_uri(),
            "s3_endpoint": env.get("LESION_S3_ENDPOINT") or None,
            "s3_access_key": env.get("LESION_S3_ACCESS_KEY") or None,
            "s3_secret_key": env.get("LESION_S3_SECRET_KEY") or None,
            "image_size": _int(env, "LESION_IMAGE_SIZE", 224, minimum=32),
            "incoming_settle_seconds": _int(env, "LESION_INCOMING_SETTLE_SECONDS", 300, minimum=0),
            "verdicts_validate": _flag(env, "LESION_VERDICTS_VALIDATE", False),
            "gradcam_materialize": _flag(env, "LESION_GRADCAM_MATERIALIZE", False),
        }
        values.update({k: v for k, v in overrides.items() if v is not None and k != "home"})
        return cls(**values)

    def __repr__(self) -> str:
        return f"Settings({self.describe()})"

    def describe(self) -> dict[str, Any]:
        """Settings safe to log: secrets and database passwords masked."""
        return {
            "home": str(self.home),
            "db_url": _mask_password(self.db_url),
            "store_url": self.store_url,
            "s3_endpoint": self.s3_endpoint,
            "s3_access_key": "***" if self.s3_access_key else None,
            "image_size": self.image_size,
            "verdicts_validate": self.verdicts_validate,
            "gradcam_materialize": self.gradcam_materialize,
        }


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{name}={raw!r}: expected 0 or 1")
    return raw == "1"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")
    return value


# Query parameters whose value is a secret (libpq's `password`/`sslpassword`, `pwd`, `token`, `api_key`, ...)
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)
# `scheme://user:<password>@`, read as SQLAlchemy reads it: the password runs up to the first '@'
# (so it may hold '?', '/' or '#', which `urlsplit` would take for the query, path or fragment)
_USERINFO = re.compile(r"^(?P<head>[\w+.-]+:" r"//[^:/]*:)(?P<password>[^@]*)@")  # split: no URL-like literal


def _mask_password(url: str) -> str:
    """`url` safe to log: the userinfo password and every query parameter named like a secret are `***`."""
    masked = _USERINFO.sub(r"\g<head>***@", url, count=1)
    base, sep, query = masked.partition("?")
    if not sep:
        return masked
    params = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        params.append(f"{name}=***" if eq and _SECRET_PARAM.search(unquote_plus(name)) else param)
    return f"{base}?{'&'.join(params)}"


# --- Airflow Connection fields -> settings (pure functions: the DAG side passes the fields in) ---

_SQLALCHEMY_DRIVERS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "sqlite": "sqlite",
}


def db_url_from_connection(
    conn_type: str | None,
    host: str | None,
    port: int | None,
    login: str | None,
    password: str | None,
    schema: str | None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """SQLAlchemy URL for the `lesion_db` Connection. `extra.sqlalchemy_url` wins when given."""
    extra = extra or {}
    if extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    driver = _SQLALCHEMY_DRIVERS.get((conn_type or "").lower())
    if driver is None:
        raise ValueError(
            f"lesion_db connection type {conn_type!r}: expected one of {sorted(_SQLALCHEMY_DRIVERS)}"
            " or extra {'sqlalchemy_url': ...}"
        )
    if driver == "sqlite":
        return f"sqlite:///{host or schema}"
    auth = ""
    if login:
        auth = quote(login, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    return f"{driver}://{auth}{host or 'localhost'}{f':{port}' if port else ''}/{schema or ''}"


def s3_overrides_from_connection(
    host: str | None,
    port: int | None,
    login: str | None,
    password: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Settings overrides for the `lesion_s3` Connection (endpoint in host or extra.endpoint_url)."""
    extra = extra or {}
    endpoint = extra.get("endpoint_url") or extra.get("endpoint")
    if not endpoint and host:
        endpoint = host if "://" in host else f"http://{host}"
        if port:
            endpoint += f":{port}"
    return {
        "s3_endpoint": endpoint or None,
        "s3_access_key": login or extra.get("aws_access_key_id") or None,
        "s3_secret_key": password or extra.get("aws_secret_access_key") or None,
        "store_url": extra.get("store_url") or None,
    }


@dataclass(frozen=True)
class WeightsSettings:
    dirs: tuple[Path, ...]  # where local weight files are read from, in order
    any_path: bool
    download: bool


def weights_settings(env: Mapping[str, str] | None = None) -> WeightsSettings:
    """Where ImageNet weight files are looked for, and what a weights value may name (see the table above)."""
    env = os.environ if env is None else env
    dirs = [Path(env["LESION_WEIGHTS_DIR"])] if env.get("LESION_WEIGHTS_DIR") else []
    dirs.append(Path(env.get("KERAS_HOME", Path.home() / ".keras")) / "models")
    return WeightsSettings(tuple(dirs), env.get("LESION_WEIGHTS_ANY_PATH") == "1", env.get("LESION_WEIGHTS_DOWNLOAD", "1") != "0")


def backbone_precision_setting(env: Mapping[str, str] | None = None) -> str:
    """`LESION_BACKBONE_PRECISION` as set (`model.precision.choose` decides what it means on this machine)."""
    env = os.environ if env is None else env
    return env.get("LESION_BACKBONE_PRECISION", "auto")
