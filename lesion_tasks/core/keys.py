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
import unicodedata
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


def _plain(name: str) -> str | None:
    """`slug(name)` where it loses nothing but whitespace (each run of it becomes one '-'): a name of ASCII
    letters, digits, '.', '_', '-' and spaces, not starting or ending with '-' or '.', at most 128. Else None."""
    words = " ".join(name.split())
    if len(words) <= 128 and re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9._ -]*[A-Za-z0-9_])?", words):
        return words.replace(" ", "-")
    return None


def _ascii_readable(name: str) -> str:
    return _readable(unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode())  # accents dropped


def _hashed(name: str, exact: str, empty: str) -> str:
    """A readable part of `name` (cut at 115) plus a hash of `exact`: different `exact` strings never share
    an id, however much of them the readable part loses."""
    head = _ascii_readable(name)[:115].rstrip("-.") or empty
    return f"{head}-{hashlib.sha256(exact.encode()).hexdigest()[:12]}"


def site_key(name: str, what: str = "site") -> str:
    """A site's stored name (`images.site`, `drops.site`), the one rule for every way a site is named.

    The name is read as Unicode NFC with runs of whitespace as one space, ends stripped. A name of ASCII letters,
    digits, '.', '_', '-' and spaces, at most 128, keeps its spelling with spaces as '-' (what the sites made
    before this rule keep). Any other name is compared case-blind (`str.casefold`): its casefolded form where
    that is such a name, else a readable part plus a hash of its whole casefolded form (`東京 Hospital` ->
    `hospital-<12 hex>`), so different names never share a site. Spellings that differ only by case are one site:
    callers match stored sites by `lower()` (`ingest.sources.stored_site`). A key is its own key.
    Raises ValueError for an empty or whitespace-only name, or one with control characters."""
    if name is None or not name.strip():
        raise ValueError(f"{what} {name!r}: empty; expected the name of a clinic or collection")
    canon = unicodedata.normalize("NFC", " ".join(name.split()))
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in canon):
        raise ValueError(f"{what} {name!r}: control characters; expected the name of a clinic or collection")
    plain = _plain(canon)
    if plain:
        return plain
    folded = unicodedata.normalize("NFC", canon.casefold())
    return _plain(folded) or _hashed(folded, folded, "site")


def drop_key(*names: str) -> str:
    """A drop's id from its name, or from its site folder and name (`incoming/<site>/<drop>`: `<site>-<drop>`).
    Plain ASCII names give what `slug` gave before; any other name gets a hash of the exact names, so two sites'
    `drop1` or one long site folder's nights never share an id. At most 128 characters."""
    plain = [_plain(n) for n in names]
    if all(plain) and len(joined := "-".join(plain)) <= 128:
        return joined
    last = _ascii_readable(names[-1])[:115]  # the drop's own name stays whole; a long site folder is cut
    first = "-".join(filter(None, map(_ascii_readable, names[:-1])))[: max(0, 114 - len(last))].rstrip("-.")
    return _hashed("-".join(filter(None, (first, last))), "/".join(names), "drop")


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
