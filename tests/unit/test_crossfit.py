"""Cross-fitting (lifecycle/crossfit.py) and the weighted evidence it rests on: every labelled image of a
sampled site is scored by a head that never saw it, the folds keep lesions together, and the margins
and weights reduce to the unweighted ones where they should."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lesion_tasks.lifecycle import crossfit
from lesion_tasks.model import evaluation
from lesion_tasks.model.training import fit_head


def _labelled(rng: np.random.Generator, n: int, site_of, prefix: str) -> crossfit.Labelled:
    y = (rng.random(n) < 0.35).astype(np.int64)
    x = (rng.normal(size=(n, 8)) + y[:, None] * 1.5).astype(np.float32)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    sites = np.array([site_of(i) for i in range(n)], dtype=object)
    lesions = np.array([f"L{prefix}{i // 2}" for i in range(n)], dtype=object)  # two images per lesion
    return crossfit.Labelled([x], y, ids, sites, lesions)


def test_out_of_fold_scores_each_site_image_with_a_head_that_never_saw_it():
    rng = np.random.default_rng(0)
    train = _labelled(rng, 160, lambda i: "clinic" if i % 4 == 0 else "archive", "t")
    val = _labelled(rng, 60, lambda i: "clinic" if i % 3 == 0 else "archive", "v")
    seen: list[tuple[set[str], set[str]]] = []
    ids_of = {x.tobytes(): i for part in (train, val) for x, i in zip(part.views[0], part.ids)}

    def fit(views, y, x_val, y_val, sample_weight):
        seen.append(({ids_of[x.tobytes()] for x in views[0]}, {ids_of[x.tobytes()] for x in x_val}))
        assert sample_weight is None or len(sample_weight) == len(y)
        return fit_head(views, y, x_val, y_val, 0.3, 8, 0)[0]

    oof = crossfit.out_of_fold("clinic", train, val, fit, "v1", 10, 0)
    clinic = {i for part in (train, val) for i, s in zip(part.ids, part.sites) if s == "clinic"}
    assert oof is not None and set(oof.ids) == clinic and len(oof.ids) == len(clinic) == 40 + 20
    assert oof.folds == 5 and len(seen) == 5
    assert np.all((oof.p > 0) & (oof.p < 1))
    # fold by fold: the images a head scored are in neither its training nor its early-stopping data
    folds = [clinic - trained - stopped for trained, stopped in seen]
    assert all(folds) and set().union(*folds) == clinic and sum(map(len, folds)) == len(clinic)
    lesion_of = dict(zip(oof.ids, oof.lesions))
    lesions = [{lesion_of[i] for i in fold} for fold in folds]
    assert sum(map(len, lesions)) == len(set().union(*lesions))  # a lesion's photographs share one fold


def test_a_site_with_one_melanoma_is_not_cross_fitted():
    rng = np.random.default_rng(1)
    train = _labelled(rng, 40, lambda i: "archive", "t")
    val = _labelled(rng, 20, lambda i: "archive", "v")
    val.y[:] = 0
    val.y[0] = 1
    val.sites[0] = "clinic"
    assert crossfit.out_of_fold("clinic", train, val, lambda *a: pytest.fail("no fit expected"), "v1", 5, 0) is None


def test_training_weights_only_for_sampled_images():
    pi = {"a": np.nan, "b": 0.25, "c": np.nan}
    assert crossfit.training_weights(["a", "c"], pi, 5.0) is None
    assert crossfit.training_weights(["a", "b", "c"], pi, 5.0).tolist() == [1.0, 5.0, 1.0]


def test_unit_sample_weights_train_the_same_head_as_none():
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 30)
    x = (rng.normal(size=(60, 6)) + y[:, None]).astype(np.float32)
    a = fit_head([x], y, x[:20], y[:20], 0.3, 5, 0)[0]
    b = fit_head([x], y, x[:20], y[:20], 0.3, 5, 0, sample_weight=np.ones(60))[0]
    c = fit_head([x], y, x[:20], y[:20], 0.3, 5, 0, sample_weight=np.where(y == 1, 5.0, 1.0))[0]
    wa, wb, wc = (m.get_layer("head_out").get_weights()[0] for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)


def test_margins_and_effective_size():
    assert evaluation.effective_size(np.ones(40)) == pytest.approx(40)
    assert evaluation.effective_size(np.array([1.0, 1.0, 10.0])) == pytest.approx(144 / 102)
    # against the whole population only the validation estimate's error counts
    assert evaluation.target_with_margin(0.80, 48, None) == pytest.approx(0.80 + 1.645 * np.sqrt(0.16 / 48))
    assert evaluation.target_with_margin(0.80, 48, None) < evaluation.target_with_margin(0.80, 48, 12)
    assert evaluation.target_with_margin(0.80, 48, 0) == 0.80


def _oof(rng: np.random.Generator, n: int, shift: float) -> crossfit.OutOfFold:
    """Out-of-fold scores whose pooled calibration is off by `shift` in the logit (0: calibrated)."""
    true_logit = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.int64)
    logits = (true_logit + shift)[:, None] + rng.normal(0, 0.05, (n, 6))  # (N, T) pooled-calibrated logits
    p = (1 / (1 + np.exp(-logits))).mean(axis=1)
    return crossfit.OutOfFold([f"i{k}" for k in range(n)], y, p, np.array([f"L{k}" for k in range(n)], object), 5,
                              logits, np.arange(n) % 5)


def test_a_site_gets_its_own_calibration_only_where_it_measurably_helps():
    rng = np.random.default_rng(3)
    w = np.ones(300)
    shifted = _oof(rng, 300, shift=2.0)  # a clinic where the pooled calibration overstates p(MEL) a lot
    cal = crossfit.site_calibration(shifted, w)
    assert cal["applied"] and cal["gain"] > 1.645 * cal["gain_se"] and cal["log_loss"]["site"] < cal["log_loss"]["pooled"]
    assert cal["b"] < -1.0  # it pulls the logit back down
    fixed = crossfit.recalibrated(shifted, cal)
    assert abs(fixed.mean() - shifted.y.mean()) < abs(shifted.p.mean() - shifted.y.mean()) / 3
    assert stats.spearmanr(fixed, shifted.p).statistic > 0.999  # a scaling: the ranking (AUC) stays

    calibrated = _oof(rng, 300, shift=0.0)  # already calibrated: a site's own scaling would only add noise
    cal = crossfit.site_calibration(calibrated, w)
    assert not cal["applied"] and "no measurable gain" in cal["why"]
    assert crossfit.recalibrated(calibrated, cal) is calibrated.p
    # weights enter the fit: a sample that over-represents melanomas is read at its population's rate
    heavy = np.where(shifted.y == 1, 0.25, 1.0)
    assert crossfit.site_calibration(shifted, heavy)["b"] != pytest.approx(crossfit.site_calibration(shifted, w)["b"])
