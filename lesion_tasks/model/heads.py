"""The melanoma head on pooled backbone features: one layer structure, three kinds.

- `mlp`: the paper's head (Table II: Dense 128 -> ReLU -> BatchNormalization -> Dropout -> Dense 2), trained by
  Keras (`training.fit_head`).
- `linear`: a class-balanced logistic regression on standardised features (scikit-learn, L2, `C`), written into
  the same layers: `head_dense` is the identity (the pooled features are averages of a ReLU, so never negative,
  and ReLU(f I) = f exactly), `head_bn` the standardisation, `head_out` the coefficients. Its Monte Carlo
  samples come from the head's dropout on the standardised features (a dropped feature sits at its mean): the
  logistic regression is fitted without it, inverted dropout leaves each sample's expected logit unchanged, and
  the calibration is fitted on the samples as for the mlp.
- `ensemble`: both side by side (128 + D hidden units, one dropout over all of them), `head_out` giving half of
  each head's logit difference: the mean of the two logits.

Every kind is a Keras head model with the layers `head_dense`, `head_bn`, `head_dropout`, `head_out`, so Monte
Carlo dropout (mc.py), Grad-CAM (gradcam.py), the saved full model and cross-fitting work on it unchanged. Which
kind the demo profile ships was chosen leave-one-site-out (bench/loso_selection.py, docs/model.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
KINDS = ("mlp", "linear", "ensemble")


def _linear_layers(x: np.ndarray, y: np.ndarray, c: float, sample_weight: np.ndarray | None, eps: float
                   ) -> dict[str, np.ndarray]:
    """The logistic regression's layer weights: identity dense, BN = standardisation, out = coefficients."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if x.min() < 0:
        raise ValueError(f"the linear head needs non-negative pooled features (a ReLU's averages); the smallest "
                         f"is {x.min():.4g}")
    scaler = StandardScaler().fit(x, sample_weight=sample_weight)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y,
                                                                            sample_weight=sample_weight)
    scale = np.maximum(scaler.scale_, 1e-6)
    d = x.shape[1]
    coef, intercept = clf.coef_[0], float(clf.intercept_[0])
    return {"w1": np.eye(d, dtype=np.float32), "b1": np.zeros(d, np.float32),
            # BN: (h - mean) / sqrt(var + eps) * gamma + beta = (h - mean) / scale
            "gamma": (np.sqrt(scale ** 2 + eps) / scale).astype(np.float32), "beta": np.zeros(d, np.float32),
            "mean": scaler.mean_.astype(np.float32), "var": (scale ** 2).astype(np.float32),
            # softmax over (NV, MEL) of (-z/2, z/2) = sigmoid(z)
            "w2": np.stack([-coef / 2, coef / 2], 1).astype(np.float32),
            "b2": np.array([-intercept / 2, intercept / 2], np.float32)}


def _layers_of(model) -> dict[str, np.ndarray]:
    w1, b1 = model.get_layer("head_dense").get_weights()
    gamma, beta, mean, var = model.get_layer("head_bn").get_weights()
    w2, b2 = model.get_layer("head_out").get_weights()
    return {"w1": w1, "b1": b1, "gamma": gamma, "beta": beta, "mean": mean, "var": var, "w2": w2, "b2": b2}


def _model_of(layers: dict[str, np.ndarray], dropout: float):
    """A head model with these weights (its hidden width is theirs)."""
    from lesion_tasks.model.backbones import build_head

    d, units = layers["w1"].shape
    head = build_head(d, dropout, units)
    head.get_layer("head_dense").set_weights([layers["w1"], layers["b1"]])
    head.get_layer("head_bn").set_weights([layers[k] for k in ("gamma", "beta", "mean", "var")])
    head.get_layer("head_out").set_weights([layers["w2"], layers["b2"]])
    return head


def _side_by_side(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two heads' layers as one: hidden units concatenated, the output the mean of their logits."""
    cat = {k: np.concatenate([a[k], b[k]], axis=-1) for k in ("w1", "b1", "gamma", "beta", "mean", "var")}
    return cat | {"w2": np.concatenate([a["w2"], b["w2"]]) / 2, "b2": (a["b2"] + b["b2"]) / 2}


def fit(kind: str, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, dropout: float, epochs: int,
        seed: int, learning_rate: float = 1e-3, c: float = 0.003, sample_weight: np.ndarray | None = None,
        views: list[np.ndarray] | None = None) -> tuple[Any, dict[str, list[float]], float]:
    """(Keras head model, history, seconds) of a head of `kind` on features `x` (every augmentation view in
    `views`, view 0 = `x`, for the mlp; the linear head fits view 0 only)."""
    from lesion_tasks.model.training import fit_head

    if kind not in KINDS:
        raise ValueError(f"head {kind!r}: expected one of {KINDS}")
    def mlp():
        return fit_head(views or [x], y, x_val, y_val, dropout=dropout, epochs=epochs, seed=seed,
                        learning_rate=learning_rate, sample_weight=sample_weight)

    started = time.monotonic()
    if kind == "mlp":
        return mlp()
    layers = _linear_layers(np.asarray(x, np.float32), y, c, sample_weight, eps=1e-3)
    history: dict[str, list[float]] = {}
    if kind == "ensemble":
        paper, history, _ = mlp()
        layers = _side_by_side(_layers_of(paper), layers)
    head = _model_of(layers, dropout)
    seconds = time.monotonic() - started
    log.info("%s head (C=%g) fitted in %.1f s on %d images", kind, c, seconds, len(y))
    return head, history, seconds
