"""Validate one image file and make its normalised model-input copy.

`inspect_image` either accepts (RGB, EXIF orientation applied, resized to the model input size,
with a perceptual hash) or rejects with a reason code. It never raises on bad bytes.
"""

from __future__ import annotations

import ctypes
import io
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
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
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transposition that shows it upright

# Decoded pixels, bounded across the ingest's worker threads (as review.previews bounds the UI's decodes).
# An image needs at most PEAK_BYTES_PER_PIXEL bytes a pixel while it is normalised: its decoded pixels
# (Pillow keeps 1, 2 or 4 bytes a pixel) plus the RGB copy (4), converted strip by strip, never through a
# whole-image float array; then the RGB copy and its upright transposition, the decoded pixels freed. A
# worker reserves that much of DECODE_BUDGET_BYTES before it decodes and waits its turn (first come,
# first served) while the reservations of others would pass it; one image past the budget alone takes it
# all. So four 64 MP RGBA PNGs are normalised one after another (512 MB each), while ordinary
# dermoscopy JPEGs (decoded at a reduced scale, a few MB) never wait.
DECODE_BUDGET_BYTES = 640 * 2**20
PEAK_BYTES_PER_PIXEL = 8
STRIP_PIXELS = 2**20  # pixels converted at once


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


class DecodeBudget:
    """Bytes of decoded pixels that threads may hold at once, handed out first come, first served."""

    def __init__(self, capacity: int):
        self.capacity, self.held = capacity, 0
        self._cond = threading.Condition()
        self._next_ticket = self._serving = 0

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.capacity)  # one image past the budget takes all of it
        with self._cond:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._cond.wait_for(lambda: self._serving == ticket and self.held + n <= self.capacity)
            self._serving += 1
            self.held += n
            self._cond.notify_all()  # the next ticket may fit beside this one
        try:
            yield
        finally:
            with self._cond:
                self.held -= n
                self._cond.notify_all()


decode_budget = DecodeBudget(DECODE_BUDGET_BYTES)


def _freed_pixels_go_back() -> bool:
    """Make glibc's malloc hand big freed blocks back to the system (true where it did). By default it raises its
    mmap threshold to the largest block freed, after which Pillow's pixel blocks (up to 16 MB) come from the
    worker threads' own heaps, which keep them: four workers then hold four big images' worth, whatever the budget
    (measured: 1.6 GB for four 64 MP PNGs normalised one at a time, 0.6 GB with this). A fixed threshold (which
    also stops that adjustment) keeps blocks of 1 MiB and more mapped on their own, returned when freed."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 2**20) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


_freed_pixels_go_back()


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
    try:
        if fmt == "JPEG":
            # decode at the smallest power-of-two scale still >= 2x the target: the whole stream
            # is still read (so truncation is caught), at a fraction of the cost for big originals
            im.draft(im.mode, (size * 2, size * 2))
        with decode_budget.hold(im.size[0] * im.size[1] * PEAK_BYTES_PER_PIXEL):
            im.load()  # (before getexif: a PNG's eXIf chunk may follow its pixels, and getexif would decode them)
            return _normalize(im, w, h, fmt, im.getexif().get(0x0112, 1), size)
    except OSError as exc:
        reason = Reason.TRUNCATED_IMAGE if "truncat" in str(exc).lower() else Reason.CORRUPT_IMAGE
        return Rejected(reason, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Rejected(Reason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")


def _normalize(im: Image.Image, w: int, h: int, fmt: str, orientation: int, size: int) -> Accepted:
    """The decoded `im` as the model's input copy (inside a `decode_budget` hold)."""
    rgb, conversions = _to_rgb(im)
    if rgb is not im:
        im.close()  # the decoded pixels: freed before the transposition copies the RGB ones
    if orientation in _UPRIGHT:  # per-pixel conversions commute with it: the pixels of transposing first
        rgb = rgb.transpose(_UPRIGHT[orientation])
        conversions.append(f"exif-orientation-{orientation}")
    small = rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    small.save(out, NORMALIZED_FORMAT, quality=NORMALIZED_QUALITY, subsampling=0)
    return Accepted(w, h, fmt, tuple(conversions), out.getvalue(), phash(small))


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """`im` as 8-bit RGB, and the conversion made. Every conversion is per pixel (16-bit and float images
    scaled by the whole image's range), so it runs strip by strip into one RGB image: no whole-image
    intermediate beyond that RGB copy."""
    mode = im.mode
    if mode == "RGB":
        return im, []
    if mode.startswith("I;16") or mode == "I":
        scale = 257.0 if max(float(np.max(np.asarray(strip))) for strip in _strips(im)) > 255 else 1.0

        def convert(strip: Image.Image) -> Image.Image:
            arr = np.asarray(strip, dtype=np.float64)
            return Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L").convert("RGB")
        return _by_strips(im, convert), [f"{mode}->8bit"]
    if mode == "F":
        lo = float(np.min([np.min(np.asarray(strip, dtype=np.float64)) for strip in _strips(im)]))  # NaN stays NaN
        hi = float(np.max([np.max(np.asarray(strip, dtype=np.float64)) for strip in _strips(im)]))

        def convert(strip: Image.Image) -> Image.Image:
            arr = np.asarray(strip, dtype=np.float64)
            return Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L").convert("RGB")
        return _by_strips(im, convert), ["F->8bit"]
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        def convert(strip: Image.Image) -> Image.Image:
            rgba = strip.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        return _by_strips(im, convert), [f"{mode}->RGB(alpha on black)"]
    return _by_strips(im, lambda strip: strip.convert("RGB")), [f"{mode}->RGB"]


def _strips(im: Image.Image) -> Iterator[Image.Image]:
    """`im` as horizontal strips of about STRIP_PIXELS pixels, top to bottom (each a copy)."""
    width, height = im.size
    rows = max(1, STRIP_PIXELS // width)
    for top in range(0, height, rows):
        yield im.crop((0, top, width, min(top + rows, height)))


def _by_strips(im: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    rgb = Image.new("RGB", im.size)
    rows = max(1, STRIP_PIXELS // im.size[0])
    for i, strip in enumerate(_strips(im)):
        rgb.paste(convert(strip), (0, i * rows))
    return rgb


def phash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash: near-identical photos differ in a few bits."""
    gray = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    low = dctn(gray, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
