"""Every ```sql block of the README runs, on SQLite and on PostgreSQL, against a database with
ingested, trained, scored and reviewed data (the session's trained home), and returns rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.versions import registry
from lesion_tasks.review import verdicts
from lesion_tasks.core.settings import Settings
from tests.helpers import NIGHT_DROP, QUARANTINED, copy_home, fresh_database, mirror_home

README = Path(__file__).resolve().parents[2] / "docs" / "sql.md"  # the SQL page the README links
BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)


def test_readme_has_sql_examples():
    assert len(BLOCKS) >= 6
    for topic in ("v_review_queue", "ORDER BY queue_rank", "mutual_info", "GROUP BY p.model_version", "FROM reviews",
                  "v_reviewed_labels"):
        assert any(topic in b for b in BLOCKS), topic


@pytest.fixture(scope="module")
def reviewed_home(trained_home, tmp_path_factory):
    """A copy of the session's trained home (a labelled drop with an empty file and a pHash twin in
    quarantine, a night of clinic images without ISIC labels, a champion, one scoring night) with
    reviewer labels: two clinic images and one contradicting ISIC."""
    settings = copy_home(trained_home.settings, tmp_path_factory.mktemp("readme") / "home")
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        version = registry.version(conn, None).model_version
        clinic_ids = conn.scalars(sa.text("SELECT image_id FROM images WHERE drop_id = :d ORDER BY image_id"),
                                  {"d": NIGHT_DROP}).all()
        labelled = conn.scalars(sa.text("SELECT image_id FROM images WHERE label = 'NV' ORDER BY image_id")).first()
    for k, (image_id, label) in enumerate(((clinic_ids[0], "MEL"), (clinic_ids[1], "NV"), (labelled, "MEL"))):
        verdicts.record(engine, image_id, version, "set_label", "dr-readme", label=label, note="README fixture",
                      submission_id=f"readme-{k:04d}")
    engine.dispose()
    return settings


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded_db(request, reviewed_home):
    """The reviewed home's database as it is (SQLite), or its rows in a new PostgreSQL database."""
    if request.param == "sqlite":
        yield reviewed_home.db_url
        return
    with fresh_database(request.getfixturevalue("postgres")) as url:
        on_postgres = Settings.from_env({"LESION_HOME": str(reviewed_home.home)}, db_url=url)
        db.upgrade(on_postgres)
        mirror_home(reviewed_home, on_postgres, objects=False)  # the queries read rows only
        yield url


@pytest.mark.parametrize("sql", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_sql_runs(loaded_db, sql):
    engine = db.make_engine(loaded_db)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(sql)).all()
    engine.dispose()
    assert rows, "every README example should show something on a populated database"
    if "FROM quarantine" in sql:
        assert sorted(tuple(r)[1] for r in rows) == QUARANTINED
