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
`lesion_alerts_smtp` it is also mailed (docs/operations.md, "Alerts").

The form shows the demo profile's values; the descriptions name the paper profile's. How many labelled
images there are: the `prepare_split` task's log and return value (images per split and label, also per
source drop) of any run, or `SELECT label, count(*) FROM images GROUP BY label` (not counted here: a DAG file
never queries databases while it is parsed).

Logic: `lesion_tasks.pipeline` (its four steps; `lesion train` runs them in one process) and
`lesion_tasks.ops.retention`. This file only wires.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task
from lesion_airflow import CHAMPION_PROMOTED, TF_POOL

from lesion_tasks.model.config import form_params

# The form: generated from the one declaration of the training settings (lesion_tasks.model.config.KNOBS):
# the demo profile's values, the paper's named in the descriptions, the same bounds as `lesion train`.
# Light to import (no TensorFlow, numpy or SQLAlchemy): the DAG processor parses this file.
PARAMS = {name: Param(**spec) for name, spec in form_params().items()}
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
    def config():  # a field left at its demo value takes the chosen profile's (config_from_params)
        from lesion_tasks.model.config import config_from_params

        return config_from_params(dict(get_current_context()["params"]), FORM_DEFAULTS)

    @task
    def prepare_split() -> dict:
        from lesion_airflow import lesion_settings

        from airflow.sdk.exceptions import AirflowFailException

        from lesion_tasks.pipeline import prepare_split as split

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
        from lesion_tasks.pipeline import train_model as train

        return train(lesion_settings(), config(), get_current_context()["run_id"])["model_version"]

    @task(pool=TF_POOL)
    def evaluate_model(model_version: str) -> str:
        from lesion_airflow import lesion_settings, quiet_tensorflow

        quiet_tensorflow()
        from lesion_tasks.pipeline import evaluate_model as evaluate

        evaluate(lesion_settings(), model_version)
        return model_version

    @task(outlets=[CHAMPION_PROMOTED])  # an event only when it promoted (a refusal or a no-op ends skipped)
    def gate_and_promote(model_version: str) -> dict:
        from lesion_airflow import alert_links, lesion_settings, quiet_tensorflow, send_alert

        from airflow.sdk.exceptions import AirflowSkipException

        quiet_tensorflow()  # the comparison with the champion may load models
        from lesion_tasks.ops import alerts
        from lesion_tasks.pipeline import gate_model

        context = get_current_context()
        gate = gate_model(lesion_settings(), model_version, actor=f"lesion_retrain:{context['run_id']}")
        if gate.get("identical_to"):  # the champion's own model again: a no-op that says so, nothing to mail
            raise AirflowSkipException(f"NOT promoted: {gate['reasons'][0]}")
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
