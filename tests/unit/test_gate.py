"""The gate's decision in words: it refuses to decide on too little evidence, and every number it shows
is on the same side of its floor as the real value. The report's gate section is replaced, not appended."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from lesion_tasks.assessment import gate, report
from lesion_tasks.model.config import GateFloors
from lesion_tasks.versions import registry

GOOD = {"mel_sensitivity": 0.9, "auc": 0.95, "balanced_accuracy": 0.85}


def _metrics(n_test: int = 40, n_val: int = 40, val_auc: float = 0.9, val_ci: list | None = None, **test) -> dict:
    val = {"n_mel": n_val, "auc": val_auc, **({"ci95": {"auc": val_ci}} if val_ci else {})}
    return {"test": {"n_mel": n_test, **GOOD, **test}, "val": val}


def decide(*args) -> tuple[bool, list[str]]:
    decision = gate.decide(*args)
    return decision.passed, decision.reasons


def _fails(reasons: list[str]) -> list[str]:
    return [r for r in reasons if r.startswith("FAIL")]


def test_too_few_melanomas_in_test_or_validation_is_refused_saying_so():
    passed, reasons = decide(_metrics(n_test=13), None, GateFloors())
    assert not passed
    assert _fails(reasons) == ["FAIL: too little evidence: 13 melanomas in test (need >= 30)"]
    passed, reasons = decide(_metrics(n_val=29), None, GateFloors())
    assert not passed and _fails(reasons) == ["FAIL: too little evidence: 29 melanomas in validation (need >= 30)"]
    passed, reasons = decide(_metrics(n_test=30, n_val=30), None, GateFloors())
    assert passed and "PASS: evidence: 30 melanomas in test (>= 30)" in reasons
    # the minimum is the version's: a config may lower it (the tests' small synthetic drops do)
    assert decide(_metrics(n_test=13, n_val=13), None, GateFloors(min_melanomas=5))[0]
    passed, reasons = decide({"test": {"n_mel": 40, **GOOD}}, None, GateFloors())  # no validation metrics
    assert not passed and "FAIL: too little evidence: no melanomas in validation (need >= 30)" in reasons


def test_validation_auc_not_above_chance_is_refused():
    floors = GateFloors()
    passed, reasons = decide(_metrics(val_auc=0.8, val_ci=[0.48, 0.95]), None, floors)
    assert not passed
    assert _fails(reasons) == ["FAIL: too little evidence: validation AUC 95% CI lower bound 0.4800 <= 0.50 (chance)"]
    passed, reasons = decide(_metrics(val_auc=0.5), None, floors)  # no interval: the point value
    assert not passed and _fails(reasons) == ["FAIL: too little evidence: validation AUC 0.5000 <= 0.50 (chance)"]
    passed, reasons = decide(_metrics(val_auc=0.9, val_ci=[0.50001, 0.99]), None, floors)
    assert passed and "PASS: evidence: validation AUC 95% CI lower bound 0.5001 > 0.50 (chance)" in reasons
    passed, reasons = decide(_metrics(val_auc=None), None, floors)
    assert not passed and "FAIL: too little evidence: validation AUC is undefined" in reasons


def test_the_papers_model_would_be_refused_by_the_floors_too():
    """0% melanoma sensitivity, balanced accuracy 0.50 (the 2025 paper), with evidence enough."""
    metrics = _metrics(mel_sensitivity=0.0, auc=0.5, balanced_accuracy=0.5)
    passed, reasons = decide(metrics, None, GateFloors())
    assert not passed and len(_fails(reasons)) == 3 and not any("evidence" in r for r in _fails(reasons))


def test_shown_values_are_on_the_same_side_of_the_floor():
    passed, reasons = decide(_metrics(balanced_accuracy=0.59996), None, GateFloors())
    assert not passed and "FAIL: test balanced_accuracy 0.5999 < floor 0.60" in reasons
    assert "PASS: test auc 0.9500 >= floor 0.70" in reasons
    # every value near a floor, for ">=" (floors) and ">" (chance) checks: the shown number decides alike
    rng = np.random.default_rng(0)
    values = np.concatenate([0.6 + rng.normal(0, 1e-4, 2000), [0.6, np.nextafter(0.6, 0), np.nextafter(0.6, 1), 0.59995]])
    for v in values:
        assert (float(gate.shown(v)) >= 0.6) == (v >= 0.6), v
        assert (float(gate.shown(v, up=True)) > 0.6) == (v > 0.6), v
        _, why = decide(_metrics(mel_sensitivity=float(v) + 0.2), None, GateFloors())
        line = next(r for r in why if "mel_sensitivity" in r)
        number, sign, floor = re.search(r"mel_sensitivity (\S+) (>=|<) floor (\S+)", line).groups()
        assert (float(number) >= float(floor)) == (sign == ">=") == line.startswith("PASS"), line
    assert gate.shown(-1e-9, sign=True) == "-0.0001" and gate.shown(0.0, sign=True) == "+0.0000"
    assert gate.bound(0.8) == "0.80" and gate.bound(0.805) == "0.805"


def test_a_regression_vs_the_champion_reads_as_it_is_decided():
    comparison = {"champion": "old", "auc_delta": -0.01, "auc_delta_ci95": [-0.03, -1e-9],
                  "mel_sensitivity_delta": 0.0, "mel_sensitivity_delta_ci95": [-0.1, 0.1]}
    passed, reasons = decide(_metrics(), comparison, GateFloors())
    assert not passed
    assert _fails(reasons) == ["FAIL: auc vs champion old delta -0.0100 (95% CI -0.0300..-0.0001) significantly worse"]


def test_a_regression_at_one_site_refuses_even_when_pooled_holds():
    """No significant regression at any site with enough evidence: a clinic the challenger does worse at
    refuses it although the pooled comparison (dominated by the archive) passes."""
    fine = {"auc_delta": 0.01, "auc_delta_ci95": [-0.01, 0.03], "mel_sensitivity_delta": 0.0,
            "mel_sensitivity_delta_ci95": [-0.05, 0.05]}
    clinic = {"n_test": 120, "n_mel": 31, "auc_delta": 0.0, "auc_delta_ci95": [-0.04, 0.04],
              "mel_sensitivity_delta": -0.19, "mel_sensitivity_delta_ci95": [-0.35, -0.03]}
    comparison = {"champion": "old", **fine, "by_site": {"archive": {"n_test": 900, "n_mel": 200, **fine}, "clinic": clinic}}
    passed, reasons = decide(_metrics(), comparison, GateFloors())
    assert not passed
    assert _fails(reasons) == ["FAIL: test[clinic] mel_sensitivity vs champion old delta -0.1900 (95% CI -0.3500..-0.0300) "
                               "significantly worse"]
    assert "PASS: test[archive] auc vs champion old delta +0.0100 (95% CI -0.0100..+0.0300)" in reasons
    assert decide(_metrics(), comparison | {"by_site": {}}, GateFloors())[0]  # pooled alone passes


def _version(**gate) -> registry.ModelVersion:
    row = {"model_version": "v2", "status": "rejected" if gate.get("passed") is False else "champion",
           "is_champion": gate.get("passed", False), "backbone": "tiny", "image_size": 32, "threshold": 0.3,
           "mc_samples": 2, "gate": gate or None}
    return registry.ModelVersion.from_row(row)


def _decided(*checks: gate.Check, **more) -> dict:
    """A stored gate decision of `checks` (what gate_model records), with `more` fields beside it."""
    return gate.Decision(checks).to_json() | more


def test_gate_section_says_the_decision_reasons_champion_and_overrides():
    pending = report.gate_section(_version())
    assert "not decided yet" in pending and "PASSED" not in pending
    checks = (gate.Check("fail", "evidence", "too little evidence: 13 melanomas in test (need >= 30)", "test"),
              gate.Check("pass", "floor", "test auc 0.9000 >= floor 0.70", "test"),
              gate.Check("note", "weights", "not the asked-for weights: random initialisation"))
    decided = _decided(*checks, decided_at="2026-11-26T08:00:00+00:00",
                       comparison={"champion": "v1", "n_test": 68, "auc_delta": 0.01, "mel_sensitivity_delta": -0.05},
                       champion_metrics={"auc": 0.93, "mel_sensitivity": 0.85, "mel_specificity": 0.7,
                                         "balanced_accuracy": 0.775, "threshold": 0.41})
    refused = report.gate_section(_version(**decided))
    assert '<span class="fail">NOT PASSED</span>, not promoted; now rejected' in refused
    assert all(f'<li class="{c.outcome}">{c.line.replace(">=", "&gt;=")}</li>' in refused for c in checks)
    assert "champion v1" in refused and "AUC 0.9300" in refused and "balanced accuracy 0.7750" in refused
    override = [{"model_version": "v2", "event": "override", "previous": "v1", "actor": "dr-x", "reason": "manual override: why",
                 "at": datetime(2026, 11, 27, tzinfo=UTC)}]
    overridden = report.gate_section(replace(_version(**decided), status="champion", is_champion=True), override)
    assert "NOT PASSED</span>, promoted by manual override; now champion" in overridden
    assert "MANUAL OVERRIDE" in overridden and "dr-x" in overridden
    promoted = [{"model_version": "v1", "event": "promoted", "previous": None, "actor": "lesion train", "reason": "PASS: x",
                 "at": datetime(2026, 11, 26, tzinfo=UTC)}]
    replaced = report.gate_section(replace(_version(**_decided(gate.Check("pass", "champion", "x"))), model_version="v1",
                                           status="retired", is_champion=False), promoted + override)
    assert "PASSED</span>, promoted; now retired" in replaced and "replaced as champion by v2 through a manual override" in replaced


def test_the_gate_section_is_replaced_not_appended():
    passed = _version(**_decided(gate.Check("pass", "champion", "all")))
    first = f"<html><body><h1>Model v2</h1>{report.gate_section(_version())}<h2>Metrics</h2></body></html>".encode()
    decided = report.with_gate(first, report.gate_section(passed))
    text = decided.decode()
    assert text.count(report.GATE_BEGIN) == 1 and "not decided yet" not in text and "PASSED" in text
    assert text.startswith("<html><body><h1>Model v2</h1>") and text.endswith("<h2>Metrics</h2></body></html>")
    assert report.with_gate(decided, report.gate_section(passed)) == decided
    legacy = b'<h1>Model v2</h1>\n<h2>Gate: <span class="fail">NOT PASSED</span></h2>\n<ul><li>x</li></ul>\n<h2>Metrics</h2>'
    text = report.with_gate(legacy, report.gate_section(passed)).decode()
    assert "NOT PASSED" not in text and text.count("<h2>Gate:") == 1 and text.endswith("\n<h2>Metrics</h2>")


def test_a_decision_is_typed_a_note_never_decides_and_it_reads_back_as_stored():
    """The gate's decision is checks, not words to parse: a failed check refuses, a note never does, and what the
    registry stores (`to_json`) reads back (`from_json`) as the same checks, with their figures."""
    decision = gate.decide(_metrics(n_test=13), None, GateFloors())
    assert not decision.passed and [c.kind for c in decision.failed] == ["evidence"]
    assert decision.failed[0].figures == {"n_mel": 13, "need": 30} and decision.failed[0].where == "test"
    floors = [c for c in decision.checks if c.kind == "floor"]
    assert {c.figures["metric"] for c in floors} == {"mel_sensitivity", "auc", "balanced_accuracy"}
    noted = gate.decide(_metrics(), None, GateFloors()).with_note("weights", "not the asked-for weights: x", fallback="x")
    assert noted.passed and noted.notes[0].line == "NOTE: not the asked-for weights: x"
    assert gate.Decision.from_json(noted.to_json()) == noted and noted.to_json()["passed"] is True
    assert gate.Decision.from_json(None).checks == () and gate.Decision.from_json({"passed": True}).checks == ()
    with pytest.raises(ValueError, match="outcome 'maybe'"):
        gate.Check("maybe", "floor", "x")


@pytest.mark.parametrize("value,expected", [(0.7996, "0.7996"), (0.79999999, "0.7999"), (None, "–"), (float("nan"), "–")])
def test_report_cells_round_toward_the_floor_side(value, expected):
    assert report._cell(value) == expected


def test_the_report_says_which_target_set_the_threshold():
    """Not "chosen for sensitivity 0.85" when a gated site's stricter target set it (issue 23)."""
    row = {"model_version": "v", "status": "candidate", "is_champion": False, "backbone": "tiny", "image_size": 32,
           "threshold": 0.1887, "mc_samples": 2, "config": {"target_sensitivity": 0.85}}
    version = registry.ModelVersion.from_row(
        row | {"review_rule": {"threshold_by_target": {"pooled": 0.2057, "isic2019-84px": 0.1887}}})
    metrics = {"test": {"threshold": 0.1887}, "val": {"mel_sensitivity": 0.8957, "thresholds_applied": "pooled"}}
    text = report.threshold_sentence(version, metrics)
    assert text == ("Threshold 0.1887, chosen on validation: set by the stricter target of site isic2019-84px (its "
                    "validation melanomas, sensitivity 0.85 or higher for their margin), which the pooled threshold "
                    "must also reach; validation sensitivity 0.896 (at this threshold).")
    pooled = report.threshold_sentence(registry.ModelVersion.from_row(
        row | {"review_rule": {"threshold_by_target": {"pooled": 0.1887}}}), metrics)
    assert "set by the pooled validation split's target (sensitivity 0.85, raised where" in pooled


def test_the_reasons_say_which_threshold_applied_and_whose_target_set_it():
    """A site at its own threshold says so; a site decided at the pooled threshold names the site whose
    stricter validation target set it (issue 23: "set by one shared threshold")."""
    row = {"model_version": "v", "status": "candidate", "is_champion": False, "backbone": "tiny", "image_size": 32,
           "threshold": 0.094, "mc_samples": 2, "config": {},
           "review_rule": {"threshold_by_target": {"pooled": 0.15, "sharp": 0.094},
                           "thresholds_by_site": {"clinic": {"threshold": 0.2, "chosen_on": "site", "n_mel": 41},
                                                  "sharp": {"threshold": 0.094, "chosen_on": "pooled", "n_mel": 88}}}}
    version = registry.ModelVersion.from_row(row)
    metrics = _metrics(thresholds_applied="per site", by_site={
        "sharp": {"n_mel": 104, **GOOD, "mel_sensitivity": 0.79}, "clinic": {"n_mel": 40, **GOOD}})
    passed, reasons = decide(metrics, None, GateFloors(), version)
    assert not passed
    assert ("FAIL: test[sharp] mel_sensitivity 0.7900 < floor 0.80 (at the pooled threshold 0.0940, set by this "
            "site's target)") in reasons
    assert ("PASS: test[clinic] balanced_accuracy 0.8500 >= floor 0.60 (at its own threshold 0.2000, chosen on its 41 "
            "validation melanomas)") in reasons
    assert ("PASS: test mel_sensitivity 0.9000 >= floor 0.80 (each site at its own threshold where it has one, else at "
            "the pooled threshold 0.0940, set by site sharp's target)") in reasons
    assert "PASS: test auc 0.9500 >= floor 0.70" in reasons  # AUC does not depend on a threshold


def test_without_bootstrap_resamples_the_comparison_with_the_champion_is_undefined_not_a_crash():
    """`bootstrap` 0 (allowed by its bounds): the paired deltas have no interval, and the gate says the regression
    check is undefined (a fail) instead of raising IndexError."""
    from lesion_tasks.model import evaluation

    y = np.array([0, 1] * 20)
    p = np.linspace(0, 1, 40)
    delta = evaluation.paired_delta(y, p, 0.5, p[::-1], 0.5, n=0)
    assert delta["auc_delta_ci95"] == [None, None] and delta["auc_delta"] == pytest.approx(delta["auc_delta"])
    passed, reasons = decide(_metrics(), delta | {"champion": "v1"}, GateFloors())
    assert not passed and "FAIL: auc vs champion v1 is undefined on this test split" in reasons
