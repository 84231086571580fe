"""`isic_ingest` run by Airflow (`dag.test()`) against real PostgreSQL and the S3 server.

The Connections `lesion_db` / `lesion_s3` point at them while LESION_DB_URL points at a SQLite
file, which must stay untouched: inside Airflow the Connections take precedence.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks.core.schema import images, quarantine
from lesion_tasks.core.store import open_store
from lesion_tasks.ops.synthetic import make_drop
from tests.helpers import run_dag

DAGS = Path(__file__).resolve().parents[2] / "dags"


def _upload_folder(store, folder: Path, prefix: str) -> int:
    n = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            store.put(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
            n += 1
    return n


def _zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def test_isic_ingest_dag_against_postgres_and_s3(airflow_env, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    settings, decoy = airflow_env
    store = open_store(settings)
    folder = make_drop(tmp_path / "night-1", n_images=10, seed=1)
    (folder / "ISIC_9019999.jpg").write_bytes(b"")  # one bad file: quarantined, not lost
    _upload_folder(store, folder, "incoming/night-1")
    zipped = make_drop(tmp_path / "night-2", n_images=6, seed=2)
    store.put("incoming/night-2.zip", _zip_of(zipped))

    dag = DagBag(dag_folder=str(DAGS)).get_dag("isic_ingest")
    run, states = run_dag(dag)
    assert run.state == "success", states
    assert states["publish"] == "success"

    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        per_drop = dict(conn.execute(sa.select(images.c.drop_id, sa.func.count()).group_by(images.c.drop_id)).all())
        reasons = conn.execute(sa.select(quarantine.c.drop_id, quarantine.c.entry, quarantine.c.reason)).all()
        uris = list(conn.scalars(sa.select(images.c.normalized_uri)))
    assert per_drop == {"night-1": 10, "night-2": 6}
    assert [tuple(r) for r in reasons] == [("night-1", "ISIC_9019999.jpg", "empty_file")]
    assert all(u.startswith("drops/night-") and store.exists(u) for u in uris)  # keys, relative to the store
    assert store.exists("drops/night-1/manifest.json") and store.exists("drops/night-2/aux/metadata.csv")
    assert not decoy.exists(), "LESION_DB_URL was used although the lesion_db Connection exists"

    # a second run finds nothing new: no new rows, no asset event, and the run says why
    run2, states2 = run_dag(dag)
    assert run2.state == "success", states2
    assert states2 == {"find_new_drops": "skipped", "ingest_drop": "skipped", "publish": "skipped",
                       "check_drops": "skipped"}, states2  # (skipped, not reading the skipped drops' XComs)
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException) as skipped:  # what the skipped task said (its callable, called here)
        dag.get_task("find_new_drops").python_callable()
    assert str(skipped.value) == ("no new drop under incoming/: 2 drop(s) already ingested (night-1, night-2.zip), "
                                  "0 settling, 0 loose file(s) ignored")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(images)).scalar() == 16
        assert conn.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar() == 1
    engine.dispose()


def test_a_drop_still_being_copied_makes_the_run_wait_not_end_green(airflow_env, tmp_path, monkeypatch):
    """A run right after a drop was copied used to end green with every task skipped, the reason in a collapsed log
    section. `find_new_drops` is a sensor now: while the drop settles (here 2 s) the run waits, up for reschedule,
    its log saying the time left, then ingests it, in the same run."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    from lesion_tasks.ingest.sources import survey_incoming
    from lesion_tasks.ops.alerts import incoming_report

    settings, _ = airflow_env
    monkeypatch.setenv("LESION_INCOMING_SETTLE_SECONDS", "2")
    store = open_store(settings)
    _upload_folder(store, make_drop(tmp_path / "night-3", n_images=4, seed=3), "incoming/night-3")
    said = incoming_report(survey_incoming(dataclasses.replace(settings, incoming_settle_seconds=2)))
    assert "1 settling (night-3 in " in said and "or at once with a _READY marker" in said, said
    dag = DagBag(dag_folder=str(DAGS)).get_dag("isic_ingest")
    run, states = run_dag(dag)
    assert run.state == "success" and states["find_new_drops"] == "success" and states["publish"] == "success", states
    with create_session() as session:
        ti = next(t for t in run.get_task_instances(session=session) if t.task_id == "find_new_drops")
        waited = session.query(TaskReschedule).filter(TaskReschedule.ti_id == ti.id).count()
    assert waited >= 1  # it waited for the drop to settle instead of skipping
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(images).where(images.c.drop_id == "night-3")).scalar() == 4
    engine.dispose()
