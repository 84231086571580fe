"""Migrations create exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lesion_tasks import db
from lesion_tasks.schema import metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'x.db'}"
    return request.getfixturevalue("pg_url")


def test_upgrade_matches_schema_module_and_is_repeatable(url):
    assert db.upgrade(url) == "0005_reviews"
    assert db.upgrade(url) == "0005_reviews"  # a second upgrade is a no-op
    engine = db.make_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": db.VERSION_TABLE})
        diff = compare_metadata(ctx, metadata)
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert {"drops", "images", "quarantine", "splits", "model_versions", "champion_history", "predictions", db.VERSION_TABLE} <= tables
    assert diff == []


def test_label_check_constraint(url):
    db.upgrade(url)
    engine = db.make_engine(url)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO drops (drop_id, source, layout, fingerprint, status, n_entries, started_at) "
                             "VALUES ('d', 's', 'l', 'f', 'bogus', 0, CURRENT_TIMESTAMP)"))
    engine.dispose()


def test_latest_migration_downgrades_and_upgrades_again(url):
    """An operator can step back one revision (views, grants and indexes recreated) and forward again."""
    from alembic import command

    db.upgrade(url)
    command.downgrade(db._alembic_config(url), "0004_reader_role")
    assert db.current_revision(url) == "0004_reader_role"
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert "reviews" not in sa.inspect(conn).get_table_names()
        conn.execute(sa.text("SELECT image_id, known_label FROM v_review_queue")).all()
    engine.dispose()
    assert db.upgrade(url) == "0005_reviews"


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
