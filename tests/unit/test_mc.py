"""MC-dropout on the head: exact, bounded, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from lesion_tasks.versions.registry import ModelVersion
from lesion_tasks.model import evaluation, mc
from lesion_tasks.model.backbones import build_head


@pytest.fixture(scope="module")
def head():
    import keras

    keras.utils.set_random_seed(1)
    model = build_head(12, dropout=0.4)
    rng = np.random.default_rng(0)
    model.get_layer("head_bn").set_weights([rng.uniform(0.5, 2, 128), rng.normal(0, 1, 128), rng.normal(0, 1, 128), rng.uniform(0.5, 2, 128)])
    return model


def test_deterministic_head_equals_keras(head):
    x = np.random.default_rng(1).normal(size=(7, 12)).astype(np.float32)
    np.testing.assert_allclose(mc.HeadWeights.from_model(head).deterministic(x), head.predict(x, verbose=0)[:, 1], atol=1e-6)


def test_mc_samples_equal_keras_dropout_with_the_same_masks(head):
    """Keras' head with dropout replaced by the explicit mask gives the same samples."""
    x = np.random.default_rng(2).normal(size=(5, 12)).astype(np.float32)
    weights = mc.HeadWeights.from_model(head)
    masks = mc.dropout_masks([f"i{k}" for k in range(5)], "v1", 9, 128, 0.4)
    ours = mc.mc_samples(weights, x, masks)
    dense, bn, out = (head.get_layer(n) for n in ("head_dense", "head_bn", "head_out"))
    h = bn(dense(x), training=False).numpy()
    for t in range(9):
        naive = out(h * masks[:, t, :]).numpy()[:, 1]
        np.testing.assert_allclose(ours[:, t], naive, atol=1e-5)


def test_uncertainty_bounds_and_reproducibility(head):
    weights = mc.HeadWeights.from_model(head)
    x = np.random.default_rng(3).normal(size=(50, 12)).astype(np.float32) * 3
    ids = [f"img{k}" for k in range(50)]
    p, h, mi = mc.predict(weights, x, ids, "model-a", 50)
    assert ((h >= 0) & (h <= np.log(2) + 1e-9)).all()
    assert (mi >= 0).all() and (mi <= h + 1e-9).all()
    assert ((p >= 0) & (p <= 1)).all()
    again = mc.predict(weights, x, ids, "model-a", 50)
    for a, b in zip((p, h, mi), again):
        np.testing.assert_array_equal(a, b)
    other = mc.predict(weights, x, ids, "model-b", 50)[0]
    assert not np.array_equal(p, other)  # seeds depend on the model version
    # an image's numbers do not depend on which other images share its batch
    alone = mc.predict(weights, x[7:8], ids[7:8], "model-a", 50)
    assert alone[0][0] == pytest.approx(p[7], abs=1e-6)


def test_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.2).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.15, 500), 0, 1)
    t = evaluation.threshold_for_sensitivity(y, p, 0.85)
    sens = ((p >= t) & (y == 1)).sum() / y.sum()
    assert sens >= 0.85
    highest = np.sort(p[y == 1])[::-1][int(np.ceil(0.85 * y.sum())) - 1]  # the highest threshold reaching 0.85
    assert ((p >= np.nextafter(highest, 1)) & (y == 1)).sum() / y.sum() < 0.85
    assert p[p < highest].max() < t < highest and t == pytest.approx((highest + p[p < highest].max()) / 2)
    assert ((p >= t) == (p >= highest)).all()  # the same decisions on these cases
    # perfectly separated: the middle of the gap
    assert evaluation.threshold_for_sensitivity(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.6, 0.9]), 1.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no melanoma"):
        evaluation.threshold_for_sensitivity(np.zeros(5, int), p[:5], 0.85)


def test_metrics_match_definitions():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.2, 0.3, 0.05])
    m = evaluation.binary_metrics(y, p, 0.5)
    assert m["confusion"]["matrix"] == [[4, 1], [1, 2]]
    assert m["mel_sensitivity"] == pytest.approx(2 / 3) and m["mel_specificity"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    cal = evaluation.calibration(y, p)
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2))
    curve = evaluation.referral_curve(y, p, np.abs(p - 0.5) * -1, 0.5)
    assert curve[0]["kept"] == 8 and curve[-1]["kept"] == 4


def test_masks_of_a_version_with_a_recorded_seed_do_not_depend_on_its_id():
    """Seeded per (seed, image): two versions trained with one seed (run ids differ) draw the same masks;
    another seed draws others; a version without a recorded seed keeps its stream per (version, image)."""
    import hashlib

    ids = [f"ISIC_{k:07d}" for k in range(6)]
    a = mc.dropout_masks(ids, "demo-tiny-run-1", 20, 128, 0.5, seed=7)
    np.testing.assert_array_equal(a, mc.dropout_masks(ids, "demo-tiny-run-2", 20, 128, 0.5, seed=7))
    assert not np.array_equal(a, mc.dropout_masks(ids, "demo-tiny-run-1", 20, 128, 0.5, seed=8))
    np.testing.assert_array_equal(a[2:3], mc.dropout_masks(ids[2:3], "x", 20, 128, 0.5, seed=7))  # per image, not per batch
    legacy = mc.dropout_masks(ids, "demo-tiny-run-1", 20, 128, 0.5)
    assert not np.array_equal(a, legacy)
    expected = int.from_bytes(hashlib.sha256(b"demo-tiny-run-1\0ISIC_0000000").digest()[:8], "little")  # as before seeds
    assert mc.image_seed("ISIC_0000000", "demo-tiny-run-1") == expected
    np.testing.assert_array_equal(legacy[0], (np.random.default_rng(expected).random((20, 128)) < 0.5) / 0.5)
    row = {"model_version": "v", "status": "candidate", "is_champion": False, "backbone": "tiny", "image_size": 64,
           "threshold": 0.5, "mc_samples": 20}
    assert ModelVersion.from_row(row | {"config": {"mc_seed": 7, "seed": 7}}).mc_seed == 7
    assert ModelVersion.from_row(row | {"config": {"seed": 7}}).mc_seed is None
    assert ModelVersion.from_row(row | {"config": None}).mc_seed is None


def test_a_site_calibrated_on_its_own_labels_changes_its_cases_only():
    """`predict`: a case of a site with its own calibration (thresholds_by_site.<site>.calibration.applied)
    gets sigmoid(a * pooled-calibrated logit + b) per sample; every other case is bit for bit what it was."""
    from lesion_tasks.versions import predict

    rng = np.random.default_rng(5)
    units = 16
    head = mc.HeadWeights(rng.normal(size=(8, units)).astype(np.float32), np.zeros(units, np.float32),
                          np.ones(units, np.float32), np.zeros(units, np.float32), np.zeros(units, np.float32),
                          np.ones(units, np.float32), 1e-3, rng.normal(size=(units, 2)).astype(np.float32),
                          np.zeros(2, np.float32), 0.5, cal_a=0.8, cal_b=-0.3)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    ids, sites = [f"ISIC_{k:07d}" for k in range(6)], ["clinic", "archive", "clinic", None, "archive", "clinic"]
    own = {"threshold": 0.2, "chosen_on": "site", "n_mel": 40}
    row = {"model_version": "v", "status": "candidate", "is_champion": False, "backbone": "tiny", "image_size": 64,
           "threshold": 0.3, "mc_samples": 20, "config": {"seed": 1, "mc_seed": 1}}
    plain = ModelVersion.from_row(row | {"review_rule": {"thresholds_by_site": {"clinic": own}}})
    calibrated = ModelVersion.from_row(row | {"review_rule": {"thresholds_by_site": {"clinic": own | {"calibration": {
        "applied": True, "a": 1.3, "b": -1.1}}}}})
    unapplied = ModelVersion.from_row(row | {"review_rule": {"thresholds_by_site": {"clinic": own | {"calibration": {
        "applied": False, "a": 1.3, "b": -1.1}}}}})
    before, after = predict.predict(plain, head, x, ids, sites=sites), predict.predict(calibrated, head, x, ids, sites=sites)
    np.testing.assert_array_equal(predict.predict(unapplied, head, x, ids, sites=sites).p_mel, before.p_mel)
    mine = np.array([s == "clinic" for s in sites])
    np.testing.assert_array_equal(after.samples[~mine], before.samples[~mine])
    pooled_logit = head.cal_a * before.logits[mine] + head.cal_b
    np.testing.assert_allclose(after.samples[mine], 1 / (1 + np.exp(-(1.3 * pooled_logit - 1.1))), rtol=1e-4, atol=1e-6)
    assert np.all(after.p_mel[mine] < before.p_mel[mine])  # b < 0 pulls this site's p(MEL) down
    assert after.thresholds.tolist() == [0.2, 0.3, 0.2, 0.3, 0.3, 0.2]
    np.testing.assert_array_equal(after.is_mel, (after.p_mel >= after.thresholds).astype(int))
