"""`make airflow` stops on ONE Ctrl-C: exactly one SIGINT to its leader (tools/airflow_standalone.sh, the
PID `make` starts: what `kill -INT` of it, or a terminal's Ctrl-C seen by the leader, does) stops the
standalone and everything it started (api-server, scheduler and its LocalExecutor workers, dag-processor,
triggerer) within STOP_BOUND_S, with nothing left running. No second signal, no escalation: the fixture
of the other live tests may escalate, this test must not need to.

It runs the real script on its embedded defaults (SQLite + local store in a temporary LESION_HOME), as a
user does, on a free port. Everything the script started is found twice: as its descendants, and by the
AIRFLOW_HOME in a process's environment (a process orphaned during shutdown is re-parented away from the
tree but keeps its environment).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from tools import servers
from tests.live.conftest import _alive, _default_sigint, _signal_group, describe

REPO = Path(__file__).resolve().parents[2]
STOP_BOUND_S = 60  # measured: about 10 s on 2 busy cores (tools/airflow_standalone.sh gives the standalone 20 s)


def _ours(airflow_home: str) -> set[psutil.Process]:
    """Every process of this user whose environment names our AIRFLOW_HOME."""
    found = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("AIRFLOW_HOME") == airflow_home:
                found.add(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            pass
    return found


def _executor_workers(processes) -> list[psutil.Process]:
    """The scheduler's LocalExecutor worker processes (not the task processes they start)."""
    out = []
    for p in processes:
        try:
            if "LocalExecutor" in " ".join(p.cmdline()) and "scheduler" in " ".join(p.parent().cmdline()):
                out.append(p)
        except (psutil.Error, AttributeError):
            pass
    return out


def _heartbeats(base: str) -> dict[str, str]:
    """{component: its latest heartbeat} from the API server's health answer ({} when it does not answer)."""
    try:
        health = requests.get(f"{base}/api/v2/monitor/health", timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}
    return {f"{name}.{key}": str(value) for name, part in health.items() if isinstance(part, dict)
            for key, value in part.items() if key.startswith("latest_") and value}


def _moved_on(first: dict[str, str], now: dict[str, str]) -> bool:
    return bool(first) and set(now) >= set(first) and all(now[k] != v for k, v in first.items())


def test_one_sigint_to_make_airflows_leader_stops_everything(tmp_path):
    home, airflow_home, port = tmp_path / "lesion", tmp_path / "airflow", servers.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_", "TF_CPP"))}
    env.update({"LESION_HOME": str(home), "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"})
    log = tmp_path / "make-airflow.log"
    leader = subprocess.Popen(["bash", str(REPO / "tools" / "airflow_standalone.sh")], env=env, cwd=REPO,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=_default_sigint)
    pidfile = airflow_home / "lesion-airflow.pid"
    seen: set[psutil.Process] = set()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 420
        healthy = False
        while time.monotonic() < deadline and leader.poll() is None:
            seen |= set(psutil.Process(leader.pid).children(recursive=True))
            try:
                health = requests.get(f"{base}/api/v2/monitor/health", timeout=5).json()
                healthy = all(health.get(c, {}).get("status") == "healthy"
                              for c in ("metadatabase", "scheduler", "dag_processor", "triggerer"))
            except (requests.RequestException, ValueError):
                healthy = False
            # running, and the LocalExecutor has forked its workers (sized by tools/airflow_env.sh)
            if healthy and _executor_workers(_alive(seen)):
                break
            time.sleep(2)
        tail = log.read_text(errors="replace")[-4000:]
        assert healthy, f"make airflow did not become healthy (exit code {leader.poll()})\n{tail}"
        # every component in its loop: each heartbeat in the health answer has moved on since it was healthy
        # (a Ctrl-C comes at any time, but not before the components have started)
        first = _heartbeats(base)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _moved_on(first, _heartbeats(base)):
            time.sleep(0.5)  # a poll with a deadline
        assert _moved_on(first, _heartbeats(base)), f"heartbeats did not advance: {first}"
        seen |= set(psutil.Process(leader.pid).children(recursive=True)) | _ours(str(airflow_home))
        # sized to the machine: [core] parallelism LocalExecutor workers, not Airflow's default 32
        n_workers = len(_executor_workers(_alive(seen)))
        assert 1 <= n_workers <= max(4, 2 * (os.cpu_count() or 1)), describe(_alive(seen))

        assert pidfile.read_text().strip() == str(leader.pid)  # `make airflow-stop` signals the leader
        started = time.monotonic()
        leader.send_signal(signal.SIGINT)  # the one and only signal
        try:
            code = leader.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the leader still runs {STOP_BOUND_S} s after one SIGINT; running: "
                        f"{describe(_alive(seen | _ours(str(airflow_home))))}\n{log.read_text(errors='replace')[-4000:]}")
        # wait on the processes' exits (not a sleep), within what is left of the bound; then look again for any
        # process of this Airflow home that started meanwhile
        _, left = psutil.wait_procs(_alive(seen | _ours(str(airflow_home))),
                                    timeout=max(0.0, STOP_BOUND_S - (time.monotonic() - started)))
        left = _alive(set(left) | _ours(str(airflow_home)))
        elapsed = time.monotonic() - started
        assert not left, (f"{len(left)} process(es) still running {elapsed:.0f} s after one SIGINT: {describe(left)}\n"
                          f"{log.read_text(errors='replace')[-4000:]}")
        assert not pidfile.exists()  # removed on the way out: `make airflow-stop` then says nothing runs
        print(f"\nmake airflow stopped on one SIGINT in {elapsed:.1f} s (exit code {code}, {len(seen)} processes)")
    finally:
        if leader.poll() is None or _alive(seen):
            _signal_group(leader, signal.SIGKILL, seen | _ours(str(airflow_home)))
            leader.wait(30)
