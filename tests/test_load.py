"""Load: ingest a 5,000-image drop and score 20,000 small images with bounded memory (peak RSS of
20,000 against 2,000, separate processes). Throughputs go to docs/reliability.md.

On a copy of the session's trained home (its champion; its predictions removed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import prediction_samples, predictions
from tests import reliability
from tests.conftest import N_IMAGES
from tests.imagegen import unlabelled_drop

CHILD = """
import json, resource, sys
from lesion_tasks.scoring.nightly import score_range
from lesion_tasks.core.settings import Settings
r = score_range(Settings.from_env(), limit=int(sys.argv[1]), run_id=sys.argv[2])
print(json.dumps({"scored": r["scored"], "seconds": r["seconds"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _score_child(settings, limit: int, run_id: str) -> dict:
    env = {**os.environ, "LESION_HOME": str(settings.home)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(limit), run_id], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ingest_5000_and_score_20000_with_bounded_memory(home_copy, tmp_path):
    settings = home_copy
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:  # all 20,000 images scored by the two processes below
        conn.execute(prediction_samples.delete())
        conn.execute(predictions.delete())
    engine.dispose()

    five = unlabelled_drop(tmp_path / "five", 5_000, 1)
    started = time.monotonic()
    first = ingest(str(five), settings)
    ingest_rate = first.accepted / (time.monotonic() - started)
    assert first.accepted == 5_000
    ingest(str(unlabelled_drop(tmp_path / "more", 15_000 - N_IMAGES, 2)), settings)  # N_IMAGES + 5,000 + the rest = 20,000

    small = _score_child(settings, 2_000, "load-2k")
    big = _score_child(settings, 18_000, "load-18k")  # the rest: 20,000 scored in all
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
    engine.dispose()
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"ingest {ingest_rate:.0f} images/s; scoring 2k {small}, 18k {big}, RSS ratio {ratio:.3f}")
    assert total == 20_000
    assert ratio <= 1.2, (small, big)
    reliability.record("Load: 5,000-image drop, 20,000 images scored",
                       "tiny backbone, 48 px images, SQLite + local store, scoring in two processes (2,000 then 18,000)",
                       "bounded memory: peak RSS ratio <= 1.2", f"ingest {ingest_rate:.0f} images/s; scoring "
                       f"{small['scored'] / small['seconds']:.0f} / {big['scored'] / big['seconds']:.0f} images/s; peak RSS "
                       f"{small['peak_rss_mb']:.0f} MB vs {big['peak_rss_mb']:.0f} MB (ratio {ratio:.2f})", 20_000 - total, 0)
