"""Every ```sql block of the README runs, on SQLite and on PostgreSQL, against a database with
ingested, trained and scored data, and returns rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks import db, registry, retrain, review, scoring
from lesion_tasks.ingest import ingest
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop
from tests.conftest import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)


def test_readme_has_sql_examples():
    assert len(BLOCKS) >= 6
    for topic in ("v_review_queue", "mutual_info", "GROUP BY p.model_version", "FROM reviews", "v_reviewed_labels"):
        assert any(topic in b for b in BLOCKS), topic


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded_db(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    url = request.getfixturevalue("pg_url_module") if request.param == "postgresql" else None
    settings = Settings.from_env({"LESION_HOME": str(tmp / "home")}, db_url=url)
    db.upgrade(settings)
    drop = make_drop(tmp / "drop", n_images=150, seed=5)
    (drop / "ISIC_9059999.jpg").write_bytes(b"")
    (drop / "ISIC_9050000.jpg").write_bytes((drop / "ISIC_9050001.jpg").read_bytes())  # pHash twins
    ingest(str(drop), settings)
    clinic = make_drop(tmp / "clinic", n_images=6, seed=6)
    (clinic / "metadata.csv").unlink()  # no ISIC labels: reviewers give them
    ingest(str(clinic), settings, drop_id="clinic")
    trained = retrain.run(settings, tiny_config(epochs=60, views=1, bootstrap=50), run_id="readme")
    engine = db.make_engine(settings.db_url)
    registry.promote(engine, trained["model_version"], "readme fixture", "test", override=not trained["promoted"])
    engine.dispose()
    scoring.score(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        version = registry.champion(conn)["model_version"]
        clinic_ids = conn.scalars(sa.text("SELECT image_id FROM images WHERE drop_id = 'clinic' ORDER BY image_id")).all()
        labelled = conn.scalars(sa.text("SELECT image_id FROM images WHERE label = 'NV' ORDER BY image_id")).first()
    for k, (image_id, label) in enumerate(((clinic_ids[0], "MEL"), (clinic_ids[1], "NV"), (labelled, "MEL"))):
        review.record(engine, image_id, version, "set_label", "dr-readme", label=label, note="README fixture",
                      submission_id=f"readme-{k:04d}")
    engine.dispose()
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
    assert rows, "every README example should show something on a populated database"
    if "FROM quarantine" in sql:
        assert sorted(tuple(r)[1] for r in rows) == ["duplicate", "empty_file"]
