"""Migrations create exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lesion_tasks.core import db
from lesion_tasks.core.schema import metadata
from lesion_tasks.core.settings import Settings

HEAD = "0019_verdicts_per_image"


@pytest.fixture
def url(any_db_url):
    return any_db_url


def _one_prediction_at(url: str, tmp_path, revision: str):
    """A database migrated to `revision` holding one drop, image, model version, prediction and its MC samples."""
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=url)
    assert db.upgrade(settings, revision) == revision
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(DROP_ROW), {"status": "complete"})
        conn.execute(sa.text(IMAGE_ROW), {"image_id": "i1", "label": None})
        conn.execute(sa.text(MODEL_ROW), {"t": True})
        conn.execute(sa.text(PREDICTION_ROW), {"image_id": "i1", "t": True})
        conn.execute(sa.text(SAMPLES_ROW), {"image_id": "i1"})
    return settings, engine


def test_upgrade_matches_schema_module_and_is_repeatable(url):
    assert db.upgrade(url) == HEAD
    assert db.upgrade(url) == HEAD  # a second upgrade is a no-op
    engine = db.make_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": db.VERSION_TABLE})
        diff = compare_metadata(ctx, metadata)
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert {"drops", "images", "quarantine", "splits", "model_versions", "champion_history", "predictions", db.VERSION_TABLE} <= tables
    assert diff == []


DROP_ROW = ("INSERT INTO drops (drop_id, source, layout, fingerprint, status, n_entries, started_at) "
            "VALUES ('d', 's', 'l', 'f', :status, 0, CURRENT_TIMESTAMP)")
IMAGE_ROW = ("INSERT INTO images (image_id, drop_id, source_entry, sha256, label, near_dup_group, phash, width, height, "
             "n_bytes, format, original_uri, normalized_uri, normalized_size, ingested_at) "
             "VALUES (:image_id, 'd', :image_id, :image_id, :label, :image_id, '0', 1, 1, 1, 'JPEG', 'o', 'n', 1, "
             "CURRENT_TIMESTAMP)")


def test_drop_status_check_constraint(url):
    """drops.status is 'running' or 'complete', nothing else."""
    db.upgrade(url)
    engine = db.make_engine(url)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text(DROP_ROW), {"status": "bogus"})
    with engine.begin() as conn:
        conn.execute(sa.text(DROP_ROW), {"status": "complete"})
    engine.dispose()


def test_image_label_check_constraint(url):
    """images.label is NULL (no ISIC label) or one of MEL, NV, OTHER; anything else is refused."""
    db.upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(DROP_ROW), {"status": "complete"})
    for label in (None, "MEL", "NV", "OTHER"):
        with engine.begin() as conn:
            conn.execute(sa.text(IMAGE_ROW), {"image_id": f"ok-{label}", "label": label})
    for label in ("BCC", "mel", ""):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text(IMAGE_ROW), {"image_id": f"bad-{label}", "label": label})
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT label FROM images ORDER BY image_id")).scalars().all()
    engine.dispose()
    assert sorted(stored, key=str) == sorted([None, "MEL", "NV", "OTHER"], key=str)


def test_migrations_downgrade_and_upgrade_again(url, tmp_path):
    """An operator can step back (views, grants and indexes recreated) and forward again."""
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=url)
    db.upgrade(settings)
    assert db.downgrade(settings, "0004_reader_role") == "0004_reader_role"
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert "reviews" not in sa.inspect(conn).get_table_names()
        conn.execute(sa.text("SELECT image_id, known_label FROM v_review_queue")).all()
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_analyze_refreshes_postgres_statistics_and_is_a_no_op_on_sqlite(url):
    db.upgrade(url)
    engine = db.make_engine(url)
    db.analyze(engine, ["predictions", "prediction_samples"])
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            analyzed = dict(conn.execute(sa.text("SELECT relname, last_analyze FROM pg_stat_user_tables "
                                                 "WHERE relname IN ('predictions', 'prediction_samples')")).all())
        assert set(analyzed) == {"predictions", "prediction_samples"} and all(analyzed.values())
    engine.dispose()


MODEL_ROW = ("INSERT INTO model_versions (model_version, created_at, status, profile, backbone, image_size, mc_samples, "
             "config, environment, weights_source, lineage, code_version, run_id, is_champion) "
             "VALUES ('m1', CURRENT_TIMESTAMP, 'champion', 'demo', 'tiny', 64, 2, '{}', '{}', 'none', '{}', 'c', 'r', :t)")
PREDICTION_ROW = ("INSERT INTO predictions (image_id, model_version, p_mel, predicted_label, threshold, entropy, mutual_info, "
                  "mc_samples, gradcam_uri, needs_review, review_reasons, drop_id, run_id, scored_at) "
                  "VALUES (:image_id, 'm1', 0.6, 'MEL', 0.5, 0.67, 0.01, 2, 'g', :t, 'uncertain', 'd', 'r', CURRENT_TIMESTAMP)")
SAMPLES_ROW = "INSERT INTO prediction_samples (image_id, model_version, p_mel_samples) VALUES (:image_id, 'm1', '[0.5, 0.7]')"


def _view_columns(conn, view: str) -> list[str]:
    return list(conn.execute(sa.text(f"SELECT * FROM {view}")).keys())


def _reader_grants(conn) -> dict[str, bool] | None:
    """Whether `lesion_reader` may SELECT each view (None: SQLite, or no such role)."""
    if conn.dialect.name != "postgresql" or not conn.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'lesion_reader'")).scalar():
        return None
    return {v: conn.execute(sa.text("SELECT has_table_privilege('lesion_reader', :v, 'SELECT')"), {"v": v}).scalar()
            for v in ("v_latest_predictions", "v_review_queue")}


def test_out_of_scope_migration_appends_p_other_and_steps_back(url, tmp_path):
    """0008 adds predictions.p_other (NULL for existing rows) and appends it to v_latest_predictions and
    v_review_queue, every other column in its place; the reader's grants on the recreated views survive;
    a downgrade removes the column and restores the views without losing rows (MC samples included)."""
    settings, engine = _one_prediction_at(url, tmp_path, "0007_failed_drops")
    with engine.connect() as conn:
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}
        grants_before = _reader_grants(conn)
    assert before["v_review_queue"][-4:] == ["review_verdict", "review_label", "reviewer", "reviewed_at"]

    assert db.upgrade(settings, "0008_out_of_scope") == "0008_out_of_scope"
    with engine.begin() as conn:
        assert {v: _view_columns(conn, v) for v in before} == {v: cols + ["p_other"] for v, cols in before.items()}
        assert conn.execute(sa.text("SELECT p_other FROM v_review_queue WHERE image_id = 'i1'")).scalar() is None
        conn.execute(sa.text("UPDATE predictions SET p_other = 0.93, review_reasons = 'out_of_scope,uncertain'"))
        row = conn.execute(sa.text("SELECT image_id, p_mel, p_other, review_reasons FROM v_review_queue")).one()
        assert tuple(row) == ("i1", 0.6, 0.93, "out_of_scope,uncertain")
        assert conn.execute(sa.text("SELECT p_other FROM v_latest_predictions")).scalar() == 0.93
        assert _reader_grants(conn) == grants_before
        if conn.dialect.name == "postgresql":  # the test server's user may create roles: 0004 made lesion_reader
            assert grants_before == {"v_latest_predictions": True, "v_review_queue": True}

    assert db.downgrade(settings, "0007_failed_drops") == "0007_failed_drops"
    with engine.connect() as conn:
        assert {v: _view_columns(conn, v) for v in before} == before
        assert "p_other" not in {c["name"] for c in sa.inspect(conn).get_columns("predictions")}
        assert conn.execute(sa.text("SELECT review_reasons FROM v_review_queue")).scalar() == "out_of_scope,uncertain"
        assert conn.execute(sa.text("SELECT COUNT(*) FROM prediction_samples")).scalar() == 1
        assert _reader_grants(conn) == grants_before
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_retention_migration_lets_gc_clear_overlays_and_steps_back(url, tmp_path):
    """0009 makes predictions.gradcam_uri nullable and adds model_versions.artifacts_pruned_at without
    copying a row (MC samples kept on SQLite too), the views' columns and the reader's grants unchanged;
    a downgrade gives NULL overlays back their deterministic key, then NOT NULL holds again."""
    settings, engine = _one_prediction_at(url, tmp_path, "0008_out_of_scope")
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE predictions SET gradcam_uri = NULL"))
    with engine.connect() as conn:
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}
        grants_before = _reader_grants(conn)

    assert db.upgrade(settings, "0009_retention") == "0009_retention"
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE predictions SET gradcam_uri = NULL"))
        conn.execute(sa.text("UPDATE model_versions SET artifacts_pruned_at = CURRENT_TIMESTAMP"))
        assert conn.execute(sa.text("SELECT gradcam_uri, p_mel FROM v_review_queue")).one() == (None, 0.6)
        assert {v: _view_columns(conn, v) for v in before} == before
        assert _reader_grants(conn) == grants_before
        assert conn.execute(sa.text("SELECT COUNT(*) FROM prediction_samples")).scalar() == 1

    assert db.downgrade(settings, "0008_out_of_scope") == "0008_out_of_scope"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT gradcam_uri FROM predictions")).scalar() == "predictions/m1/gradcam/d/i1.png"
        assert "artifacts_pruned_at" not in {c["name"] for c in sa.inspect(conn).get_columns("model_versions")}
        assert conn.execute(sa.text("SELECT COUNT(*) FROM prediction_samples")).scalar() == 1
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE predictions SET gradcam_uri = NULL"))
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_review_p_other_migration_keeps_verdicts_and_steps_back(url, tmp_path):
    """0010 adds reviews.p_other (NULL for verdicts recorded before it) without touching a verdict or the
    views; a downgrade drops the column and keeps the verdicts."""
    settings, engine = _one_prediction_at(url, tmp_path, "0009_retention")
    with engine.begin() as conn:
        conn.execute(sa.text(REVIEW_ROW))
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}

    assert db.upgrade(settings, "0010_review_p_other") == "0010_review_p_other"
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT label, p_other FROM reviews")).one() == ("OTHER", None)
        conn.execute(sa.text("UPDATE reviews SET p_other = 0.93"))
        assert conn.execute(sa.text("SELECT review_label FROM v_review_queue")).scalar() == "OTHER"
        assert {v: _view_columns(conn, v) for v in before} == before

    assert db.downgrade(settings, "0009_retention") == "0009_retention"
    with engine.connect() as conn:
        assert "p_other" not in {c["name"] for c in sa.inspect(conn).get_columns("reviews")}
        assert conn.execute(sa.text("SELECT verdict, label FROM reviews")).one() == ("set_label", "OTHER")
    engine.dispose()
    assert db.upgrade(settings) == HEAD


REVIEW_ROW = ("INSERT INTO reviews (submission_id, image_id, model_version, verdict, label, reviewer, reviewed_at, p_mel, "
              "predicted_label) VALUES ('s-0001', 'i1', 'm1', 'set_label', 'OTHER', 'dr', CURRENT_TIMESTAMP, 0.6, 'MEL')")


def test_sites_migration_backfills_site_and_appends_site_columns_and_steps_back(url, tmp_path):
    """0011 gives every drop and image the site = its drop id, appends `site` and `site_status` to both
    prediction views (every other column in place; the reader's grants survive), adds v_sites; a downgrade
    removes all of it and keeps the rows."""
    settings, engine = _one_prediction_at(url, tmp_path, "0010_review_p_other")
    with engine.begin() as conn:
        conn.execute(sa.text(IMAGE_ROW), {"image_id": "i2", "label": "MEL"})
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}
        grants_before = _reader_grants(conn)

    assert db.upgrade(settings, "0011_sites") == "0011_sites"
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT site FROM drops")).scalar() == "d"
        assert set(conn.execute(sa.text("SELECT image_id, site FROM images")).all()) == {("i1", "d"), ("i2", "d")}
        for view, cols in before.items():
            assert _view_columns(conn, view) == cols + ["site", "site_status"]
        # the drop has a labelled image of its own: provisional without a champion's evaluation
        assert conn.execute(sa.text("SELECT site, site_status FROM v_latest_predictions")).one() == ("d", "provisional")
        assert conn.execute(sa.text("SELECT site, images, labelled, status FROM v_sites")).one() == ("d", 2, 1, "provisional")
        conn.execute(sa.text("INSERT INTO site_evaluations (model_version, site, status, evidence, melanomas_evidence, "
                             "threshold, chosen_on, evaluated_at) VALUES ('m1', 'd', 'failing', 'test', 31, 0.2, 'site', "
                             "CURRENT_TIMESTAMP)"))
        assert conn.execute(sa.text("SELECT site_status FROM v_review_queue")).scalar() == "failing"
        if grants_before is not None:
            assert _reader_grants(conn) == grants_before

    assert db.downgrade(settings, "0010_review_p_other") == "0010_review_p_other"
    with engine.connect() as conn:
        assert "site" not in {c["name"] for c in sa.inspect(conn).get_columns("images")}
        assert "site_evaluations" not in sa.inspect(conn).get_table_names()
        assert {v: _view_columns(conn, v) for v in before} == before
        assert conn.execute(sa.text("SELECT COUNT(*) FROM images")).scalar() == 2
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_decision_uncertainty_migration_fills_it_from_the_stored_samples_and_steps_back(url, tmp_path):
    """0012 adds predictions.decision_uncertainty, filled for existing rows from their MC samples (the share on
    the other side of the row's threshold), without touching the views; a downgrade drops it."""
    settings, engine = _one_prediction_at(url, tmp_path, "0011_sites")
    with engine.begin() as conn:
        # decided MEL at threshold 0.5; 1 of its 4 samples is below the threshold
        conn.execute(sa.text("UPDATE prediction_samples SET p_mel_samples = '[0.45, 0.7, 0.9, 0.55]'"))
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}

    assert db.upgrade(settings, "0012_decision_uncertainty") == "0012_decision_uncertainty"
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT decision_uncertainty FROM predictions")).scalar() == pytest.approx(0.25)
        assert {v: _view_columns(conn, v) for v in before} == before

    assert db.downgrade(settings, "0011_sites") == "0011_sites"
    with engine.connect() as conn:
        assert "decision_uncertainty" not in {c["name"] for c in sa.inspect(conn).get_columns("predictions")}
        assert conn.execute(sa.text("SELECT p_mel, predicted_label FROM predictions")).one() == (0.6, "MEL")
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_attention_migration_keeps_existing_rows_and_their_overlays_and_steps_back(url, tmp_path):
    """0013 adds predictions.attention_on_lesion, NULL for rows scored before (not measured), every other value
    and the views as they were; a downgrade drops it."""
    settings, engine = _one_prediction_at(url, tmp_path, "0012_decision_uncertainty")
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM predictions")).mappings().one()
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}
    assert db.upgrade(settings, "0013_attention_on_lesion") == "0013_attention_on_lesion"
    with engine.connect() as conn:
        after = conn.execute(sa.text("SELECT * FROM predictions")).mappings().one()
        assert after["attention_on_lesion"] is None
        assert {k: after[k] for k in row} == dict(row)  # gradcam_uri included: old overlays stay readable
        assert {v: _view_columns(conn, v) for v in before} == before
    assert db.downgrade(settings, "0012_decision_uncertainty") == "0012_decision_uncertainty"
    with engine.connect() as conn:
        assert "attention_on_lesion" not in {c["name"] for c in sa.inspect(conn).get_columns("predictions")}
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_views_carry_every_prediction_column_and_the_decision_columns_step_back(url, tmp_path):
    """0014 appends decision_uncertainty and attention_on_lesion to both prediction views (every other column in
    place, the reader's grants survive), so the views hold every column of `predictions` and SQL can rank the
    queue as the review UI does; a downgrade restores the views as they were, and 0013 then steps back too."""
    settings, engine = _one_prediction_at(url, tmp_path, "0013_attention_on_lesion")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE predictions SET decision_uncertainty = 0.25, attention_on_lesion = 0.4"))
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}
        grants_before = _reader_grants(conn)

    assert db.upgrade(settings, "0014_views_decision_columns") == "0014_views_decision_columns"
    with engine.connect() as conn:
        table = [c["name"] for c in sa.inspect(conn).get_columns("predictions")]
        for view, cols in before.items():
            assert _view_columns(conn, view) == cols + ["decision_uncertainty", "attention_on_lesion"]
            assert not set(table) - set(_view_columns(conn, view)), view
        assert conn.execute(sa.text("SELECT decision_uncertainty, attention_on_lesion FROM v_review_queue")).one() == (0.25, 0.4)
        if grants_before is not None:
            assert _reader_grants(conn) == grants_before

    assert db.downgrade(settings, "0012_decision_uncertainty") == "0012_decision_uncertainty"
    with engine.connect() as conn:
        assert {v: _view_columns(conn, v) for v in before} == before
        assert "attention_on_lesion" not in {c["name"] for c in sa.inspect(conn).get_columns("predictions")}
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_typed_records_migration_gives_stored_gates_checks_and_renames_the_rule_key_and_steps_back(url, tmp_path):
    """0015: a gate stored as lines gets typed checks (read by `Decision.from_json`, never by parsing), the review
    rule's `threshold_by_source` becomes `threshold_by_target` and its dead keys go; a downgrade puts them back."""
    from lesion_tasks.assessment.gate import Decision
    from lesion_tasks.versions import registry

    settings, engine = _one_prediction_at(url, tmp_path, "0014_views_decision_columns")
    gate = {"passed": False, "reasons": ["PASS: evidence: 40 melanomas in test (>= 30)",
                                         "FAIL: test mel_sensitivity 0.7692 < floor 0.80",
                                         "NOTE not the asked-for weights: random initialisation"]}
    rule = {"decision_uncertainty_above": 0.2, "p_mel_band": [0.1, 0.2], "calibrated_on": "fixed",
            "threshold_by_source": {"pooled": 0.15}, "thresholds_by_site": {}}
    mv = sa.table("model_versions", sa.column("model_version"), sa.column("gate", sa.JSON), sa.column("review_rule", sa.JSON))
    with engine.begin() as conn:
        conn.execute(mv.update().values(gate=gate, review_rule=rule))
    assert db.upgrade(settings, "0015_typed_records") == "0015_typed_records"
    with engine.connect() as conn:
        v, stored = registry.version(conn, "m1"), registry.get(conn, "m1")["review_rule"]
    decision = Decision.from_json(v.gate)
    assert [c.outcome for c in decision.checks] == ["pass", "fail", "note"] and not decision.passed
    assert [c.text for c in decision.failed] == ["test mel_sensitivity 0.7692 < floor 0.80"]
    assert decision.notes[0].text == "not the asked-for weights: random initialisation"
    assert v.review_rule.threshold_by_target == {"pooled": 0.15} and v.review_rule.setter(0.15) == "pooled"
    assert "p_mel_band" not in stored and "calibrated_on" not in stored and "threshold_by_source" not in stored
    assert db.downgrade(settings, "0014_views_decision_columns") == "0014_views_decision_columns"
    with engine.connect() as conn:
        row = registry.get(conn, "m1")
    assert "checks" not in row["gate"] and row["gate"]["reasons"] == gate["reasons"]
    assert row["review_rule"]["threshold_by_source"] == {"pooled": 0.15}
    engine.dispose()
    assert db.upgrade(settings) == HEAD


def test_queue_rank_migration_appends_the_uis_order_to_the_queue_view_and_steps_back(url, tmp_path):
    """0018 appends `queue_rank` to v_review_queue (every other column in place, v_latest_predictions untouched,
    the reader's grants survive): the review UI's default order over the open cases, 1 = first, NULL once
    reviewed; a downgrade restores the view as it was."""
    settings, engine = _one_prediction_at(url, tmp_path, "0017_label_import_runs")
    with engine.begin() as conn:
        conn.execute(sa.text(IMAGE_ROW), {"image_id": "i2", "label": None})
        conn.execute(sa.text(IMAGE_ROW), {"image_id": "i3", "label": None})
        # i1: p 0.6, a likely melanoma; i2: unsure (flagged uncertain); i3: the rest; i4: reviewed
        conn.execute(sa.text(PREDICTION_ROW.replace("0.6, 'MEL'", "0.3, 'MEL'")), {"image_id": "i2", "t": True})
        conn.execute(sa.text(PREDICTION_ROW.replace("0.6, 'MEL'", "0.45, 'MEL'").replace("'uncertain'", "'predicted_mel'")),
                     {"image_id": "i3", "t": True})
        conn.execute(sa.text(IMAGE_ROW), {"image_id": "i4", "label": None})
        conn.execute(sa.text(PREDICTION_ROW.replace("0.6, 'MEL'", "0.9, 'MEL'")), {"image_id": "i4", "t": True})
        conn.execute(sa.text(REVIEW_ROW.replace("'i1'", "'i4'")))
        conn.execute(sa.text("UPDATE predictions SET decision_uncertainty = 0.25"))
        before = {v: _view_columns(conn, v) for v in ("v_latest_predictions", "v_review_queue")}
        grants_before = _reader_grants(conn)

    assert db.upgrade(settings, "0018_queue_rank") == "0018_queue_rank"
    with engine.connect() as conn:
        assert _view_columns(conn, "v_review_queue") == before["v_review_queue"] + ["queue_rank"]
        assert _view_columns(conn, "v_latest_predictions") == before["v_latest_predictions"]
        ranks = dict(conn.execute(sa.text("SELECT image_id, queue_rank FROM v_review_queue")).all())
        assert ranks == {"i1": 1, "i2": 2, "i3": 3, "i4": None}
        if grants_before is not None:
            assert _reader_grants(conn) == grants_before
    # 0019: verdicts per image, the previous champion's predictions until the champion scored the image (marked)
    assert db.upgrade(settings) == HEAD
    with engine.connect() as conn:
        assert _view_columns(conn, "v_review_queue") == before["v_review_queue"] + [
            "queue_rank", "review_model_version", "prediction_of"]
        assert _view_columns(conn, "v_latest_predictions") == before["v_latest_predictions"] + ["prediction_of"]
        assert dict(conn.execute(sa.text("SELECT image_id, queue_rank FROM v_review_queue")).all()) == ranks
        assert set(conn.scalars(sa.text("SELECT prediction_of FROM v_latest_predictions"))) == {"champion"}
        if grants_before is not None:
            assert _reader_grants(conn) == grants_before

    assert db.downgrade(settings, "0017_label_import_runs") == "0017_label_import_runs"
    with engine.connect() as conn:
        assert {v: _view_columns(conn, v) for v in before} == before
    engine.dispose()
    assert db.upgrade(settings) == HEAD
