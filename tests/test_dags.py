"""DAG integrity: every DAG file imports, with the ids, schedules and policies DESIGN.md fixes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
EXPECTED = {"isic_ingest": "*/30 * * * *", "lesion_retrain": None, "lesion_nightly_score": "0 2 * * *"}
TF_POOL = "lesion_tensorflow"


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_dag_files_import_cleanly(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == set(EXPECTED)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_dag_policy(dagbag, dag_id):
    dag = dagbag.get_dag(dag_id)
    assert dag is not None
    assert dag.catchup is False
    assert dag.doc_md and dag_id in dag.doc_md
    assert "lesion" in dag.tags
    assert dag.start_date is not None and dag.start_date.utcoffset().total_seconds() == 0
    assert dag.max_active_runs == 1
    for t in dag.tasks:
        assert t.retries >= 1, f"{dag_id}.{t.task_id} has no retries"


@pytest.mark.parametrize("dag_id,schedule", sorted(EXPECTED.items()))
def test_dag_schedule(dagbag, dag_id, schedule):
    assert dagbag.get_dag(dag_id).schedule == schedule


def test_retrain_params_are_the_trigger_form(dagbag):
    """Typed, titled, described Params for the same knobs as `lesion train`."""
    params = dagbag.get_dag("lesion_retrain").params
    assert {"profile", "backbone", "epochs", "image_size", "weights", "seed", "mc_samples", "target_sensitivity"} <= set(params)
    for name in params:
        param = params.get_param(name)
        assert param.schema.get("type") and param.schema.get("title") and param.description, name
    assert params["profile"] == "demo" and params["mc_samples"] == 50 and params["target_sensitivity"] == 0.85


@pytest.mark.parametrize("dag_id,tf_tasks", [("lesion_retrain", {"train_model", "evaluate_model"}),
                                              ("lesion_nightly_score", {"score_shard"}), ("isic_ingest", set())])
def test_tensorflow_tasks_share_one_pool(dagbag, dag_id, tf_tasks):
    """Exactly the tasks that run TensorFlow take a slot of the one pool (one at a time per machine)."""
    dag = dagbag.get_dag(dag_id)
    assert {t.task_id for t in dag.tasks if t.pool == TF_POOL} == tf_tasks


def test_nightly_score_policy(dagbag):
    """02:00 UTC every night, two retries on every task; shards run side by side, as many as the TF pool
    has slots (one per machine), not one at a time per run; the shard size is a Param."""
    dag = dagbag.get_dag("lesion_nightly_score")
    assert dag.schedule == "0 2 * * *"
    assert set(dag.tags) == {"lesion", "scoring"}
    assert {t.task_id: t.retries for t in dag.tasks} == {"plan_shards": 2, "score_shard": 2, "summarise": 2}
    shard = dag.get_task("score_shard")
    assert shard.pool == TF_POOL and shard.max_active_tis_per_dagrun is None
    assert dag.params["shard_size"] == 512
    assert dag.get_task("summarise").trigger_rule == "none_failed"
    assert {u for u in dag.get_task("summarise").upstream_task_ids} == {"plan_shards", "score_shard"}


def test_isic_ingest_emits_validated_asset(dagbag):
    dag = dagbag.get_dag("isic_ingest")
    outlets = [o.uri for t in dag.tasks for o in t.outlets]
    assert outlets == ["lesion://images/validated"]


@pytest.mark.parametrize("path", sorted(DAGS.glob("*.py")), ids=lambda p: p.name)
def test_dag_files_only_wire(path):
    """No heavy imports at module level, and lesion_tasks imported only inside tasks."""
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] for n in top_level for a in n.names}
    assert not names & {"tensorflow", "keras", "pandas", "numpy", "lesion_tasks", "sqlalchemy", "PIL"}
    assert len(path.read_text().splitlines()) <= 150


def test_lesion_tasks_never_imports_airflow():
    package = Path(__file__).resolve().parents[1] / "lesion_tasks"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("airflow") for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("airflow"), path
