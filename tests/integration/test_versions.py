"""Model version ids are injective and claimed before anything is written; a promoted version's artifacts
never change (issue: a reviewer replaced the champion by triggering a run id that slugged to its id)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from lesion_tasks.assessment import assess
from lesion_tasks.versions import registry
from lesion_tasks.training import retrain
from lesion_tasks.core import db, keys
from lesion_tasks.core.schema import champion_history, model_versions
from lesion_tasks.core.store import open_store
from tests import reliability
from tests.helpers import shared_config


def _state(settings, version):
    store = open_store(settings)
    objects = {o.key: store.get(o.key) for o in store.list(keys.model_prefix(version))}
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        row = dict(conn.execute(sa.select(model_versions).where(model_versions.c.model_version == version)).mappings().one())
        history = conn.execute(sa.select(champion_history)).all()
        versions = conn.scalars(sa.select(model_versions.c.model_version)).all()
    engine.dispose()
    return objects, row, history, sorted(versions)


def test_another_runs_version_is_refused_before_anything_is_written(trained_home, home_copy, monkeypatch):
    version = trained_home.version
    before = _state(home_copy, version)
    assert before[0], "the champion has artifacts to protect"
    monkeypatch.setattr(retrain, "model_version_id", lambda run_id, config: version)  # a colliding id
    with pytest.raises(registry.VersionConflict, match="belongs to run 'shared', not 'intruder'"):
        retrain.train_model(home_copy, shared_config(), run_id="intruder")
    assert _state(home_copy, version) == before
    reliability.record("A run id colliding with the champion's version", "train_model of another run under the champion's "
                       "version id; the champion's own run retried", "refused before any write; artifacts write-once",
                       "VersionConflict; artifacts, registry row and history byte-identical", 0, 0)


def test_a_promoted_version_is_write_once_even_for_its_own_run(trained_home, home_copy):
    version = trained_home.version
    before = _state(home_copy, version)
    assert before[1]["is_champion"]
    with pytest.raises(registry.VersionConflict, match="write-once"):
        retrain.train_model(home_copy, shared_config(), run_id="shared")  # the champion's own run, retried
    with pytest.raises(registry.VersionConflict, match="write-once"):
        assess.evaluate_model(home_copy, version)
    assert _state(home_copy, version) == before


def test_a_retried_task_of_the_same_run_reclaims_its_own_version(home_copy):
    engine = db.make_engine(home_copy.db_url)
    placeholder = {"created_at": datetime.now(UTC), "profile": "demo", "backbone": "tiny", "image_size": 64, "mc_samples": 2,
                   "config": {}, "environment": {}, "weights_source": "-", "lineage": {}, "code_version": "0"}
    registry.claim(engine, "v-retry", "run-a", placeholder)
    registry.claim(engine, "v-retry", "run-a", placeholder)  # the retry: same owner, still training
    with pytest.raises(registry.VersionConflict, match="belongs to run 'run-a'"):
        registry.claim(engine, "v-retry", "run-b", placeholder)
    with engine.connect() as conn:
        row = conn.execute(sa.select(model_versions.c.run_id, model_versions.c.status)
                           .where(model_versions.c.model_version == "v-retry")).one()
    engine.dispose()
    assert tuple(row) == ("run-a", "training")


def test_after_promotion_only_the_reports_gate_section_is_rewritten(trained_home, home_copy):
    """A manual override retires the champion: its report.html (same key) now says it was replaced, every
    other artifact of it stays byte-identical, and it still refuses to be evaluated again."""
    version = trained_home.version
    objects, row, _, _ = _state(home_copy, version)
    report_key = f"{keys.model_prefix(version)}report.html"
    assert report_key in objects and "now champion" in objects[report_key].decode()
    engine = db.make_engine(home_copy.db_url)
    with engine.begin() as conn:
        conn.execute(model_versions.insert().values(**row | {"model_version": "overrider", "status": "candidate",
                                                               "is_champion": False, "run_id": "other", "report_uri": None}))
    assert assess.promote_with_report(home_copy, engine, "overrider", "manual override: drill", "dr-test", override=True) == version
    engine.dispose()
    after, row_after, _, _ = _state(home_copy, version)
    assert set(after) == set(objects)
    assert {k: v for k, v in after.items() if k != report_key} == {k: v for k, v in objects.items() if k != report_key}
    report = after[report_key].decode()
    assert "now retired" in report and "replaced as champion by overrider through a manual override" in report
    assert report.split("<!--gate:end-->")[1] == objects[report_key].decode().split("<!--gate:end-->")[1]  # metrics as they were
    assert row_after["report_uri"] == row["report_uri"] and row_after["status"] == "retired"
    with pytest.raises(registry.VersionConflict, match="write-once"):
        assess.evaluate_model(home_copy, version)
