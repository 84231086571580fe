"""A crash mid-drop (SIGKILL of the real CLI) followed by a rerun ends in the same state as one
clean run: same rows, same objects, same bytes."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from lesion_tasks.core.schema import drops, images, quarantine
from lesion_tasks.ops.synthetic import make_drop
from tests import reliability
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
VOLATILE = {"ingested_at", "quarantined_at", "started_at", "finished_at", "id"}


def _state(home: Path) -> dict:
    engine = sa.create_engine(f"sqlite:///{home / 'lesion.db'}")
    out = {}
    with engine.connect() as conn:
        for table, key in ((drops, "drop_id"), (images, "image_id"), (quarantine, "entry")):
            rows = conn.execute(sa.select(table).order_by(table.c[key])).mappings().all()
            out[table.name] = [{k: (v.replace(str(home), "HOME") if isinstance(v, str) else v)
                                for k, v in r.items() if k not in VOLATILE} for r in rows]
    engine.dispose()
    store = home / "store"
    out["objects"] = {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(store.rglob("*")) if p.is_file()}
    return out


def _count_images(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_crash_mid_drop_then_rerun_equals_clean_run(tmp_path):
    drop = make_drop(tmp_path / "night", n_images=1500, seed=3, size=128)
    (drop / "ISIC_9039998.jpg").write_bytes(b"not an image")
    (drop / "ISIC_9039999.jpg").write_bytes((drop / "ISIC_9030000.jpg").read_bytes())  # a duplicate

    clean = tmp_path / "clean"
    assert run_cli("ingest", str(drop), env={"LESION_HOME": str(clean)}).returncode == 0

    crashed = tmp_path / "crashed"
    assert run_cli("db", "upgrade", env={"LESION_HOME": str(crashed)}).returncode == 0
    # SIGKILL right after the 5th recorded batch of rows (aux, rows without images, then 3 batches of 64 images)
    proc = subprocess.run([sys.executable, "-m", "tests.crash", "lesion_tasks.ingest.drop:_DropIngestion._record", "5",
                           "ingest", str(drop)], env={**os.environ, "LESION_HOME": str(crashed)}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = _count_images(crashed / "lesion.db")
    assert partial == 3 * 64, f"the kill should land after 3 batches (had {partial} images)"

    rerun = run_cli("ingest", str(drop), "--json", env={"LESION_HOME": str(crashed)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _state(crashed) == _state(clean)
    reliability.record("Ingestion process killed mid-drop", "SIGKILL of `lesion ingest` (injected) after 192 of 1,502 images, then rerun",
                       "same rows and objects as one clean run", "DB rows and every object byte-identical", 0, 0)
