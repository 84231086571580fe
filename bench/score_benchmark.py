"""Nightly scoring benchmark on ResNet101V2 (random weights) with real ISIC images, printed as JSON.

    .venv/bin/python bench/score_benchmark.py [--data DIR] [--images 64] [--naive-images 4]
                                               [--rss 200,2000] [--e2e 200] [--backbone resnet101v2]

(a) speedup of the scoring path (one compiled backbone pass per batch, head-only MC dropout with
    T=50, Grad-CAM from the head's gradient) over the naive loop (per image: T full-model predictions
    with the same dropout masks, then a GradientTape Grad-CAM through the whole model);
(b) scoring cost over plain backbone inference (pooled features only) on the same images;
(c) peak RSS of `score_range` on 2,000 images over 200 (separate processes);
(d) end-to-end images/s with S3 reads/writes (rclone serve s3) and PostgreSQL upserts.
All ratios are measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

T = 50


def _images(data: Path, n: int, size: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    paths = sorted((data / "isic2017-mel-nv" / "images").glob("*.jpg"))[:n]
    rgb = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for p in paths])
    return rgb, [p.stem for p in paths]


def _model(backbone: str, size: int):
    """A full model with random (seeded) weights and a head with non-trivial BatchNorm statistics."""
    from lesion_tasks import backbones

    weights = backbones.resolve_weights("none", backbones.get_backbone(backbone), None)
    model = backbones.build_model(backbone, size, weights, dropout=0.5, seed=0)
    rng = np.random.default_rng(0)
    model.get_layer("head_bn").set_weights([rng.uniform(0.5, 2, 128), rng.normal(0, .5, 128),
                                            rng.normal(0, .5, 128), rng.uniform(0.5, 2, 128)])
    return model


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def compute_ratios(data: Path, backbone: str, n_images: int, n_naive: int) -> dict:
    import keras
    import tensorflow as tf

    from lesion_tasks import backbones, gradcam, mc, scoring

    size = backbones.get_backbone(backbone).default_size
    rgb, ids = _images(data, n_images, size)
    x = backbones.preprocess(rgb)
    model = _model(backbone, size)
    last = backbones.get_backbone(backbone).last_activation
    head = mc.HeadWeights.from_model(model)
    version = "bench"

    # scoring path: exactly what lesion_tasks.scoring runs per batch
    cut = keras.Model(model.input, [model.get_layer(last).output, model.get_layer("head_gap").output])
    cut_fn = tf.function(lambda b: cut(b, training=False), reduce_retracing=True)

    def run_backbone(batch):
        n = len(batch)
        if n < scoring.BATCH:
            batch = np.concatenate([batch, np.zeros((scoring.BATCH - n, *batch.shape[1:]), np.float32)])
        a, p = cut_fn(tf.constant(batch))
        return a.numpy()[:n], p.numpy()[:n]

    smodel = scoring.ScoringModel({"model_version": version, "threshold": 0.5}, head, run_backbone)

    def fast_all():
        return [scoring.score_batch(smodel, rgb[i:i + scoring.BATCH], ids[i:i + scoring.BATCH], T)
                for i in range(0, n_images, scoring.BATCH)]

    # plain backbone inference: pooled features only, same batches, same compilation
    pooled_model = keras.Model(model.input, model.get_layer("head_gap").output)
    pooled_fn = tf.function(lambda b: pooled_model(b, training=False), reduce_retracing=True)

    def plain_all():
        out = []
        for i in range(0, n_images, scoring.BATCH):
            batch = x[i:i + scoring.BATCH]
            if len(batch) < scoring.BATCH:
                batch = np.concatenate([batch, np.zeros((scoring.BATCH - len(batch), *batch.shape[1:]), np.float32)])
            out.append(pooled_fn(tf.constant(batch)).numpy())
        return out

    fast_all(), plain_all()  # trace and warm both
    fast_s = min(_timed(fast_all)[1] for _ in range(2))
    plain_s = min(_timed(plain_all)[1] for _ in range(2))

    # overlays (drawn on 1024-px-bounded originals and PNG-encoded), for the "encoding must not dominate" check
    from PIL import Image

    heat = fast_all()[0][4]
    originals = [Image.fromarray(r) for r in rgb[: len(heat)]]
    _, overlay_s = _timed(lambda: [gradcam.png_bytes(gradcam.overlay(o, h)) for o, h in zip(originals, heat)])

    # naive loop: per image, T full-model predictions with the same masks + a tape Grad-CAM
    to_bn = keras.Model(model.input, model.get_layer("head_bn").output)
    to_bn_fn = tf.function(lambda b: to_bn(b, training=False), reduce_retracing=True)
    out_layer = model.get_layer("head_out")
    masks = mc.dropout_masks(ids[:n_naive], version, T, backbones.HEAD_UNITS, head.dropout)

    def naive(k):
        one = tf.constant(x[k:k + 1])
        samples = [out_layer(to_bn_fn(one).numpy() * masks[k, t][None]).numpy()[0, mc.MEL] for t in range(T)]
        p = float(np.mean(samples))
        cam = gradcam.gradcam_tape(model, last, x[k:k + 1], np.array([int(p >= 0.5)]))
        return samples, cam

    naive(0)  # trace
    naive_s = sum(_timed(naive, k)[1] for k in range(n_naive))
    return {
        "backbone": backbone, "images": n_images, "mc_samples": T,
        "scoring_s_per_image": round(fast_s / n_images, 4),
        "plain_backbone_s_per_image": round(plain_s / n_images, 4),
        "naive_s_per_image": round(naive_s / n_naive, 4), "naive_images_timed": n_naive,
        "a_speedup_vs_naive": round((naive_s / n_naive) / (fast_s / n_images), 1),
        "b_scoring_over_plain_backbone": round(fast_s / plain_s, 3),
        "overlay_png_s_per_image": round(overlay_s / len(heat), 4),
        "b_with_overlays_over_plain_backbone": round((fast_s + overlay_s / len(heat) * n_images) / plain_s, 3),
    }


def _register_untrained(settings, backbone: str) -> str:
    """A registry row + artifacts for a random-weights model: the benchmark needs a champion, not a good one."""
    from dataclasses import asdict
    from datetime import UTC, datetime

    from lesion_tasks import backbones, db, mc, registry
    from lesion_tasks.schema import model_versions
    from lesion_tasks.store import open_store

    store = open_store(settings)
    size = backbones.get_backbone(backbone).default_size
    model = _model(backbone, size)
    version = f"bench-{backbone}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        model_uri = store.put(f"models/{version}/model.keras", path.read_bytes())
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in asdict(mc.HeadWeights.from_model(model)).items()})
    store.put(f"models/{version}/head.npz", buf.getvalue())
    engine = db.engine_for(settings)
    with engine.begin() as conn:
        conn.execute(model_versions.insert().values(
            model_version=version, created_at=datetime.now(UTC), status="candidate", profile="bench", backbone=backbone,
            image_size=size, threshold=0.5, mc_samples=T, config={"last_activation": backbones.get_backbone(backbone).last_activation},
            environment={}, weights_source="random initialisation (benchmark)", lineage={}, model_uri=model_uri,
            review_rule={"predicted_mel": True, "entropy_above": 0.6, "p_mel_band": [0.45, 0.55]}, code_version="bench",
            run_id="bench"))
    registry.promote(engine, version, "benchmark", "bench")
    engine.dispose()
    return version


def _prepare_home(data: Path, home: Path, backbone: str, **settings_kw):
    from lesion_tasks import db
    from lesion_tasks.ingest import ingest
    from lesion_tasks.settings import Settings

    settings = Settings.from_env({"LESION_HOME": str(home)}, **settings_kw)
    db.upgrade(settings)
    ingest(str(data / "isic2017-mel-nv"), settings)
    _register_untrained(settings, backbone)
    return settings


def child_rss(home: str, limit: int) -> None:
    """Runs in its own process: score `limit` images, print peak RSS."""
    from lesion_tasks.scoring import score_range
    from lesion_tasks.settings import Settings

    result = score_range(Settings.from_env({"LESION_HOME": home}), limit=limit, run_id=f"rss-{limit}")
    print(json.dumps({"images": result["scored"], "seconds": result["seconds"],
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def rss_ratio(data: Path, backbone: str, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="lesion-rss-") as tmp:
            _prepare_home(data, Path(tmp), backbone)
            proc = subprocess.run([sys.executable, __file__, "--child-rss", tmp, "--limit", str(n)],
                                  capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            out[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, big = (out[str(n)] for n in sizes)
    return {"runs": out, "c_peak_rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)}


def end_to_end(data: Path, backbone: str, n: int) -> dict:
    from tests import servers

    from lesion_tasks.scoring import score_range

    pg, s3 = servers.start_postgres(), servers.start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="lesion-e2e-") as tmp:
            settings = _prepare_home(data, Path(tmp), backbone, db_url=pg.url, store_url="s3://bench/lesion",
                                     s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
            started = time.perf_counter()
            result = score_range(settings, limit=n, run_id="e2e")
            wall = time.perf_counter() - started
    finally:
        pg.stop()
        s3.stop()
    return {"images": result["scored"], "wall_s": round(wall, 1), "d_images_per_s": round(result["scored"] / wall, 2),
            "includes": "model load, S3 reads of normalised copies and originals, overlay PNG writes to S3, Postgres upserts"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=os.environ.get("LESION_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--backbone", default="resnet101v2")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--naive-images", type=int, default=4)
    parser.add_argument("--rss", default="200,2000", help="two image counts for the peak-RSS ratio ('' to skip)")
    parser.add_argument("--e2e", type=int, default=200, help="images for the end-to-end run (0 to skip)")
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        child_rss(args.child_rss, args.limit)
        return
    data = Path(args.data)
    if not (data / "isic2017-mel-nv").is_dir():
        raise SystemExit(f"ISIC data not found at {data} (pass --data or set LESION_DATA_DIR)")
    result = {"benchmark": "nightly_scoring", "cpus": os.cpu_count(),
              "targets": {"a_speedup_vs_naive": ">= 25", "b_scoring_over_plain_backbone": "<= 1.25", "c_peak_rss_ratio": "<= 1.2"}}
    result.update(compute_ratios(data, args.backbone, args.images, args.naive_images))
    print(json.dumps(result), file=sys.stderr, flush=True)
    if args.rss:
        result.update(rss_ratio(data, args.backbone, [int(n) for n in args.rss.split(",")]))
        print(json.dumps(result), file=sys.stderr, flush=True)
    if args.e2e:
        result["end_to_end"] = end_to_end(data, args.backbone, args.e2e)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
