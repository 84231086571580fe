"""
### isic_ingest

Every 30 minutes: find new ISIC drops (a folder or a `.zip`) under `incoming/` in the object store,
validate every image and metadata row, record accepted images in `images` and everything else in
`quarantine` with a reason code. Emits the Asset `lesion://images/validated` when anything new was
accepted (`lesion_nightly_score` then scores them). Re-running is safe: finished drops are skipped and every
write is idempotent. A run that finds no new drop (e.g. a manual run after the schedule took it) ends with
`find_new_drops` **skipped**, its message saying what it saw: "no new drop under incoming/: 2 drop(s) already
ingested (night-1, night-2.zip), 0 settling, 0 loose file(s) ignored".

Logic: `lesion_tasks.ingest.drop` (also `lesion ingest SOURCE`). This file only wires.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import dag, task
from lesion_airflow import VALIDATED_IMAGES



@dag(
    dag_id="isic_ingest",
    schedule="*/30 * * * *",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["lesion", "ingest"],
    default_args={"owner": "lesion", "retries": 2, "retry_delay": timedelta(minutes=1)},
)
def isic_ingest():
    @task
    def find_new_drops() -> list[str]:
        """Skipped, saying what it saw (drops already ingested, still settling, loose files), when no drop is new."""
        from lesion_airflow import lesion_settings

        from airflow.sdk.exceptions import AirflowSkipException

        from lesion_tasks.ops.alerts import incoming_report
        from lesion_tasks.ingest.sources import discover_incoming

        settings = lesion_settings()
        ready = discover_incoming(settings)
        if not ready:
            raise AirflowSkipException(incoming_report(settings, ready))
        return ready

    # one drop at a time: drops deduplicate against each other. A bad drop is recorded as failed and
    # returned as such (the others go on); an unreachable store or database raises and is retried.
    @task(max_active_tis_per_dagrun=1)
    def ingest_drop(source: str) -> dict:
        from lesion_airflow import lesion_settings

        from lesion_tasks.ingest.drop import ingest_one_of_many

        return ingest_one_of_many(source, lesion_settings())

    @task(outlets=[VALIDATED_IMAGES])
    def publish(results: list[dict]) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from lesion_tasks.ingest.drop import summarize

        summary = summarize(list(results))
        if summary["accepted"] == 0:
            raise AirflowSkipException(f"nothing new accepted ({summary}): no asset event")
        return summary

    @task(trigger_rule="all_done")
    def check_drops(results: list[dict]) -> None:
        """The run fails, after the good drops were published, when a drop failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from lesion_tasks.ingest.drop import summarize

        failed = summarize(list(results))["failed"]
        if failed:
            raise AirflowFailException(f"{len(failed)} drop(s) failed: {failed}")

    results = ingest_drop.expand(source=find_new_drops())
    publish(results) >> check_drops(results)


isic_ingest()
