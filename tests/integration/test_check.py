"""`lesion check` (consistency.py): a clean home is consistent (exit 0); each kind of disagreement between
the database and the store is reported by kind, with examples, and makes the check fail (exit 1); an
abandoned training claim and the leftovers of an unfinished drop are warnings that do not."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from lesion_tasks.ops import consistency
from lesion_tasks.core import db, keys
from lesion_tasks.versions import registry
from lesion_tasks.core.schema import images, model_versions, predictions, splits
from lesion_tasks.core.store import key_of, open_store
from tests import reliability
from tests.helpers import LABELLED_DROP, NIGHT_DROP, registry_row, run_cli

N_ORPHAN_OVERLAYS = 25  # more than the 20 examples shown


def _check_cli(settings, *args):
    out = run_cli("check", *args, env={"LESION_HOME": str(settings.home)})
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out


def test_a_clean_home_is_consistent(home_copy, trained_home):
    report = consistency.check(home_copy)
    assert report["ok"] is True, report["examples"]
    assert set(report["problems"]) == set(consistency.PROBLEMS) and not any(report["problems"].values())
    assert not any(report["warnings"].values()) and report["examples"] == {}
    store = open_store(home_copy)
    assert report["info"]["objects"] == sum(1 for _ in store.list(""))
    feature_key = registry_row(home_copy, trained_home.version)["lineage"]["feature_config"]
    cache = report["info"]["features"][feature_key]
    assert cache["used_by"] == [trained_home.version] and cache["objects"] == sum(1 for _ in store.list(f"features/{feature_key}/"))
    human = _check_cli(home_copy)
    assert human.returncode == 0 and human.stdout.strip().splitlines()[-1] == "consistent"
    assert f"{'missing_normalized':<32} 0\n" in human.stdout
    as_json = _check_cli(home_copy, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["ok"] is True


def test_each_inconsistency_is_reported_and_fails_the_check(home_copy, trained_home):
    settings, version = home_copy, trained_home.version
    store, engine = open_store(settings), db.make_engine(settings.db_url)
    # warnings first: a training claim two days old, an unrecorded object of a drop that failed
    placeholder = {"created_at": datetime.now(UTC) - timedelta(days=2), "profile": "demo", "backbone": "tiny",
                   "image_size": 64, "mc_samples": 2, "config": {}, "environment": {}, "weights_source": "(training)",
                   "lineage": {}, "code_version": "0"}
    registry.claim(engine, "crashed-run", "run-x", placeholder)
    store.put(f"drops/{NIGHT_DROP}/original/ISIC_7777777.jpg", b"half a drop")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE drops SET status = 'failed' WHERE drop_id = :d"), {"d": NIGHT_DROP})
    warned = consistency.check(settings)
    assert warned["ok"] is True and warned["warnings"] == {"stale_training_claim": 1, "unfinished_drop_object": 1, "gc_leftover": 0}
    assert warned["examples"]["stale_training_claim"][0]["model_version"] == "crashed-run"
    assert _check_cli(settings).returncode == 0

    # then one of each problem
    with engine.connect() as conn:
        image_id, normalized = conn.execute(sa.select(images.c.image_id, images.c.normalized_uri)
                                            .order_by(images.c.image_id)).first()
        split_image = conn.scalars(sa.select(splits.c.image_id).order_by(splits.c.image_id.desc())).first()
        scored = conn.execute(sa.select(predictions).where(predictions.c.model_version == version)).mappings().first()
    store.delete(normalized)
    # an overlay drawn from a referenced map (`lesion gradcam-url`) is that map's, not an orphan
    assert scored["gradcam_uri"].endswith(".npy")
    store.put(keys.overlay_of_map(key_of(store, scored["gradcam_uri"])), b"png")
    stray = f"drops/{LABELLED_DROP}/normalized/{settings.image_size}/ISIC_0000042.jpg"
    store.put(stray, b"nobody's")
    for k in range(N_ORPHAN_OVERLAYS):
        store.put(f"predictions/{version}/gradcam/{LABELLED_DROP}/ISIC_90000{k:02d}.png", b"png")
    store.put("models/never-registered/model.keras", b"zip")
    with engine.begin() as conn:
        conn.execute(splits.delete().where(splits.c.image_id == split_image))
    engine.dispose()
    raw = sqlite3.connect(settings.db_url.split("///", 1)[1])  # foreign keys are off unless asked for
    with raw:
        raw.execute("INSERT INTO predictions (image_id, model_version, p_mel, predicted_label, threshold, entropy, mutual_info, "
                    "mc_samples, gradcam_uri, needs_review, drop_id, run_id, scored_at) "
                    "VALUES (?, 'ghost-version', 0.5, 'MEL', 0.5, 0.6, 0.1, 2, NULL, 1, ?, 'forged', ?)",
                    (scored["image_id"], scored["drop_id"], "2026-01-01 00:00:00.000000"))
    raw.close()

    report = consistency.check(settings)
    expected = dict.fromkeys(consistency.PROBLEMS, 0) | {
        "missing_normalized": 1, "orphan_drop_object": 1, "orphan_gradcam": N_ORPHAN_OVERLAYS, "orphan_model_object": 1,
        "prediction_of_unknown_version": 1, "labelled_image_without_split": 1}
    assert report["ok"] is False and report["problems"] == expected
    examples = report["examples"]
    assert examples["missing_normalized"] == [{"image_id": image_id, "key": normalized}]
    assert examples["orphan_drop_object"] == [stray] and examples["orphan_model_object"] == ["models/never-registered/model.keras"]
    assert examples["prediction_of_unknown_version"] == [{"image_id": scored["image_id"], "model_version": "ghost-version"}]
    assert [e["image_id"] for e in examples["labelled_image_without_split"]] == [split_image]
    assert len(examples["orphan_gradcam"]) == consistency.MAX_EXAMPLES  # capped
    assert report["warnings"]["stale_training_claim"] == 1  # still there, still only a warning

    n = sum(expected.values())
    human = _check_cli(settings)
    assert human.returncode == 1 and human.stdout.strip().splitlines()[-1] == f"{n} problems"
    assert f"{'orphan_gradcam':<32} {N_ORPHAN_OVERLAYS}\n" in human.stdout
    as_json = _check_cli(settings, "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["problems"] == expected
    reliability.record("Database and store out of step", "an image's normalised copy deleted, stray objects under drops/, "
                       "models/ and predictions/, a prediction of an unknown model version (foreign keys off), a split row "
                       "deleted", "`lesion check` reports each by kind with examples and exits 1; warnings alone exit 0",
                       f"{n} problems in 6 kinds, exit 1; stale claim and unfinished drop: warnings, exit 0", 0, 0)


def test_a_pruned_version_is_not_expected_to_have_its_model(home_copy, trained_home):
    """Versions whose artifacts `lesion gc` removed keep report and metrics, which are still checked."""
    settings, version = home_copy, trained_home.version
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(model_versions.update().values(is_champion=False, status="retired", artifacts_pruned_at=datetime.now(UTC)))
        conn.execute(predictions.update().values(gradcam_uri=None))
    engine.dispose()
    store = open_store(settings)
    for o in list(store.list(f"models/{version}/")):
        if not o.key.endswith(("report.html", "metrics.json")):
            store.delete(o.key)
    report = consistency.check(settings)
    assert report["problems"]["missing_model_artifact"] == 0
    assert report["warnings"]["gc_leftover"] == len(list(store.list(f"predictions/{version}/"))) > 0  # overlays left
    store.delete(f"models/{version}/report.html")
    report = consistency.check(settings)
    assert report["problems"]["missing_model_artifact"] == 1
    assert report["examples"]["missing_model_artifact"][0]["column"] == "report_uri"
