"""`lesion demo` / `make demo`: the three DAGs, in order, run by Airflow (`dag.test()`) on the
embedded defaults (SQLite + local store under LESION_HOME).

    python tools/airflow_demo.py [--data PATH] [--json]

1. a drop goes under `incoming/` in the store (yours with --data, else a synthetic one, said plainly);
2. `isic_ingest` finds and ingests it; 3. `lesion_retrain` trains the demo profile and gates it;
4. `lesion_nightly_score` scores every image with the champion; then a summary and a SQL query.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("lesion.demo")


def _airflow_env() -> None:
    """A private Airflow under LESION_HOME (set before anything imports airflow)."""
    home = Path(os.environ.get("LESION_HOME") or Path.home() / ".lesion").expanduser()
    os.environ.setdefault("LESION_HOME", str(home))
    os.environ.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines (as under make airflow)
    os.environ["LESION_INCOMING_SETTLE_SECONDS"] = "0"  # the demo's drop is complete once copied
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def _run(dag_id: str, conf: dict | None = None) -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag(dag_id)
    log.info("running DAG %s through Airflow (dag.test)%s", dag_id, f" with Params {conf}" if conf else "")
    started = time.monotonic()
    run = dag.test(run_conf=conf)
    states = {ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): ti.state for ti in run.get_task_instances()}
    log.info("DAG %s: %s in %.0f s %s", dag_id, run.state, time.monotonic() - started, states)
    if run.state != "success":
        raise SystemExit(f"DAG {dag_id} ended {run.state}: task states {states}; see the task logs above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="an ISIC drop folder or .zip (default: a synthetic drop)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _airflow_env()
    # Airflow's task logs print to stdout: send everything to stderr until the summary, so stdout
    # carries only the result (one JSON object with --json)
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    from lesion_tasks.core import db
    from lesion_tasks.demo import prepare_drop, summary
    from lesion_tasks.core.settings import Settings

    started = time.monotonic()
    settings = Settings.from_env()
    log.info("step 1/5: databases (lesion %s, Airflow metadata in %s)", settings.describe()["db_url"], os.environ["AIRFLOW_HOME"])
    db.upgrade(settings)
    migrated = subprocess.run(["airflow", "db", "migrate"], capture_output=True, text=True)
    if migrated.returncode != 0:
        raise SystemExit(f"airflow db migrate failed:\n{migrated.stdout[-2000:]}\n{migrated.stderr[-2000:]}")
    log.info("step 2/5: placing the drop under incoming/")
    log.info("drop at %s", prepare_drop(settings, Path(args.data) if args.data else None))
    log.info("step 3/5: isic_ingest")
    _run("isic_ingest")
    log.info("step 4/5: lesion_retrain (profile demo)")
    _run("lesion_retrain", {"profile": "demo"})
    if summary(settings)[0]["champion"] is None:
        log.warning("step 5/5 skipped: no model passed the quality gate, so there is no champion to score with")
    else:
        log.info("step 5/5: lesion_nightly_score")
        _run("lesion_nightly_score")
    payload, human = summary(settings)
    payload["wall_seconds"] = round(time.monotonic() - started, 1)
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    print(json.dumps(payload, default=str) if args.json else f"{human}\n\ndemo finished in {payload['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
