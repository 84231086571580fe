"""`lesion_nightly_score` through `dag.test()` against PostgreSQL and S3: a run killed mid-shard and
a rerun end with every accepted image scored exactly once; the next night scores nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from lesion_tasks import retrain
from lesion_tasks.ingest import ingest
from lesion_tasks.schema import images, predictions
from lesion_tasks.synthetic import make_drop
from tests import reliability
from tests.conftest import run_dag, tiny_config

DAGS = Path(__file__).resolve().parents[1] / "dags"


def _count(url: str, table) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
    engine.dispose()
    return n


def test_nightly_scoring_killed_then_rerun_scores_each_image_once(airflow_env, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    settings, decoy = airflow_env
    ingest(str(make_drop(tmp_path / "labelled", n_images=200, seed=41)), settings)
    night = make_drop(tmp_path / "night", n_images=400, seed=42, size=128)
    (night / "metadata.csv").unlink()
    ingest(str(night), settings)
    trained = retrain.run(settings, tiny_config(epochs=150, views=2, bootstrap=100, target_sensitivity=0.97), run_id="night-model")
    assert trained["promoted"], trained["gate"]
    n_images = _count(settings.db_url, images)

    # a scoring process killed mid-way (SIGKILL): some rows written, the rest not
    env = {**os.environ, "LESION_DB_URL": settings.db_url, "LESION_STORE_URL": settings.store_url,
           "LESION_S3_ENDPOINT": settings.s3_endpoint, "LESION_S3_ACCESS_KEY": settings.s3_access_key,
           "LESION_S3_SECRET_KEY": settings.s3_secret_key}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("lesion")), "score"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while _count(settings.db_url, predictions) < 64 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _count(settings.db_url, predictions)
    assert 0 < partial < n_images, f"the kill should land mid-way ({partial} of {n_images})"

    dag = DagBag(dag_folder=str(DAGS)).get_dag("lesion_nightly_score")
    run, states = run_dag(dag)
    assert run.state == "success", states
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        per_image = conn.execute(sa.select(predictions.c.image_id, sa.func.count()).group_by(predictions.c.image_id)).all()
        this_run = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(predictions.c.run_id == run.run_id)).scalar()
    engine.dispose()
    assert len(per_image) == n_images and all(n == 1 for _, n in per_image)
    assert this_run == n_images - partial
    summary_state = states["summarise"]
    assert summary_state == "success"

    # the next night: nothing left to score
    run2, states2 = run_dag(dag)
    assert run2.state == "success", states2
    assert _count(settings.db_url, predictions) == n_images
    assert not decoy.exists()
    reliability.record("Scoring process killed mid-shard", "SIGKILL of `lesion score` after 64 predictions, then the DAG",
                       "the DAG scores the rest; every image exactly once", f"{partial} + {this_run} = {n_images} rows",
                       0, 0)
