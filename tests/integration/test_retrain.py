"""Retraining end to end on a synthetic drop with the tiny backbone: registry, artifacts, feature
cache, gate (including a degenerate always-NV model and a version refused for too little evidence, then
overridden), the report after the gate, determinism (same data, config and seed: same metrics), and
agreement with isic-challenge-scoring.

The first model is the session's trained home (tests/conftest.py); the second retrain, the degenerate
model and the override happen on this module's copy of it."""

from __future__ import annotations

import html
import io
import json
import os
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks.versions.registry import ModelVersion
from lesion_tasks import pipeline
from lesion_tasks.versions import artifacts, registry
from lesion_tasks.assessment import assess
from lesion_tasks.data import trainset
from lesion_tasks.core import db
from lesion_tasks.model import evaluation, features, mc
from lesion_tasks.core.schema import champion_history, model_versions
from lesion_tasks.core.store import key_of, open_store
from tests.helpers import champion_row, LABELLED_DROP, N_LABELLED, N_OTHER, OTHER_DROP, copy_home, registry_row


@pytest.fixture(scope="module")
def trained(trained_home, tmp_path_factory):
    """(settings of a copy of the trained home, config, the first model = the home's champion, a second
    retrain on the same data in the copy)."""
    settings = copy_home(trained_home.settings, tmp_path_factory.mktemp("retrain") / "home")
    config = trained_home.config
    first = trained_home.trained
    second = pipeline.run(settings, config, run_id="second")
    return settings, config, first, second


def test_first_model_learns_and_is_promoted(trained, trained_home):
    settings, _, first, second = trained
    test = first["metrics"]["test"]
    assert first["promoted"] is True, first["gate"]
    assert test["auc"] > 0.9 and test["mel_sensitivity"] >= 0.8 and test["balanced_accuracy"] > 0.75
    assert set(test["ci95"]) == {"auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy"}
    home_row = registry_row(trained_home.settings, first["model_version"])
    assert home_row["status"] == "champion"
    # what the models page shows: 95% intervals of sensitivity and specificity, test and validation
    for split in ("test", "val"):
        ci = home_row["metrics"][split]["ci95"]
        for key in ("auc", "mel_sensitivity", "mel_specificity"):
            lo, hi = ci[key]
            assert 0 <= lo <= home_row["metrics"][split][key] <= hi <= 1, (split, key, ci[key])
    row = registry_row(settings, first["model_version"])
    assert row["status"] == ("retired" if second["promoted"] else "champion")  # in the copy, after the second retrain
    assert row["gate"]["passed"] is True
    assert row["threshold"] == pytest.approx(first["threshold"])
    assert row["weights_source"] == "random initialisation" and row["config"]["weights_used"] == "none"
    assert {"tensorflow", "keras", "devices", "python"} <= set(row["environment"])
    assert row["lineage"]["drops"] == {LABELLED_DROP: N_LABELLED, OTHER_DROP: N_OTHER}
    assert set(row["lineage"]["splits"]) == {"train", "val", "test"}
    rule = row["review_rule"]
    assert rule["decision_uncertainty_above"] == 0.3 and "entropy_above" not in rule
    # the near-threshold band is relative (logit scale), and the out-of-scope threshold is recorded for a grid of
    # decision thresholds, ascending, for sites whose operating point moves
    assert rule["near_threshold_logit"] == 0.15
    grid = rule["out_of_scope_by_threshold"]
    assert len(grid) == 40 and [t for t, _ in grid] == sorted(t for t, _ in grid)
    assert all(0 <= o <= 1 for _, o in grid)
    # and what a new site's images are compared with to raise it there (model.scope.for_site): the validation
    # in-scope images' lower quantile of logit p_other
    assert isinstance(rule["out_of_scope_site_reference"], float)


def test_per_source_metrics_calibration_and_out_of_scope_are_reported(trained):
    """The CLI answer, the registry row and the report carry per-source metrics, the calibration before
    and after, and out-of-scope recall per diagnosis (the synthetic basal cell carcinomas)."""
    settings, _, first, _ = trained
    test = first["metrics"]["test"]
    assert set(test["by_source"]) == {LABELLED_DROP}  # OTHER images are not in the MEL/NV task
    assert test["by_source"][LABELLED_DROP]["n"] == test["n"] and test["by_source"][LABELLED_DROP]["auc"] == test["auc"]
    assert "ece_before_calibration" in test
    oos = first["metrics"]["out_of_scope_test"]
    assert set(oos["by_diagnosis"]) == {"BCC"} and oos["malignant"]["n"] == oos["all"]["n"] > 0
    assert oos["all"]["flagged"] >= 0.75  # pink-red blobs are easy to tell from the pigmented ones
    row = registry_row(settings, first["model_version"])
    assert row["metrics"]["out_of_scope"]["test"]["threshold"] == pytest.approx(row["review_rule"]["out_of_scope_above"])
    assert row["metrics"]["test"]["uncalibrated"]["ece"] == pytest.approx(first["metrics"]["test"]["ece_before_calibration"])
    head = artifacts.of(open_store(settings), ModelVersion.from_row(row)).load_head()
    assert (head.cal_a, head.cal_b) != (1.0, 0.0)
    report = open_store(settings).get(key_of(open_store(settings), row["report_uri"])).decode()
    assert "Per site (test)" in report and "threshold applied" in report and "Out of scope (test" in report and "<td>BCC</td>" in report
    assert "before calibration" in report
    # where Grad-CAM looks, per true class and right / wrong, on a seeded sample of test cases
    att = row["metrics"]["test"]["attention"]
    assert set(att["cells"]) == {"MEL right", "MEL wrong", "NV right", "NV wrong"} and att["off_lesion_below"] == 0.5
    for cell in att["cells"].values():
        assert 0 <= cell["off_lesion"] <= cell["n_measured"] <= cell["n"] <= att["per_cell"]
        assert cell["n_measured"] == 0 or 0 <= cell["mean_on_lesion"] <= 1
    assert sum(c["n_measured"] for c in att["cells"].values()) > 0  # the synthetic lesions are segmented
    assert "Grad-CAM attention on the lesion" in report and "on the lesion</figcaption>" in report


def test_artifacts_are_stored_without_optimizer_state(trained):
    settings, _, first, _ = trained
    store = open_store(settings)
    base = f"models/{first['model_version']}"
    for name in ("model.keras", "head.npz", "config.json", "metrics.json", "report.html", "train_log.json",
                 "test_truth_isic.csv", "test_predictions_isic.csv", "figures/roc.png", "figures/referral-curve.png"):
        assert store.exists(f"{base}/{name}"), name
    report = store.get(f"{base}/report.html").decode()
    assert "data:image/png;base64," in report and "Gate" in report and "http" not in report.split("<body>")[1][:2000]
    with zipfile.ZipFile(io.BytesIO(store.get(f"{base}/model.keras"))) as zf:
        with zf.open("model.weights.h5") as fh, h5py.File(io.BytesIO(fh.read())) as h5:
            assert "optimizer" not in h5
    metrics = json.loads(store.get(f"{base}/metrics.json"))
    assert len(metrics["test"]["referral"]) == 11 and metrics["test"]["confusion"]["labels"] == ["NV", "MEL"]


def test_saved_model_matches_the_cached_features(trained):
    """The full model's backbone is the one whose features trained the head (same seeded init)."""
    import keras

    settings, config, first, _ = trained
    store = open_store(settings)
    row = registry_row(settings, first["model_version"])
    model_path = settings.home / "m.keras"
    model_path.write_bytes(store.get(key_of(store, row["model_uri"])))
    model = keras.models.load_model(model_path, compile=False)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        refs, _ = trainset.split_refs(conn)["test"]
    engine.dispose()
    cached, stats = features.features_for(refs[:6], [0], artifacts.feature_config(ModelVersion.from_row(row)), artifacts.weights_of(ModelVersion.from_row(row), settings, store), store)
    assert stats.computed == 0
    rgb = np.stack([features.model_input(store, r.uri, artifacts.feature_config(ModelVersion.from_row(row))) for r in refs[:6]])
    probs = model.predict(features.backbones.preprocess(rgb), verbose=0)[:, mc.MEL]
    head = artifacts.of(store, ModelVersion.from_row(row)).load_head()
    np.testing.assert_allclose(replace(head, cal_a=1.0, cal_b=0.0).deterministic(cached[0]), probs, atol=1e-5)
    logit = np.log(probs) - np.log1p(-probs)  # the saved model is the raw head; scoring calibrates its samples
    np.testing.assert_allclose(head.deterministic(cached[0]), 1 / (1 + np.exp(-(head.cal_a * logit + head.cal_b))), atol=1e-4)


def test_retrain_on_unchanged_data_runs_no_backbone(trained):
    _, _, first, second = trained
    assert first["feature_cache"]["computed"] > 0
    assert second["feature_cache"]["computed"] == 0
    assert second["feature_cache"]["reused"] == first["feature_cache"]["computed"]  # the cache travels with a copied home


def test_a_retrain_identical_to_the_champion_is_a_no_op_that_says_so(trained):
    """The second retrain (same data, config and seed: the same head, calibration, thresholds and out-of-scope head)
    is not promoted: a REST retrain on unchanged data used to replace the champion with itself, emptying the queue
    and reopening every reviewed case. The gate says why; the champion stays."""
    settings, _, first, second = trained
    store = open_store(settings)
    row = registry_row(settings, second["model_version"])
    assert second["promoted"] is False and row["gate"]["identical_to"] == first["model_version"], row["gate"]
    assert row["gate"]["reasons"][0].startswith(f"identical to the champion {first['model_version']} (the same head and "
                                                "config digests)")
    report = _report(settings, row)
    assert f"identical to the champion {first['model_version']}: not promoted, nothing would change" in report
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        assert registry.version(conn, None).model_version == first["model_version"]
        versions = {v: registry.version(conn, v) for v in (first["model_version"], second["model_version"])}
    engine.dispose()
    digests = [artifacts.digests(store, v) for v in versions.values()]
    assert digests[0] == digests[1]
    changed = replace(versions[second["model_version"]], config={**versions[second["model_version"]].config, "epochs": 1})
    assert artifacts.digests(store, changed)["config"] != digests[0]["config"]  # another config is another model


def _report(settings, row) -> str:
    store = open_store(settings)
    return store.get(key_of(store, row["report_uri"])).decode()


def test_a_promoted_versions_report_says_passed_after_the_gate(trained_home):
    """report.html is rewritten after the gate: the champion's says PASSED and promoted, with every reason
    (it was rendered before the gate decided, when it could only say "not decided yet")."""
    row = registry_row(trained_home.settings, trained_home.version)
    report = _report(trained_home.settings, row)
    assert '<h2>Gate: <span class="pass">PASSED</span>, promoted; now champion</h2>' in report
    assert "NOT PASSED" not in report and "not decided yet" not in report
    for reason in row["gate"]["reasons"]:
        assert html.escape(reason) in report
    assert "There was no champion to compare with" in report and "promoted to champion by the gate" in report


def test_same_data_config_and_seed_give_the_same_metrics(trained):
    """The second retrain (another run id, so another version id) on the same data, config and seed
    reproduces the first's numbers exactly, and both draw the same MC-dropout samples for an image."""
    settings, _, first, second = trained
    assert first["model_version"] != second["model_version"]
    for split in ("test", "val"):
        for key in ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "threshold", "ece", "brier"):
            assert second["metrics"][split][key] == first["metrics"][split][key], (split, key)
    assert second["threshold"] == first["threshold"]
    store = open_store(settings)
    rows = [registry_row(settings, v["model_version"]) for v in (first, second)]
    assert rows[0]["config"]["mc_seed"] == rows[1]["config"]["mc_seed"] == rows[0]["config"]["seed"]
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        refs = trainset.split_refs(conn)["test"][0][:3]
    engine.dispose()
    ids = [r.image_id for r in refs]
    samples = []
    for row in rows:
        feats, _ = features.features_for(refs, [0], artifacts.feature_config(ModelVersion.from_row(row)), artifacts.weights_of(ModelVersion.from_row(row), settings, store), store)
        head = artifacts.of(store, ModelVersion.from_row(row)).load_head()
        samples.append(head.calibrated(mc.logits_for(head, feats[0], ids, row["model_version"], row["mc_samples"],
                                                     ModelVersion.from_row(row).mc_seed)))
    np.testing.assert_array_equal(samples[0], samples[1])
    assert samples[0].std(axis=1).max() > 0  # they are MC samples: dropout makes them differ


def test_degenerate_always_nv_model_is_refused_and_champion_stays(trained):
    settings, config, _, _ = trained
    store = open_store(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        champ, v = champion_row(conn), registry.version(conn, None)
        parts = trainset.split_refs(conn)
    head = artifacts.of(store, v).load_head()
    bad = replace(head, w2=np.zeros_like(head.w2), b2=np.array([10.0, -10.0], np.float32))  # always NV
    version = "degenerate-always-nv"
    artifacts.ModelArtifacts(store, version).save_head(bad)
    for name in ("model.keras", "train_log.json", "scope.npz"):
        store.put(f"models/{version}/{name}", store.get(f"models/{champ['model_version']}/{name}"))
    refs, y_val = parts["val"]
    feats, _ = features.features_for(refs, [0], artifacts.feature_config(v), artifacts.weights_of(v, settings, store), store)
    p_val = mc.predict(bad, feats[0], [r.image_id for r in refs], version, champ["mc_samples"])[0]
    assert np.allclose(p_val, p_val[0]) and p_val[0] < 1e-6  # it says NV for everything
    row = {k: v for k, v in champ.items()} | {
        "model_version": version, "status": "candidate", "is_champion": False, "metrics": None, "gate": None,
        "threshold": evaluation.threshold_for_sensitivity(y_val, p_val, 0.85), "run_id": "test",
        "model_uri": f"models/{version}/model.keras"}
    with engine.begin() as conn:
        conn.execute(model_versions.insert().values(**row))
    assess.evaluate_model(settings, version)
    decision = assess.gate_model(settings, version)
    assert decision["promoted"] is False
    fails = [r for r in decision["reasons"] if r.startswith("FAIL")]
    assert any("auc" in r for r in fails) and any("balanced_accuracy" in r for r in fails)
    with engine.connect() as conn:
        report = _report(settings, registry.get(conn, version))
    assert '<span class="fail">NOT PASSED</span>, not promoted; now rejected' in report and "PASSED</span>, promoted" not in report
    assert all(html.escape(r) in report for r in fails)
    with engine.connect() as conn:
        assert registry.version(conn, None).model_version == champ["model_version"]
        assert registry.get(conn, version)["status"] == "rejected"
    engine.dispose()


def test_too_little_evidence_is_refused_then_overridden_and_the_reports_say_so(trained_home, home_copy):
    """The champion's own model, gated with the default evidence minimum (30 melanomas; the shared drop has
    fewer): refused saying why, its report NOT PASSED with the reasons and the champion compared with.
    Then a manual override: its report says so, and the replaced champion's report too."""
    settings = home_copy
    store = open_store(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        champ = champion_row(conn)
    version = "too-little-evidence"
    for name in ("model.keras", "head.npz", "train_log.json", "scope.npz"):
        store.put(f"models/{version}/{name}", store.get(f"models/{champ['model_version']}/{name}"))
    config = champ["config"] | {"floors": champ["config"]["floors"] | {"min_melanomas": 30}}
    with engine.begin() as conn:
        conn.execute(model_versions.insert().values(**champ | {
            "model_version": version, "status": "candidate", "is_champion": False, "metrics": None, "gate": None,
            "config": config, "run_id": "test", "model_uri": f"models/{version}/model.keras", "report_uri": None}))
    assess.evaluate_model(settings, version)
    decision = assess.gate_model(settings, version)
    n_test = champ["metrics"]["test"]["n_mel"]
    assert n_test < 30 and decision["promoted"] is False
    assert f"FAIL: too little evidence: {n_test} melanomas in test (need >= 30)" in decision["reasons"]
    with engine.connect() as conn:
        row = registry.get(conn, version)
    report = _report(settings, row)
    assert '<span class="fail">NOT PASSED</span>, not promoted; now rejected' in report
    assert all(html.escape(r) in report for r in decision["reasons"])
    assert f"Compared with the champion {champ['model_version']}" in report

    previous = assess.promote_with_report(settings, engine, version, "manual override: the reader study", "dr-test",
                                          override=True)
    assert previous == champ["model_version"]
    with engine.connect() as conn:
        report = _report(settings, registry.get(conn, version))
        old = _report(settings, registry.get(conn, previous))
    engine.dispose()
    assert "NOT PASSED</span>, promoted by manual override; now champion" in report
    assert "MANUAL OVERRIDE" in report and "dr-test" in report and "the reader study" in report
    assert "PASSED</span>, promoted; now retired" in old
    assert f"replaced as champion by {version} through a manual override" in old


def test_manual_override_is_recorded(trained):
    from tests.helpers import run_cli

    settings, _, first, second = trained
    engine = db.make_engine(settings.db_url)
    registry.promote(engine, second["model_version"], "set up", "test")
    out = run_cli("promote", first["model_version"], "--reason", "clinical lead accepted it", "--actor", "dr-test", "--json",
                  env={"LESION_HOME": str(settings.home)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"champion": first["model_version"], "previous": second["model_version"], "override": True}
    with engine.connect() as conn:
        assert registry.version(conn, None).model_version == first["model_version"]
        assert registry.get(conn, second["model_version"])["status"] == "retired"
        last = conn.execute(sa.select(champion_history).order_by(champion_history.c.id.desc())).mappings().first()
        assert (last["event"], last["actor"], last["previous"]) == ("override", "dr-test", second["model_version"])
        assert "clinical lead" in last["reason"]
        assert conn.execute(sa.select(sa.func.count()).select_from(model_versions).where(model_versions.c.is_champion)).scalar() == 1
    engine.dispose()


@pytest.fixture(scope="session")
def isic_scoring() -> Path:
    """The official scorer, from its own venv (it needs pandas < 3; see tests/isic-scoring.lock)."""
    venv = Path(os.environ.get("LESION_ISIC_SCORING_VENV", Path(__file__).resolve().parents[2] / ".venv-isic"))
    exe = venv / "bin" / "isic-challenge-scoring"
    if not exe.exists():
        message = f"isic-challenge-scoring not found at {exe} (make test builds it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return exe


def test_metrics_agree_with_isic_challenge_scoring(trained, isic_scoring, tmp_path):
    settings, _, first, _ = trained
    store = open_store(settings)
    base = f"models/{first['model_version']}"
    truth, pred = tmp_path / "truth.csv", tmp_path / "pred.csv"
    truth.write_bytes(store.get(f"{base}/test_truth_isic.csv"))
    pred.write_bytes(store.get(f"{base}/test_predictions_isic.csv"))
    out = subprocess.run([str(isic_scoring), "-o", "json", "classification", str(truth), str(pred)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    score = json.loads(out.stdout)
    ours = first["metrics"]["test"]
    per = score["per_category"]
    assert per["auc"]["MEL"] == pytest.approx(ours["auc"], abs=1e-6)
    assert per["sensitivity"]["MEL"] == pytest.approx(ours["mel_sensitivity"], abs=1e-9)
    assert per["specificity"]["MEL"] == pytest.approx(ours["mel_specificity"], abs=1e-9)
    assert score["aggregate"]["balanced_accuracy"] == pytest.approx(ours["balanced_accuracy"], abs=1e-9)
