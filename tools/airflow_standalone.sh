#!/usr/bin/env bash
# `make airflow`: a real Airflow 3 on 127.0.0.1 with the project's DAGs and the embedded defaults
# (SQLite + local store under LESION_HOME), sized to this machine (tools/airflow_env.sh).
#
# ONE Ctrl-C (or ONE `kill -INT` of this script's PID) stops everything, in order, within a bound:
#   1. the scheduler first (SIGTERM), while the API server still answers: its LocalExecutor lets running
#      tasks finish and report, for up to LESION_AIRFLOW_STOP_GRACE seconds (default 20);
#   2. then `airflow standalone` (SIGINT: it stops the api-server, dag-processor and triggerer);
#   3. whatever still runs after 15 s more gets SIGTERM, then SIGKILL 5 s later.
# A second Ctrl-C skips the waiting. Why not just `exec airflow standalone`: on one SIGINT it stops all its
# components at once, and Airflow 3.3.2's LocalExecutor then waits forever for a worker whose task can no
# longer reach the stopped API server (tests/live/test_one_ctrl_c.py caught it: scheduler, worker and
# serve-logs still running a minute after the SIGINT). Task processes run in process groups of their own,
# so the standalone runs in a session of its own and stopping covers every process of that session.
# SIGINT works also when this was started with SIGINT ignored (`make airflow &`, nohup, some CI runners:
# the ignore survives exec, and `trap` cannot undo it in a non-interactive shell): the supervisor below is
# Python, which installs its handlers whatever it inherited. `make` itself cannot: started so, it ignores
# SIGINT and passes none on, so `kill -INT` of make's PID does nothing. The supervisor writes its PID to
# $AIRFLOW_HOME/lesion-airflow.pid, and `make airflow-stop` sends it the one SIGINT.
set -euo pipefail
source "$(dirname "$0")/airflow_env.sh"
# every port this Airflow listens on must be free: say which is taken and what to set, instead of logs that
# cannot be served later (a second Airflow on the machine holding 8793, say)
for var in AIRFLOW__API__PORT AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT; do
  if ! python -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", int(sys.argv[1])))' "${!var}" 2>/dev/null; then
    echo "make airflow: port ${!var} ($var) is already in use (another Airflow?): set $var to a free port," \
         "or AIRFLOW__API__PORT, which the log-server ports follow (+713, +714)" >&2
    exit 2
  fi
done
mkdir -p "$AIRFLOW_HOME"
echo "Airflow home: $AIRFLOW_HOME   lesion home: $LESION_HOME"
lesion db upgrade
airflow db migrate >/dev/null
# one TensorFlow task at a time: a TF process holds all cores of this machine
airflow pools set lesion_tensorflow 1 "TensorFlow tasks (train, evaluate, score)" >/dev/null
echo "UI: http://${AIRFLOW__API__HOST}:${AIRFLOW__API__PORT}  (user admin, password in $AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE)"
echo "Drop ISIC folders or .zip files under $LESION_HOME/store/incoming/ and trigger isic_ingest, then lesion_retrain."
echo "LocalExecutor parallelism $AIRFLOW__CORE__PARALLELISM, API workers $AIRFLOW__API__WORKERS. Ctrl-C stops everything."

SUPERVISOR=$(cat <<'PY'
import os, signal, subprocess, sys, time

GRACE = float(os.environ.get("LESION_AIRFLOW_STOP_GRACE", "20"))
signals = []


def say(message):
    print(f"[make airflow] {message}", file=sys.stderr, flush=True)


def session(sid):
    """{pid: (ppid, cmdline)} of the live (not zombie) processes of session `sid`."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out[int(name)] = (int(fields[1]), cmdline)
    return out


def send(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait(seconds, done):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(signals) < 2:
        if done():
            return True
        time.sleep(0.2)
    return done()


def child_setup():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:  # if this supervisor dies (SIGKILL), the standalone gets the SIGINT that stops its components
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG
    except Exception:
        pass


for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda signum, frame: signals.append(signum))
PIDFILE = os.path.join(os.environ["AIRFLOW_HOME"], "lesion-airflow.pid")  # `make airflow-stop` signals this pid
with open(PIDFILE, "w") as fh:
    fh.write(f"{os.getpid()}\n")
standalone = subprocess.Popen(["airflow", "standalone"], start_new_session=True, preexec_fn=child_setup)
sid = standalone.pid
while standalone.poll() is None and not signals:
    time.sleep(0.2)
if not signals:  # the standalone ended by itself: leave nothing behind
    send(session(sid), signal.SIGTERM)
    os.remove(PIDFILE)
    sys.exit(standalone.returncode)

started = time.monotonic()
say(f"stopping Airflow: running tasks get up to {GRACE:.0f} s (Ctrl-C again to stop at once)")
schedulers = [pid for pid, (ppid, cmd) in session(sid).items() if ppid == sid and cmd.endswith("airflow scheduler")]
send(schedulers, signal.SIGTERM)
wait(GRACE, lambda: not set(schedulers) & set(session(sid)))
if standalone.poll() is None:
    send([sid], signal.SIGINT)
if not wait(15, lambda: standalone.poll() is not None and not session(sid)):
    left = session(sid)
    say(f"{len(left)} process(es) still running: SIGTERM, then SIGKILL: "
        + ", ".join(f"{pid} {cmd[:60]}" for pid, (_, cmd) in sorted(left.items())))
    send(left, signal.SIGTERM)
    wait(5, lambda: not session(sid))
    send(session(sid), signal.SIGKILL)
    wait(5, lambda: not session(sid))
try:
    standalone.wait(5)
except subprocess.TimeoutExpired:
    pass
say(f"stopped in {time.monotonic() - started:.1f} s")
os.remove(PIDFILE)
sys.exit(128 + signals[0])
PY
)
exec python -c "$SUPERVISOR"
