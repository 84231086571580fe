"""`lesion_nightly_score` through `dag.test()` against PostgreSQL and S3: a run killed mid-shard and
a rerun end with every accepted image scored exactly once; the next night scores nothing.

The champion is the session's trained home, mirrored (rows and objects, no predictions) into the
test's database and bucket: scoring is what runs on PostgreSQL and S3 here (training there is
tests/dags/test_dag_retrain.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.versions import registry
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, predictions
from lesion_tasks.ops.synthetic import make_drop
from tests import reliability
from tests.helpers import N_IMAGES, mirror_home, run_dag

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"


def _count(url: str, table) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
    engine.dispose()
    return n


class _ErrorRecorder:
    """Stands in for a module's structlog logger: records its error events and passes everything on
    (capfd cannot watch them here: TensorFlow's absl handler, bound to pytest's capture stream, is
    closed when Airflow configures logging under capfd, and pytest's own capture breaks)."""

    def __init__(self, log):
        self._log, self.errors = log, []

    def error(self, event, *args, **kw):
        self.errors.append(f"{event} {kw}")
        return self._log.error(event, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._log, name)


def test_nightly_scoring_killed_then_rerun_scores_each_image_once(airflow_env, trained_home, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    settings, decoy = airflow_env
    mirror_home(trained_home.settings, settings, predictions=False)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        assert registry.version(conn, None).model_version == trained_home.version
    engine.dispose()
    night = make_drop(tmp_path / "tonight", n_images=600 - N_IMAGES, seed=43, size=128)  # not the home's "night" drop
    (night / "metadata.csv").unlink()
    ingest(str(night), settings)
    n_images = _count(settings.db_url, images)
    assert n_images == 600 and _count(settings.db_url, predictions) == 0

    # a scoring process killed mid-way (SIGKILL): some rows written, the rest not
    env = {**os.environ, "LESION_DB_URL": settings.db_url, "LESION_STORE_URL": settings.store_url,
           "LESION_S3_ENDPOINT": settings.s3_endpoint, "LESION_S3_ACCESS_KEY": settings.s3_access_key,
           "LESION_S3_SECRET_KEY": settings.s3_secret_key}
    # injected: SIGKILL right after the 6th upsert (predictions, then samples, per batch of 32) returns; that
    # batch's transaction never commits, so exactly two batches are written
    proc = subprocess.run([sys.executable, "-m", "tests.crash", "lesion_tasks.scoring.nightly:upsert", "6", "score"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = _count(settings.db_url, predictions)
    assert partial == 2 * 32, f"the kill should land after two batches ({partial} of {n_images})"

    dag = DagBag(dag_folder=str(DAGS)).get_dag("lesion_nightly_score")
    # a green run logs no error: summarise must not read past the end of the mapped results (the Task
    # SDK's API client logs each such 404 as "[error] XCom not found ... offset=N", read as a failure)
    from airflow.sdk.api import client as sdk_client

    monkeypatch.setattr(sdk_client, "log", client_log := _ErrorRecorder(sdk_client.log))
    run, states = run_dag(dag)
    assert run.state == "success", states
    assert not [e for e in client_log.errors if "XCom not found" in e], client_log.errors
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        per_image = conn.execute(sa.select(predictions.c.image_id, sa.func.count()).group_by(predictions.c.image_id)).all()
        this_run = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(predictions.c.run_id == run.run_id)).scalar()
    engine.dispose()
    assert len(per_image) == n_images and all(n == 1 for _, n in per_image)
    assert this_run == n_images - partial
    assert states["settle"] == "success" and states["summarise"] == "success"

    # the next night: nothing left to score
    run2, states2 = run_dag(dag)
    assert run2.state == "success", states2
    assert _count(settings.db_url, predictions) == n_images
    assert not decoy.exists()
    reliability.record("Scoring process killed mid-shard", "SIGKILL of `lesion score` (injected) after 64 predictions, then the DAG",
                       "the DAG scores the rest; every image exactly once", f"{partial} + {this_run} = {n_images} rows",
                       0, 0)
