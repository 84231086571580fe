"""Monte Carlo dropout on the head alone, vectorised, seeded per (image, model version).

Dropout lives only in the head, so the T stochastic forward passes share one backbone pass: with
h = BN(ReLU(f W1 + b1)) computed once per image (BatchNormalization in inference mode, always), sample
t is softmax((h * m_t / (1 - p)) W2 + b2) for a Bernoulli(1 - p) mask m_t. This is exactly what
Keras' Dropout computes in training mode, with the masks made explicit and reproducible.

Uncertainty per image (natural log, so entropy is in [0, ln 2]):
- p_mel = mean over t of p_t(MEL)
- entropy = H(p_mel), the predictive entropy of the mean
- mutual_info = H(p_mel) - mean_t H(p_t) >= 0 (BALD: disagreement between the samples)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MEL = 1  # output index of melanoma (0 = nevus)
_EPS = 1e-12


@dataclass(frozen=True)
class HeadWeights:
    w1: np.ndarray
    b1: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    w2: np.ndarray
    b2: np.ndarray
    dropout: float

    @classmethod
    def from_model(cls, model) -> HeadWeights:
        """Head weights of a full model or a head-only model (layers named head_*)."""
        w1, b1 = model.get_layer("head_dense").get_weights()
        bn = model.get_layer("head_bn")
        gamma, beta, mean, var = bn.get_weights()
        w2, b2 = model.get_layer("head_out").get_weights()
        return cls(w1, b1, gamma, beta, mean, var, float(bn.epsilon), w2, b2, float(model.get_layer("head_dropout").rate))

    def hidden(self, features: np.ndarray) -> np.ndarray:
        """Dense -> ReLU -> BatchNormalization (inference statistics): the input of Dropout."""
        h = np.maximum(features.astype(np.float32) @ self.w1 + self.b1, 0.0)
        return (h - self.mean) / np.sqrt(self.var + self.eps) * self.gamma + self.beta

    def deterministic(self, features: np.ndarray) -> np.ndarray:
        """p(MEL) with dropout off (what Keras predict() gives)."""
        return _softmax(self.hidden(features) @ self.w2 + self.b2)[..., MEL]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def image_seed(image_id: str, model_version: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{model_version}\0{image_id}".encode()).digest()[:8], "little")


def dropout_masks(image_ids: Sequence[str], model_version: str, samples: int, units: int, rate: float) -> np.ndarray:
    """(N, T, units) float32 masks already scaled by 1/(1-rate), one seeded stream per image."""
    keep = 1.0 - rate
    out = np.empty((len(image_ids), samples, units), np.float32)
    for i, image_id in enumerate(image_ids):
        rng = np.random.default_rng(image_seed(image_id, model_version))
        out[i] = (rng.random((samples, units)) < keep) / keep
    return out


def mc_samples(head: HeadWeights, features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, T) p(MEL) for each image and dropout sample, in one vectorised call."""
    h = head.hidden(features)  # (N, U), once per image
    z = np.einsum("nu,ntu,uk->ntk", h, masks, head.w2, optimize=True) + head.b2
    return _softmax(z)[..., MEL]


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def summarize(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p_mel, entropy, mutual_info) per image from (N, T) samples."""
    p_mel = samples.mean(axis=1)
    entropy = binary_entropy(p_mel)
    mutual_info = np.maximum(entropy - binary_entropy(samples).mean(axis=1), 0.0)
    return p_mel, entropy, mutual_info


def predict(head: HeadWeights, features: np.ndarray, image_ids: Sequence[str], model_version: str,
            samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MC-dropout (p_mel, entropy, mutual_info) for pooled features of `image_ids`."""
    masks = dropout_masks(image_ids, model_version, samples, head.w1.shape[1], head.dropout)
    return summarize(mc_samples(head, features, masks))
