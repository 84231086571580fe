"""Helpers shared by the test tiers: the session's trained home (its drops and config), copies and mirrors
of a home, servers that fail under CI, the real `lesion` command and `dag.test()`. Fixtures live in
conftest.py; tests import these from here, never from a conftest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lesion_tasks.model.config import GateFloors, make_config
from lesion_tasks.core import db
from lesion_tasks.core.settings import Settings
from tools import servers

REPO = Path(__file__).resolve().parents[1]

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(what: str, exc: BaseException):
    message = f"{what} unavailable: {exc}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing server is a failure)", pytrace=False)
    pytest.skip(message)


def start_s3_or_fail() -> servers.S3Server:
    """A new S3 server, or the test fails (CI) / skips (elsewhere) saying why."""
    try:
        return servers.start_s3()
    except Exception as exc:  # noqa: BLE001
        unavailable("S3 server (rclone serve s3)", exc)


@contextlib.contextmanager
def fresh_database(postgres) -> Iterator[str]:
    """A new, empty database with a unique name on the test PostgreSQL server (which may be an external
    one holding other databases), dropped afterwards."""
    name = f"lesion_t_{uuid.uuid4().hex[:10]}"

    def admin(sql: str) -> None:  # a new connection each time: the fault tests restart the server
        engine = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text(sql))
        engine.dispose()

    admin(f'CREATE DATABASE "{name}"')
    try:
        yield postgres.url.rsplit("/", 1)[0] + "/" + name
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tiny_config(**overrides):
    """A `demo`-profile config on the test backbone: tiny, 64 px, random init (no weights file), every
    image through 48 px first (the effective-resolution path runs in every test). The gate decides with 5
    melanomas in test and validation (the synthetic drops have ~16-20); its default, 30, is tested in
    tests/unit/test_gate.py and by the Params-driven DAG tests, which cannot lower it."""

    return make_config("demo", **{"backbone": "tiny", "image_size": 64, "weights": "none",
                                          "effective_resolution": 48,
                                          "floors": GateFloors(min_melanomas=5), **overrides})


LABELLED_DROP = "labelled"  # make_drop(n_images=300, seed=11) with two files that must be quarantined


N_LABELLED = 299            # 300 generated; ISIC_9110000 is made a byte copy of ISIC_9110001 ("duplicate")


NIGHT_DROP = "night"        # 60 unlabelled synthetic images (clinic images: no ISIC label) + one big original


N_NIGHT = 61


BIG_ORIGINAL = "ISIC_9429999"  # 3000 x 2000 px: the Grad-CAM overlay is drawn on it at bounded size


OTHER_DROP = "outofscope"  # 40 synthetic basal cell carcinomas: ISIC-labelled, neither MEL nor NV


N_OTHER = 40


N_IMAGES = N_LABELLED + N_NIGHT + N_OTHER


QUARANTINED = ["duplicate", "empty_file"]


def shared_config():
    """The shared model's config. Target sensitivity 0.97 and 150 epochs with 2 views: the tiny model separates
    validation (~16 melanomas) perfectly. The floors are these pipeline tests' own: with ~20 test melanomas one
    case moves sensitivity by 5 points, so at the product's 0.80 floor whether the gate passed depended on the
    split and the seed (seed 0 gave 0.85, seed 1 1.0, 0.70 under an earlier threshold rule), and a threshold
    change broke every test at setup. At 0.60 any of seeds 0-5 promotes (issue 32); the product's floors are
    tested on their own (tests/unit/test_gate.py, tests/dags)."""
    return tiny_config(epochs=150, views=2, bootstrap=200, target_sensitivity=0.97, seed=1,
                       floors=GateFloors(min_melanomas=5, mel_sensitivity=0.60))


@dataclass(frozen=True)
class TrainedHome:
    settings: Settings  # SQLite + local store under settings.home
    config: Any         # shared_config()
    trained: dict       # retrain.run's answer: the champion
    scored: dict        # scoring.score's answer, the first night (run_id "night-1")

    @property
    def version(self) -> str:
        return self.trained["model_version"]


def footprint(settings: Settings) -> dict:
    """Rows per table and objects in the store: what a test writing to a home would change."""
    from lesion_tasks.core.schema import metadata, predictions
    from lesion_tasks.core.store import open_store

    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in metadata.sorted_tables}
        rows["predictions.scored_at"] = str(conn.execute(sa.select(sa.func.max(predictions.c.scored_at))).scalar())
    engine.dispose()
    return {"rows": rows, "objects": [(o.key, o.size) for o in open_store(settings).list("")]}


def copy_home(source: Settings, dest: Path) -> Settings:
    """A private copy of an embedded home (SQLite database and local store) at `dest`. The database
    holds store-relative keys, so the copy reads and writes only its own store."""
    shutil.copytree(source.home, dest)
    return Settings.from_env({"LESION_HOME": str(dest)})


def mirror_home(source: Settings, dest: Settings, *, predictions: bool = True, objects: bool = True) -> None:
    """Copy a home's rows into `dest`'s migrated (empty) database, every table of the schema, parents
    first, and with `objects` its objects into `dest`'s store: a trained home on PostgreSQL and S3
    without training there again. Without `predictions`, the images are left unscored (no
    predictions, samples, reviews or overlays)."""
    from lesion_tasks.core.schema import metadata
    from lesion_tasks.core.store import open_store

    skip = set() if predictions else {"predictions", "prediction_samples", "reviews"}
    src, dst = db.make_engine(source.db_url), db.make_engine(dest.db_url)
    try:
        with src.connect() as s, dst.begin() as d:
            for table in metadata.sorted_tables:
                if table.name in skip:
                    continue
                rows = [dict(r) for r in s.execute(sa.select(table)).mappings()]
                for k in range(0, len(rows), 500):
                    d.execute(table.insert(), rows[k:k + 500])
                pk = list(table.primary_key.columns)
                if d.dialect.name == "postgresql" and len(pk) == 1 and isinstance(pk[0].type, sa.Integer):
                    # explicit ids were inserted: move a serial's sequence past them
                    d.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{pk[0].name}'), "
                                      f"COALESCE(MAX({pk[0].name}), 0) + 1, false) FROM {table.name}"))
    finally:
        src.dispose()
        dst.dispose()
    if objects:
        source_store, dest_store = open_store(source), open_store(dest)
        for info in source_store.list(""):
            if predictions or not info.key.startswith("predictions/"):
                dest_store.put(info.key, source_store.get(info.key))


def registry_row(settings: Settings, version: str) -> dict:
    """The registry row of `version` in the home `settings` points at."""
    from lesion_tasks.versions import registry

    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        row = registry.get(conn, version)
    engine.dispose()
    return row


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `lesion` console script."""
    lesion = Path(sys.executable).with_name("lesion")
    return subprocess.run([str(lesion), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_dag(dag, conf: dict | None = None):
    """`dag.test()` (which does not raise when a task fails): the run and each task's state."""
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    return run, states


def champion_row(conn) -> dict:
    """The champion's registry row as stored (tests that inspect or copy rows; the code reads
    `registry.version`)."""
    from lesion_tasks.versions import registry

    return registry.get(conn, registry.version(conn, None).model_version)


def labelled_features(rng, n: int, site_of, prefix: str):
    """Features of `n` labelled images (crossfit.Labelled): 35% melanomas shifted by 1.5, sites by `site_of(i)`, two
    images per lesion."""
    import numpy as np

    from lesion_tasks.training import crossfit

    y = (rng.random(n) < 0.35).astype(np.int64)
    x = (rng.normal(size=(n, 8)) + y[:, None] * 1.5).astype(np.float32)
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    sites = np.array([site_of(i) for i in range(n)], dtype=object)
    lesions = np.array([f"L{prefix}{i // 2}" for i in range(n)], dtype=object)  # two images per lesion
    return crossfit.Labelled([x], y, ids, sites, lesions)


def wait_for_lock_waiters(engine, n: int, threads, what: str) -> None:
    """Until n sessions of this PostgreSQL database wait on a lock (work the test queued behind its own open
    transaction): a poll with a deadline, failing when a thread ended before it waited."""
    import time

    import sqlalchemy as sa

    deadline = time.monotonic() + 60
    with engine.connect() as conn:
        while conn.scalar(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND wait_event_type = 'Lock'")) < n:
            assert all(t.is_alive() for t in threads), f"{what}: one ended without waiting on the lock"
            assert time.monotonic() < deadline, f"{what}: {n} never waited on the lock"
            time.sleep(0.02)  # a poll with a deadline
            conn.rollback()  # a fresh snapshot of pg_stat_activity


def priority_key(c: dict) -> tuple:
    """cases.priority_order in Python: what the default queue is sorted by."""
    from lesion_tasks.review import cases

    likely, unsure = c["p_mel"] >= cases.LIKELY_MEL, "uncertain" in (c["review_reasons"] or "").split(",")
    share = -1.0 if c["decision_uncertainty"] is None else c["decision_uncertainty"]
    tier, key = (1, c["p_mel"]) if likely else (2, share) if unsure else (3, c["p_mel"])
    return (c["known_label"] is not None, tier, -key, abs(c["p_mel"] - c["threshold"]), c["image_id"])
