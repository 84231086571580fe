"""Ingestion throughput on the real ISIC 2017 drop (2,358 images), printed as JSON.

    .venv/bin/python bench/ingest_throughput.py [--data DIR] [--workers N]

End to end (read, sha256, decode, validate, normalise, perceptual hash, two store writes, SQLite
rows) into a fresh LESION_HOME, plus a per-stage CPU profile of 300 images in the same run, to say
what bounds it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks.core import db
from lesion_tasks.ingest.images import inspect_image  # noqa: E402
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.ingest.sources import Limits  # noqa: E402
from lesion_tasks.core.store import LocalStore  # noqa: E402


def _stages(files: list[Path], store_root: Path) -> dict[str, float]:
    store = LocalStore(store_root)
    t = {"read_ms": 0.0, "sha256_ms": 0.0, "decode_validate_normalize_ms": 0.0, "store_writes_ms": 0.0}
    for i, path in enumerate(files):
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        result = inspect_image(data, Limits(), 224)
        t3 = time.perf_counter()
        store.put(f"s/{i}.jpg", data)
        store.put(f"n/{i}.jpg", result.normalized)
        t4 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k] += v * 1000
    return {k: round(v / len(files), 3) for k, v in t.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=os.environ.get("LESION_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    drop = Path(args.data) / "isic2017-mel-nv"
    if not drop.is_dir():
        raise SystemExit(f"ISIC 2017 drop not found at {drop} (pass --data or set LESION_DATA_DIR)")
    with tempfile.TemporaryDirectory(prefix="lesion-bench-") as tmp:
        settings = Settings.from_env({"LESION_HOME": tmp})
        db.upgrade(settings)
        t0 = time.perf_counter()
        result = ingest(str(drop), settings, workers=args.workers)
        wall = time.perf_counter() - t0
        uda = Path(args.data) / "isic-archive-uda1-sample"
        full_res = None
        if uda.is_dir():  # full-resolution originals (up to 3072x2304): decode cost dominates
            t0 = time.perf_counter()
            n = ingest(str(uda), settings, workers=args.workers).accepted
            full_res = {"images": n, "wall_s": round(time.perf_counter() - t0, 2),
                        "images_per_s": round(n / (time.perf_counter() - t0), 1)}
        sample = sorted((drop / "images").glob("*.jpg"))[:300]
        stages = _stages(sample, Path(tmp) / "stages")
    per_image_ms = sum(stages.values())
    print(json.dumps({
        "benchmark": "ingest_throughput",
        "drop": str(drop),
        "images": result.accepted,
        "quarantined": result.quarantined,
        "wall_s": round(wall, 2),
        "images_per_s": round(result.accepted / wall, 1),
        "cpus": os.cpu_count(),
        "single_thread_stage_ms_per_image": stages,
        "single_thread_bound_images_per_s": round(1000 / per_image_ms, 1),
        "target_images_per_s": 150,
        "full_resolution_uda1": full_res,
    }, indent=1))


if __name__ == "__main__":
    main()
