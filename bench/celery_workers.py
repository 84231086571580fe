"""Nightly scoring on Celery workers: images per second with 1 and 2 workers on this machine, and the
per-image costs the README's 100,000-images-a-night estimate is computed from. Prints JSON.

    .venv/bin/python bench/celery_workers.py [--images 3000] [--shard-size 500] [--rounds 1]

Starts everything itself, as the live Celery test does (tools/celery_cluster.py): a PostgreSQL cluster,
the S3 server (rclone), Redis, and Airflow (api-server, scheduler, dag-processor) with N
`airflow celery worker`s using docker/airflow-workers.env; the pool lesion_tensorflow gets N slots.
A demo-profile model (MobileNet 0.25 multi-scale, 224 px, effective resolution 84 px; random weights:
the cost does not depend on them) is trained on a small labelled drop and made champion; then
`lesion_nightly_score` scores an unlabelled drop of --images images (S3 reads, Grad-CAM overlays to S3,
PostgreSQL upserts), once per worker count, alternating, predictions and overlays removed in between.
Also measured in this process: `score_range` end to end and the plain backbone pass (demo model), and
the plain ResNet101V2 pass at 224 px (the paper profile's backbone).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from lesion_tasks import pipeline
from lesion_tasks.model.config import make_config
from lesion_tasks.model import backbones
from lesion_tasks.core import db
from lesion_tasks.versions import registry
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.core.schema import prediction_samples, predictions  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402
from lesion_tasks.ops.synthetic import make_drop  # noqa: E402
from tools import celery_cluster, servers  # noqa: E402

NIGHT_SECONDS = 4 * 3600
NIGHT_IMAGES = 100_000


def _reset(settings: Settings, version: str) -> None:
    """Remove a model version's predictions and overlays: the next run scores every image again."""
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(prediction_samples.delete().where(prediction_samples.c.model_version == version))
        conn.execute(predictions.delete().where(predictions.c.model_version == version))
    engine.dispose()
    store = open_store(settings)
    for info in list(store.list(f"predictions/{version}/")):
        store.delete(info.key)


def _plain_backbone_seconds_per_image(name: str, size: int, n: int = 64) -> float:
    """Seconds per image of the compiled backbone pass alone (batches of 32, after a warm-up batch)."""
    import tensorflow as tf

    weights = backbones.resolve_weights("none", backbones.get_backbone(name), None)
    model = backbones.feature_model(name, size, weights)
    fn = tf.function(lambda x: model(x, training=False))
    batch = tf.constant(backbones.preprocess(np.random.default_rng(0).integers(0, 255, (32, size, size, 3)).astype(np.uint8)))
    fn(batch)
    started = time.perf_counter()
    for _ in range(n // 32):
        fn(batch)
    return (time.perf_counter() - started) / (n // 32 * 32)


def _cluster_run(tmp: Path, settings: Settings, pg_url: str, redis_url: str, workers: int, shard_size: int) -> dict:
    names = tuple(f"w{k + 1}" for k in range(workers))
    with celery_cluster.start(tmp / f"cluster-{workers}-{uuid.uuid4().hex[:6]}", settings, pg_url, redis_url, names,
                              pool_slots=workers) as cluster:
        session = cluster.session()
        run_url = cluster.trigger(session, "lesion_nightly_score", {"shard_size": shard_size})
        run = cluster.finish(session, run_url, timeout=3600)
        tis = session.get(f"{run_url}/taskInstances", timeout=10).json()["task_instances"]
    if run["state"] != "success":
        raise RuntimeError(f"run with {workers} worker(s) ended {run['state']}: {[(t['task_id'], t['state']) for t in tis]}")
    shards = [t for t in tis if t["task_id"] == "score_shard"]
    first = min(datetime.fromisoformat(t["start_date"]) for t in shards)
    last = max(datetime.fromisoformat(t["end_date"]) for t in shards)
    busy = sum((datetime.fromisoformat(t["end_date"]) - datetime.fromisoformat(t["start_date"])).total_seconds() for t in shards)
    return {"workers": workers, "shards": len(shards), "hosts": sorted({t["hostname"] for t in shards}),
            "scoring_seconds": round((last - first).total_seconds(), 1), "shard_busy_seconds": round(busy, 1),
            "run_seconds": round((datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])).total_seconds(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="lesion-bench-celery-"))
    pg, s3, redis = servers.start_postgres(), servers.start_s3(), servers.start_redis()
    try:
        settings = Settings.from_env({"LESION_HOME": str(tmp / "home")},
                                     db_url=celery_cluster.create_database(pg.url, "lesion_bench"),
                                     store_url="s3://lesion-bench/lesion", s3_endpoint=s3.endpoint,
                                     s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
        db.upgrade(settings)
        print(f"ingesting 300 labelled + {args.images} unlabelled images", file=sys.stderr)
        ingest(str(make_drop(tmp / "labelled", n_images=300, seed=11)), settings)
        night = make_drop(tmp / "night", n_images=args.images, seed=42)
        (night / "metadata.csv").unlink()
        ingest(str(night), settings)
        config = make_config("demo", weights="none", epochs=20, bootstrap=0)
        trained = pipeline.run(settings, config, run_id="bench")
        version = trained["model_version"]
        engine = db.make_engine(settings.db_url)
        registry.promote(engine, version, "benchmark: cost does not depend on the weights", "bench", override=True)
        engine.dispose()
        n_total = 300 + args.images

        print("in-process reference: score_range end to end", file=sys.stderr)
        _reset(settings, version)
        result = scoring.score_range(settings, version)
        in_process = result["scored"] / result["seconds"]
        runs = []
        for _ in range(args.rounds):
            for workers in (1, 2):
                print(f"cluster with {workers} worker(s)", file=sys.stderr)
                _reset(settings, version)
                run = _cluster_run(tmp, settings, pg.url, redis.url, workers, args.shard_size)
                run["images_per_s"] = round(n_total / run["scoring_seconds"], 1)
                runs.append(run)
        plain_demo = _plain_backbone_seconds_per_image(config.backbone, config.image_size)
        plain_paper = _plain_backbone_seconds_per_image("resnet101v2", 224)
    finally:
        redis.stop()
        s3.stop()
        pg.stop()

    one = [r for r in runs if r["workers"] == 1]
    two = [r for r in runs if r["workers"] == 2]
    # Cost model, from this run: a shard costs a start-up (task process, TensorFlow import, model load)
    # plus, per image, the backbone pass and what the pipeline adds to it (store reads, MC dropout,
    # Grad-CAM PNG, S3 writes, upserts). Both additions are measured on the demo model and carried over
    # to ResNet101V2, whose backbone pass is measured alone.
    e2e = 1 / in_process
    per_image_overhead = e2e - plain_demo
    slowest = max(one, key=lambda r: r["shard_busy_seconds"])
    shard_startup = max(0.0, slowest["shard_busy_seconds"] / slowest["shards"] - n_total / slowest["shards"] * e2e)

    def per_worker(plain: float, shard: int = 512) -> float:  # images/s of one worker at the DAG's default shard size
        return shard / (shard_startup + shard * (plain + per_image_overhead))

    def workers_needed(rate: float) -> int:
        return math.ceil(NIGHT_IMAGES / (rate * NIGHT_SECONDS))

    demo, paper = per_worker(plain_demo), per_worker(plain_paper)
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "note": "the workers share these cores: 2 workers on one machine are CPU-bound"},
        "images": n_total, "shard_size": args.shard_size, "runs": runs,
        "images_per_s": {"1_worker": [r["images_per_s"] for r in one], "2_workers": [r["images_per_s"] for r in two],
                         "2_over_1": [round(b["images_per_s"] / a["images_per_s"], 2) for a, b in zip(one, two)]},
        "per_image_seconds": {"demo_in_process_end_to_end": round(e2e, 5), "demo_plain_backbone": round(plain_demo, 5),
                              "pipeline_overhead": round(per_image_overhead, 5),
                              "paper_plain_backbone_resnet101v2_224": round(plain_paper, 5)},
        "shard_startup_seconds": round(shard_startup, 1),
        "estimate_100k_in_4h": {
            "worker": "one worker = one machine like this one (2 cores), worker_concurrency 1, shards of 512",
            "demo": {"images_per_s_per_worker": round(demo, 1), "workers": workers_needed(demo)},
            "paper": {"images_per_s_per_worker": round(paper, 2), "workers": workers_needed(paper)},
        },
    }, indent=1))


if __name__ == "__main__":
    main()
