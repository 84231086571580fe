"""The project driven by a real client: a real `airflow standalone` (what `make airflow` starts) on
127.0.0.1, `lesion_retrain` then `lesion_nightly_score` triggered through the REST API v2 with Params,
and the database checked afterwards."""

from __future__ import annotations

import requests
import sqlalchemy as sa

from lesion_tasks.core.schema import images, model_versions, predictions

TINY = {"profile": "demo", "backbone": "tiny", "image_size": 64, "weights": "none", "epochs": 150, "seed": 0,
        "mc_samples": 20, "target_sensitivity": 0.97}


def test_anonymous_requests_get_no_data(live):
    assert requests.get(f"{live.base}/api/v2/dags", timeout=10).status_code in (401, 403)


def test_retrain_then_nightly_scoring_through_the_rest_api(live):
    session = live.session()
    params = session.get(f"{live.base}/api/v2/dags/lesion_retrain/details", timeout=10).json()["params"]
    assert {"profile", "epochs", "weights", "mc_samples"} <= set(params)
    retrain_run = live.trigger_and_wait(session, "lesion_retrain", TINY)
    score_run = live.trigger_and_wait(session, "lesion_nightly_score", {})
    engine = sa.create_engine(live.settings.db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(model_versions).where(model_versions.c.run_id == retrain_run)).mappings().one()
        n_images = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
        by_run = dict(conn.execute(sa.select(predictions.c.run_id, sa.func.count())
                                   .where(predictions.c.model_version == row["model_version"])
                                   .group_by(predictions.c.run_id)).all())
    engine.dispose()
    runs = session.get(f"{live.base}/api/v2/dags/lesion_nightly_score/dagRuns?limit=100", timeout=10).json()["dag_runs"]
    nightly = {r["dag_run_id"]: r["state"] for r in runs}
    assert row["backbone"] == "tiny" and row["mc_samples"] == 20 and row["is_champion"]
    # the new champion scored every image, once, in lesion_nightly_score runs: the one triggered here, and the
    # day's cron run (02:00) where that one was still retrying when the champion appeared (a loaded machine)
    assert sum(by_run.values()) == n_images >= 300, by_run
    assert set(by_run) <= {run for run, state in nightly.items() if state in ("success", "running")}, (by_run, nightly)
    assert score_run in nightly
