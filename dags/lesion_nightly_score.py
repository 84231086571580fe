"""
### lesion_nightly_score

Every night at 02:00 UTC, whenever `isic_ingest` accepted new images (the Asset `lesion://images/validated`)
and whenever `lesion_retrain` promoted a new champion (`lesion://models/champion`): every image without a
prediction from the current champion gets one, the previous champion's open cases and the latest nights' images
first (until then the queue shows the previous champion's prediction, marked as such),
with `p_mel`, the predicted label at the model version's threshold, MC-dropout uncertainty (entropy,
mutual information), `needs_review`, and a Grad-CAM overlay in the store. The unscored images are cut
into id-range shards (Param `shard_size`), scored as dynamically mapped tasks (the unit that scales out
to more workers: as many run at once as the pool `lesion_tensorflow` has slots, one per machine), settled
(each scored site's operating point re-estimated from its scored images, tonight's cases decided at it:
`lesion_tasks.sites.operating`), then summarised. A shard whose worker dies is retried (`[core] default_task_retry_delay`, see
docker/airflow-workers.env) and scores only what is still unscored. Rows are upserted: reruns and
retries never duplicate and rewrite identical numbers.

Without a champion model, `plan_shards` ends **skipped** ("no champion model: train one with lesion_retrain")
and so does the rest: the run is not a silent green. After scoring, `summarise` compares tonight's `p_mel`
and entropy with the previous nights' of the same model version (`lesion_tasks.ops.alerts`: Kolmogorov-Smirnov
above 0.2 with p < 0.01). With the Connection `lesion_alerts_smtp`, a failed run, a run without a champion and
a shifted night are mailed (docs/operations.md, "Alerts").

Logic: `lesion_tasks.scoring.nightly` (also `lesion score`) and `lesion_tasks.ops.alerts`. This file only wires.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task
from lesion_airflow import CHAMPION_PROMOTED, TF_POOL, VALIDATED_IMAGES



def _failed(context) -> None:
    from lesion_airflow import nightly_failed_callback

    nightly_failed_callback(context)


@dag(
    dag_id="lesion_nightly_score",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
                                  assets=VALIDATED_IMAGES | CHAMPION_PROMOTED),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["lesion", "scoring"],
    # the retry delay is a deployment setting ([core] default_task_retry_delay, docker/airflow-workers.env)
    default_args={"owner": "lesion", "retries": 2},
    on_failure_callback=_failed,
    params={"shard_size": Param(512, type="integer", minimum=16, maximum=100_000, title="Images per shard",
                                description="Unscored images per mapped score_shard task (one worker scores one shard).")},
)
def lesion_nightly_score():
    @task
    def plan_shards() -> list[dict]:
        from lesion_airflow import alert_links, lesion_settings, send_alert

        from airflow.sdk.exceptions import AirflowSkipException

        from lesion_tasks.ops import alerts
        from lesion_tasks.scoring.nightly import plan_shards as plan

        context = get_current_context()
        planned = plan(lesion_settings(), "champion", shard_size=context["params"]["shard_size"])
        if planned.reason == planned.NO_CHAMPION:  # nothing to score *because* there is no model
            send_alert(context, alerts.nightly_empty(context["run_id"], alert_links(context)))
            raise AirflowSkipException(alerts.NO_CHAMPION)
        return planned.shards

    @task(pool=TF_POOL)
    def score_shard(shard: dict) -> dict:
        from lesion_airflow import lesion_settings, quiet_tensorflow

        quiet_tensorflow()
        from lesion_tasks.scoring.nightly import score_range

        return score_range(lesion_settings(), shard["model_version"], shard.get("first"), shard.get("last"),
                           image_ids=shard.get("image_ids"), run_id=get_current_context()["run_id"])

    # after the shards: each scored site's operating point re-estimated, tonight's cases decided at it
    @task(pool=TF_POOL, trigger_rule="none_failed_min_one_success")
    def settle(shards: list[dict], results: list[dict] | None = None) -> dict:
        from lesion_airflow import lesion_settings

        # TensorFlow is imported only where cases must be scored again (their MEL/NV call flipped)
        from lesion_tasks.scoring.nightly import settle as settle_run

        version = shards[0]["model_version"] if shards else "champion"
        return settle_run(lesion_settings(), version, get_current_context()["run_id"])

    # runs after the shards unless one failed; skipped with plan_shards (no champion)
    @task(trigger_rule="none_failed_min_one_success")
    def summarise(shards: list[dict], results: list[dict] | None = None, settled: dict | None = None) -> dict:
        from lesion_airflow import alert_links, lesion_settings, send_alert

        from lesion_tasks.ops import alerts
        from lesion_tasks.scoring.nightly import summarize

        # `results` is Airflow's lazy sequence over the mapped XComs: iterating it (list(results)) reads
        # item by item until the API answers 404, which the SDK logs as "XCom not found ... offset=N"
        # on every run; a full slice reads them all in one request
        context, settings = get_current_context(), lesion_settings()
        version = shards[0]["model_version"] if shards else "champion"
        summary = summarize(settings, version, context["run_id"], list(results[:]) if results is not None else [], settled)
        shift, to_send = alerts.after_night(settings, summary, context["run_id"],
                                            alert_links(context, summary.get("model_version")))
        if shift is not None:
            summary["shift"] = shift
            print("distribution shift check:", shift)
        if summary.get("sites", {}).get("mostly_unvalidated"):
            print(summary["sites"]["note"])
        for alert in to_send:
            send_alert(context, alert)
        return summary

    shards = plan_shards()
    scored = score_shard.expand(shard=shards)
    summarise(shards, scored, settle(shards, scored))


lesion_nightly_score()
