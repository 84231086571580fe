"""`lesion_retrain` triggered with Params through `dag.test()`, against PostgreSQL and S3."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.store import open_store
from lesion_tasks.core.schema import champion_history, model_versions
from lesion_tasks.ops.synthetic import make_drop
from tests.helpers import run_dag

DAGS = Path(__file__).resolve().parents[2] / "dags"


def test_lesion_retrain_with_params(airflow_env, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    settings, decoy = airflow_env
    ingest(str(make_drop(tmp_path / "drop", n_images=450, seed=11, melanoma_fraction=0.5)), settings)
    dag = DagBag(dag_folder=str(DAGS)).get_dag("lesion_retrain")
    conf = {"profile": "demo", "backbone": "tiny", "image_size": 64, "weights": "none", "epochs": 150, "seed": 0,
            "mc_samples": 20, "target_sensitivity": 0.97}
    run, states = run_dag(dag, conf)
    assert run.state == "success", states
    assert set(states.values()) == {"success"} and "collect_garbage" in states  # retention ran last, nothing to prune
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(model_versions)).mappings().all()
        history = conn.execute(sa.select(champion_history)).mappings().all()
    engine.dispose()
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == run.run_id and row["backbone"] == "tiny" and row["mc_samples"] == 20
    assert row["config"]["target_sensitivity"] == 0.97 and row["metrics"]["test"]["auc"] > 0.9
    assert row["is_champion"] and row["gate"]["passed"]
    assert row["report_uri"] == f"models/{row['model_version']}/report.html"
    assert open_store(settings).exists(row["report_uri"])
    assert [h["event"] for h in history] == ["promoted"] and history[0]["actor"].startswith("lesion_retrain:")
    assert not decoy.exists()
