"""CeleryExecutor for real: the path a user takes when one machine is not enough.

Airflow's api-server, scheduler and dag-processor and TWO `airflow celery worker` processes on this
machine (loopback only); Debian's redis-server as the broker; PostgreSQL for Airflow's metadata, Celery's
results and the lesion database; the S3 server for the store. Every Celery, heartbeat and retry setting
comes from docker/airflow-workers.env, the file docker-compose.yaml gives its Airflow services. The
shared trained home's champion and its images (mirrored, unscored) are scored by `lesion_nightly_score`
in shards; one worker is SIGKILLed with everything it started (a lost machine) while it runs a shard.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime

import pytest
import requests
import sqlalchemy as sa

from lesion_tasks.ops import consistency
from lesion_tasks.core import db
from lesion_tasks.core.schema import model_versions, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import key_of, open_store
from tests import reliability
from tools import celery_cluster, servers
from tests.helpers import N_IMAGES, unavailable, mirror_home, start_s3_or_fail

WORKERS = ("w1", "w2")
POOL_SLOTS = 2  # one TensorFlow task per worker (worker_concurrency 1 in docker/airflow-workers.env)
SHARD_SIZE = 80  # the trained home's 400 images: 5 shards


@pytest.fixture(scope="module")
def cluster(trained_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("celery")
    try:
        redis = servers.start_redis()
    except Exception as exc:  # noqa: BLE001
        unavailable("redis-server (the Celery broker)", exc)
    try:
        pg = servers.start_postgres()
    except Exception as exc:  # noqa: BLE001
        redis.stop()
        unavailable("PostgreSQL (for Airflow with Celery)", exc)
    s3 = start_s3_or_fail()
    try:
        settings = Settings.from_env({"LESION_HOME": str(tmp / "lesion")},
                                     db_url=celery_cluster.create_database(pg.url, f"lesion_celery_{uuid.uuid4().hex[:8]}"),
                                     store_url="s3://lesion-celery/lesion", s3_endpoint=s3.endpoint,
                                     s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
        db.upgrade(settings)
        mirror_home(trained_home.settings, settings, predictions=False)  # the champion, every image unscored
        with celery_cluster.start(tmp, settings, pg.url, redis.url, WORKERS, POOL_SLOTS) as cluster:
            yield cluster
    finally:
        s3.stop()
        pg.stop()
        redis.stop()


def _tries(session: requests.Session, run_url: str, map_index: int) -> list[dict]:
    response = session.get(f"{run_url}/taskInstances/score_shard/{map_index}/tries", timeout=10)
    assert response.ok, response.text
    return response.json()["task_instances"]


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_shards_run_on_two_celery_workers_and_survive_a_killed_worker(cluster):
    started = time.monotonic()
    session = cluster.session()
    run_url = cluster.trigger(session, "lesion_nightly_score", {"shard_size": SHARD_SIZE})
    run_id = run_url.rsplit("/", 1)[1]

    def running_shard():
        tis = session.get(f"{run_url}/taskInstances", timeout=10).json()["task_instances"]
        return next((t for t in tis if t["task_id"] == "score_shard" and t["state"] == "running"
                     and (t.get("hostname") or "").rsplit("/", 1)[-1] in WORKERS), None)

    # kill the worker (and its task processes) of the first shard seen running
    victim = cluster.wait(running_shard, 240, "a score_shard task running on a worker", every=0.3)
    worker = victim["hostname"].rsplit("/", 1)[-1]
    killed = cluster.kill_tree(worker)
    killed_at = time.monotonic()
    assert not any(t["try_number"] == victim["try_number"] and t["state"] == "success"
                   for t in _tries(session, run_url, victim["map_index"])), "the shard finished before the kill"

    state = cluster.finish(session, run_url)["state"]
    tis = session.get(f"{run_url}/taskInstances", timeout=10).json()["task_instances"]
    assert state == "success", ({(t["task_id"], t["map_index"]): t["state"] for t in tis}, cluster.tails())
    shards = sorted(t["map_index"] for t in tis if t["task_id"] == "score_shard")
    assert len(shards) == -(-N_IMAGES // SHARD_SIZE) >= 4
    tries = {i: _tries(session, run_url, i) for i in shards}

    # the killed shard: its first try failed (no heartbeat), the retry succeeded on the surviving worker
    survivor = next(w for w in WORKERS if w != worker)
    first, *rest = sorted(tries[victim["map_index"]], key=lambda t: t["try_number"])
    assert first["state"] == "failed" and first["hostname"].endswith("/" + worker), first
    assert rest and rest[-1]["state"] == "success" and rest[-1]["hostname"].endswith("/" + survivor), rest
    # shards ran on both workers, never more at once than the pool's slots, and side by side
    every_try = [t for i in shards for t in tries[i] if t["start_date"]]
    assert {t["hostname"].rsplit("/", 1)[-1] for t in every_try} == set(WORKERS)
    intervals = [(datetime.fromisoformat(t["start_date"]), datetime.fromisoformat(t["end_date"])) for t in every_try]
    assert _max_overlap(intervals) == POOL_SLOTS

    # every image scored exactly once, by this run; every overlay referenced, none missing
    engine = db.make_engine(cluster.settings.db_url)
    with engine.connect() as conn:
        version = conn.execute(sa.select(model_versions.c.model_version).where(model_versions.c.is_champion)).scalar_one()
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.run_id, predictions.c.gradcam_uri)
                            .where(predictions.c.model_version == version)).all()
    engine.dispose()
    assert len(rows) == len({r.image_id for r in rows}) == N_IMAGES
    assert {r.run_id for r in rows} == {run_id}
    store = open_store(cluster.settings)
    overlays = {o.key for o in store.list(f"predictions/{version}/gradcam/")}
    assert overlays == {key_of(store, r.gradcam_uri) for r in rows}
    summary = session.get(f"{run_url}/taskInstances/summarise/xcomEntries/return_value", timeout=10).json()["value"]
    summary = summary if isinstance(summary, dict) else json.loads(summary)
    assert summary["still_unscored"] == 0 and summary["rows_of_this_run"] == N_IMAGES
    report = consistency.check(cluster.settings)  # `lesion check`: the home ends consistent
    assert report["ok"] and not any(report["warnings"].values()), (report["problems"], report["warnings"], report["examples"])

    seconds = time.monotonic() - started
    print(f"\ncelery: {len(shards)} shards on {WORKERS}, {worker} killed ({killed} processes) during shard "
          f"{victim['map_index']}; retried on {survivor}; run done {time.monotonic() - killed_at:.0f} s after the kill, "
          f"{seconds:.0f} s in all")
    reliability.record(
        "A Celery worker lost during a scoring shard",
        f"two `airflow celery worker`s (Redis broker, pool of {POOL_SLOTS}); SIGKILL of one worker and its task "
        f"processes while its shard ran",
        "the try fails on its missed heartbeats and is retried on the other worker; every image scored once",
        f"{len(shards)} shards over both workers, at most {POOL_SLOTS} at once; shard {victim['map_index']} retried on the "
        f"other worker; {N_IMAGES} rows, {len(overlays)} overlays, none orphaned",
        0, 0)
