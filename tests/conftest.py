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

from lesion_tasks import db  # noqa: E402
from lesion_tasks.settings import Settings  # noqa: E402
from tests import servers  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(what: str, exc: BaseException):
    message = f"{what} unavailable: {exc}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing server is a failure)", pytrace=False)
    pytest.skip(message)


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
        _unavailable("PostgreSQL", exc)
    yield server
    server.stop()


def start_s3_or_fail() -> servers.S3Server:
    """A new S3 server, or the test fails (CI) / skips (elsewhere) saying why."""
    try:
        return servers.start_s3()
    except Exception as exc:  # noqa: BLE001
        _unavailable("S3 server (rclone serve s3)", exc)


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_or_fail()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh, empty database on the test PostgreSQL server."""
    name = f"lesion_t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield postgres.url.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


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


def tiny_config(**overrides):
    """A `demo`-profile config on the test backbone: tiny, 64 px, random init (no weights file)."""
    from lesion_tasks import retrain

    return retrain.make_config("demo", **{"backbone": "tiny", "image_size": 64, "weights": "none", **overrides})


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `lesion` console script."""
    lesion = Path(sys.executable).with_name("lesion")
    return subprocess.run([str(lesion), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


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



def run_dag(dag, conf: dict | None = None):
    """`dag.test()` (which does not raise when a task fails): the run and each task's state."""
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    return run, states


def pytest_sessionfinish(session, exitstatus):
    """Write docs/reliability.md from the fault tests, only after a whole, green run (a partial run,
    e.g. one file or -k, would leave a table with rows missing)."""
    from tests import reliability

    config = session.config
    whole = (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
             and not config.option.markexpr and not config.option.lf)
    if exitstatus == 0 and whole:
        reliability.write()
