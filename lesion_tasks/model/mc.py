"""Monte Carlo dropout on the head alone, vectorised, seeded per image and per model version's seed.

Dropout lives only in the head, so the T stochastic forward passes share one backbone pass: with
h = BN(ReLU(f W1 + b1)) computed once per image (BatchNormalization in inference mode, always), sample
t is softmax((h * m_t / (1 - p)) W2 + b2) for a Bernoulli(1 - p) mask m_t. This is exactly what
Keras' Dropout computes in training mode, with the masks made explicit and reproducible.

Uncertainty per image (natural log, so entropy is in [0, ln 2]):
- p_mel = mean over t of p_t(MEL)
- entropy = H(p_mel), the predictive entropy of the mean
- mutual_info = H(p_mel) - mean_t H(p_t) >= 0 (BALD: disagreement between the samples)

Calibration (Platt scaling of the samples): each sample is p_t = sigmoid(a d_t + b), d_t the head's
logit difference MEL - NV; (a, b) = (1, 0) is the head as trained. Class weights make the raw head
over-predict melanoma, so (a, b) is fitted after training on the validation split by minimising the
negative log-likelihood of the MC mean (`fit_calibration`); p_mel, entropy and mutual information are
all computed from the calibrated samples, so they stay consistent with one another.

Seeding: a model version records its mask seed (`config["mc_seed"]`, the training seed);
its masks are one stream per (seed, image), so the same data, config and seed give the same numbers
whatever the run's (timestamped) version id. Versions trained before seeds were recorded keep their
stream per (model version, image). Either way the masks of an image do not depend on its batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MEL = 1  # output index of melanoma (0 = nevus)
_EPS = 1e-12
_MASK_FLOATS = 2**26  # 256 MiB of float32 masks


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
    cal_a: float = 1.0
    cal_b: float = 0.0

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
        """p(MEL) with dropout off (what Keras predict() gives, calibrated)."""
        z = self.hidden(features) @ self.w2 + self.b2
        return self.calibrated(z[..., MEL] - z[..., 1 - MEL])

    def calibrated(self, logit_diff: np.ndarray, site_a: np.ndarray | float = 1.0,
                   site_b: np.ndarray | float = 0.0) -> np.ndarray:
        """Calibrated p(MEL) per sample: the pooled Platt scaling, then a site's own (`site_a`, `site_b` per
        row: a second Platt scaling on the pooled-calibrated logit; 1, 0 leaves it, bit for bit)."""
        return sigmoid(site_a * (self.cal_a * logit_diff + self.cal_b) + site_b)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """log(p / (1 - p)), p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def image_seed(image_id: str, model_version: str, seed: int | None = None) -> int:
    """The mask stream of one image: per (seed, image) when the version recorded a seed, else per
    (model version, image) for versions that recorded none."""
    key = f"mc-seed={int(seed)}\0{image_id}" if seed is not None else f"{model_version}\0{image_id}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def dropout_masks(image_ids: Sequence[str], model_version: str, samples: int, units: int, rate: float,
                  seed: int | None = None) -> np.ndarray:
    """(N, T, units) float32 masks already scaled by 1/(1-rate), one seeded stream per image (`image_seed`)."""
    keep = 1.0 - rate
    out = np.empty((len(image_ids), samples, units), np.float32)
    for i, image_id in enumerate(image_ids):
        rng = np.random.default_rng(image_seed(image_id, model_version, seed))
        out[i] = (rng.random((samples, units)) < keep) / keep
    return out


def mc_logits(head: HeadWeights, features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, T) uncalibrated logit differences MEL - NV for each image and dropout sample, in one call."""
    h = head.hidden(features)  # (N, U), once per image
    w = head.w2[:, MEL] - head.w2[:, 1 - MEL]
    return np.einsum("nu,ntu,u->nt", h, masks, w, optimize=True) + (head.b2[MEL] - head.b2[1 - MEL])


def mc_samples(head: HeadWeights, features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, T) calibrated p(MEL) for each image and dropout sample."""
    return head.calibrated(mc_logits(head, features, masks))


def fit_calibration(logits: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    """(a, b) minimising the negative log-likelihood of mean_t sigmoid(a d_t + b) on labelled (N, T) logits
    (Platt 1999, with his smoothed targets); `w`: per-image weights (e.g. IPW of a site's sample)."""
    from scipy.optimize import minimize

    y = np.asarray(y, np.float64)
    n1, n0 = y.sum(), len(y) - y.sum()
    # Platt's smoothed targets: on a validation split the head separates perfectly, plain NLL would
    # drive the slope to its bound and make every probability 0 or 1
    target = np.where(y == 1, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))

    def nll(params: np.ndarray) -> float:
        p = np.clip(sigmoid(params[0] * logits + params[1]).mean(axis=1), 1e-7, 1 - 1e-7)
        return float(-np.average(target * np.log(p) + (1 - target) * np.log(1 - p), weights=w))

    best = minimize(nll, np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(0.02, 50.0), (-20.0, 20.0)])
    return float(best.x[0]), float(best.x[1])


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
            samples: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MC-dropout (p_mel, entropy, mutual_info) for pooled features of `image_ids`."""
    return summarize(head.calibrated(logits_for(head, features, image_ids, model_version, samples, seed)))


def logits_for(head: HeadWeights, features: np.ndarray, image_ids: Sequence[str], model_version: str,
               samples: int, seed: int | None = None) -> np.ndarray:
    """(N, T) uncalibrated MC logit differences, with the seeded masks of each image (`image_seed`), in chunks
    whose masks stay under _MASK_FLOATS (a wide head's, model/heads.py, are N x T x ~1,000 floats; the paper's
    head on up to 10,000 images is one chunk, as it always was)."""
    chunk = max(1, _MASK_FLOATS // (samples * head.w1.shape[1]))
    parts = [mc_logits(head, features[start : start + chunk],
                       dropout_masks(image_ids[start : start + chunk], model_version, samples, head.w1.shape[1],
                                     head.dropout, seed))
             for start in range(0, max(len(image_ids), 1), chunk)]
    return np.concatenate(parts)
