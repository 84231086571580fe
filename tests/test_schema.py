"""Migrations create exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lesion_tasks import db
from lesion_tasks.schema import metadata
from lesion_tasks.settings import Settings


@pytest.fixture
def url(any_db_url):
    return any_db_url


def test_upgrade_matches_schema_module_and_is_repeatable(url):
    assert db.upgrade(url) == "0007_failed_drops"
    assert db.upgrade(url) == "0007_failed_drops"  # a second upgrade is a no-op
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
    assert db.upgrade(settings) == "0007_failed_drops"


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
