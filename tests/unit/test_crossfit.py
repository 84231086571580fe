"""Cross-fitting (training/crossfit.py) and the weighted evidence it rests on: every labelled image of a
sampled site is scored by a head that never saw it, the folds keep lesions together, and the margins
and weights reduce to the unweighted ones where they should."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lesion_tasks.sites import thresholds
from lesion_tasks.training import crossfit
from tests.helpers import labelled_features
from lesion_tasks.model import evaluation


def test_a_site_with_one_melanoma_is_not_cross_fitted():
    rng = np.random.default_rng(1)
    train = labelled_features(rng, 40, lambda i: "archive", "t")
    val = labelled_features(rng, 20, lambda i: "archive", "v")
    val.y[:] = 0
    val.y[0] = 1
    val.sites[0] = "clinic"
    assert crossfit.out_of_fold("clinic", train, val, lambda *a: pytest.fail("no fit expected"), "v1", 5, 0) is None


def test_training_weights_only_for_sampled_images():
    pi = {"a": np.nan, "b": 0.25, "c": np.nan}
    assert crossfit.training_weights(["a", "c"], pi, 5.0) is None
    assert crossfit.training_weights(["a", "b", "c"], pi, 5.0).tolist() == [1.0, 5.0, 1.0]


def test_margins_and_effective_size():
    assert evaluation.effective_size(np.ones(40)) == pytest.approx(40)
    assert evaluation.effective_size(np.array([1.0, 1.0, 10.0])) == pytest.approx(144 / 102)
    # against the whole population only the validation estimate's error counts
    assert evaluation.target_with_margin(0.80, 48, None) == pytest.approx(0.80 + 1.645 * np.sqrt(0.16 / 48))
    assert evaluation.target_with_margin(0.80, 48, None) < evaluation.target_with_margin(0.80, 48, 12)
    assert evaluation.target_with_margin(0.80, 48, 0) == 0.80


def _oof(rng: np.random.Generator, n: int, shift: float) -> thresholds.OutOfFold:
    """Out-of-fold scores whose pooled calibration is off by `shift` in the logit (0: calibrated)."""
    true_logit = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    logits = (true_logit + shift)[:, None] + rng.normal(0, 0.05, (n, 6))  # (N, T) pooled-calibrated logits
    p = (1 / (1 + np.exp(-logits))).mean(axis=1)
    return thresholds.OutOfFold([f"i{k}" for k in range(n)], y, p, np.array([f"L{k}" for k in range(n)], object), 5,
                              logits, np.arange(n) % 5)


def test_a_site_gets_its_own_calibration_only_where_it_measurably_helps():
    rng = np.random.default_rng(3)
    w = np.ones(300)
    shifted = _oof(rng, 300, shift=2.0)  # a clinic where the pooled calibration overstates p(MEL) a lot
    cal = thresholds.site_calibration(shifted, w)
    assert cal["applied"] and cal["gain"] > 1.645 * cal["gain_se"] and cal["log_loss"]["site"] < cal["log_loss"]["pooled"]
    assert cal["b"] < -1.0  # it pulls the logit back down
    fixed = thresholds.recalibrated(shifted, cal)
    assert abs(fixed.mean() - shifted.y.mean()) < abs(shifted.p.mean() - shifted.y.mean()) / 3
    assert stats.spearmanr(fixed, shifted.p).statistic > 0.999  # a scaling: the ranking (AUC) stays

    calibrated = _oof(rng, 300, shift=0.0)  # already calibrated: a site's own scaling would only add noise
    cal = thresholds.site_calibration(calibrated, w)
    assert not cal["applied"] and "no measurable gain" in cal["why"]
    assert thresholds.recalibrated(calibrated, cal) is calibrated.p
    # weights enter the fit: a sample that over-represents melanomas is read at its population's rate
    heavy = np.where(shifted.y == 1, 0.25, 1.0)
    assert thresholds.site_calibration(shifted, heavy)["b"] != pytest.approx(thresholds.site_calibration(shifted, w)["b"])
