"""Bounded image previews: thumbnails and large views decoded within a pixel budget, a few at a time.

The review UI runs inside Airflow's API server, which also serves the Execution API (task heartbeats and
state, sync routes on the same pool of worker threads): one viewer must not be able to exhaust its
memory with huge originals, nor its threads with requests waiting to decode. Web-agnostic (the app maps
`Busy` to 503, `TooMany` to 429, and `TooLargeToDecode` to 413 or a fallback).
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
from PIL import Image

from lesion_tasks.model import gradcam

# Decoding bounds, per API-server process (it serves Airflow's Execution API too). An image is decoded
# only if it has at most DECODE_MAX_PIXELS pixels once opened (JPEG: at the reduced scale `draft` picks,
# 1/2 to 1/8), and only DECODE_SLOTS decodes run at once, each holding at most DECODE_MAX_BYTES of
# encoded bytes and a few bytes per pixel (~100 MB for a 16 MP RGBA PNG) while it decodes. An
# original past a bound (ingest admits up to 64 MP, and PNG/TIFF/BMP/WebP have no reduced-scale
# decoding) is shown as its normalised copy made at ingest. Who decodes when is `gate`'s: a request
# waits for its turn in the event loop, holding no worker thread; one user decodes USER_DECODES images
# at once (another user's request gets the other slot), at most USER_WAITING more of one user's and
# DECODE_WAITING of all users' requests wait, each at most DECODE_WAIT_S; past a bound a request is
# refused at once (TooMany: that user's, Busy: everybody's).
DECODE_MAX_PIXELS = 16_000_000
DECODE_MAX_BYTES = 40 * 2**20
DECODE_SLOTS = 2
USER_DECODES = 1
USER_WAITING = 16  # a queue page's images, fetched at once (6 at a time over HTTP/1.1, more through an HTTP/2 proxy)
DECODE_WAITING = 64  # a waiting request costs a coroutine and its connection, no thread and no image bytes
DECODE_WAIT_S = 30.0
_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class TooLargeToDecode(Exception):
    """The image is past the decoding budget: it is not decoded."""


class Busy(Exception):
    """No decode slot: DECODE_WAITING requests wait already, or none came free within DECODE_WAIT_S."""


class TooMany(Exception):
    """This user has USER_DECODES decodes running and USER_WAITING requests waiting already."""


class Gate:
    """The process's DECODE_SLOTS decode slots, handed out in order of arrival among users under
    USER_DECODES. Awaited in the event loop (any loop: a slot freed in one thread wakes a waiter of
    another), so a waiting request holds no thread; thread-safe."""

    def __init__(self, slots: int = DECODE_SLOTS):
        self._changed = threading.Condition()  # tests wait on it for a state to be reached
        self._free = slots
        self._decoding: Counter[str] = Counter()
        self._waiting: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Future]] = []

    @asynccontextmanager
    async def turn(self, user: str) -> AsyncIterator[None]:
        """Hold one of the slots for `user` (Busy or TooMany at once past a bound, Busy after DECODE_WAIT_S)."""
        await self._acquire(user)
        try:
            yield
        finally:
            self._release(user)

    def counts(self) -> dict[str, int]:
        with self._changed:
            return {"decoding": sum(self._decoding.values()), "waiting": len(self._waiting)}

    async def _acquire(self, user: str) -> None:
        loop = asyncio.get_running_loop()
        with self._changed:
            if self._free and self._decoding[user] < USER_DECODES:  # no waiter may take it (see _release)
                self._take(user)
                return
            if sum(u == user for u, _, _ in self._waiting) >= USER_WAITING:
                raise TooMany(f"user {user!r} has {self._decoding[user]} image(s) decoding and {USER_WAITING} "
                              "waiting: wait for them, then try again")
            if len(self._waiting) >= DECODE_WAITING:
                raise Busy(f"busy decoding images ({DECODE_WAITING} requests waiting): try again shortly")
            waiter = (user, loop, loop.create_future())
            self._waiting.append(waiter)
            self._changed.notify_all()
        try:
            await asyncio.wait_for(asyncio.shield(waiter[2]), DECODE_WAIT_S)
        except BaseException as exc:  # timed out, or cancelled (the client went away)
            with self._changed:
                granted = waiter not in self._waiting
                if not granted:
                    self._waiting.remove(waiter)
                    self._changed.notify_all()
            if granted and isinstance(exc, TimeoutError):
                return  # the slot came at the last moment: use it
            if granted:
                self._release(user)
            if isinstance(exc, TimeoutError):
                raise Busy(f"busy decoding images: no slot came free within {DECODE_WAIT_S:g} s; "
                           "try again shortly") from None
            raise

    def _take(self, user: str) -> None:
        self._free -= 1
        self._decoding[user] += 1
        self._changed.notify_all()

    def _release(self, user: str) -> None:
        """Free `user`'s slot, or hand it to the first waiter whose user may decode one more."""
        with self._changed:
            self._decoding[user] -= 1
            if not self._decoding[user]:
                del self._decoding[user]
            self._free += 1
            for waiter in list(self._waiting):
                name, loop, future = waiter
                if self._decoding[name] >= USER_DECODES:
                    continue
                self._waiting.remove(waiter)
                try:
                    loop.call_soon_threadsafe(_wake, future)
                except RuntimeError:  # its loop has closed: that request is gone
                    continue
                self._take(name)
                break
            self._changed.notify_all()


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


gate = Gate()


def upright(data: bytes, side: int) -> Image.Image:
    """`data` decoded to fit side x side, upright, RGB. Call it during a `gate.turn`. Raises
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
    """A JPEG of `data` fitting side x side, upright (`upright`: during a `gate.turn`, within the budget)."""
    out = io.BytesIO()
    upright(data, side).save(out, "JPEG", quality=85)
    return out.getvalue()


def overlay_bytes(heat: np.ndarray, original: Callable[[], bytes], fallback: Callable[[], bytes], side: int,
                  jpeg: bool) -> bytes:
    """A Grad-CAM map drawn on the original (on `fallback`, the normalised copy, past the decoding budget)
    fitting side x side: a JPEG (thumbnails) or a PNG as scoring would draw it. Call it during a `gate.turn`."""
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
