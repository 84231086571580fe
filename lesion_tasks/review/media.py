"""The review UI's images and Grad-CAM overlays, streamed from the private store: thumbnails, large
views and overlays drawn on demand are decoded within `previews`' bounds, a few at a time, and cached.

The routes are async: a request waiting for its turn to decode holds none of the API server's worker
threads (Airflow's task heartbeats and state routes are sync and need them); the database, the store
and the decoding run in worker threads, the last two only during the user's turn (`previews.gate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from lesion_tasks.core.schema import images, predictions
from lesion_tasks.core.store import ObjectNotFound, key_of
from lesion_tasks.model import gradcam
from lesion_tasks.review import previews

if TYPE_CHECKING:
    from lesion_tasks.review.web import Backend, Reviewer

log = logging.getLogger(__name__)

THUMB_SIDE = 192  # queue thumbnails
LARGE_SIDE = 1024  # the case page's view of the original (ISIC originals reach 6000x4000)
CACHE = "private, max-age=300"
# overlays drawn from maps and large views, kept per process (a 1024 px overlay PNG ~1 MB, a large view ~0.2 MB)
PREVIEW_CACHE_BYTES = 64 * 2**20


def read(backend: Backend, uri: str | None, what: str) -> bytes:
    if uri is None:
        raise LookupError(f"{what}: not found")
    try:
        return backend.store.get(key_of(backend.store, uri))
    except ObjectNotFound:
        raise LookupError(f"{what}: the object {uri} is missing from the store") from None


def stored(backend: Backend, uri: str | None, media_type: str, what: str) -> Response:
    """An object as stored (no decoding)."""
    return Response(read(backend, uri, what), media_type=media_type, headers={"Cache-Control": CACHE})


def _jpeg(data: bytes, **headers: str) -> Response:
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": CACHE, **headers})


async def _decoded(who: Reviewer, work: Callable[[], bytes]) -> Any:
    """`work` (reading and decoding) in a worker thread once the user's turn to decode comes (a 503 or
    429 at once past the gate's bounds)."""
    async with previews.gate.turn(who.name):
        return await run_in_threadpool(work)


def router(backend: Backend, current_user: Callable) -> APIRouter:
    """The routes /image/... and /overlay/...; `current_user`: the app's login dependency."""
    routes = APIRouter()
    drawn = previews.BoundedCache(PREVIEW_CACHE_BYTES)  # overlays and large views, per API-server process

    def cached_view(row: Any) -> tuple[str, bytes] | None:
        for view in ("original", "normalized"):
            data = drawn.get(f"{row.original_uri}@{LARGE_SIDE}:{view}")
            if data is not None:
                return view, data
        return None

    def large(row: Any, what: str) -> tuple[str, bytes]:
        """During a turn: the original downscaled to LARGE_SIDE (its bytes count against the turn too), or
        past the decoding budget the normalised copy; cached, so a flood of one image decodes it once."""
        view = cached_view(row)  # another request may have made it while this one waited
        if view is None:
            try:
                view = "original", previews.downscaled(read(backend, row.original_uri, what), LARGE_SIDE)
            except previews.TooLargeToDecode as exc:
                log.debug("%s: the large view is the normalised copy (%s)", what, exc)
                view = "normalized", read(backend, row.normalized_uri, what)
            drawn.put(f"{row.original_uri}@{LARGE_SIDE}:{view[0]}", view[1])
        return view

    def image_row(image_id: str, what: str) -> Any:
        with backend.engine.connect() as conn:
            row = conn.execute(sa.select(images.c.original_uri, images.c.normalized_uri, images.c.n_bytes)
                               .where(images.c.image_id == image_id)).first()
        if row is None:
            raise LookupError(f"{what}: not found")
        return row

    @routes.get("/image/{image_id}")
    async def image(image_id: str, size: str = "normalized", who: Any = Depends(current_user)):
        """size: normalized (the model's input copy), thumb, or large (the original, downscaled; the
        normalised copy when the original is past the decoding budget)."""
        if size not in ("normalized", "thumb", "large"):
            raise ValueError(f"size={size!r}: expected normalized, thumb or large")
        what = f"image {image_id!r}"
        row = await run_in_threadpool(image_row, image_id, what)
        if size == "thumb":
            return _jpeg(await _decoded(who, lambda: previews.downscaled(read(backend, row.normalized_uri, what),
                                                                         THUMB_SIDE)))
        if size == "large" and row.n_bytes <= previews.DECODE_MAX_BYTES:
            view = cached_view(row) or await _decoded(who, lambda: large(row, what))
            return _jpeg(view[1], **{"X-Lesion-View": view[0]})
        response = await run_in_threadpool(stored, backend, row.normalized_uri, "image/jpeg", what)
        if size == "large":  # an original of more bytes than the budget: its normalised copy, unread
            response.headers["X-Lesion-View"] = "normalized"
        return response

    def draw(found: Any, what: str, thumb: bool, key: str) -> bytes:
        """During a turn: the overlay of a prediction whose stored Grad-CAM is a map, drawn on the original
        (the normalised copy past the decoding budget): a PNG at most OVERLAY_MAX_SIDE px as scoring would
        draw it, or a JPEG thumbnail drawn at THUMB_SIDE (a queue page needs dozens); cached."""
        cached = drawn.get(key)  # another request may have drawn it while this one waited
        if cached is not None:
            return cached
        data = previews.overlay_bytes(gradcam.map_from_bytes(read(backend, found.gradcam_uri, what)),
                                      lambda: read(backend, found.original_uri, what),
                                      lambda: read(backend, found.normalized_uri, what),
                                      THUMB_SIDE if thumb else gradcam.OVERLAY_MAX_SIDE, jpeg=thumb)
        drawn.put(key, data)
        return data

    def prediction_row(model_version: str, image_id: str, what: str) -> Any:
        with backend.engine.connect() as conn:
            found = conn.execute(sa.select(predictions.c.gradcam_uri, images.c.original_uri, images.c.normalized_uri)
                                 .join(images, images.c.image_id == predictions.c.image_id)
                                 .where(predictions.c.image_id == image_id)
                                 .where(predictions.c.model_version == model_version)).first()
        if found is None:
            raise LookupError(f"{what}: not found")
        if found.gradcam_uri is None:
            raise LookupError(f"{what}: removed by `lesion gc` (the artifacts of model version {model_version!r} were "
                              "pruned; its prediction is kept)")
        return found

    @routes.get("/overlay/{model_version}/{image_id}")
    async def overlay(model_version: str, image_id: str, thumb: bool = False, who: Any = Depends(current_user)):
        what = f"Grad-CAM of {image_id!r} by {model_version!r}"
        found = await run_in_threadpool(prediction_row, model_version, image_id, what)
        if not found.gradcam_uri.endswith(".npy"):  # an overlay PNG as stored (materialised, or scored before maps)
            if not thumb:
                return await run_in_threadpool(stored, backend, found.gradcam_uri, "image/png", what)
            return _jpeg(await _decoded(who, lambda: previews.downscaled(read(backend, found.gradcam_uri, what),
                                                                         THUMB_SIDE)))
        key = f"{found.gradcam_uri}@{THUMB_SIDE if thumb else gradcam.OVERLAY_MAX_SIDE}"
        data = drawn.get(key) or await _decoded(who, lambda: draw(found, what, thumb, key))
        return Response(data, media_type="image/jpeg" if thumb else "image/png", headers={"Cache-Control": CACHE})

    return routes
