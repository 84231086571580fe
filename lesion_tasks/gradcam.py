"""Grad-CAM of the predicted class at the backbone's last activation, and overlays.

Reference implementation through the whole model with a GradientTape (keras-io grad_cam). Because
the last activation A feeds global average pooling, d score / d A[i,j,k] = d score / d pooled[k] / (H W)
for every position: the channel weights need only the head's gradient (used by scoring).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_MAX_SIDE = 1024
OVERLAY_ALPHA = 0.45


def gradcam_tape(model, last_layer: str, images: np.ndarray, class_index: np.ndarray) -> np.ndarray:
    """(N, h, w) heatmaps in [0, 1] for preprocessed `images` and the class of each."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.inputs, [model.get_layer(last_layer).output, model.output])
    x = tf.constant(images, tf.float32)
    with tf.GradientTape() as tape:
        activations, preds = grad_model(x, training=False)
        score = tf.gather(preds, tf.constant(class_index, tf.int32), axis=1, batch_dims=1)
    grads = tape.gradient(score, activations)
    weights = tf.reduce_mean(grads, axis=(1, 2))
    cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", activations, weights)).numpy()
    return cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12)


def _jet(v: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' colour map without importing matplotlib on the hot path."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(rgb: Image.Image, heatmap: np.ndarray, max_side: int = OVERLAY_MAX_SIDE, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The heatmap upsampled onto the image (longest side at most `max_side`), colour-mapped, blended."""
    base = rgb.convert("RGB")
    scale = min(1.0, max_side / max(base.size))
    if scale < 1.0:
        base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))), Image.Resampling.BILINEAR)
    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize(base.size, Image.Resampling.BILINEAR)
    colored = Image.fromarray(_jet(np.asarray(heat, np.float32) / 255.0))
    return Image.blend(base, colored, alpha)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
