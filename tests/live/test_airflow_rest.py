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
        scored = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                              .where(predictions.c.run_id == score_run)).scalar()
        of_version = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                                  .where(predictions.c.model_version == row["model_version"])).scalar()
    engine.dispose()
    assert row["backbone"] == "tiny" and row["mc_samples"] == 20 and row["is_champion"]
    # the new champion scored every image, all of them in the nightly run
    assert scored == of_version == n_images >= 300
