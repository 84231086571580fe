"""DAG integrity: every DAG file imports, with the ids, schedules and policies DESIGN.md fixes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import servers

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
EXPECTED = {"isic_ingest": "*/30 * * * *", "lesion_retrain": None, "lesion_nightly_score": "0 2 * * *"}
VALIDATED = "lesion://images/validated"
CHAMPION = "lesion://models/champion"
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
    dag = dagbag.get_dag(dag_id)
    if dag_id == "lesion_nightly_score":  # the cron OR new validated images OR a new champion
        from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

        assert isinstance(dag.schedule, AssetOrTimeSchedule)
        assert isinstance(dag.schedule.timetable, CronTriggerTimetable)
        assert dag.schedule.timetable.expression == schedule and str(dag.schedule.timetable.timezone) == "UTC"
        assert {a.uri for a in dag.schedule.asset_condition.objects} == {VALIDATED, CHAMPION}
        # lesion_retrain's gate emits the champion Asset (only when it promoted: a refusal ends skipped)
        assert {a.uri for a in dagbag.get_dag("lesion_retrain").get_task("gate_and_promote").outlets} == {CHAMPION}
    else:
        assert dag.schedule == schedule


def test_retrain_params_are_the_trigger_form(dagbag):
    """Typed, titled, described Params for the same knobs as `lesion train`."""
    params = dagbag.get_dag("lesion_retrain").params
    assert {"profile", "backbone", "epochs", "image_size", "weights", "seed", "mc_samples", "target_sensitivity"} <= set(params)
    for name in params:
        param = params.get_param(name)
        assert param.schema.get("type") and param.schema.get("title") and param.description, name
    assert params["profile"] == "demo" and params["mc_samples"] == 50 and params["target_sensitivity"] == 0.85


def test_retrain_form_shows_real_defaults(dagbag):
    """The form shows the demo profile's values (no `null`, no blank), names the paper's, and offers every
    backbone but the test-only `tiny` (which the task still accepts: free text with suggestions)."""
    from dataclasses import asdict

    from lesion_tasks.model.backbones import BACKBONES
    from lesion_tasks.model.config import PROFILES

    params = dagbag.get_dag("lesion_retrain").params
    demo, paper = asdict(PROFILES["demo"]), asdict(PROFILES["paper"])
    for name in params:
        schema = params.get_param(name).schema
        assert params[name] is not None and "null" not in str(schema.get("type")), name
        assert None not in schema.get("enum", []) + schema.get("examples", []), name
        assert "tiny" not in schema.get("enum", []) + schema.get("examples", []), name
        if name in demo:
            assert params[name] == demo[name], name
        if name in ("backbone", "epochs", "image_size"):  # the paper's value is in the description
            assert str(paper[name]) in params.get_param(name).description, name
    backbone = params.get_param("backbone").schema
    assert backbone["type"] == "string" and "enum" not in backbone
    assert sorted(backbone["examples"]) == sorted(set(BACKBONES) - {"tiny"})
    assert backbone["examples"][0] == demo["backbone"]
    doc = dagbag.get_dag("lesion_retrain").doc_md
    assert "prepare_split" in doc and "SELECT label, count(*) FROM images" in doc  # where to see the labelled counts


def test_retrain_form_values_become_the_profiles_config(dagbag):
    """Triggered as the form sends it (every field): demo as shown; `paper` with the demo values left in
    place trains the paper's model; a changed field overrides; `tiny` from the API passes."""
    from lesion_tasks.model.config import PROFILES
    from lesion_tasks.model.config import config_from_params as retrain_config

    params = dagbag.get_dag("lesion_retrain").params
    form = {name: params[name] for name in params}
    assert retrain_config(form, form) == PROFILES["demo"]
    assert retrain_config({**form, "profile": "paper"}, form) == PROFILES["paper"]
    changed = retrain_config({**form, "profile": "paper", "epochs": 7, "backbone": "mobilenet025"}, form)
    assert (changed.backbone, changed.epochs, changed.profile) == ("mobilenet025", 7, "paper")
    assert retrain_config({**form, "backbone": "tiny"}, form).backbone == "tiny"
    with pytest.raises(ValueError, match="backbone 'nope'"):
        retrain_config({**form, "backbone": "nope"}, form)


def test_retrain_refusal_is_a_skip_and_retention_still_runs(dagbag):
    dag = dagbag.get_dag("lesion_retrain")
    gc = dag.get_task("collect_garbage")
    assert gc.trigger_rule == "none_failed" and gc.upstream_task_ids == {"gate_and_promote"}


@pytest.mark.parametrize("dag_id,tf_tasks", [("lesion_retrain", {"train_model", "evaluate_model"}),
                                              ("lesion_nightly_score", {"score_shard", "settle"}), ("isic_ingest", set())])
def test_tensorflow_tasks_share_one_pool(dagbag, dag_id, tf_tasks):
    """Exactly the tasks that run TensorFlow take a slot of the one pool (one at a time per machine)."""
    dag = dagbag.get_dag(dag_id)
    assert {t.task_id for t in dag.tasks if t.pool == TF_POOL} == tf_tasks


def test_nightly_score_policy(dagbag):
    """02:00 UTC every night, two retries on every task; shards run side by side, as many as the TF pool
    has slots (one per machine), not one at a time per run; the shard size is a Param."""
    dag = dagbag.get_dag("lesion_nightly_score")
    assert dag.schedule.timetable.expression == "0 2 * * *"
    assert set(dag.tags) == {"lesion", "scoring"}
    assert {t.task_id: t.retries for t in dag.tasks} == {"plan_shards": 2, "score_shard": 2, "settle": 2, "summarise": 2}
    shard = dag.get_task("score_shard")
    assert shard.pool == TF_POOL and shard.max_active_tis_per_dagrun is None
    assert dag.params["shard_size"] == 512
    # after the shards unless one failed; skipped with plan_shards when there is no champion; the operating points
    # are settled (re-estimated, tonight's cases decided at them) between the shards and the summary
    for name in ("settle", "summarise"):
        assert dag.get_task(name).trigger_rule == "none_failed_min_one_success"
    assert dag.on_failure_callback is not None  # the failure alert
    assert dag.get_task("settle").upstream_task_ids == {"plan_shards", "score_shard"}
    assert dag.get_task("summarise").upstream_task_ids == {"plan_shards", "score_shard", "settle"}


def test_isic_ingest_emits_validated_asset(dagbag):
    dag = dagbag.get_dag("isic_ingest")
    outlets = [o.uri for t in dag.tasks for o in t.outlets]
    assert outlets == ["lesion://images/validated"]


def test_nightly_score_consumes_what_ingest_and_retrain_emit(dagbag):
    produced = {o.uri for dag_id in ("isic_ingest", "lesion_retrain") for t in dagbag.get_dag(dag_id).tasks
                for o in t.outlets}
    consumed = {a.uri for a in dagbag.get_dag("lesion_nightly_score").schedule.asset_condition.objects}
    assert produced == consumed == {VALIDATED, CHAMPION}


def _tf_stderr(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_tensorflow_startup_lines_stay_out_of_task_logs():
    """A task's stderr is logged as ERROR: what a TensorFlow task runs first (quiet_tensorflow) keeps TF's
    C++ start-up lines (absl, oneDNN, cpu_feature_guard) out of it; without it they are there."""
    op = "import tensorflow as tf; print(float(tf.reduce_sum(tf.ones((2, 2)))))"
    noise = ("oneDNN", "cpu_feature_guard", "absl::InitializeLog")
    loud = _tf_stderr(op)
    assert any(n in loud for n in noise), loud  # this TensorFlow is noisy: the check below means something
    quiet = _tf_stderr(f"import sys; sys.path.insert(0, 'plugins'); from lesion_airflow import quiet_tensorflow; "
                       f"quiet_tensorflow(); {op}; import os; assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '2'")
    assert not [line for line in quiet.splitlines() if any(n in line for n in noise)], quiet


def test_training_and_the_reports_grad_cam_log_no_error_lines():
    """What train_model and evaluate_model run (the head's fit, the report's Grad-CAM through the demo
    backbone) writes no TensorFlow error lines: fit's validation numpy arrays made a parallel map that op
    determinism rewrites ("E0000 ... use_unbounded_threadpool"), and an eager tape through the backbone logged
    "oneDNN supports DT_INT32 only on platforms with AVX-512"."""
    code = (
        "import sys; sys.path.insert(0, 'plugins'); from lesion_airflow import quiet_tensorflow; quiet_tensorflow()\n"
        "import numpy as np\n"
        "from lesion_tasks.model import backbones, gradcam, training\n"
        "x = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32); y = np.array([0, 1] * 60)\n"
        "training.fit_head([x], y, x[:40], y[:40], 0.3, 2, 0)\n"
        "w = backbones.ResolvedWeights('none', None, 'random', None)\n"
        "model = backbones.build_model('mobilenet025_multiscale', 96, w, 0.3)\n"
        "spec = backbones.get_backbone('mobilenet025_multiscale')\n"
        "cam = gradcam.gradcam_tape(model, spec.last_activation, np.zeros((2, 96, 96, 3), np.float32), np.array([0, 1]))\n"
        "print(cam.shape)\n")
    err = _tf_stderr(code)
    assert not [line for line in err.splitlines() if line.startswith("E0000") or "DT_INT32" in line], err


def test_make_airflow_is_sized_to_the_machine():
    """tools/airflow_env.sh: LocalExecutor parallelism (it forks them all at start), API workers and parsing
    processes from the CPU count; the environment wins."""
    def sourced(env: dict) -> dict:
        out = subprocess.run(["bash", "-c", "set -euo pipefail; source tools/airflow_env.sh; env"], cwd=REPO,
                             env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    ncpu = os.cpu_count() or 1
    env = sourced({})
    assert 4 <= int(env["AIRFLOW__CORE__PARALLELISM"]) <= max(4, min(32, 2 * ncpu))
    assert 1 <= int(env["AIRFLOW__API__WORKERS"]) <= max(1, ncpu // 4)
    assert 1 <= int(env["AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES"]) <= 2
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    env = sourced({"AIRFLOW__CORE__PARALLELISM": "9", "AIRFLOW__API__WORKERS": "3", "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert (env["AIRFLOW__CORE__PARALLELISM"], env["AIRFLOW__API__WORKERS"], env["TF_CPP_MIN_LOG_LEVEL"]) == ("9", "3", "0")
    # the log servers follow the API port: Airflow's own 8793/8794 at 8080, others elsewhere
    ports = ("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT")
    assert [sourced({})[k] for k in ports] == ["8793", "8794"]
    assert [sourced({"AIRFLOW__API__PORT": "8093"})[k] for k in ports] == ["8806", "8807"]
    assert sourced({"AIRFLOW__API__PORT": "8093", ports[0]: "9001"})[ports[0]] == "9001"
    assert [sourced({"AIRFLOW__API__PORT": "65000"})[k] for k in ports] == ["64000", "64001"]  # stays a port


def test_make_airflow_says_which_port_is_taken(tmp_path):
    """A second Airflow holding the worker log-server port: `make airflow` stops at once and names the
    variable to set, instead of starting with logs that cannot be served."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        taken = held.getsockname()[1]
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LESION_HOME": str(tmp_path / "home"),
               "AIRFLOW__API__PORT": str(servers.free_port()), "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(taken)}
        done = subprocess.run(["bash", "tools/airflow_standalone.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60)
    finally:
        held.close()
    assert done.returncode == 2, done.stderr
    assert f"port {taken} (AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT) is already in use" in done.stderr
    assert "or AIRFLOW__API__PORT, which the log-server ports follow" in done.stderr
    assert not (tmp_path / "home").exists()  # nothing started, nothing written


@pytest.mark.parametrize("path", sorted(DAGS.glob("*.py")), ids=lambda p: p.name)
def test_dag_files_only_wire(path):
    """No heavy imports at module level, and lesion_tasks imported only inside tasks (but for the training
    settings' declaration, which the form is generated from: light, see the next test)."""
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in top_level for a in n.names}
    names = {m.split(".")[0] for m in modules - {"lesion_tasks.model.config"}}
    assert not names & {"tensorflow", "keras", "pandas", "numpy", "lesion_tasks", "sqlalchemy", "PIL"}
    assert len(path.read_text().splitlines()) <= 150


def test_the_training_declaration_is_light_to_parse():
    code = ("import sys, lesion_tasks.model.config; heavy = {'tensorflow', 'keras', 'pandas', 'numpy', "
            "'sqlalchemy', 'PIL', 'sklearn'} & {m.split('.')[0] for m in sys.modules}; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_lesion_tasks_never_imports_airflow():
    package = Path(__file__).resolve().parents[2] / "lesion_tasks"
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("airflow") for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("airflow"), path
