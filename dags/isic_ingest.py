"""
### isic_ingest

Every 30 minutes: find new ISIC drops (a folder or a `.zip`) under `incoming/` in the object store,
validate every image and metadata row, record accepted images in `images` and everything else in
`quarantine` with a reason code. Emits the Asset `lesion://images/validated` when anything new was
accepted (`lesion_nightly_score` then scores them). Re-running is safe: finished drops are skipped and every
write is idempotent. A run that finds no new drop (e.g. a manual run after the schedule took it) ends with
`find_new_drops` **skipped**, its message saying what it saw: "no new drop under incoming/: 2 drop(s) already
ingested (night-1, night-2.zip), 0 settling, 0 loose file(s) ignored". While a drop is still being copied
(it changed within LESION_INCOMING_SETTLE_SECONDS and has no `_READY` marker) the run waits for it:
`find_new_drops` is a sensor, up for reschedule, its log saying which drops settle and the time each has left
("1 settling (night-3 in 4 min 10 s, or at once with a _READY marker in the drop)").

Logic: `lesion_tasks.ingest.drop` (also `lesion ingest SOURCE`). This file only wires.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from airflow.sdk import PokeReturnValue, dag, task
from lesion_airflow import VALIDATED_IMAGES

SETTLE_POKE_S = 15  # how often a run waiting for settling drops looks again
SETTLE_TIMEOUT_S = 25 * 60  # then skipped (soft fail): the next scheduled run looks again


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
    # a sensor: while drops under incoming/ are still settling (being copied: unchanged for
    # LESION_INCOMING_SETTLE_SECONDS, or a _READY marker), the run waits for them, up_for_reschedule with the
    # time left in its log, instead of ending green with every task skipped
    @task.sensor(mode="reschedule", poke_interval=SETTLE_POKE_S, timeout=SETTLE_TIMEOUT_S, soft_fail=True)
    def find_new_drops() -> PokeReturnValue:
        """Waits while drops are settling; skipped, saying what it saw (drops already ingested, loose files),
        when no drop is new."""
        from lesion_airflow import lesion_settings

        from airflow.sdk.exceptions import AirflowSkipException

        from lesion_tasks.ops.alerts import incoming_report
        from lesion_tasks.ingest.sources import survey_incoming

        found = survey_incoming(lesion_settings())
        if found.ready:
            return PokeReturnValue(is_done=True, xcom_value=found.ready)
        if not found.settling:
            raise AirflowSkipException(incoming_report(found))
        logging.getLogger("airflow.task").info("waiting: %s", incoming_report(found))  # each poke, in the log
        return PokeReturnValue(is_done=False)

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

    # none_failed_min_one_success: after the drops' tasks, whether or not publish had anything to publish; skipped
    # when no drop was found (all_done resolved the skipped drops' XComs: a red "XCom not found" line a run)
    @task(trigger_rule="none_failed_min_one_success")
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
