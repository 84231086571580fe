"""Ids and object-store keys: one home for how things are named.

Every artifact's key says which drop, model version or feature configuration made it:

    drops/<drop_id>/original/<image_id><suffix>        the bytes as received (immutable)
    drops/<drop_id>/normalized/<size>/<image_id>.jpg   the RGB copy the model reads
    drops/<drop_id>/quarantine/<hash>-<name>           a rejected entry's bytes
    drops/<drop_id>/aux/<path>                         the drop's CSV / JSON / text files
    drops/<drop_id>/manifest.json                      every entry and what became of it
    features/<config>/view<k>/<drop_id>.npz            cached backbone features
    models/<version>/<name>                            a model version's artifacts (artifacts.py)
    predictions/<version>/gradcam/<drop_id>/<id>.png   Grad-CAM overlays

The database stores these keys, never absolute URIs, so a home, a bucket or a prefix can move.
Names from outside (file names inside a drop) are bounded: a key segment never exceeds
`MAX_SEGMENT` bytes, whatever the sender's file system allowed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath

MAX_SEGMENT = 120  # bytes; file systems cap a name at 255, S3 a key at 1024


def _readable(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


def slug(name: str, what: str = "drop name") -> str:
    """A readable id from a free-form name: letters, digits, '.', '_' and '-' only, at most 128."""
    out = _readable(name)[:128]
    if not out:
        raise ValueError(f"{what} {name!r}: cannot derive an id from it (pass one explicitly)")
    return out


def injective_slug(name: str, max_len: int = 128) -> str:
    """`slug(name)` when that is `name` itself and fits; else the slug cut short plus a hash of the
    exact `name`, so two different names never give one id (e.g. run ids `a:b`, `a~b`, `a.b.`)."""
    readable = _readable(name)
    if readable == name and 0 < len(name) <= max_len:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{readable[: max_len - 13].rstrip('-.')}-{digest}".lstrip("-")


def safe_segment(text: str, max_len: int = MAX_SEGMENT) -> str:
    """One key segment from an outside name: unsafe characters replaced, length bounded (with a hash
    of the full name when cut, so different long names stay different)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip(".") or "_"
    if len(out) <= max_len:
        return out
    return out[: max_len - 17] + "~" + hashlib.sha256(text.encode()).hexdigest()[:16]


# --- drops --------------------------------------------------------------------------------------

def original(drop_id: str, image_id: str, suffix: str) -> str:
    """The received bytes under the image's id and its file's suffix (a suffix that is not a short
    alphanumeric extension, e.g. 300 characters after the last dot, becomes `.bin`)."""
    suffix = suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix) else ".bin"
    return f"drops/{drop_id}/original/{image_id}{suffix}"


def normalized(drop_id: str, size: int, image_id: str) -> str:
    return f"drops/{drop_id}/normalized/{size}/{image_id}.jpg"


def quarantined(drop_id: str, entry: str) -> str:
    """Bounded and collision-free: a hash of the whole entry name, then (part of) its file name."""
    digest = hashlib.sha256(entry.encode()).hexdigest()[:10]
    return f"drops/{drop_id}/quarantine/{digest}-{safe_segment(PurePosixPath(entry).name, 80)}"


def aux(drop_id: str, entry: str) -> str:
    return f"drops/{drop_id}/aux/" + "/".join(safe_segment(p) for p in PurePosixPath(entry).parts)


def manifest(drop_id: str) -> str:
    return f"drops/{drop_id}/manifest.json"


# --- features, models, predictions --------------------------------------------------------------

def features(config_key: str, view: int, drop_id: str) -> str:
    return f"features/{config_key}/view{view}/{drop_id}.npz"


def feature_config(config_key: str) -> str:
    return f"features/{config_key}/config.json"


def model_prefix(version: str) -> str:
    return f"models/{version}/"


def gradcam_prefix(version: str) -> str:
    """Every Grad-CAM overlay of a model version is under this prefix."""
    return f"predictions/{version}/gradcam/"


def gradcam(version: str, drop_id: str, image_id: str) -> str:
    """An image's overlay PNG: written by scoring where overlays are materialised, else rendered on demand
    from its map and kept here (`lesion gradcam-url`)."""
    return f"{gradcam_prefix(version)}{drop_id}/{image_id}.png"


def gradcam_map(version: str, drop_id: str, image_id: str) -> str:
    """An image's low-resolution Grad-CAM map (float16 .npy, a few hundred bytes): what scoring stores."""
    return f"{gradcam_prefix(version)}{drop_id}/{image_id}.npy"


def overlay_of_map(key: str) -> str:
    """The overlay PNG rendered from the map at `key` (the same name, .png)."""
    return key[: -len(".npy")] + ".png" if key.endswith(".npy") else key


def gradcam_version(key: str) -> str | None:
    """The model version whose overlay `key` is (None: not an overlay key)."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 4 and parts[0] == "predictions" and parts[2] == "gradcam" else None
