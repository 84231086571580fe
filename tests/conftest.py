"""Shared fixtures: real PostgreSQL and S3 servers, per-test databases, buckets and settings.

A server that cannot start fails the tests that need it under CI (CI=true) and skips them, with the
reason, on a developer machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]

# A private Airflow for the DAG tests (set before anything imports airflow).
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="lesion-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
# The backbone in float32 unless a test says otherwise: the exactness tests compare two paths of one precision,
# and the trained home's numbers are float32's. bfloat16 (what `auto` takes on a CPU with the units) is tested on
# purpose in tests/integration/test_precision.py.
os.environ.setdefault("LESION_BACKBONE_PRECISION", "float32")

from lesion_tasks.core import db
from lesion_tasks.core.settings import Settings  # noqa: E402
from tools import servers  # noqa: E402
from tests.helpers import (  # noqa: E402
    BIG_ORIGINAL, LABELLED_DROP, N_IMAGES, N_OTHER, NIGHT_DROP, OTHER_DROP, TrainedHome, copy_home, footprint,
    fresh_database, shared_config, start_s3_or_fail, unavailable,
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real ISIC drops (LESION_DATA_DIR, default ../shared/data)."""
    path = Path(os.environ.get("LESION_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "isic2017-mel-nv").is_dir():
        pytest.skip(f"real ISIC data not found at {path} (set LESION_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def postgres():
    try:
        server = servers.start_postgres()
        engine = sa.create_engine(server.url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        unavailable("PostgreSQL", exc)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_or_fail()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres) -> Iterator[str]:
    """A fresh, empty database on the test PostgreSQL server."""
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture
def s3_settings_kwargs(s3_server) -> dict:
    """Settings fields for a fresh bucket on the test S3 server."""
    return {
        "store_url": f"s3://t-{uuid.uuid4().hex[:12]}/lesion",
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key": s3_server.access_key,
        "s3_secret_key": s3_server.secret_key,
    }


@pytest.fixture
def local_settings(tmp_path) -> Settings:
    """Embedded defaults: SQLite and a local store under a fresh LESION_HOME."""
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")})
    db.upgrade(settings)
    return settings


@pytest.fixture
def pg_s3_settings(tmp_path, pg_url, s3_settings_kwargs) -> Settings:
    """Production shape: PostgreSQL and an S3 bucket."""
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=pg_url, **s3_settings_kwargs)
    db.upgrade(settings)
    return settings


@pytest.fixture(scope="session")
def airflow_db():
    """Airflow's metadata database, migrated once per session."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return os.environ["AIRFLOW_HOME"]


# --- one trained home for the session ---------------------------------------------------------------
# Ingesting, training and scoring once, instead of once per test module. Tests that only read use
# `trained_home` as it is; tests that write (verdicts, reruns, retrains, more drops) work on a copy
# (`copy_home`, `home_copy`), or on PostgreSQL / S3 through `mirror_home`.


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory) -> Iterator[TrainedHome]:
    """A labelled drop, a drop of out-of-scope lesions and a night of unlabelled images ingested, one
    tiny model (with its out-of-scope head) trained and promoted
    (gate passed), every image scored once; no reviews. Read it, never write to it: copy it first."""
    import numpy as np
    from PIL import Image

    from lesion_tasks import pipeline
    from lesion_tasks.scoring import nightly as scoring
    from lesion_tasks.ingest.drop import ingest
    from lesion_tasks.ops.synthetic import make_drop

    tmp = tmp_path_factory.mktemp("trained")
    settings = Settings.from_env({"LESION_HOME": str(tmp / "home")})
    db.upgrade(settings)
    labelled = make_drop(tmp / LABELLED_DROP, n_images=300, seed=11)
    (labelled / "ISIC_9110000.jpg").write_bytes((labelled / "ISIC_9110001.jpg").read_bytes())
    (labelled / "ISIC_9119999.jpg").write_bytes(b"")
    ingest(str(labelled), settings)
    night = make_drop(tmp / NIGHT_DROP, n_images=60, seed=42)
    (night / "metadata.csv").unlink()
    Image.fromarray(np.full((2000, 3000, 3), 180, np.uint8)).save(night / f"{BIG_ORIGINAL}.jpg")
    ingest(str(night), settings, drop_id=NIGHT_DROP)
    ingest(str(make_drop(tmp / OTHER_DROP, n_images=N_OTHER, seed=13, melanoma_fraction=0.0, other_fraction=1.0)),
           settings, drop_id=OTHER_DROP)
    config = shared_config()
    trained = pipeline.run(settings, config, run_id="shared")
    assert trained["promoted"], trained["gate"]
    scored = scoring.score(settings, run_id="night-1")
    assert scored["scored"] == N_IMAGES, scored
    before = footprint(settings)
    yield TrainedHome(settings, config, trained, scored)
    assert footprint(settings) == before, "a test wrote to the shared trained home: give it a copy (copy_home)"


@pytest.fixture
def home_copy(trained_home, tmp_path) -> Settings:
    """A copy of the trained home for one test to write to."""
    return copy_home(trained_home.settings, tmp_path / "home")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path) -> str:
    """An empty database on each dialect: SQLite in tmp_path, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'x.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def embedded_airflow_env(monkeypatch, tmp_path, airflow_db) -> Settings:
    """DAGs run by dag.test() on the embedded defaults (SQLite + local store under tmp_path/home), no
    Connections; incoming drops are taken at once."""
    for name in ("AIRFLOW_CONN_LESION_DB", "AIRFLOW_CONN_LESION_S3", "LESION_DB_URL", "LESION_STORE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LESION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LESION_INCOMING_SETTLE_SECONDS", "0")
    settings = Settings.from_env()
    db.upgrade(settings)
    return settings


@pytest.fixture
def airflow_env(monkeypatch, tmp_path, pg_s3_settings, airflow_db):
    """Connections lesion_db / lesion_s3 -> the test Postgres and S3; LESION_* -> decoys that must stay unused."""
    s = pg_s3_settings
    sqlalchemy_url = sa.engine.make_url(s.db_url)
    monkeypatch.setenv("AIRFLOW_CONN_LESION_DB", json.dumps({
        "conn_type": "postgres", "host": sqlalchemy_url.host, "port": sqlalchemy_url.port,
        "login": sqlalchemy_url.username, "schema": sqlalchemy_url.database}))
    monkeypatch.setenv("AIRFLOW_CONN_LESION_S3", json.dumps({
        "conn_type": "aws", "login": s.s3_access_key, "password": s.s3_secret_key,
        "extra": {"endpoint_url": s.s3_endpoint, "store_url": s.store_url}}))
    decoy = tmp_path / "decoy.db"
    monkeypatch.setenv("LESION_DB_URL", f"sqlite:///{decoy}")
    monkeypatch.setenv("LESION_STORE_URL", (tmp_path / "decoy-store").as_uri())
    monkeypatch.setenv("LESION_INCOMING_SETTLE_SECONDS", "0")
    return s, decoy


TIERS = ("unit", "dags", "integration", "live")


def pytest_collection_modifyitems(config, items):
    """Each test carries its tier's marker (its folder): `-m unit`, `-m "not live"`, ..."""
    root = Path(__file__).parent
    for item in items:
        parts = Path(item.path).relative_to(root).parts if Path(item.path).is_relative_to(root) else ()
        if parts and parts[0] in TIERS:
            item.add_marker(parts[0])


def pytest_sessionfinish(session, exitstatus):
    """Write docs/reliability.md from the fault tests, only after a whole, green run (a partial run,
    e.g. one file or -k, would leave a table with rows missing)."""
    from tests import reliability

    config = session.config
    whole = (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
             and not config.option.markexpr and not config.option.lf)
    if exitstatus == 0 and whole:
        reliability.write()
