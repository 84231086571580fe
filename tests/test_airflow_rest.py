"""The project driven by a real client: a real `airflow standalone` (what `make airflow` starts) on
127.0.0.1, `lesion_retrain` then `lesion_nightly_score` triggered through the REST API v2 with Params,
and the database checked afterwards. SIGINT to the standalone leader stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import sqlalchemy as sa

from lesion_tasks import db
from lesion_tasks.ingest import ingest
from lesion_tasks.schema import images, model_versions, predictions
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "lesion-rest-test-password"
TINY = {"profile": "demo", "backbone": "tiny", "image_size": 64, "weights": "none", "epochs": 150, "seed": 0,
        "mc_samples": 20, "target_sensitivity": 0.97}


def _wait(predicate, timeout: float, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            value = predicate()
            if value:
                return value
        except requests.RequestException:
            pass
        time.sleep(2)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("standalone")
    home, airflow_home = tmp / "lesion", tmp / "airflow"
    airflow_home.mkdir()
    settings = Settings.from_env({"LESION_HOME": str(home)})
    db.upgrade(settings)
    ingest(str(make_drop(tmp / "drop", n_images=300, seed=11)), settings)
    port = free_port()
    passwords = airflow_home / "passwords.json"
    passwords.write_text(json.dumps({"admin": PASSWORD}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_"))}
    env.update({
        "LESION_HOME": str(home), "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    })
    for cmd in (["airflow", "db", "migrate"], ["airflow", "pools", "set", "lesion_tensorflow", "1", "TensorFlow tasks"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    log = tmp / "standalone.log"
    proc = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    _wait(lambda: requests.get(f"{base}/api/v2/monitor/health", timeout=5).ok, 240, "the API server", proc, log)
    token = requests.post(f"{base}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=10).json()["access_token"]
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    yield base, session, settings, proc, log
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    finally:
        leftovers = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in leftovers:
            p.kill()
    assert not leftovers, f"SIGINT to the standalone leader left processes behind: {leftovers}"


def _trigger_and_wait(base, session, dag_id, conf, log, proc, timeout=600):
    _wait(lambda: session.get(f"{base}/api/v2/dags/{dag_id}", timeout=10).ok, 180, f"{dag_id} to be parsed", proc, log)
    session.patch(f"{base}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=10).raise_for_status()
    response = session.post(f"{base}/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}, timeout=10)
    assert response.ok, response.text
    run_id = response.json()["dag_run_id"]
    state = _wait(lambda: (s := session.get(f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}", timeout=10).json()["state"])
                  in ("success", "failed") and s, timeout, f"{dag_id} run {run_id}", proc, log)
    tasks = session.get(f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", timeout=10).json()
    assert state == "success", {t["task_id"]: t["state"] for t in tasks["task_instances"]}
    return run_id


def test_anonymous_requests_get_no_data(standalone):
    base, *_ = standalone
    assert requests.get(f"{base}/api/v2/dags", timeout=10).status_code in (401, 403)


def test_retrain_then_nightly_scoring_through_the_rest_api(standalone):
    base, session, settings, proc, log = standalone
    params = session.get(f"{base}/api/v2/dags/lesion_retrain/details", timeout=10).json()["params"]
    assert {"profile", "epochs", "weights", "mc_samples"} <= set(params)
    retrain_run = _trigger_and_wait(base, session, "lesion_retrain", TINY, log, proc)
    score_run = _trigger_and_wait(base, session, "lesion_nightly_score", {}, log, proc)
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(model_versions).where(model_versions.c.run_id == retrain_run)).mappings().one()
        n_images = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
        scored = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                              .where(predictions.c.run_id == score_run)).scalar()
        total = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
    engine.dispose()
    assert row["backbone"] == "tiny" and row["mc_samples"] == 20 and row["is_champion"]
    assert scored == total == n_images == 300
