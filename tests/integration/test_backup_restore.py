"""The backup and restore drill of docs/operations.md, "Backup and restore", command for command.

PostgreSQL + S3: a home is built for real (a synthetic drop ingested, a tiny model trained, part of the
images scored, one verdict recorded), then `pg_dump -Fc`, `pg_restore --no-owner` into a NEW database,
`rclone sync` of the bucket into a NEW bucket (the remote given by RCLONE_CONFIG_* variables). The
restored home, through new settings only: `lesion check` is consistent, its predictions, samples and
reviews equal the originals, the rest of the images score (overlays land in the new bucket), the review
queue lists cases and takes a verdict. SQLite + local store: `sqlite3 .backup` and a copy of the store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks import pipeline
from lesion_tasks.core import db
from lesion_tasks.versions import registry
from lesion_tasks.review import cases as review
from lesion_tasks.review import verdicts
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, prediction_samples, predictions, reviews
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store
from lesion_tasks.ops.synthetic import make_drop
from tools import servers
from tests.helpers import IN_CI, fresh_database, run_cli, shared_config

N_DROP = 300
N_BEFORE = 120  # scored before the backup; the rest after the restore


def _run(cmd: list[str], env: dict | None = None) -> None:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"


def _libpq(url: str) -> str:
    """The SQLAlchemy URL as pg_dump / pg_restore take it (postgresql://user@host:port/db)."""
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _tables(settings: Settings) -> dict[str, list[dict]]:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        out = {t.name: [dict(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns)).mappings()]
               for t in (predictions, prediction_samples, reviews)}
    engine.dispose()
    return out


def _env(settings: Settings) -> dict[str, str]:
    env = {"LESION_HOME": str(settings.home), "LESION_DB_URL": settings.db_url, "LESION_STORE_URL": settings.store_url}
    if settings.s3_endpoint:
        env |= {"LESION_S3_ENDPOINT": settings.s3_endpoint, "LESION_S3_ACCESS_KEY": settings.s3_access_key,
                "LESION_S3_SECRET_KEY": settings.s3_secret_key}
    return env


def _consistent(settings: Settings) -> None:
    out = run_cli("check", env=_env(settings))
    assert out.returncode == 0 and out.stdout.strip().endswith("consistent"), out.stdout + out.stderr[-3000:]


def test_postgres_and_s3_backup_restores_into_a_new_database_and_bucket(postgres, s3_server, pg_url, tmp_path):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3 = {"s3_endpoint": s3_server.endpoint, "s3_access_key": s3_server.access_key, "s3_secret_key": s3_server.secret_key}
    home = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=pg_url, store_url=f"s3://{bucket}/lesion", **s3)
    db.upgrade(home)
    ingest(str(make_drop(tmp_path / "drop", n_images=N_DROP, seed=11)), home)
    trained = pipeline.run(home, shared_config(), run_id="drill")
    version = trained["model_version"]
    engine = db.make_engine(home.db_url)
    if not trained["promoted"]:  # the drill is about the backup, not the gate
        registry.promote(engine, version, "backup drill: a champion to score with", "test", override=True)
    assert scoring.score(home, limit=N_BEFORE, run_id="before-backup")["scored"] == N_BEFORE
    with engine.connect() as conn:
        case = review.queue(conn, review.QueueFilter(status="all"))["cases"][0]
        n_images = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
    first = verdicts.record(engine, case["image_id"], version, "agree", "dr-before")
    engine.dispose()
    original = _tables(home)
    old_keys = {o.key for o in open_store(home).list("")}

    # backup, as documented: the database first, then the objects
    bindir = servers._pg_bindir()
    dump = tmp_path / "lesion.dump"
    _run([bindir / "pg_dump", "-Fc", "-f", dump, "-d", _libpq(home.db_url)])
    rclone = Path(sys.executable).with_name("rclone")
    remote = {"RCLONE_CONFIG_LESION_TYPE": "s3", "RCLONE_CONFIG_LESION_PROVIDER": "Other",
              "RCLONE_CONFIG_LESION_ENDPOINT": s3_server.endpoint, "RCLONE_CONFIG_LESION_ACCESS_KEY_ID": s3_server.access_key,
              "RCLONE_CONFIG_LESION_SECRET_ACCESS_KEY": s3_server.secret_key}
    backup_bucket, new_bucket = f"{bucket}-backup", f"{bucket}-restored"
    _run([rclone if rclone.exists() else "rclone", "sync", f"lesion:{bucket}", f"lesion:{backup_bucket}"], remote)

    # restore into a new database and a new bucket
    with fresh_database(postgres) as new_url:
        _run([bindir / "pg_restore", "--no-owner", "-d", _libpq(new_url), dump])
        _run([rclone if rclone.exists() else "rclone", "sync", f"lesion:{backup_bucket}", f"lesion:{new_bucket}"], remote)
        restored = Settings.from_env({"LESION_HOME": str(tmp_path / "restored-home")}, db_url=new_url,
                                     store_url=f"s3://{new_bucket}/lesion", **s3)
        assert db.upgrade(restored) == db.current_revision(home.db_url)  # at head already: nothing to migrate
        _consistent(restored)
        assert _tables(restored) == original
        assert {o.key for o in open_store(restored).list("")} == old_keys

        rest = scoring.score(restored, run_id="after-restore")
        assert (rest["model_version"], rest["scored"], rest["skipped"]) == (version, n_images - N_BEFORE, N_BEFORE)
        engine = db.make_engine(restored.db_url)
        with engine.connect() as conn:
            new_overlays = conn.scalars(sa.select(predictions.c.gradcam_uri).where(predictions.c.run_id == "after-restore")).all()
            queue = review.queue(conn, review.QueueFilter())
        assert len(new_overlays) == rest["scored"]
        new_store = open_store(restored)
        assert all(new_store.exists(k) for k in new_overlays)
        assert not set(new_overlays) & old_keys and not any(open_store(home).exists(k) for k in new_overlays[:20])
        assert queue["model_version"] == version and queue["total"] > 0
        verdict = verdicts.record(engine, queue["cases"][0]["image_id"], version, "disagree", "dr-after")
        engine.dispose()
        assert verdict["id"] > first["id"]  # the sequence came back with the rows
        _consistent(restored)
    assert _tables(home) == original  # the original home was only read


def test_sqlite_and_local_store_backup_restores_into_a_new_home(trained_home, tmp_path):
    sqlite3 = shutil.which("sqlite3")
    if not sqlite3:
        (pytest.fail if IN_CI else pytest.skip)("the sqlite3 command-line shell is not installed (apt install sqlite3)")
    source = trained_home.settings
    backup, new_home = tmp_path / "backup", tmp_path / "new-home"
    backup.mkdir()
    _run([sqlite3, source.home / "lesion.db", f".backup '{backup / 'lesion.db'}'"])
    _run(["cp", "-a", source.home / "store", backup / "store"])
    new_home.mkdir()
    _run(["cp", backup / "lesion.db", new_home / "lesion.db"])
    _run(["cp", "-a", backup / "store", new_home / "store"])
    restored = Settings.from_env({"LESION_HOME": str(new_home)})
    _consistent(restored)
    assert _tables(restored) == _tables(source)
    engine = db.make_engine(restored.db_url)
    with engine.connect() as conn:
        case = review.queue(conn, review.QueueFilter())["cases"][0]
    assert verdicts.record(engine, case["image_id"], trained_home.version, "agree", "dr-restored")["reviewer"] == "dr-restored"
    engine.dispose()
