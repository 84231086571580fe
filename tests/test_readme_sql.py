"""Every ```sql block of the README runs, on SQLite and on PostgreSQL, against ingested data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks import db
from lesion_tasks.ingest import ingest
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)


def test_readme_has_sql_examples():
    assert len(BLOCKS) >= 3


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def loaded_db(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    settings = Settings.from_env({"LESION_HOME": str(tmp / "home")})
    if request.param == "postgresql":
        settings = Settings.from_env({"LESION_HOME": str(tmp / "home")}, db_url=request.getfixturevalue("pg_url_module"))
    db.upgrade(settings)
    drop = make_drop(tmp / "drop", n_images=8, seed=5)
    (drop / "ISIC_9059999.jpg").write_bytes(b"")
    ingest(str(drop), settings)
    return settings.db_url


@pytest.fixture(scope="module")
def pg_url_module(postgres):
    name = "lesion_readme"
    admin = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return postgres.url.rsplit("/", 1)[0] + "/" + name


@pytest.mark.parametrize("sql", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_sql_runs(loaded_db, sql):
    engine = db.make_engine(loaded_db)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(sql)).all()
    engine.dispose()
    assert rows is not None
    if "quarantine" in sql:
        assert [tuple(r)[1:] for r in rows] == [("empty_file", 1)]
    if "COALESCE(label" in sql:
        assert sum(r.images for r in rows) == 8
