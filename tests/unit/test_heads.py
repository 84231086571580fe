"""The three head kinds in one layer structure: exact, MC-able, and their uncertainty ranks their errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from lesion_tasks.model import heads, mc


def _data(n: int = 600, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative features (a ReLU's averages), many of them weakly informative as a backbone's are, and a
    noisy linear truth: plenty of errors to rank."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, d))).astype(np.float32)
    y = ((x - 0.8) @ (0.3 * rng.normal(size=d)) + 0.8 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_the_linear_head_is_the_logistic_regression_exactly():
    x, y = _data()
    w = np.where(np.arange(len(y)) % 5 == 0, 5.0, 1.0)  # a site's labels weigh more
    model, _, _ = heads.fit("linear", x, y, x[:50], y[:50], dropout=0.5, epochs=3, seed=0, c=0.01, sample_weight=w)
    scaler = StandardScaler().fit(x, sample_weight=w)
    ref = LogisticRegression(C=0.01, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y, sample_weight=w)
    expected = ref.predict_proba(scaler.transform(x))[:, 1]
    np.testing.assert_allclose(mc.HeadWeights.from_model(model).deterministic(x), expected, atol=2e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0)[:, 1], expected, atol=2e-6)  # the Keras layers agree
    assert model.get_layer("head_dense").units == x.shape[1]


def test_the_ensemble_is_the_mean_of_both_logits():
    x, y = _data(seed=1)
    kwargs = dict(dropout=0.5, epochs=5, seed=0, c=0.01)
    both = mc.HeadWeights.from_model(heads.fit("ensemble", x, y, x[:80], y[:80], **kwargs)[0]).deterministic(x)
    mlp = mc.HeadWeights.from_model(heads.fit("mlp", x, y, x[:80], y[:80], **kwargs)[0]).deterministic(x)
    linear = mc.HeadWeights.from_model(heads.fit("linear", x, y, x[:80], y[:80], **kwargs)[0]).deterministic(x)
    np.testing.assert_allclose(_logit(both), (_logit(mlp) + _logit(linear)) / 2, atol=1e-4)


def test_linear_mc_samples_are_keras_dropout_on_the_standardised_features():
    x, y = _data(seed=2)
    model, _, _ = heads.fit("linear", x, y, x[:50], y[:50], dropout=0.3, epochs=3, seed=0, c=0.1)
    weights = mc.HeadWeights.from_model(model)
    masks = mc.dropout_masks([f"i{k}" for k in range(6)], "v1", 7, x.shape[1], 0.3)
    ours = mc.mc_samples(weights, x[:6], masks)
    dense, bn, out = (model.get_layer(n) for n in ("head_dense", "head_bn", "head_out"))
    h = bn(dense(x[:6]), training=False).numpy()
    for t in range(7):
        np.testing.assert_allclose(ours[:, t], out(h * masks[:, t, :]).numpy()[:, 1], atol=1e-5)


@pytest.mark.parametrize("kind", heads.KINDS)
def test_mc_uncertainty_ranks_the_errors(kind):
    """Mutual information (disagreement between the MC samples) is higher on the cases the head gets wrong. On
    real features (bench/loso_selection.py, docs/model.md) the linear head's ranks them better than the mlp's;
    on these synthetic ones a little worse (AUROC 0.60 against 0.78), still far from the 0.5 of a head whose
    samples do not disagree."""
    x, y = _data(n=1500, seed=3)
    model, _, _ = heads.fit(kind, x[:1000], y[:1000], x[1000:1200], y[1000:1200], dropout=0.5, epochs=30, seed=0, c=0.01)
    ids = [f"img{k}" for k in range(500)]
    p, _, mi = mc.predict(mc.HeadWeights.from_model(model), x[1000:], ids, "v", 50, seed=0)
    wrong = (p >= 0.5) != (y[1000:] == 1)
    assert 20 < wrong.sum() < 250
    assert roc_auc_score(wrong, mi) > 0.56


def test_bad_input_is_refused_with_what_was_expected():
    x, y = _data()
    with pytest.raises(ValueError, match="head 'forest': expected one of"):
        heads.fit("forest", x, y, x, y, dropout=0.5, epochs=1, seed=0)
    with pytest.raises(ValueError, match=r"non-negative pooled features \(a ReLU.s averages\); the smallest is -5"):
        heads.fit("linear", x - 1.0 - x.max(), y, x, y, dropout=0.5, epochs=1, seed=0)
