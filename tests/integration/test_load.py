"""Load, small: ingest a 1,000-image drop and score 4,000 small images with bounded memory (peak RSS of
3,600 against 400, separate processes). Throughputs go to docs/reliability.md. The full scale (5,000
ingested, 20,000 scored) is `bench/load.py`.

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
from tests.helpers import N_IMAGES
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


def test_ingest_1000_and_score_4000_with_bounded_memory(home_copy, tmp_path):
    settings = home_copy
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:  # all 4,000 images scored by the two processes below
        conn.execute(prediction_samples.delete())
        conn.execute(predictions.delete())
    engine.dispose()

    first_drop = unlabelled_drop(tmp_path / "first", 1_000, 1)
    started = time.monotonic()
    first = ingest(str(first_drop), settings)
    ingest_rate = first.accepted / (time.monotonic() - started)
    assert first.accepted == 1_000
    ingest(str(unlabelled_drop(tmp_path / "more", 3_000 - N_IMAGES, 2)), settings)  # N_IMAGES + 1,000 + the rest = 4,000

    small = _score_child(settings, 400, "load-400")
    big = _score_child(settings, 3_600, "load-3600")  # the rest: 4,000 scored in all
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
    engine.dispose()
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"ingest {ingest_rate:.0f} images/s; scoring 400 {small}, 3,600 {big}, RSS ratio {ratio:.3f}")
    assert total == 4_000
    assert ratio <= 1.2, (small, big)
    reliability.record("Load: 1,000-image drop, 4,000 images scored (bench/load.py: 5,000 and 20,000)",
                       "tiny backbone, 48 px images, SQLite + local store, scoring in two processes (400 then 3,600)",
                       "bounded memory: peak RSS ratio <= 1.2", f"ingest {ingest_rate:.0f} images/s; scoring "
                       f"{small['scored'] / small['seconds']:.0f} / {big['scored'] / big['seconds']:.0f} images/s; peak RSS "
                       f"{small['peak_rss_mb']:.0f} MB vs {big['peak_rss_mb']:.0f} MB (ratio {ratio:.2f})", 4_000 - total, 0)
