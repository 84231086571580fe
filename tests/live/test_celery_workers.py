"""CeleryExecutor for real: the path a user takes when one machine is not enough.

Airflow's api-server, scheduler and dag-processor and TWO `airflow celery worker` processes on this
machine (loopback only); Debian's redis-server as the broker; PostgreSQL for Airflow's metadata, Celery's
results and the lesion database; the S3 server for the store. Every Celery, heartbeat and retry setting
comes from docker/airflow-workers.env, the file docker-compose.yaml gives its Airflow services. The
shared trained home's champion and its images (mirrored, unscored) are scored by `lesion_nightly_score`
in shards; one worker is SIGKILLed with everything it started (a lost machine) while it runs a shard.
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
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import requests
import sqlalchemy as sa

from lesion_tasks import db
from lesion_tasks.schema import model_versions, predictions
from lesion_tasks.settings import Settings
from lesion_tasks.store import key_of, open_store
from tests import reliability, servers
from tests.conftest import N_IMAGES, _unavailable, mirror_home, start_s3_or_fail
from tests.live.conftest import _create_database

REPO = Path(__file__).resolve().parents[2]
WORKERS = ("w1", "w2")
POOL_SLOTS = 2  # one TensorFlow task per worker (worker_concurrency 1 in docker/airflow-workers.env)
SHARD_SIZE = 80  # the trained home's 400 images: 5 shards
PASSWORD = "lesion-celery-admin-password"


def worker_settings() -> dict[str, str]:
    """docker/airflow-workers.env as a dict: what the compose file's Airflow services read."""
    lines = (REPO / "docker" / "airflow-workers.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


@dataclass
class Cluster:
    base: str
    settings: Settings
    procs: dict[str, subprocess.Popen]
    logs: Path

    def session(self) -> requests.Session:
        response = requests.post(f"{self.base}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=10)
        assert response.status_code == 201, response.text
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return session

    def tails(self, n: int = 1500) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.glob("*.log")))

    def wait(self, predicate, timeout: float, what: str, every: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if value := predicate():
                    return value
            except requests.RequestException:
                pass
            time.sleep(every)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")

    def kill_tree(self, name: str) -> list[int]:
        """SIGKILL process `name` and everything it started (its task supervisor and task processes)."""
        proc = self.procs[name]
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(30)
        return [p.pid for p in victims]


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM to every process group (each component runs in a session of its own), then SIGKILL."""
    for sig, patience in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        for proc in procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + patience
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(trained_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("celery")
    try:
        redis = servers.start_redis()
    except Exception as exc:  # noqa: BLE001
        _unavailable("redis-server (the Celery broker)", exc)
    try:
        pg = servers.start_postgres()
    except Exception as exc:  # noqa: BLE001
        redis.stop()
        _unavailable("PostgreSQL (for Airflow with Celery)", exc)
    s3 = start_s3_or_fail()
    procs: dict[str, subprocess.Popen] = {}
    try:
        suffix = uuid.uuid4().hex[:8]
        settings = Settings.from_env({"LESION_HOME": str(tmp / "lesion")},
                                     db_url=_create_database(pg.url, f"lesion_celery_{suffix}"),
                                     store_url="s3://lesion-celery/lesion", s3_endpoint=s3.endpoint,
                                     s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
        db.upgrade(settings)
        mirror_home(trained_home.settings, settings, predictions=False)  # the champion, every image unscored
        airflow_url = _create_database(pg.url, f"airflow_celery_{suffix}")
        airflow_home = tmp / "airflow"
        airflow_home.mkdir()
        (airflow_home / "passwords.json").write_text(json.dumps({"admin": PASSWORD}))
        lesion_url = sa.engine.make_url(settings.db_url)
        port = servers.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_"))}
        env.update(worker_settings())  # exactly what the compose file's services get
        env.update({
            "AIRFLOW_HOME": str(airflow_home), "LESION_HOME": str(tmp / "lesion"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": redis.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_url,
            "AIRFLOW_CONN_LESION_DB": json.dumps({"conn_type": "postgres", "host": lesion_url.host, "port": lesion_url.port,
                                                  "login": lesion_url.username, "schema": lesion_url.database}),
            "AIRFLOW_CONN_LESION_S3": json.dumps({"conn_type": "aws", "login": s3.access_key, "password": s3.secret_key,
                                                  "extra": {"endpoint_url": s3.endpoint, "store_url": settings.store_url}}),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            # only the run this test triggers: no 02:00 run created for the interval just passed
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
                    ["airflow", "pools", "set", "lesion_tensorflow", str(POOL_SLOTS), "TensorFlow tasks: one per worker"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        logs = tmp / "logs"
        logs.mkdir()

        def start(name: str, cmd: list[str], extra: dict[str, str] | None = None) -> None:
            procs[name] = subprocess.Popen(["airflow", *cmd], env={**env, **(extra or {})}, cwd=tmp,
                                           stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                                           start_new_session=True)

        start("api-server", ["api-server"])
        start("scheduler", ["scheduler"])
        start("dag-processor", ["dag-processor"])
        for name in WORKERS:  # two workers on one machine: their own names, log-server ports and task host names
            start(name, ["celery", "worker", "--celery-hostname", f"{name}@%h"],
                  {"LESION_TEST_WORKER": name, "PYTHONPATH": str(REPO),
                   "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.live.worker_name.hostname",
                   "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(servers.free_port())})
        cluster = Cluster(f"http://127.0.0.1:{port}", settings, procs, logs)
        cluster.wait(lambda: requests.get(f"{cluster.base}/api/v2/monitor/health", timeout=5).ok, 240, "the API server")
        yield cluster
    finally:
        _stop(procs)
        s3.stop()
        pg.stop()
        redis.stop()


def _tries(session: requests.Session, run_url: str, map_index: int) -> list[dict]:
    response = session.get(f"{run_url}/taskInstances/score_shard/{map_index}/tries", timeout=10)
    assert response.ok, response.text
    return response.json()["task_instances"]


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_shards_run_on_two_celery_workers_and_survive_a_killed_worker(cluster):
    started = time.monotonic()
    session = cluster.session()
    base = f"{cluster.base}/api/v2/dags/lesion_nightly_score"
    cluster.wait(lambda: session.get(base, timeout=10).ok, 180, "lesion_nightly_score to be parsed")
    assert session.patch(base, json={"is_paused": False}, timeout=10).ok
    response = session.post(f"{base}/dagRuns", json={"logical_date": None, "conf": {"shard_size": SHARD_SIZE}}, timeout=10)
    assert response.ok, response.text
    run_id = response.json()["dag_run_id"]
    run_url = f"{base}/dagRuns/{run_id}"

    def running_shard():
        tis = session.get(f"{run_url}/taskInstances", timeout=10).json()["task_instances"]
        return next((t for t in tis if t["task_id"] == "score_shard" and t["state"] == "running"
                     and (t.get("hostname") or "").rsplit("/", 1)[-1] in WORKERS), None)

    # kill the worker of the first shard seen running; if that shard finished in between, the next one
    victim = None
    while victim is None:
        shard = cluster.wait(running_shard, 240, "a score_shard task running on a worker", every=0.3)
        worker = shard["hostname"].rsplit("/", 1)[-1]
        killed = cluster.kill_tree(worker)
        after = _tries(session, run_url, shard["map_index"])
        if any(t["try_number"] == shard["try_number"] and t["state"] == "success" for t in after):
            pytest.fail(f"shard {shard['map_index']} finished before {worker} was killed; nothing else to kill")
        victim = shard
    killed_at = time.monotonic()

    state = cluster.wait(lambda: (s := session.get(run_url, timeout=10).json()["state"]) in ("success", "failed") and s,
                         420, f"run {run_id}", every=2)
    tis = session.get(f"{run_url}/taskInstances", timeout=10).json()["task_instances"]
    assert state == "success", ({(t["task_id"], t["map_index"]): t["state"] for t in tis}, cluster.tails())
    shards = sorted(t["map_index"] for t in tis if t["task_id"] == "score_shard")
    assert len(shards) == -(-N_IMAGES // SHARD_SIZE) >= 4
    tries = {i: _tries(session, run_url, i) for i in shards}

    # the killed shard: its first try failed (no heartbeat), the retry succeeded on the surviving worker
    survivor = next(w for w in WORKERS if w != worker)
    first, *rest = sorted(tries[victim["map_index"]], key=lambda t: t["try_number"])
    assert first["state"] == "failed" and first["hostname"].endswith("/" + worker), first
    assert rest and rest[-1]["state"] == "success" and rest[-1]["hostname"].endswith("/" + survivor), rest
    # shards ran on both workers, never more at once than the pool's slots, and side by side
    every_try = [t for i in shards for t in tries[i] if t["start_date"]]
    assert {t["hostname"].rsplit("/", 1)[-1] for t in every_try} == set(WORKERS)
    intervals = [(datetime.fromisoformat(t["start_date"]), datetime.fromisoformat(t["end_date"])) for t in every_try]
    assert _max_overlap(intervals) == POOL_SLOTS

    # every image scored exactly once, by this run; every overlay referenced, none missing
    engine = db.make_engine(cluster.settings.db_url)
    with engine.connect() as conn:
        version = conn.execute(sa.select(model_versions.c.model_version).where(model_versions.c.is_champion)).scalar_one()
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.run_id, predictions.c.gradcam_uri)
                            .where(predictions.c.model_version == version)).all()
    engine.dispose()
    assert len(rows) == len({r.image_id for r in rows}) == N_IMAGES
    assert {r.run_id for r in rows} == {run_id}
    store = open_store(cluster.settings)
    overlays = {o.key for o in store.list(f"predictions/{version}/gradcam/")}
    assert overlays == {key_of(store, r.gradcam_uri) for r in rows}
    summary = session.get(f"{run_url}/taskInstances/summarise/xcomEntries/return_value", timeout=10).json()["value"]
    summary = summary if isinstance(summary, dict) else json.loads(summary)
    assert summary["still_unscored"] == 0 and summary["rows_of_this_run"] == N_IMAGES

    seconds = time.monotonic() - started
    print(f"\ncelery: {len(shards)} shards on {WORKERS}, {worker} killed ({len(killed)} processes) during shard "
          f"{victim['map_index']}; retried on {survivor}; run done {time.monotonic() - killed_at:.0f} s after the kill, "
          f"{seconds:.0f} s in all")
    reliability.record(
        "A Celery worker lost during a scoring shard",
        f"two `airflow celery worker`s (Redis broker, pool of {POOL_SLOTS}); SIGKILL of one worker and its task "
        f"processes while its shard ran",
        "the try fails on its missed heartbeats and is retried on the other worker; every image scored once",
        f"{len(shards)} shards over both workers, at most {POOL_SLOTS} at once; shard {victim['map_index']} retried on the "
        f"other worker; {N_IMAGES} rows, {len(overlays)} overlays, none orphaned",
        0, 0)
