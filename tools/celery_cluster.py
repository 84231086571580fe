"""Airflow with the CeleryExecutor on this machine, for tests/live/test_celery_workers.py and
bench/celery_workers.py: api-server, scheduler, dag-processor and N `airflow celery worker` processes,
loopback only, with Redis as the broker and PostgreSQL for Airflow's metadata and Celery's results.

Every Celery, heartbeat and retry setting comes from docker/airflow-workers.env, the file
docker-compose.yaml gives its Airflow services: what the test proves is what the stack runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import sqlalchemy as sa

from lesion_tasks.core.settings import Settings
from tools import servers

REPO = Path(__file__).resolve().parents[1]
PASSWORD = uuid.uuid4().hex  # the admin password of this throwaway Airflow, made per process


def worker_settings() -> dict[str, str]:
    """docker/airflow-workers.env as a dict: what the compose file's Airflow services read."""
    lines = (REPO / "docker" / "airflow-workers.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def create_database(admin_url: str, name: str) -> str:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


class ClusterError(RuntimeError):
    pass


@dataclass
class Cluster:
    base: str
    settings: Settings
    procs: dict[str, subprocess.Popen]
    logs: Path

    def session(self) -> requests.Session:
        response = requests.post(f"{self.base}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=10)
        if response.status_code != 201:
            raise ClusterError(f"login refused: {response.status_code} {response.text}")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return session

    def tails(self, n: int = 1500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.glob("*.log")))

    def wait(self, predicate, timeout: float, what: str, every: float = 1.0):
        """Poll `predicate` until it returns something truthy; ClusterError with every log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if value := predicate():
                    return value
            except requests.RequestException:
                pass
            time.sleep(every)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")

    def trigger(self, session: requests.Session, dag_id: str, conf: dict) -> str:
        """Unpause `dag_id` once parsed, trigger a run with `conf`; its REST URL."""
        base = f"{self.base}/api/v2/dags/{dag_id}"
        self.wait(lambda: session.get(base, timeout=10).ok, 180, f"{dag_id} to be parsed")
        if not session.patch(base, json={"is_paused": False}, timeout=10).ok:
            raise ClusterError(f"could not unpause {dag_id}")
        response = session.post(f"{base}/dagRuns", json={"logical_date": None, "conf": conf}, timeout=10)
        if not response.ok:
            raise ClusterError(f"trigger of {dag_id} refused: {response.text}")
        return f"{base}/dagRuns/{response.json()['dag_run_id']}"

    def finish(self, session: requests.Session, run_url: str, timeout: float = 420) -> dict:
        """Wait for the run to end; its JSON (state, start_date, end_date, ...)."""
        return self.wait(lambda: (r := session.get(run_url, timeout=10).json())["state"] in ("success", "failed") and r,
                         timeout, run_url, every=2)

    def kill_tree(self, name: str) -> int:
        """SIGKILL process `name` and everything it started (its task supervisors and task processes)."""
        proc = self.procs[name]
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait(30)
        return len(victims)


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM to every process group (each component runs in a session of its own), then SIGKILL."""
    for sig, patience in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
        deadline = time.monotonic() + patience
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)


@contextlib.contextmanager
def start(tmp: Path, settings: Settings, pg_admin_url: str, redis_url: str, workers: tuple[str, ...],
          pool_slots: int) -> Iterator[Cluster]:
    """Airflow on `tmp` with `workers` (names), the lesion Connections pointing at `settings` (PostgreSQL
    + S3), the pool lesion_tensorflow of `pool_slots`. Only triggered runs: no 02:00 run is created."""
    airflow_url = create_database(pg_admin_url, f"airflow_celery_{uuid.uuid4().hex[:8]}")
    airflow_home = tmp / "airflow"
    airflow_home.mkdir(parents=True)
    (airflow_home / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
    lesion_url = sa.engine.make_url(settings.db_url)
    port = servers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_"))}
    env.update(worker_settings())  # exactly what the compose file's services get
    env.update({
        "AIRFLOW_HOME": str(airflow_home), "LESION_HOME": str(settings.home),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_url,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url,
        "AIRFLOW_CONN_LESION_DB": json.dumps({"conn_type": "postgres", "host": lesion_url.host, "port": lesion_url.port,
                                              "login": lesion_url.username, "schema": lesion_url.database}),
        "AIRFLOW_CONN_LESION_S3": json.dumps({"conn_type": "aws", "login": settings.s3_access_key,
                                              "password": settings.s3_secret_key,
                                              "extra": {"endpoint_url": settings.s3_endpoint, "store_url": settings.store_url}}),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # only the runs triggered here: no 02:00 run created for the interval just passed
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # one signing secret for every component, as in the compose file (else tasks are refused)
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    })
    for cmd in (["airflow", "db", "migrate"],
                ["airflow", "pools", "set", "lesion_tensorflow", str(pool_slots), "TensorFlow tasks: one per worker"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    logs = tmp / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def launch(name: str, cmd: list[str], extra: dict[str, str] | None = None) -> None:
        procs[name] = subprocess.Popen(["airflow", *cmd], env={**env, **(extra or {})}, cwd=tmp,
                                       stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                                       start_new_session=True)

    try:
        launch("api-server", ["api-server"])
        launch("scheduler", ["scheduler"])
        launch("dag-processor", ["dag-processor"])
        for name in workers:  # several workers on one machine: their own names, log-server ports and host names
            launch(name, ["celery", "worker", "--celery-hostname", f"{name}@%h"],
                   {"LESION_TEST_WORKER": name, "PYTHONPATH": str(REPO),
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tools.worker_name.hostname",
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(servers.free_port())})
        cluster = Cluster(f"http://127.0.0.1:{port}", settings, procs, logs)
        cluster.wait(lambda: requests.get(f"{cluster.base}/api/v2/monitor/health", timeout=5).ok, 240, "the API server")
        yield cluster
    finally:
        _stop(procs)
