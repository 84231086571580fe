"""
### lesion_retrain

Manual retraining, with the trigger form as the UI: freeze (or extend) the split, train the head on
cached backbone features, choose the threshold on validation for the target melanoma sensitivity,
evaluate on the frozen test split (metrics, figures, HTML report), then gate: floors on melanoma
sensitivity, AUC and balanced accuracy, and no significant regression against the champion. Passing
promotes the model to champion; failing keeps the champion and records why. Last, promoted or not,
retention (`lesion gc`): versions that are neither the champion, nor among the 3 newest, nor training
lose their heavy artifacts (model, overlays, unused feature caches); every row stays.

Logic: `lesion_tasks.retrain` (also `lesion train`) and `lesion_tasks.retention`. This file only wires.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

TF_POOL = "lesion_tensorflow"  # one TensorFlow task at a time: a TF process holds all cores

PARAMS = {
    "profile": Param("demo", type="string", enum=["demo", "paper"], title="Profile",
                     description="demo: multi-scale MobileNet features, minutes on a CPU. paper: ResNet101V2 at 224 px (the paper's model)."),
    "backbone": Param(None, type=["null", "string"],
                      enum=[None, "resnet101v2", "mobilenet025", "mobilenet025_multiscale", "effnet_lite0",
                            "effnet_lite2_multiscale", "tiny"],
                      title="Backbone", description="Override the profile's backbone (empty = the profile's)."),
    "epochs": Param(None, type=["null", "integer"], minimum=1, maximum=10_000, title="Epochs", description="Maximum head epochs (early stopping applies)."),
    "image_size": Param(None, type=["null", "integer"], minimum=32, maximum=1024, title="Image size", description="Input side in pixels."),
    "weights": Param("imagenet", type="string", title="Weights",
                     description="imagenet (Keras cache or $LESION_WEIGHTS_DIR), none, a file path, or s3://bucket/key."),
    "seed": Param(0, type="integer", minimum=0, maximum=2**31 - 1, title="Seed",
                  description="Split, initialisation and training seed."),
    "mc_samples": Param(50, type="integer", minimum=2, maximum=1000, title="MC-dropout samples",
                        description="Samples T for p_mel, entropy and mutual information."),
    "target_sensitivity": Param(0.85, type="number", minimum=0.5, maximum=1.0, title="Target melanoma sensitivity",
                                description="The threshold is the highest one reaching this sensitivity on validation."),
}


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
    @task
    def prepare_split() -> dict:
        from lesion_airflow import lesion_settings

        from airflow.sdk.exceptions import AirflowFailException

        from lesion_tasks.retrain import config_from_params, prepare_split as split

        try:  # bad values fail here, first, and for good: a retry would not make them valid
            config = config_from_params(dict(get_current_context()["params"]))
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        return split(lesion_settings(), config.seed)

    @task(pool=TF_POOL)
    def train_model(_split: dict) -> str:
        from lesion_airflow import lesion_settings

        from lesion_tasks.retrain import config_from_params, train_model as train

        context = get_current_context()
        config = config_from_params(dict(context["params"]))
        return train(lesion_settings(), config, context["run_id"])["model_version"]

    @task(pool=TF_POOL)
    def evaluate_model(model_version: str) -> str:
        from lesion_airflow import lesion_settings

        from lesion_tasks.assess import evaluate_model as evaluate

        evaluate(lesion_settings(), model_version)
        return model_version

    @task
    def gate_and_promote(model_version: str) -> dict:
        from lesion_airflow import lesion_settings

        from lesion_tasks.assess import gate_model

        return gate_model(lesion_settings(), model_version, actor=f"lesion_retrain:{get_current_context()['run_id']}")

    @task(trigger_rule="none_failed")  # after the gate whichever way it went; not after a failed run
    def collect_garbage(_gate: dict) -> dict:
        from lesion_airflow import lesion_settings

        from lesion_tasks.retention import collect_garbage as gc

        return gc(lesion_settings())

    collect_garbage(gate_and_promote(evaluate_model(train_model(prepare_split()))))


lesion_retrain()
