"""Grad-CAM as stored and as shown: scoring stores the low-resolution map of each prediction (a few hundred
bytes: no original decoded, no overlay drawn or encoded on the hot path), or with LESION_GRADCAM_MATERIALIZE=1
the overlay PNG itself; an overlay is drawn from its map when someone looks (the review UI, `lesion
gradcam-url`), on the original at most OVERLAY_MAX_SIDE px, exactly as scoring would have drawn it.
Predictions scored before maps point to their overlay PNG, which is served as it is.
"""

from __future__ import annotations

import io

import numpy as np
import sqlalchemy as sa
from PIL import Image, ImageOps

from lesion_tasks.core import keys
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import images, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, key_of, open_store
from lesion_tasks.model import gradcam
from lesion_tasks.versions import registry


def original(store: ObjectStore, uri: str, max_side: int) -> Image.Image:
    """The original image, upright RGB (JPEG decoded at a reduced scale of at least `max_side`)."""
    im = Image.open(io.BytesIO(store.get(key_of(store, uri))))
    if im.format == "JPEG":
        im.draft("RGB", (max_side, max_side))  # decode big originals at a reduced scale
    return ImageOps.exif_transpose(im).convert("RGB")


def draw(store: ObjectStore, original_uri: str, heatmap: np.ndarray) -> bytes:
    """The overlay PNG of `heatmap` on the original, at most OVERLAY_MAX_SIDE px."""
    return gradcam.png_bytes(gradcam.overlay(original(store, original_uri, gradcam.OVERLAY_MAX_SIDE), heatmap))


def store_gradcam(store: ObjectStore, version: str, row: sa.Row, heatmap: np.ndarray, materialize: bool) -> str:
    """What the prediction's `gradcam_uri` points to: the map (`keys.gradcam_map`), or with `materialize`
    the overlay PNG drawn on the original (`keys.gradcam`)."""
    if materialize:
        return store.put(keys.gradcam(version, row.drop_id, row.image_id), draw(store, row.original_uri, heatmap),
                         "image/png")
    return store.put(keys.gradcam_map(version, row.drop_id, row.image_id), gradcam.map_bytes(heatmap),
                     "application/octet-stream")


def overlay_png(store: ObjectStore, gradcam_uri: str, original_uri: str) -> bytes:
    """The overlay PNG of a prediction: the stored one (materialised, or scored before maps), else drawn now
    from its map."""
    key = key_of(store, gradcam_uri)
    if not key.endswith(".npy"):
        return store.get(key)
    return draw(store, original_uri, gradcam.map_from_bytes(store.get(key)))


def gradcam_link(settings: Settings, image_id: str, model_version: str = "champion", expires_s: int = 3600) -> str:
    """A time-limited presigned URL of an image's Grad-CAM overlay (S3 stores only: buckets stay private).
    Where scoring stored the map, the overlay is drawn from it the first time and kept beside it."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            version = registry.version(conn, model_version).model_version
            found = conn.execute(sa.select(predictions.c.gradcam_uri, images.c.original_uri)
                                 .join(images, images.c.image_id == predictions.c.image_id)
                                 .where(predictions.c.image_id == image_id)
                                 .where(predictions.c.model_version == version)).first()
    finally:
        engine.dispose()
    if found is None:
        raise ValueError(f"image {image_id!r} has no prediction from model {version}")
    uri = found.gradcam_uri
    if uri is None:
        raise ValueError(f"image {image_id!r}: the Grad-CAM overlay of model {version} was removed by `lesion gc` "
                         "(its artifacts were pruned); its prediction is kept")
    if not 1 <= expires_s <= 7 * 24 * 3600:
        raise ValueError(f"expires={expires_s}: expected 1 to 604800 seconds")
    key = key_of(store, uri)
    png = keys.overlay_of_map(key)
    if png != key and not store.exists(png):  # a map: its overlay is drawn once, kept beside it (`lesion gc` removes both)
        store.put(png, overlay_png(store, uri, found.original_uri), "image/png")
    if not hasattr(store, "presigned_url"):
        raise ValueError(f"store {store.url} is a local directory: open {store.uri(png)} directly (presigned links need S3)")
    return store.presigned_url(png, expires_s)
