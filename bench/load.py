"""Load at full scale (what tests/integration/test_load.py checks small): ingest a 5,000-image drop and score
20,000 small images with bounded memory, peak RSS of a process scoring 18,000 against one scoring 2,000.

A fresh home: a synthetic labelled drop, a tiny model trained and promoted, then the unlabelled images.
Prints one JSON object: ingest images/s, scoring images/s of both processes, peak RSS and their ratio
(target <= 1.2).

    python bench/load.py [--ingest 5000] [--score 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks import pipeline
from lesion_tasks.model.config import make_config
from lesion_tasks.core import db  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.versions import registry  # noqa: E402
from lesion_tasks.ops.synthetic import make_drop  # noqa: E402

CHILD = """
import json, resource, sys
from lesion_tasks.scoring.nightly import score_range
from lesion_tasks.core.settings import Settings
r = score_range(Settings.from_env(), limit=int(sys.argv[1]), run_id=sys.argv[2])
print(json.dumps({"scored": r["scored"], "seconds": r["seconds"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def unlabelled(root: Path, n: int, seed: int) -> Path:
    """n small distinct 48 px images, no metadata."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (48, 48, 3), dtype=np.uint8)
    for i in range(n):
        arr = base.copy()
        arr[i % 48, :, :] = rng.integers(0, 255, (48, 3), dtype=np.uint8)
        arr[:, (i // 48) % 48, 0] = (i * 7) % 255
        Image.fromarray(arr).save(root / f"ISIC_L{seed}{i:06d}.png", compress_level=1)
    return root


def score_child(home: Path, limit: int, run_id: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(limit), run_id], env={**os.environ, "LESION_HOME": str(home)},
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", type=int, default=5_000, help="images in the timed drop")
    parser.add_argument("--score", type=int, default=20_000, help="images scored in all (a tenth by the first process)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        settings = Settings.from_env({"LESION_HOME": str(home)})
        db.upgrade(settings)
        labelled = ingest(str(make_drop(Path(tmp) / "labelled", n_images=300, seed=11)), settings).accepted
        config = make_config("demo", backbone="tiny", image_size=64, weights="none", effective_resolution=48,
                                     floors=registry.GateFloors(min_melanomas=5), epochs=150, views=2, bootstrap=200,
                                     target_sensitivity=0.97, seed=1)
        trained = pipeline.run(settings, config, run_id="load")
        started = time.monotonic()
        first = ingest(str(unlabelled(Path(tmp) / "timed", args.ingest, 1)), settings)
        ingest_seconds = time.monotonic() - started
        ingest(str(unlabelled(Path(tmp) / "more", args.score - labelled - first.accepted, 2)), settings)
        small = score_child(home, args.score // 10, "load-small")
        big = score_child(home, args.score - args.score // 10, "load-big")
    print(json.dumps({
        "champion_promoted": trained["promoted"],
        "ingest": {"images": first.accepted, "images_per_s": round(first.accepted / ingest_seconds, 1)},
        "score_small": small, "score_big": big,
        "scoring_images_per_s": [round(r["scored"] / r["seconds"], 1) for r in (small, big)],
        "peak_rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3), "target_peak_rss_ratio": 1.2,
    }, indent=1))


if __name__ == "__main__":
    main()
