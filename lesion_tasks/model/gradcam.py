"""Grad-CAM of the predicted class at the backbone's last activation, the stored map, and overlays.

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


def gradcam_tape(model, last_layer: str, images: np.ndarray, class_index: np.ndarray, normalize: bool = True,
                 batch_size: int = 16) -> np.ndarray:
    """(N, h, w) heatmaps (in [0, 1] when normalised) for preprocessed `images` and the class of each, a
    batch at a time through one traced function (the tape holds a batch's activations)."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.input, [model.get_layer(last_layer).output, model.output])

    # one graph: run eagerly, the tape's backward pass logs "oneDNN supports DT_INT32 only on platforms
    # with AVX-512" as an error line (in every evaluate_model log) on CPUs without it
    @tf.function
    def cam_of(x, index):
        with tf.GradientTape() as tape:
            activations, preds = grad_model(x, training=False)
            score = tf.gather(preds, index, axis=1, batch_dims=1)
        weights = tf.reduce_mean(tape.gradient(score, activations), axis=(1, 2))
        return tf.nn.relu(tf.einsum("nhwk,nk->nhw", activations, weights))

    cam = np.concatenate([cam_of(tf.constant(images[i : i + batch_size], tf.float32),
                                 tf.constant(class_index[i : i + batch_size], tf.int32)).numpy()
                          for i in range(0, len(images), batch_size)])
    return cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12) if normalize else cam


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


def map_bytes(heatmap: np.ndarray) -> bytes:
    """A Grad-CAM map as stored: float16 .npy (a 14x14 map is 520 bytes)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(heatmap, np.float16), allow_pickle=False)
    return buf.getvalue()


def map_from_bytes(data: bytes) -> np.ndarray:
    heat = np.load(io.BytesIO(data), allow_pickle=False)
    if heat.ndim != 2:
        raise ValueError(f"a Grad-CAM map of shape {heat.shape}: expected (h, w)")
    return heat.astype(np.float32)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def head_gradient(head, pooled: np.ndarray, class_index: np.ndarray) -> np.ndarray:
    """d p(class) / d pooled features, analytically through the head (dropout off, BN in inference).

    p = softmax(BN(ReLU(f W1 + b1)) W2 + b2); backpropagating by hand costs two small matmuls.
    """
    pre = pooled.astype(np.float32) @ head.w1 + head.b1
    hidden = (np.maximum(pre, 0) - head.mean) / np.sqrt(head.var + head.eps) * head.gamma + head.beta
    z = hidden @ head.w2 + head.b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(p.shape[1], dtype=np.float32)[class_index]
    pc = (p * onehot).sum(axis=1, keepdims=True)
    g_z = pc * (onehot - p)  # d softmax_c / d z
    g_hidden = g_z @ head.w2.T
    g_pre = g_hidden * (head.gamma / np.sqrt(head.var + head.eps)) * (pre > 0)
    return g_pre @ head.w1.T


def gradcam_fast(activations: np.ndarray, pooled_gradient: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Grad-CAM from the last activation map (N, H, W, K) and the head's gradient (N, K).

    The map feeds global average pooling, so d score / d A[h, w, k] = g[k] / (H W) everywhere and the
    Grad-CAM channel weights (the spatial mean of that gradient) are g / (H W): no backbone backprop.
    """
    h, w = activations.shape[1:3]
    weights = pooled_gradient / (h * w)
    cam = np.maximum(np.einsum("nhwk,nk->nhw", activations, weights), 0)
    if normalize:
        cam = cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12)
    return cam
