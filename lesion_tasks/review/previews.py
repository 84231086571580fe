"""Bounded image previews: thumbnails and large views decoded within a pixel budget, a few at a time.

The review UI runs inside Airflow's API server, which also serves the Execution API: one viewer must not
be able to exhaust its memory with huge originals. Web-agnostic (the app maps `Busy` to 503 and
`TooLargeToDecode` to 413 or a fallback).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from lesion_tasks.model import gradcam

# Decoding bounds, per API-server process (it serves Airflow's Execution API too). An image is decoded
# only if it has at most DECODE_MAX_PIXELS pixels once opened (JPEG: at the reduced scale `draft` picks,
# 1/2 to 1/8), and only DECODE_SLOTS decodes run at once, each holding at most DECODE_MAX_BYTES of
# encoded bytes and a few bytes per pixel (~100 MB for a 16 MP RGBA PNG) while it decodes. An
# original past a bound (ingest admits up to 64 MP, and PNG/TIFF/BMP/WebP have no reduced-scale
# decoding) is shown as its normalised copy made at ingest. A request waits DECODE_WAIT_S for a slot,
# then gets 503.
DECODE_MAX_PIXELS = 16_000_000
DECODE_MAX_BYTES = 40 * 2**20
DECODE_SLOTS = 2
DECODE_WAIT_S = 30.0
_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class TooLargeToDecode(Exception):
    """The image is past the decoding budget: it is not decoded."""


class Busy(Exception):
    """No decode slot came free within DECODE_WAIT_S."""


@contextmanager
def decode_slot() -> Iterator[None]:
    """One of the process's DECODE_SLOTS: parallel requests queue here instead of stacking decoded images."""
    if not _decode_slots.acquire(timeout=DECODE_WAIT_S):
        raise Busy("busy decoding images: try again shortly")
    try:
        yield
    finally:
        _decode_slots.release()


def upright(data: bytes, side: int) -> Image.Image:
    """`data` decoded to fit side x side, upright, RGB. Call it inside a `decode_slot`. Raises
    TooLargeToDecode, before decoding anything, when the image is past the budget."""
    if len(data) > DECODE_MAX_BYTES:
        raise TooLargeToDecode(f"{len(data)} bytes, decoding limit {DECODE_MAX_BYTES}")
    try:
        im = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise TooLargeToDecode(str(exc)) from None
    with im:
        im.draft("RGB", (side, side))  # JPEG/MPO: decode at the smallest scale >= side; other formats: no-op
        width, height = im.size
        if width * height > DECODE_MAX_PIXELS:
            raise TooLargeToDecode(f"{width}x{height} = {width * height} pixels to decode, limit {DECODE_MAX_PIXELS}")
        im.load()
        orientation = im.getexif().get(_ORIENTATION, 1)  # PNG: the eXIf chunk may follow the pixels
        small: Image.Image = im
        if small.mode not in ("RGB", "RGBA", "RGBX", "L", "LA", "CMYK", "YCbCr"):
            small = small.convert("RGB")  # palette, 1-bit, 16-bit, float: resize them as RGB
        small.thumbnail((side, side))  # in place: the full-size pixels are freed here
        if orientation in _UPRIGHT:
            small = small.transpose(_UPRIGHT[orientation])
        return small.convert("RGB")


def downscaled(data: bytes, side: int) -> bytes:
    """A JPEG of `data` fitting side x side, upright (`upright`: inside a `decode_slot`, within the budget)."""
    out = io.BytesIO()
    upright(data, side).save(out, "JPEG", quality=85)
    return out.getvalue()


def overlay_bytes(heat: np.ndarray, original: Callable[[], bytes], fallback: Callable[[], bytes], side: int,
                  jpeg: bool) -> bytes:
    """A Grad-CAM map drawn on the original (on `fallback`, the normalised copy, past the decoding budget)
    fitting side x side: a JPEG (thumbnails) or a PNG as scoring would draw it. Takes a decode slot."""
    with decode_slot():
        try:
            base = upright(original(), side)
        except TooLargeToDecode:
            base = upright(fallback(), side)
        picture = gradcam.overlay(base, heat, max_side=side)
    if not jpeg:
        return gradcam.png_bytes(picture)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()


class BoundedCache:
    """Bytes by key, least recently used first out once `max_bytes` is exceeded; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                self.size -= len(self._items.pop(key))
            self._items[key] = value
            self.size += len(value)
            while self.size > self.max_bytes and self._items:
                self.size -= len(self._items.popitem(last=False)[1])
