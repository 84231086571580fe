"""A site's labels correct its calibration (`sites.correction`): the fit recovers a known miscalibration, the
stated lower bound of sensitivity holds at the rate it promises over simulated clinics (their labels drawn as
`lesion sites sample` draws them), the threshold is the highest the bound allows, and the labels-only check
gets exact intervals."""

from __future__ import annotations

import numpy as np
import pytest

from lesion_tasks.model import mc
from lesion_tasks.sites import correction, sample

pytestmark = pytest.mark.unit


def _clinic(n: int, seed: int, a: float = -0.6, b: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """(p as scored, truth): the model's calibrated p, and melanomas drawn from a miscalibrated truth
    sigmoid(a + b logit p) (the site's prevalence and spread differ from the training sites')."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.6, 1.5, n)
    p = mc.sigmoid(z)
    return p, (rng.random(n) < mc.sigmoid(a + b * z)).astype(np.int64)


def _sample(p: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, inclusion probabilities) of a k-image sample drawn by the product's design."""
    ids = [f"img-{i}" for i in range(len(p))]
    w, _ = sample.size_measure(dict(zip(ids, p)), ids)
    u = np.random.default_rng(seed).random(len(p))
    chosen = np.argsort(u / w, kind="stable")[:k]
    return chosen, np.minimum(1.0, k * w[chosen] / w.sum())


def test_the_fit_recovers_a_known_miscalibration_and_leaves_a_calibrated_model_alone():
    p, y = _clinic(40_000, 0)
    beta = correction.fit(correction.logit(p), y, shrink=0.0)
    assert beta[0] == pytest.approx(-0.6, abs=0.1) and beta[1] == pytest.approx(0.75, abs=0.06) and abs(beta[2]) < 0.1
    p2, y2 = _clinic(40_000, 1, a=0.0, b=1.0)
    assert np.allclose(correction.fit(correction.logit(p2), y2, shrink=0.0), [0.0, 1.0, 0.0], atol=0.08)
    # a few labels: the ridge keeps the correction near the identity instead of wherever 20 labels point
    few = correction.fit(correction.logit(p[:20]), y[:20])
    assert np.abs(few - correction.IDENTITY).max() < np.abs(correction.fit(correction.logit(p[:20]), y[:20], shrink=0.0)
                                                           - correction.IDENTITY).max()


def test_the_stated_lower_bound_holds_over_simulated_clinics():
    held, misses = 0, []
    for seed in range(100):
        p, y = _clinic(1500, 100 + seed)
        chosen, pi = _sample(p, 200, seed)
        corrected = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi, seed=seed, boot=100)
        t = corrected.choose(0.85)
        sens, spec = corrected.at(t)
        assert sens.low <= sens.estimate <= sens.high and spec.low <= spec.estimate <= spec.high
        assert sens.low >= 0.85 - 1e-9  # the threshold is where the stated lower bound meets the target
        realised = float((p[y == 1] >= t).mean())
        held += sens.low <= realised
        misses.append(round(realised - sens.low, 3))
    assert held >= 90, (held, misses)  # >= 90% of 100 (a 95% bound, widened by ALLOWANCE)


def test_the_threshold_is_the_highest_the_bound_allows_and_reruns_agree():
    p, y = _clinic(2000, 7)
    chosen, pi = _sample(p, 200, 7)
    corrected = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi)
    t = corrected.choose(0.85)
    higher = np.sort(p[p > t])[len(p[p > t]) // 20]  # a clearly higher threshold
    assert corrected.at(t)[0].low >= 0.85 > corrected.at(higher)[0].low
    again = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi)
    assert again.choose(0.85) == t and again.at(t) == corrected.at(t)  # seeded: the same labels, the same point
    # more labels, a narrower interval
    chosen4, pi4 = _sample(p, 800, 7)
    wide, narrow = corrected.at(t)[0], correction.Corrected.fit(p, p[chosen4], y[chosen4], 1 / pi4).at(t)[0]
    assert narrow.high - narrow.low < wide.high - wide.low


def test_the_labels_only_check_gets_exact_intervals_and_bad_input_is_named():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.05, 0.3])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    check = correction.ipw_check(p, y, None, 0.4)
    assert check["sensitivity"] == 1.0 and check["sensitivity_ci95"] == [pytest.approx(0.4782, abs=1e-4), 1.0]
    assert check["specificity"] == 1.0 and check["effective_melanomas"] == 5.0
    with pytest.raises(ValueError, match="3 scores, 2 labels"):
        correction.Corrected.fit(p, p[:3], y[:2])


def test_a_sharp_site_is_not_told_the_misses_of_a_blunt_one():
    """The allowance scales the miss rate: at a site where the model misses almost no melanoma, a target of 0.97
    is reachable without calling every image MEL (an additive allowance would have asked for more than 1.0)."""
    p, y = _clinic(3000, 11, a=0.0, b=3.0)  # the truth much sharper than the scores say
    chosen, pi = _sample(p, 200, 11)
    corrected = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi)
    t = corrected.choose(0.97)
    sens, spec = corrected.at(t)
    assert t > p.min() and sens.low >= 0.97 and spec.estimate > 0.3, (t, sens, spec)  # not everything MEL
    assert float((p[y == 1] >= t).mean()) >= sens.low


def test_specificity_is_over_the_nevi_when_the_labels_hold_other_diagnoses():
    """Other diagnoses score higher than nevi: counting them as nevi would understate the nevi's specificity. With
    the sample's other diagnoses fitted by score, the estimate is the nevi's, inside its interval."""
    rng = np.random.default_rng(5)
    p, y = _clinic(4000, 21, a=0.0, b=1.0)
    other = (y == 0) & (rng.random(len(p)) < mc.sigmoid(-0.5 + 0.9 * correction.logit(p)))
    chosen, pi = _sample(p, 300, 21)
    with_other = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi, other=other[chosen])
    blind = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi)
    t = with_other.choose(0.85)
    realised = float((p[(y == 0) & ~other] < t).mean())
    spec, spec_blind = with_other.at(t)[1], blind.at(t)[1]
    assert spec.low <= realised <= spec.high, (spec, realised)
    assert abs(spec.estimate - realised) < abs(spec_blind.estimate - realised), (spec, spec_blind, realised)
    check = correction.ipw_check(p[chosen], y[chosen], 1 / pi, t, nevus=~other[chosen] & (y[chosen] == 0))
    assert check["specificity_ci95"][0] <= check["specificity"] <= check["specificity_ci95"][1]


def test_the_samples_auc_is_weighted_and_bootstrapped():
    p, y = _clinic(3000, 31)
    chosen, pi = _sample(p, 300, 31)
    auc, ci = correction.ipw_auc(p[chosen], y[chosen], 1 / pi)
    from sklearn.metrics import roc_auc_score

    assert ci[0] <= auc <= ci[1] and ci[0] <= roc_auc_score(y, p) <= ci[1], (auc, ci, roc_auc_score(y, p))
    assert correction.ipw_auc(p[:5], np.zeros(5, np.int64), None) == (None, None)  # one class: no AUC to state
