"""Validate one image file and make its normalised model-input copy.

`inspect_image` either accepts (RGB, EXIF orientation applied, resized to the model input size,
with a perceptual hash) or rejects with a reason code. It never raises on bad bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.fft import dctn

from lesion_tasks.core.reasons import Reason
from lesion_tasks.ingest.sources import Limits

# Bombs are this module's to judge: `inspect_image` rejects more than Limits.max_pixels (64 M, under PIL's own
# warning threshold of about 89 M) from the header, before any pixel is decoded, with reason
# decompression_bomb; PIL's error above twice its threshold stays as a backstop. So PIL's warning is noise in
# every ingest log: ignored process-wide, once. (It was ignored per call with warnings.catch_warnings(), which
# is not thread-safe: with the ingest's worker threads it leaked the warning now and then.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ALLOWED_FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "WEBP", "MPO"}
# Modes we know how to turn into 8-bit RGB.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV",
                     "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"BM", "BMP"), (b"GIF8", "GIF"), (b"RIFF", "WEBP"))
NORMALIZED_FORMAT = "JPEG"
NORMALIZED_QUALITY = 95


@dataclass(frozen=True)
class Accepted:
    width: int
    height: int
    format: str
    conversions: tuple[str, ...]
    normalized: bytes  # JPEG, size x size, RGB
    phash: int  # 64-bit DCT perceptual hash of the normalised copy


@dataclass(frozen=True)
class Rejected:
    reason: Reason
    detail: str


def _kind_of(data: bytes) -> str:
    """What a file is, in words, never what it contains (its bytes may be anyone's secret)."""
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else None  # a cut multi-byte char
    if text is not None and all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return "text"
    return "binary data with no image signature"


def inspect_image(data: bytes, limits: Limits, size: int) -> Accepted | Rejected:
    """Check `data` is one usable image and return its normalised copy, or why it is not."""
    if not data:
        return Rejected(Reason.EMPTY_FILE, "zero bytes")
    if len(data) > limits.max_bytes:
        return Rejected(Reason.FILE_TOO_LARGE, f"{len(data)} bytes, limit {limits.max_bytes}")
    try:
        im = Image.open(io.BytesIO(data))  # lazy: the header only; the pixel limit is ours (below)
    except UnidentifiedImageError:
        known = next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)
        if known:  # the signature of an image, but the decoder cannot read its header
            return Rejected(Reason.CORRUPT_IMAGE, f"{known} signature but an unreadable header")
        return Rejected(Reason.NOT_AN_IMAGE, f"{_kind_of(data)} ({len(data)} bytes), not an image")
    except Image.DecompressionBombError as exc:
        return Rejected(Reason.DECOMPRESSION_BOMB, str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoder failure on hostile bytes is a quarantine, not a crash
        return Rejected(Reason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")
    with im:
        return _check_and_normalize(im, limits, size)


def _check_and_normalize(im: Image.Image, limits: Limits, size: int) -> Accepted | Rejected:
    fmt = im.format or "?"
    if fmt not in ALLOWED_FORMATS:
        return Rejected(Reason.UNSUPPORTED_FORMAT, f"format {fmt}, expected one of {sorted(ALLOWED_FORMATS)}")
    w, h = im.size
    if w * h > limits.max_pixels:
        return Rejected(Reason.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels, limit {limits.max_pixels}")
    if min(w, h) < limits.min_side:
        return Rejected(Reason.TOO_SMALL, f"{w}x{h}, each side must be >= {limits.min_side}")
    if max(w, h) / min(w, h) > limits.max_aspect:
        return Rejected(Reason.EXTREME_ASPECT_RATIO, f"{w}x{h}, aspect ratio limit {limits.max_aspect}")
    if getattr(im, "n_frames", 1) > 1 and fmt != "MPO":
        return Rejected(Reason.MULTI_FRAME, f"{im.n_frames} frames in a {fmt}")
    if im.mode not in CONVERTIBLE_MODES:
        return Rejected(Reason.UNSUPPORTED_MODE, f"pixel mode {im.mode}")
    orientation = im.getexif().get(0x0112, 1)
    try:
        if fmt == "JPEG":
            # decode at the smallest power-of-two scale still >= 2x the target: the whole stream
            # is still read (so truncation is caught), at a fraction of the cost for big originals
            im.draft(im.mode, (size * 2, size * 2))
        im.load()
    except OSError as exc:
        reason = Reason.TRUNCATED_IMAGE if "truncat" in str(exc).lower() else Reason.CORRUPT_IMAGE
        return Rejected(reason, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Rejected(Reason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")
    upright = im
    if orientation in range(2, 9):
        upright = ImageOps.exif_transpose(im)
    rgb, conversions = _to_rgb(upright)
    if upright is not im:
        conversions.append(f"exif-orientation-{orientation}")
    small = rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    small.save(out, NORMALIZED_FORMAT, quality=NORMALIZED_QUALITY, subsampling=0)
    return Accepted(w, h, fmt, tuple(conversions), out.getvalue(), phash(small))


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    mode = im.mode
    if mode == "RGB":
        return im, []
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if arr.max() > 255 else 1.0
        gray = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB"), [f"{mode}->8bit"]
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        gray = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
        return gray.convert("RGB"), ["F->8bit"]
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), [f"{mode}->RGB(alpha on black)"]
    return im.convert("RGB"), [f"{mode}->RGB"]


def phash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash: near-identical photos differ in a few bits."""
    gray = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    low = dctn(gray, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
