"""Faults injected for real against the servers the suite starts. Each test ends by checking that
nothing was lost or duplicated, and records a row of docs/reliability.md."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks.ops import consistency
from lesion_tasks.core import db
from lesion_tasks.versions import registry
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import StoreError, key_of, open_store
from lesion_tasks.ops.synthetic import make_drop
from tests import reliability
from tests.helpers import champion_row, fresh_database, mirror_home, start_s3_or_fail
from tests.imagegen import unlabelled_drop


@pytest.fixture(scope="module")
def own_s3():
    """An S3 server of this module's own: these tests kill it."""
    server = start_s3_or_fail()
    yield server
    server.stop()


def _settings(tmp_path, pg_url, s3, bucket="faults"):
    return Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=pg_url, store_url=f"s3://{bucket}/lesion",
                             s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)


def _count(settings, table, *where) -> int:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar()
    engine.dispose()
    return n


def _dangling(settings) -> int:
    """Rows that point at objects the store does not have."""
    store = open_store(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        uris = [u for row in conn.execute(sa.select(images.c.original_uri, images.c.normalized_uri)) for u in row]
        uris += list(conn.scalars(sa.select(predictions.c.gradcam_uri)))
    engine.dispose()
    return sum(not store.exists(key_of(store, u)) for u in uris)


def _consistent(settings) -> None:
    """Every fault scenario ends consistent: `lesion check` finds no problem, not even a warning."""
    report = consistency.check(settings)
    assert report["ok"] and not any(report["warnings"].values()), (report["problems"], report["warnings"], report["examples"])


def _in_thread(fn, *args, **kwargs):
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _wait_until(predicate, timeout=120):
    """Poll `predicate` until it holds; fail at the deadline (a poll, not a sleep that decides a race)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {predicate}"
        time.sleep(0.02)


def test_s3_killed_mid_ingestion_then_rerun(tmp_path, pg_url, own_s3):
    settings = _settings(tmp_path, pg_url, own_s3, "ingest-crash")
    db.upgrade(settings)
    drop = make_drop(tmp_path / "drop", n_images=400, seed=51, size=128)
    objects = lambda: sum(1 for _ in (own_s3.root / "ingest-crash").rglob("*.jpg"))  # noqa: E731
    thread, box = _in_thread(ingest, str(drop), settings)
    _wait_until(lambda: objects() >= 150)
    own_s3.kill()
    thread.join(300)
    assert isinstance(box.get("error"), StoreError), box
    assert own_s3.endpoint in str(box["error"])
    partial = _count(settings, images)
    own_s3.restart()
    result = ingest(str(drop), settings)
    total = _count(settings, images)
    assert total == 400 and result.totals["accepted"] == 400
    dangling = _dangling(settings)
    assert dangling == 0
    _consistent(settings)
    reliability.record("S3 server dies during ingestion", "SIGKILL of rclone serve s3 after 150 objects, then restart",
                       "StoreError naming the endpoint; rerun completes", f"error raised, {partial} rows before, rerun: {total}",
                       400 - total + dangling, 0)


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory, postgres, own_s3, trained_home):
    """A champion (the session's trained home, mirrored: rows and objects, no predictions) and 1,660
    unscored images on Postgres + this module's S3 server."""
    tmp = tmp_path_factory.mktemp("faults-scoring")
    with fresh_database(postgres) as url:
        settings = _settings(tmp, url, own_s3, "scoring-faults")
        db.upgrade(settings)
        mirror_home(trained_home.settings, settings, predictions=False)
        # 1,660 images: enough work to be interrupted mid-way
        ingest(str(unlabelled_drop(tmp / "bulk", 1_660 - _count(settings, images), 53)), settings)
        engine = db.make_engine(settings.db_url)
        with engine.connect() as conn:
            assert registry.version(conn, None).model_version == trained_home.version
        engine.dispose()
        yield settings, postgres


def _reset_predictions(settings):
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(predictions.delete())
    engine.dispose()


def _once_each(settings) -> tuple[int, int]:
    """(lost, duplicated) predictions of the champion against the images."""
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        n_images = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
        per_image = conn.execute(sa.select(predictions.c.image_id, sa.func.count()).group_by(predictions.c.image_id)).all()
    engine.dispose()
    return n_images - len(per_image), sum(n - 1 for _, n in per_image)


def test_s3_killed_mid_scoring_shard_then_rerun(scoring_setup, own_s3):
    settings, _ = scoring_setup
    _reset_predictions(settings)
    thread, box = _in_thread(scoring.score_range, settings, batch_size=16, run_id="s3-crash")
    _wait_until(lambda: _count(settings, predictions) >= 32)
    own_s3.kill()
    thread.join(300)
    assert isinstance(box.get("error"), StoreError), box
    partial = _count(settings, predictions)
    own_s3.restart()
    scoring.score_range(settings, run_id="s3-rerun")
    lost, duplicated = _once_each(settings)
    dangling = _dangling(settings)
    assert (lost, duplicated, dangling) == (0, 0, 0)
    _consistent(settings)
    reliability.record("S3 server dies during a scoring shard", "SIGKILL of rclone serve s3 after 32 predictions, then restart",
                       "StoreError; rerun scores the rest once", f"error raised after {partial} rows; rerun complete",
                       lost + dangling, duplicated)


def test_postgres_restarted_mid_scoring_shard_then_rerun(scoring_setup):
    settings, postgres = scoring_setup
    if postgres.base is None:
        pytest.skip("LESION_TEST_PG_URL points at an external server the tests may not restart")
    _reset_predictions(settings)
    thread, box = _in_thread(scoring.score_range, settings, batch_size=16, run_id="pg-crash")
    _wait_until(lambda: _count(settings, predictions) >= 32)
    postgres.restart()
    thread.join(300)
    assert not thread.is_alive()
    # the restart either cuts a transaction (the shard fails with a database error) or lands between two
    # batches, where the pool's pre-ping reconnects and the shard completes: never another error
    error = box.get("error")
    assert error is None or isinstance(error, sa.exc.DBAPIError), box
    rerun = scoring.score_range(settings, run_id="pg-rerun")
    lost, duplicated = _once_each(settings)
    assert (lost, duplicated) == (0, 0)
    assert error is not None or rerun["scored"] == 0, "a shard that completed left nothing for the rerun"
    _consistent(settings)
    outcome = f"{type(error).__name__}; rerun scored the rest" if error else "reconnected and completed; rerun scored 0"
    reliability.record("Postgres restarts during a scoring shard", "pg_ctl restart -m fast after 32 predictions",
                       "a database error or a reconnect, never anything else; rerun completes",
                       f"{outcome}; counts exact", lost, duplicated)


def test_two_scoring_runs_at_once(scoring_setup):
    settings, _ = scoring_setup
    _reset_predictions(settings)
    env = {**os.environ, "LESION_DB_URL": settings.db_url, "LESION_STORE_URL": settings.store_url,
           "LESION_S3_ENDPOINT": settings.s3_endpoint, "LESION_S3_ACCESS_KEY": settings.s3_access_key,
           "LESION_S3_SECRET_KEY": settings.s3_secret_key, "LESION_HOME": str(settings.home)}
    lesion = str(Path(sys.executable).with_name("lesion"))
    procs = [subprocess.Popen([lesion, "score"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    codes = [p.wait(600) for p in procs]
    assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    lost, duplicated = _once_each(settings)
    assert (lost, duplicated) == (0, 0)
    _consistent(settings)
    reliability.record("Two scoring runs at once", "two `lesion score` processes started together",
                       "both succeed; upserts keep one row per image", "both exit 0; one row per image", lost, duplicated)


def test_corrupt_or_missing_champion_artifact_stops_scoring(scoring_setup):
    settings, _ = scoring_setup
    _reset_predictions(settings)
    store = open_store(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        champion = champion_row(conn)
    engine.dispose()
    key = key_of(store, champion["model_uri"])
    good = store.get(key)
    try:
        store.put(key, b"PK\x03\x04 this is not a keras model")
        with pytest.raises(ValueError, match="unreadable.*nothing written"):
            scoring.score_range(settings, run_id="corrupt")
        store.delete(key)
        with pytest.raises(ValueError, match="missing from the store"):
            scoring.score_range(settings, run_id="missing")
        assert _count(settings, predictions) == 0
    finally:
        store.put(key, good)
    reliability.record("Champion model artifact corrupt or missing", "model.keras overwritten with junk, then deleted",
                       "scoring stops with a clear error; nothing written", "ValueError naming the artifact; 0 rows", 0, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_disk_full_and_read_only_store(tmp_path):
    home = tmp_path / "home"
    store_dir = home / "store"
    store_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(store_dir)], check=True)
    try:
        settings = Settings.from_env({"LESION_HOME": str(home)})
        db.upgrade(settings)
        drop = make_drop(tmp_path / "drop", n_images=150, seed=54)
        with pytest.raises(StoreError, match="No space left on device"):
            ingest(str(drop), settings)
        assert not list(store_dir.rglob(".tmp-*")), "a half-written object was left behind"
        assert _dangling(settings) == 0
        full_rows = _count(settings, images)
        subprocess.run(["mount", "-o", "remount,ro", str(store_dir)], check=True)
        from tests.helpers import run_cli

        out = run_cli("ingest", str(drop), env={"LESION_HOME": str(home)})
        assert out.returncode == 2 and "Read-only file system" in out.stderr and "Traceback" not in out.stderr
        subprocess.run(["mount", "-o", "remount,rw,size=64m", str(store_dir)], check=True)
        result = ingest(str(drop), settings)
        assert result.totals["accepted"] == 150 and _dangling(settings) == 0
        _consistent(settings)
    finally:
        subprocess.run(["umount", "-l", str(store_dir)], check=False)
    reliability.record("Local store full, then read-only", "3 MB tmpfs under the store; then remount read-only",
                       "clear error, no partial object, no row without its object; rerun after space completes",
                       f"StoreError 'No space left' ({full_rows} rows kept, all with objects); CLI exit 2 'Read-only'; rerun 150",
                       0, 0)
