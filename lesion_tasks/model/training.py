"""Fit the head on cached backbone features: class-balanced, early-stopped, learning rate on plateau.

Deterministic: the same features, labels, settings and seed give the same head, bit for bit (one seed
for Keras' initialisers and dropout, a seeded shuffle, TensorFlow's deterministic kernels while the head
trains), so a retrain on unchanged data reproduces its metrics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from lesion_tasks.model.backbones import build_head

log = logging.getLogger(__name__)


def balanced_weights(y: np.ndarray) -> dict[int, float]:
    """Inverse-frequency class weights (sklearn's 'balanced'): each class weighs half the loss."""
    counts = np.bincount(y, minlength=2)
    if (counts == 0).any():
        raise ValueError(f"training split has {counts[0]} NV and {counts[1]} MEL: both classes are needed")
    return {c: float(len(y) / (2 * counts[c])) for c in (0, 1)}


@contextlib.contextmanager
def deterministic_ops() -> Iterator[None]:
    """TensorFlow's op determinism for the duration of the block only (it is process-wide: the state
    before is restored, so scoring and feature extraction elsewhere in the process are not affected)."""
    try:
        from tensorflow.python.framework import config as tf_config
    except ImportError:  # pragma: no cover - a TensorFlow without the switch: seeds alone
        yield
        return
    was = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()


def fit_head(train_views: list[np.ndarray], y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             dropout: float, epochs: int, seed: int, learning_rate: float = 1e-3, batch_size: int = 64,
             patience: int = 10, sample_weight: np.ndarray | None = None) -> tuple[Any, dict[str, list[float]], float]:
    """(head model, history, seconds). Every augmentation view of every training image is a sample, weighed
    by its class's balanced weight times its `sample_weight` (e.g. a site's own labelled images, retrain.py)."""
    import keras
    import tensorflow as tf

    x = np.concatenate(train_views).astype(np.float32)
    y = np.tile(y_train, len(train_views))
    weights = balanced_weights(y_train)
    w = np.array([weights[int(c)] for c in y], np.float32)  # = class_weight, as sample weights
    if sample_weight is not None:
        w = w * np.tile(np.asarray(sample_weight, np.float32), len(train_views))
    val_w = np.array([weights[int(c)] for c in y_val], np.float32)

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch % 5 == 0 or epoch == epochs - 1:
                log.info("head epoch %d/%d: loss %.4f val_loss %.4f lr %.1e", epoch + 1, epochs, logs["loss"],
                         logs["val_loss"], float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    started = time.monotonic()
    with deterministic_ops():
        keras.utils.set_random_seed(seed)  # initialisers, dropout masks while training
        head = build_head(x.shape[1], dropout)
        head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
        # a new order every epoch, the same orders on every run with this seed
        train = (tf.data.Dataset.from_tensor_slices((x, y, w))
                 .shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size))
        # validation as a dataset too: from numpy arrays Keras builds a parallel map that TensorFlow's op
        # determinism rewrites, logging a red "E0000 ... use_unbounded_threadpool" line on every fit
        val = tf.data.Dataset.from_tensor_slices((x_val.astype(np.float32), y_val, val_w)).batch(batch_size)
        history = head.fit(
            train, epochs=epochs, verbose=0, shuffle=False, validation_data=val,
            callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
                keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(2, patience // 3), min_lr=1e-5),
                _Progress(),
            ],
        )
    seconds = time.monotonic() - started
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    log.info("head trained in %.1f s (%d epochs, best val_loss %.4f)", seconds, len(hist["loss"]), min(hist["val_loss"]))
    return head, hist, seconds
