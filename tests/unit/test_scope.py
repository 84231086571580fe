"""Clinical safety rules on numbers alone (fast, no model): calibration of the MC samples, the
out-of-scope head and its threshold, the threshold that must hold on every gated source, and the gate's
per-source and out-of-scope floors."""

from __future__ import annotations

import io

from dataclasses import replace

import numpy as np
import pytest

from lesion_tasks.model.config import make_config
from lesion_tasks.model import evaluation, mc, scope
from lesion_tasks.assessment import gate
from lesion_tasks.model.config import GateFloors
from lesion_tasks.sites import thresholds


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_calibration_recovers_a_known_distortion_and_keeps_the_ranking():
    """Labels drawn from sigmoid(d); the 'head' reports 3 d + 1.5 (over-confident, pushed towards MEL as
    class weights do). The fit undoes it: the calibrated MC mean has ECE < 0.03, the raw one does not."""
    rng = np.random.default_rng(0)
    d = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < _sigmoid(d)).astype(int)
    logits = (3 * d + 1.5)[:, None] + rng.normal(0, 0.3, (4000, 20))  # 20 MC samples per image
    a, b = mc.fit_calibration(logits, y)
    assert a == pytest.approx(1 / 3, rel=0.15) and b == pytest.approx(-0.5, abs=0.15)
    raw = _sigmoid(logits).mean(axis=1)
    calibrated = _sigmoid(a * logits + b).mean(axis=1)
    assert evaluation.calibration(y, raw)["ece"] > 0.08
    assert evaluation.calibration(y, calibrated)["ece"] < 0.03
    assert np.corrcoef(np.argsort(np.argsort(raw)), np.argsort(np.argsort(calibrated)))[0, 1] > 0.999


def test_calibrated_head_is_the_raw_head_with_identity_parameters():
    rng = np.random.default_rng(1)
    head = mc.HeadWeights(rng.normal(size=(6, 128)).astype(np.float32), np.zeros(128, np.float32), np.ones(128),
                          np.zeros(128), np.zeros(128), np.ones(128), 1e-3, rng.normal(size=(128, 2)).astype(np.float32),
                          np.zeros(2, np.float32), 0.5)
    x = rng.normal(size=(9, 6)).astype(np.float32)
    z = head.hidden(x) @ head.w2 + head.b2
    softmax_mel = np.exp(z[:, 1]) / np.exp(z).sum(axis=1)
    np.testing.assert_allclose(head.deterministic(x), softmax_mel, atol=1e-6)
    shifted = replace(head, cal_a=0.5, cal_b=-1.0)
    np.testing.assert_allclose(shifted.deterministic(x), _sigmoid(0.5 * (z[:, 1] - z[:, 0]) - 1.0), atol=1e-6)
    ids = [f"I{i}" for i in range(9)]
    p, _, _ = mc.predict(shifted, x, ids, "v", 30)
    np.testing.assert_allclose(p, shifted.calibrated(mc.logits_for(head, x, ids, "v", 30)).mean(axis=1), atol=1e-9)


def test_scope_head_separates_and_its_threshold_meets_both_targets():
    rng = np.random.default_rng(2)
    x_in, x_other = rng.normal(0, 1, (400, 8)), rng.normal(1.2, 1, (300, 8))
    head = scope.fit(x_in, x_other)
    p_in, p_other = head.p_other(x_in), head.p_other(x_other)
    assert p_other.mean() > 0.7 > 0.3 > p_in.mean()
    diagnoses = ["BCC"] * 100 + ["BKL"] * 150 + ["DF"] * 50
    predicted_mel = np.zeros(300, bool)
    predicted_mel[:10] = True  # some OTHER lesions are already flagged as melanoma
    t, targets = scope.choose_threshold(p_other, predicted_mel, diagnoses, 0.95, 0.97, n_test=(1000, 300))
    table = scope.recall_table(p_other, predicted_mel, diagnoses, t, p_in, np.zeros(400, int))
    # the floor plus 1.645 standard errors of a validation-vs-test difference (300 vs 1000 / 100 vs 300 images)
    assert targets["all"] == pytest.approx(0.95 + 1.645 * np.sqrt(0.95 * 0.05 * (1 / 300 + 1 / 1000)))
    assert targets["malignant"] == 1.0  # 0.97 + 0.032: capped, with only 100 malignant validation images
    assert table["all"]["flagged"] >= targets["all"] and table["malignant"]["flagged"] >= targets["malignant"]
    assert table["malignant"]["n"] == 100 and set(table["by_diagnosis"]) == {"BCC", "BKL", "DF"}
    # the review work out_of_scope adds on nevi: flagged by it and not called MEL
    called = p_in > np.quantile(p_in, 0.7)
    priced = scope.recall_table(p_other, predicted_mel, diagnoses, t, p_in, np.zeros(400, int), called)
    assert priced["nv_flagged_out_of_scope_only"] == pytest.approx(((p_in >= t) & ~called).mean())
    assert priced["nv_flagged_out_of_scope_only"] < priced["nv_flagged_out_of_scope"]
    assert "nv_flagged_out_of_scope_only" not in table
    assert scope.choose_threshold(p_other, predicted_mel, diagnoses, 0.5, 0.5)[0] > t  # the highest that suffices
    # two photographs per lesion are not twice the evidence: a wider margin
    paired = scope.choose_threshold(p_other, predicted_mel, diagnoses, 0.95, 0.97, [f"L{i // 2}" for i in range(300)],
                                    n_test=(1000, 300))[1]
    assert paired["all"] > targets["all"] and paired["malignant"] == 1.0
    again = scope.ScopeHead.from_bytes(head.to_bytes())
    np.testing.assert_allclose(again.p_other(x_other), p_other, atol=1e-6)
    assert "threshold" not in np.load(io.BytesIO(head.to_bytes())).files  # stored once: in the registry


def test_scope_head_without_other_images_is_a_clear_error():
    with pytest.raises(ValueError, match="no OTHER images"):
        scope.fit(np.zeros((5, 3)), np.zeros((0, 3)))


def test_threshold_holds_on_every_gated_source():
    """A pooled threshold dominated by a large, easy source misses melanomas of the small, sharp one:
    the chosen threshold is the lowest of the pooled one and each gated source's, and a source with few
    melanomas aims above the target (the floor plus a margin for its validation and test sizes)."""
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(400), np.zeros(600), np.ones(60), np.zeros(200)].astype(int)
    p = np.r_[rng.uniform(0.5, 1, 400), rng.uniform(0, 0.6, 600), rng.uniform(0.2, 0.8, 60), rng.uniform(0, 0.5, 200)]
    src = np.array(["big"] * 1000 + ["sharp"] * 260)
    lesions = [f"L{i}" for i in range(1260)]
    summary = {"counts": {"test": {"MEL": 130}}, "by_source": {"big": {"test": {"MEL": 100}}, "sharp": {"test": {"MEL": 30}}}}
    config = make_config("demo")
    t, per_source, own = thresholds.choose(y, p, src, lesions, summary, config)
    assert set(per_source) == {"pooled", "big", "sharp"} and t == min(per_source.values())
    # each site with >= 10 validation melanomas also gets its own threshold, chosen on its images alone
    assert {k: v.chosen_on for k, v in own.items()} == {"big": "site", "sharp": "site"}
    assert own["sharp"].threshold == per_source["sharp"] and own["big"].threshold >= t
    assert own["sharp"].n_mel == 60 and own["big"].weighted is False
    sharp = (src == "sharp") & (y == 1)
    target = evaluation.target_with_margin(0.80, 60, 30)  # 0.80 + 1.645 * sqrt(0.16 * (1/60 + 1/30)) = 0.947
    assert target == pytest.approx(0.80 + 1.645 * np.sqrt(0.16 * (1 / 60 + 1 / 30))) and target > 0.85
    assert (p[sharp] >= t).mean() >= target
    assert (p[(src == "big") & (y == 1)] >= t).mean() >= 0.85
    assert (p[sharp] >= per_source["pooled"]).mean() < 0.85  # the pooled threshold alone fails the sharp source
    summary["by_source"]["sharp"]["test"]["MEL"] = 29  # too few melanomas to gate the source on its own
    assert set(thresholds.choose(y, p, src, lesions, summary, config)[1]) == {"pooled", "big"}


def _decide(*args) -> tuple[bool, list[str]]:
    decision = gate.decide(*args)
    return decision.passed, decision.reasons


def _metrics(**by_source):
    good = {"mel_sensitivity": 0.9, "auc": 0.9, "balanced_accuracy": 0.8}
    return {"test": {**good, "n_mel": 40, "by_source": {name: {**good, **m} for name, m in by_source.items()}},
            "val": {"n_mel": 40, "auc": 0.9}}


def test_gate_refuses_a_model_that_fails_one_source_with_enough_melanomas():
    floors = GateFloors()
    passed, reasons = _decide(_metrics(big={"n_mel": 500}, sharp={"n_mel": 104, "mel_sensitivity": 0.62}), None, floors)
    assert not passed
    assert "FAIL: test[sharp] mel_sensitivity 0.6200 < floor 0.80" in reasons
    assert any(r.startswith("PASS: test[big] auc") for r in reasons)
    # a source with fewer than MIN_SITE_MEL melanomas in test is reported, not gated on its own
    passed, reasons = _decide(_metrics(tiny={"n_mel": thresholds.MIN_SITE_MEL - 1, "mel_sensitivity": 0.3}), None, floors)
    assert passed and not any("tiny" in r for r in reasons)


def test_gate_refuses_too_little_out_of_scope_recall():
    metrics = _metrics()
    metrics["out_of_scope"] = {"test": {"all": {"n": 1135, "flagged": 0.96}, "malignant": {"n": 790, "flagged": 0.93}}}
    passed, reasons = _decide(metrics, None, GateFloors())
    assert not passed and "FAIL: test out-of-scope (malignant, n=790) flagged 0.9300 < floor 0.95" in reasons
    metrics["out_of_scope"]["test"]["malignant"]["n"] = 10  # too few to judge: not gated
    assert _decide(metrics, None, GateFloors())[0]


def test_small_out_of_scope_shares_carry_their_n_and_an_exact_interval():
    """The report said "flagged 1.0000" of a site's 4 OTHER test images: a share of 4 is shown as 4/4 with its
    exact (Clopper-Pearson) interval, in the metrics and in the report's tables (overall, per site, the price)."""
    from lesion_tasks.assessment import report

    p_other = np.array([0.9, 0.8, 0.95, 0.7])
    table = scope.recall_table(p_other, np.zeros(4, bool), ["BCC", "BCC", "DF", "BKL"], 0.5,
                               np.array([0.1, 0.6, 0.2]), np.array([0, 0, 1]))
    assert table["all"]["flagged"] == 1.0 and table["all"]["n"] == 4
    low, high = table["all"]["ci95"]["flagged"]
    assert low == pytest.approx(0.025 ** (1 / 4)) and high == 1.0  # 0.398: four of four is no certainty
    assert (table["n_nv"], table["n_mel"]) == (2, 1)
    html = report._scope_table({"out_of_scope": {"test": {**table, "by_site": {"clinic": table}}}})
    assert "4/4 = 1.000 (0.398–1.000)" in html and "1.0000" not in html
    assert "1/2 = 0.500" in html  # the price: one of the two nevi flagged out_of_scope
    assert "BCC 2/2 = 1.00 (0.16–1.00)" in html  # per site, per diagnosis
