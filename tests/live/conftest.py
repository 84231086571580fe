"""A real `airflow standalone` (what `make airflow` starts), shared by the tests of this package.

Airflow's metadata and the project's results live in their own throwaway PostgreSQL cluster and the
store in its own S3 server (rclone), so the fault tests elsewhere (which restart and kill the shared
servers) never reach it; Airflow on Postgres is also what production runs (SQLite under a busy
standalone answered a REST call with "database is locked" once in CI). The Connections `lesion_db`
and `lesion_s3` point the DAGs and the review plugin at the results database and bucket. Users: an
admin and a viewer (SimpleAuthManager). Torn down (SIGINT to the standalone leader, which must stop
everything) when the package's tests are done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import sqlalchemy as sa

from lesion_tasks import db
from lesion_tasks.ingest import ingest
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop
from tests import servers
from tests.conftest import _unavailable, start_s3_or_fail

REPO = Path(__file__).resolve().parents[2]
USERS = {"admin": ("admin", "lesion-live-admin-password"), "viewer": ("viewer", "lesion-live-viewer-password")}
N_IMAGES = 300


@dataclass
class Live:
    base: str
    settings: Settings
    proc: subprocess.Popen
    log: Path
    tmp: Path

    def token(self, user: str = "admin") -> str:
        response = requests.post(f"{self.base}/auth/token", json={"username": user, "password": USERS[user][1]}, timeout=10)
        assert response.status_code == 201, response.text
        return response.json()["access_token"]

    def session(self, user: str = "admin") -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token(user)}"
        return session

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def wait(self, predicate, timeout: float, what: str):
        """Poll `predicate` until it returns something truthy; fail with the server log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                value = predicate()
                if value:
                    return value
            except requests.RequestException:
                pass
            time.sleep(2)
        pytest.fail(f"timed out waiting for {what} (standalone exit code {self.proc.poll()})\n{self.log_tail()}")

    def trigger_and_wait(self, session: requests.Session, dag_id: str, conf: dict, timeout: float = 600) -> str:
        """Unpause `dag_id`, trigger it with `conf` through the REST API and wait for success."""
        self.wait(lambda: session.get(f"{self.base}/api/v2/dags/{dag_id}", timeout=10).ok, 180, f"{dag_id} to be parsed")
        response = session.patch(f"{self.base}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=10)
        assert response.ok, f"{response.status_code} {response.text}\n{self.log_tail()}"
        response = session.post(f"{self.base}/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}, timeout=10)
        assert response.ok, response.text
        run_id = response.json()["dag_run_id"]
        url = f"{self.base}/api/v2/dags/{dag_id}/dagRuns/{run_id}"
        state = self.wait(lambda: (s := session.get(url, timeout=10).json()["state"]) in ("success", "failed") and s,
                          timeout, f"{dag_id} run {run_id}")
        tasks = session.get(f"{url}/taskInstances", timeout=10).json()
        assert state == "success", {t["task_id"]: t["state"] for t in tasks["task_instances"]}
        return run_id


def _create_database(admin_url: str, name: str) -> str:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="package")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    try:
        pg = servers.start_postgres()
    except Exception as exc:  # noqa: BLE001
        _unavailable("PostgreSQL (for the live Airflow)", exc)
    s3 = start_s3_or_fail()
    proc = None
    try:
        suffix = uuid.uuid4().hex[:8]  # unique even on an external server (LESION_TEST_PG_URL)
        lesion_url = _create_database(pg.url, f"lesion_live_{suffix}")
        settings = Settings.from_env({"LESION_HOME": str(tmp / "lesion")}, db_url=lesion_url,
                                     store_url="s3://lesion-live/lesion", s3_endpoint=s3.endpoint,
                                     s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
        db.upgrade(settings)
        ingest(str(make_drop(tmp / "drop", n_images=N_IMAGES, seed=11)), settings)

        airflow_home = tmp / "airflow"
        airflow_home.mkdir()
        passwords = airflow_home / "passwords.json"
        passwords.write_text(json.dumps({name: password for name, (_, password) in USERS.items()}))
        url = sa.engine.make_url(lesion_url)
        port = servers.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_"))}
        env.update({
            "LESION_HOME": str(tmp / "lesion"), "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _create_database(pg.url, f"airflow_live_{suffix}"),
            "AIRFLOW_CONN_LESION_DB": json.dumps({"conn_type": "postgres", "host": url.host, "port": url.port,
                                                  "login": url.username, "schema": url.database}),
            "AIRFLOW_CONN_LESION_S3": json.dumps({"conn_type": "aws", "login": s3.access_key, "password": s3.secret_key,
                                                  "extra": {"endpoint_url": s3.endpoint, "store_url": settings.store_url}}),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{n}:{role}" for n, (role, _) in USERS.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__CORE__PARALLELISM": "4",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        })
        for cmd in (["airflow", "db", "migrate"],
                    ["airflow", "pools", "set", "lesion_tensorflow", "1", "TensorFlow tasks"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        log = tmp / "standalone.log"
        proc = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        server = Live(f"http://127.0.0.1:{port}", settings, proc, log, tmp)
        server.wait(lambda: requests.get(f"{server.base}/api/v2/monitor/health", timeout=5).ok, 240, "the API server")
        yield server
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            # Airflow 3.3.2's LocalExecutor.end() sometimes waits forever for a worker that never gets
            # its poison pill; a second Ctrl-C (SIGINT to the whole group, as a terminal sends) ends it
            print("\nstandalone still stopping after 60 s (LocalExecutor shutdown race): second SIGINT to the group")
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
        time.sleep(2)
        leftovers = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in leftovers:
            p.kill()
        assert not leftovers, f"SIGINT to the standalone leader left processes behind: {leftovers}"
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        s3.stop()
        pg.stop()
