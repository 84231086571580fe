"""A site's operating point from its unlabelled scored images (`sites.operating`): the estimate, the threshold that
reaches the target plus the margin, an interval whose coverage is measured here, which method a site gets, the
out-of-scope threshold that goes with a moved threshold, and the review band that follows the threshold."""

from __future__ import annotations

import numpy as np
import pytest

from lesion_tasks.model.config import GateFloors
from lesion_tasks.sites import operating
from lesion_tasks.sites.status import labels_to_next_status
from lesion_tasks.versions import predict
from lesion_tasks.versions.registry import ModelVersion, ReviewRule, SiteThreshold

pytestmark = pytest.mark.unit


def _night(n: int, seed: int) -> np.ndarray:
    """Calibrated p_mel of a night: mostly low, a tail of likely melanomas (about 20% melanomas)."""
    return np.random.default_rng(seed).beta(0.8, 3.2, n)


def test_the_estimate_is_the_expected_sensitivity_of_calibrated_scores():
    p = np.array([0.9, 0.6, 0.3, 0.1, 0.1])
    sens, spec = operating.estimated(p, 0.3)
    assert sens == pytest.approx(1.8 / 2.0) and spec == pytest.approx((0.9 + 0.9) / 3.0)
    t = operating.choose(p, 0.85, margin=0.0)
    assert t == 0.3 and operating.estimated(p, t)[0] >= 0.85  # the highest score reaching it
    assert operating.estimated(p, 0.6)[0] < 0.85
    # the margin moves the threshold down, never up; a target above 1 is capped (the lowest score)
    assert operating.choose(p, 0.85, margin=0.12) <= t and operating.choose(p, 0.95, margin=0.12) == 0.1


def test_the_interval_covers_the_realised_sensitivity_when_the_calibration_holds():
    """Coverage measured, not assumed: nights whose labels are drawn from their own p_mel (the calibration holds);
    the realised sensitivity at the chosen threshold falls inside the stated interval in at least 95% of them, and
    the interval without the calibration allowance (sampling alone) still covers about 95%."""
    covered = covered_sampling_only = 0
    trials = 200
    for seed in range(trials):
        p = _night(300, seed)
        t = operating.choose(p, 0.85)
        sens, _ = operating.interval(p, t, seed=seed, draws=400)
        y = np.random.default_rng(10_000 + seed).random(len(p)) < p
        realised = float((p[y] >= t).mean())
        covered += sens.low <= realised <= sens.high
        covered_sampling_only += sens.low + operating.SENS_ALLOWANCE - 1e-9 <= realised <= sens.high - operating.SENS_ALLOWANCE + 1e-9 or sens.high == 1.0
        assert sens.low <= sens.estimate <= sens.high
    assert covered / trials >= 0.95, covered
    assert covered_sampling_only / trials >= 0.90, covered_sampling_only


def test_a_small_site_gets_a_wider_interval_and_the_same_images_the_same_one():
    small, large = _night(120, 1), _night(12_000, 1)
    s_small, _ = operating.interval(small, operating.choose(small, 0.85))
    s_large, _ = operating.interval(large, operating.choose(large, 0.85))
    assert s_small.high - s_small.low > s_large.high - s_large.low
    assert operating.interval(small, 0.2) == operating.interval(small, 0.2)  # seeded: reruns change nothing


def _version(**rule) -> ModelVersion:
    row = {"model_version": "v1", "status": "trained", "is_champion": True, "backbone": "b", "image_size": 96,
           "threshold": 0.2, "mc_samples": 10, "config": {"target_sensitivity": 0.85},
           "review_rule": ReviewRule(out_of_scope_above=0.6, **rule).to_json()}
    return ModelVersion.from_row(row)


def test_which_method_a_site_gets():
    v = _version(thresholds_by_site={"trained": SiteThreshold(0.2, "pooled", 40),
                                     "labelled": SiteThreshold(0.12, "site", 28, "cross-fitted (5 folds)"),
                                     "new": SiteThreshold(0.2, "pooled", 0)})
    p = _night(500, 3)
    assert operating.method_for(v, "labelled", p)[0] == "labelled"
    assert operating.method_for(v, "trained", p)[0] == "pooled"  # its validation images chose the pooled threshold
    assert operating.method_for(v, "new", p)[0] == "unlabelled"
    assert operating.method_for(v, "never-seen", p)[0] == "unlabelled"
    method, why = operating.method_for(v, "never-seen", p[:50])
    assert method == "pooled" and "too few" in why and "50 images" in why
    point = operating.point_for(v, "never-seen", p)
    assert point.method == "unlabelled" and point.threshold == operating.choose(p, 0.85)
    assert point.sensitivity.estimate >= 0.85 + operating.MARGIN - 1e-9 and point.images == 500
    assert operating.point_for(v, "labelled", p).threshold == 0.12
    assert operating.point_for(v, "trained", p).threshold == 0.2
    # what it would take to be validated: about (30 missing) / (20% to test x its melanoma rate) labels
    needed = labels_to_next_status("unvalidated", 0, point, GateFloors())
    assert needed == int(np.ceil(30 / (0.2 * p.mean()))), needed
    assert labels_to_next_status("validated", 40, point, GateFloors()) is None
    # once the site has labels, its own yield of melanomas per label: 33 in 200, 5 already in its test split
    assert labels_to_next_status("provisional", 5, point, GateFloors(), 200, 33) == int(np.ceil(25 / (0.2 * 33 / 200)))


def test_the_out_of_scope_threshold_follows_a_moved_threshold():
    grid = ((0.05, 0.8), (0.1, 0.7), (0.2, 0.6), (0.4, 0.5))
    v = _version(out_of_scope_by_threshold=grid)
    assert operating.scope_threshold_at(v, 0.2) == 0.6  # the pooled threshold: the version's own
    assert operating.scope_threshold_at(v, 0.07) == 0.7  # the grid point above: the lower, safer one
    assert operating.scope_threshold_at(v, 0.3) == 0.5
    assert operating.scope_threshold_at(v, 0.95) == 0.5
    assert operating.scope_threshold_at(_version(), 0.07) == 0.6  # versions without the grid keep theirs


def test_a_new_sites_out_of_scope_threshold_follows_its_own_images():
    """At a clinic the backbone has not seen, its in-scope lesions' p_other rise together: the threshold rises by
    the shift of the site's lower quantile over the validation in-scope images', capped, never lowered; a site
    trained at (pooled point), a version without the reference and one without an out-of-scope head keep theirs."""
    from lesion_tasks.model import scope

    rng = np.random.default_rng(4)
    logit_in = rng.normal(-3.0, 1.0, 4000)  # validation in-scope images' logit p_other
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    reference = scope.site_reference(sig(logit_in))
    assert reference == pytest.approx(np.quantile(logit_in, scope.SITE_QUANTILE), abs=1e-6)
    shifted = sig(rng.normal(-2.6, 1.0, 3000))  # a sharp new camera: +0.4 logit on every lesion
    with_others = np.r_[shifted, sig(rng.normal(1.5, 1.0, 2000))]  # and 40% other diagnoses on top
    above, shift = scope.for_site(0.6, reference, shifted)
    assert shift == pytest.approx(0.4, abs=0.1) and above > 0.6
    assert np.log(above / (1 - above)) - np.log(0.6 / 0.4) == pytest.approx(shift)
    # other diagnoses above raise the lower quantile (it is then the in-scope lesions' 0.2 / 0.6 quantile): the cap
    # bounds what they take away
    assert shift < scope.for_site(0.6, reference, with_others)[1] <= scope.SITE_SHIFT_CAP
    assert scope.for_site(0.6, reference, sig(rng.normal(0.0, 1.0, 3000)))[1] == scope.SITE_SHIFT_CAP  # capped
    assert scope.for_site(0.6, reference, sig(rng.normal(-4.0, 1.0, 3000))) == (0.6, 0.0)  # never lowered
    assert scope.for_site(0.6, None, shifted) == (0.6, 0.0) and scope.for_site(None, reference, shifted) == (None, 0.0)
    assert scope.for_site(1.0, reference, shifted) == (1.0, 0.0)  # flags nothing there: stays so

    v = _version(thresholds_by_site={"trained": SiteThreshold(0.2, "pooled", 40)}, out_of_scope_site_reference=reference)
    p = _night(500, 3)
    new = operating.point_for(v, "never-seen", p, p_other=shifted[:500])
    assert new.method == "unlabelled" and new.out_of_scope_above > 0.6 and "logit above the validation" in new.why
    assert operating.point_for(v, "trained", p, p_other=shifted[:500]).out_of_scope_above == 0.6
    assert operating.point_for(_version(), "never-seen", p, p_other=shifted[:500]).out_of_scope_above == 0.6
    assert operating.point_for(v, "never-seen", p, p_other=np.zeros(0)).out_of_scope_above == 0.6
    assert ReviewRule.from_json(v.review_rule.to_json()).out_of_scope_site_reference == reference


def test_the_near_threshold_band_is_relative_at_a_low_threshold():
    rule = ReviewRule(decision_uncertainty_above=0.3, near_threshold_logit=0.15)
    old = ReviewRule(decision_uncertainty_above=0.3)  # a version from before the relative band
    t = 0.05

    def near(p: float, r: ReviewRule, threshold: float = t) -> bool:
        return "near_threshold" in predict.review_reasons(p, 0.1, threshold, r, decision_uncertainty=0.0)

    # a nevus-like score of 0.09 is 80% above a threshold of 0.05: not near it (the old ±0.05 band said it was,
    # and around 0.05 that band held every nevus)
    assert near(0.09, old) and not near(0.09, rule)
    assert near(0.052, rule) and near(0.047, rule) and not near(0.01, rule) and near(0.01, old)
    # the same relative width around 0.5
    assert near(0.53, rule, 0.5) and not near(0.56, rule, 0.5)
    # an operating point's out-of-scope threshold replaces the rule's
    flagged = predict.review_reasons(0.01, 0.1, t, ReviewRule(out_of_scope_above=0.9, decision_uncertainty_above=0.3, near_threshold_logit=0.15),
                                     0.7, 0.0, scope_above=0.6)
    assert flagged == ["out_of_scope"]


def test_a_labelled_point_is_the_status_evidence_where_it_holds_more_melanomas():
    """Every label counts: a labelled operating point's effective melanomas are the status evidence where they
    outnumber the test split's, its figures are the corrected ones with their intervals, and the labels still
    needed follow the sample's own yield of (effective) melanomas per label."""
    from types import SimpleNamespace

    from lesion_tasks.sites import status

    labels = {"labelled": 200, "melanomas": 33, "effective_melanomas": 18.5, "auc": 0.81, "auc_ci95": [0.74, 0.87],
              "ipw": {"sensitivity": 0.9, "sensitivity_ci95": [0.7, 0.98]}}
    op = operating.OperatingPoint("c1", 0.08, "labelled", 2992, 200, 18.5, operating.Estimate(0.91, 0.86, 0.97),
                                  operating.Estimate(0.62, 0.55, 0.7), 0.6, "its labels", labels)
    part = status.labels_part(op)
    assert part["n_mel"] == 18.5 and part["evidence"] == "labels" and part["auc"] == 0.81
    assert part["ci95"]["mel_sensitivity"] == [0.86, 0.97] and part["balanced_accuracy"] == pytest.approx(0.765)
    test_row = SimpleNamespace(melanomas_evidence=5, evidence="test", metrics={"n_mel": 5})
    assert status.evidence_for(test_row, op)[1:] == ("labels", 18.5)
    assert status.evidence_for(SimpleNamespace(melanomas_evidence=40, evidence="test", metrics={"n_mel": 40}), op)[1] == "test"
    state, needed = status.status_of(part, 200, GateFloors(), "labels")
    assert state == "provisional" and "12 more effective melanomas among its labelled sample" in needed, needed
    # 11.5 effective melanomas missing at 18.5 per 200 labels
    assert labels_to_next_status(state, 18, op, GateFloors(), 200, 33) == int(np.ceil(11.5 / (18.5 / 200)))
    unlabelled = operating.OperatingPoint("c1", 0.08, "unlabelled", 2992, 0, 300.0, operating.Estimate(0.9, 0.8, 1.0),
                                          operating.Estimate(0.5, 0.4, 0.6), 0.6, "its scores")
    assert status.labels_part(unlabelled) is None
