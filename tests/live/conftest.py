"""A real `airflow standalone` (what `make airflow` starts), shared by the tests of this package.

Airflow's metadata and the project's results live in their own throwaway PostgreSQL cluster and the
store in its own S3 server (rclone), so the fault tests elsewhere (which restart and kill the shared
servers) never reach it; Airflow on Postgres is also what production runs (SQLite under a busy
standalone answered a REST call with "database is locked" once in CI). The Connections `lesion_db`
and `lesion_s3` point the DAGs and the review plugin at the results database and bucket. Users: an
admin and a viewer (SimpleAuthManager). Torn down when the package's tests are done: SIGINT to the
standalone leader (what Ctrl-C on `make airflow` does), which must stop everything it started; a slow
shutdown escalates (SIGINT to the group, SIGTERM, SIGKILL) and is reported, never failed.

The standalone gets SIGINT at its default disposition whatever pytest inherited: a suite started from a
background job (`make test &`, nohup, some CI runners) inherits SIGINT *ignored*, exec keeps the ignore,
and Python then never installs its KeyboardInterrupt handler, so the SIGINT would have done nothing.
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

from lesion_tasks.core import db
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.settings import Settings
from lesion_tasks.ops.synthetic import make_drop
from tools import servers
from tools.celery_cluster import create_database
from tests.helpers import start_s3_or_fail, unavailable

REPO = Path(__file__).resolve().parents[2]
USERS = {"admin": ("admin", "lesion-live-admin-password"), "viewer": ("viewer", "lesion-live-viewer-password")}
N_IMAGES = 450  # half of them melanomas: >= 30 in test and validation, or the gate refuses to decide


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


def _default_sigint() -> None:
    """Popen preexec_fn: SIGINT back to its default in the child (`restore_signals` covers only SIGPIPE,
    SIGXFZ and SIGXFSZ), so an ignore inherited from a background job does not reach `airflow standalone`."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignores_sigint(pid: int) -> bool:
    """Whether process `pid` has SIGINT ignored (the SigIgn mask of /proc/<pid>/status; False off Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:")), 0)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def _descendants(proc: subprocess.Popen) -> set[psutil.Process]:
    try:
        return set(psutil.Process(proc.pid).children(recursive=True)) if proc.poll() is None else set()
    except psutil.NoSuchProcess:
        return set()


def _alive(processes) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _signal_group(proc: subprocess.Popen, sig: int, processes) -> None:
    """`sig` to the standalone's process group (its own session) and to every process it started."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in _alive(processes):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _stop_standalone(proc: subprocess.Popen, patience: float = 1.0) -> tuple[str, float, list[str]]:
    """Stop the standalone as a person would, escalating only when that is slow.

    SIGINT to the leader (Ctrl-C of `make airflow` seen by Airflow), then SIGINT to the whole group (a
    second Ctrl-C, as a terminal sends it: Airflow 3.3.2's LocalExecutor.end() sometimes waits forever for
    a worker that never got its poison pill), then SIGTERM, then SIGKILL of the group and of every process
    it started. Returns the signal that stopped the leader, the seconds it took and the processes (started
    by the standalone) still running a grace period after the leader exited, which are then killed."""
    started = time.monotonic()
    seen = _descendants(proc)
    stopped_by = "already exited" if proc.poll() is not None else ""
    stages = [("SIGINT to the leader", lambda: proc.send_signal(signal.SIGINT), 60),
              ("SIGINT to the group", lambda: _signal_group(proc, signal.SIGINT, seen), 30),
              ("SIGTERM to the group", lambda: _signal_group(proc, signal.SIGTERM, seen), 20),
              ("SIGKILL to the group", lambda: _signal_group(proc, signal.SIGKILL, seen), 10)]
    for name, send, timeout in stages:
        if stopped_by:
            break
        seen |= _descendants(proc)
        send()
        try:
            proc.wait(timeout * patience)
            stopped_by = name
        except subprocess.TimeoutExpired:
            print(f"\nstandalone still running {time.monotonic() - started:.0f} s after {name}: escalating")
    if not stopped_by:
        stopped_by = "nothing (still running after SIGKILL)"
    elapsed = time.monotonic() - started
    # what the leader started stops with it; give it a grace period (a loaded machine is slow), then kill
    deadline = time.monotonic() + 30 * patience
    while (leftovers := _alive(seen)) and time.monotonic() < deadline:
        time.sleep(0.5)
    described = describe(leftovers)
    _signal_group(proc, signal.SIGKILL, leftovers)
    return stopped_by, elapsed, described


def describe(processes) -> list[str]:
    """'pid command…' of each process still there (for failure messages)."""
    out = []
    for p in processes:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline()[:5])}")
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="package")
def live(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("live")
    try:
        pg = servers.start_postgres()
    except Exception as exc:  # noqa: BLE001
        unavailable("PostgreSQL (for the live Airflow)", exc)
    s3 = start_s3_or_fail()
    proc = None
    try:
        suffix = uuid.uuid4().hex[:8]  # unique even on an external server (LESION_TEST_PG_URL)
        lesion_url = create_database(pg.url, f"lesion_live_{suffix}")
        settings = Settings.from_env({"LESION_HOME": str(tmp / "lesion")}, db_url=lesion_url,
                                     store_url="s3://lesion-live/lesion", s3_endpoint=s3.endpoint,
                                     s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
        db.upgrade(settings)
        ingest(str(make_drop(tmp / "drop", n_images=N_IMAGES, seed=11, melanoma_fraction=0.5)), settings)

        airflow_home = tmp / "airflow"
        airflow_home.mkdir()
        passwords = airflow_home / "passwords.json"
        passwords.write_text(json.dumps({name: password for name, (_, password) in USERS.items()}))
        url = sa.engine.make_url(lesion_url)
        port = servers.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_"))}
        env.update({
            "LESION_HOME": str(tmp / "lesion"), "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": create_database(pg.url, f"airflow_live_{suffix}"),
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
                                start_new_session=True, preexec_fn=_default_sigint)
        server = Live(f"http://127.0.0.1:{port}", settings, proc, log, tmp)
        server.wait(lambda: requests.get(f"{server.base}/api/v2/monitor/health", timeout=5).ok, 240, "the API server")
        yield server
        sigint_deliverable = proc.poll() is None and not _ignores_sigint(proc.pid)
        stopped_by, elapsed, leftovers = _stop_standalone(proc)
        proc = None
        report = f"standalone stopped by {stopped_by} in {elapsed:.1f} s"
        if leftovers:
            report += f"; killed what it left running: {leftovers}"
        print(f"\n{report}")
        with log.open("a") as f:
            f.write(f"\n[live fixture] {report}\n")
        if stopped_by != "SIGINT to the leader" or leftovers:  # shown even under -q and output capture
            terminal = request.config.pluginmanager.get_plugin("terminalreporter")
            if terminal is not None:
                terminal.write_line(f"\nlive Airflow: {report}", yellow=True)
        # the check that matters for `make airflow`: once the leader has stopped on SIGINT (one Ctrl-C or,
        # for the 3.3.2 LocalExecutor race, a second one to the group), nothing it started runs on. A
        # shutdown that needed SIGTERM/SIGKILL is only slow: reported above, not failed.
        if sigint_deliverable and stopped_by.startswith("SIGINT"):
            assert not leftovers, f"SIGINT to the standalone leader left processes behind: {leftovers}"
    finally:
        if proc is not None and proc.poll() is None:  # setup failed: no need to be gentle
            _stop_standalone(proc, patience=0.1)
        s3.stop()
        pg.stop()


def pytest_collection_modifyitems(config, items):
    """Modules marked `after_retrains` (the screenshots: they leave real labelled images in the live home,
    which a later retrain would split in) run after every other live test, whatever the file names."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if Path(item.path).is_relative_to(here)]  # the live block stays in place
    ordered = sorted((items[i] for i in slots), key=lambda item: item.get_closest_marker("after_retrains") is not None)
    for i, item in zip(slots, ordered):
        items[i] = item
