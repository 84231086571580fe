"""
### lesion_nightly_score

Every night at 02:00 UTC: every image without a prediction from the current champion gets one,
with `p_mel`, the predicted label at the model version's threshold, MC-dropout uncertainty (entropy,
mutual information), `needs_review`, and a Grad-CAM overlay in the store. The unscored images are cut
into id-range shards (Param `shard_size`), scored as dynamically mapped tasks (the unit that scales out
to more workers: as many run at once as the pool `lesion_tensorflow` has slots, one per machine), then
summarised. A shard whose worker dies is retried (`[core] default_task_retry_delay`, see
docker/airflow-workers.env) and scores only what is still unscored. Rows are upserted: reruns and
retries never duplicate and rewrite identical numbers.

Logic: `lesion_tasks.scoring` (also `lesion score`). This file only wires.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import Param, dag, get_current_context, task

TF_POOL = "lesion_tensorflow"  # slots = machines (workers): a TensorFlow task uses every core of its machine


@dag(
    dag_id="lesion_nightly_score",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["lesion", "scoring"],
    # the retry delay is a deployment setting ([core] default_task_retry_delay, docker/airflow-workers.env)
    default_args={"owner": "lesion", "retries": 2},
    params={"shard_size": Param(512, type="integer", minimum=16, maximum=100_000, title="Images per shard",
                                description="Unscored images per mapped score_shard task (one worker scores one shard).")},
)
def lesion_nightly_score():
    @task
    def plan_shards() -> list[dict]:
        from lesion_airflow import lesion_settings

        from lesion_tasks.scoring import plan_shards as plan

        return plan(lesion_settings(), "champion", shard_size=get_current_context()["params"]["shard_size"])

    @task(pool=TF_POOL)
    def score_shard(shard: dict) -> dict:
        from lesion_airflow import lesion_settings

        from lesion_tasks.scoring import score_range

        return score_range(lesion_settings(), shard["model_version"], shard["first"], shard["last"],
                           run_id=get_current_context()["run_id"])

    @task(trigger_rule="none_failed")
    def summarise(shards: list[dict], results: list[dict] | None = None) -> dict:
        from lesion_airflow import lesion_settings

        from lesion_tasks.scoring import summarize

        # `results` is Airflow's lazy sequence over the mapped XComs: iterating it (list(results)) reads
        # item by item until the API answers 404, which the SDK logs as "XCom not found ... offset=N"
        # on every run; a full slice reads them all in one request
        version = shards[0]["model_version"] if shards else "champion"
        return summarize(lesion_settings(), version, get_current_context()["run_id"],
                         list(results[:]) if results is not None else [])

    shards = plan_shards()
    summarise(shards, score_shard.expand(shard=shards))


lesion_nightly_score()
