"""Retraining, step by step: split -> train -> evaluate -> gate. The CLI runs all four in a row
(`run`); the DAG `lesion_retrain` runs them as tasks, passing only the model version between them.

A model version's id derives from the run id, so a retried task overwrites its own artifacts and
rows instead of creating a second version.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks import backbones, evaluation, features, mc, registry, report, review, splits
from lesion_tasks.db import engine_for, insert_ignore
from lesion_tasks.ingest import slug
from lesion_tasks.schema import images, model_versions, splits as splits_table
from lesion_tasks.settings import Settings
from lesion_tasks.store import ObjectStore, key_of, open_store

log = logging.getLogger(__name__)
MIN_REVIEW_ENTROPY = 0.2


@dataclass(frozen=True)
class TrainConfig:
    profile: str = "demo"
    backbone: str = "mobilenet025_multiscale"
    image_size: int = 224
    weights: str = "imagenet"
    epochs: int = 200
    seed: int = 0
    dropout: float = 0.5
    views: int = 8  # augmentation views per training image (view 0 = as is)
    mc_samples: int = 50
    target_sensitivity: float = 0.85
    learning_rate: float = 1e-3
    bootstrap: int = 1000
    # demo only: when ImageNet weights are unavailable, train from random initialisation, loudly
    random_init_fallback: bool = True
    floors: registry.GateFloors = registry.GateFloors()


PROFILES: dict[str, TrainConfig] = {
    # what learns on a 2-core CPU in minutes: frozen multi-scale MobileNet features, cached
    "demo": TrainConfig(),
    # the paper: ResNet101V2, ImageNet, 224 px, frozen backbone, the Table II head
    "paper": TrainConfig(profile="paper", backbone="resnet101v2", epochs=100, views=2, random_init_fallback=False),
}


def make_config(profile: str = "demo", **overrides: Any) -> TrainConfig:
    """The profile's defaults with the non-None overrides applied, validated."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: expected one of {sorted(PROFILES)}")
    config = replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})
    backbones.get_backbone(config.backbone)
    checks = {"epochs": config.epochs >= 1, "image_size": 32 <= config.image_size <= 1024, "views": config.views >= 1,
              "mc_samples": config.mc_samples >= 2, "dropout": 0 < config.dropout < 1,
              "target_sensitivity": 0 < config.target_sensitivity <= 1}
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{name}={getattr(config, name)!r} is out of range")
    return config


def model_version_id(run_id: str, config: TrainConfig) -> str:
    return slug(f"{config.profile}-{config.backbone}-{run_id}")[:128]


def _environment() -> dict[str, Any]:
    """The paper's Table I, for this run: library versions and devices."""
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "devices": [d.name + ":" + d.device_type for d in tf.config.list_physical_devices()],
    }


def _code_version() -> str:
    from lesion_tasks import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _split_refs(conn: sa.Connection, reviewed: dict[str, str] | None = None
                ) -> dict[str, tuple[list[features.ImageRef], np.ndarray]]:
    """Images and labels per split: the ISIC label, or where ISIC gave none the latest reviewer label
    (`reviewed`, default review.training_labels); images whose label is neither MEL nor NV (any more)
    are left out."""
    reviewed = review.training_labels(conn)["labels"] if reviewed is None else reviewed
    rows = conn.execute(
        sa.select(images.c.image_id, images.c.drop_id, images.c.normalized_uri, images.c.label, splits_table.c.split)
        .join(splits_table, splits_table.c.image_id == images.c.image_id).order_by(images.c.image_id)).all()
    out = {}
    for split in ("train", "val", "test"):
        part = [(r, r.label or reviewed.get(r.image_id)) for r in rows if r.split == split]
        part = [(r, label) for r, label in part if label in ("MEL", "NV")]
        out[split] = ([features.ImageRef(r.image_id, r.drop_id, r.normalized_uri) for r, _ in part],
                      np.array([1 if label == "MEL" else 0 for _, label in part], np.int64))
    return out


def _weights(config: TrainConfig, settings: Settings, store: ObjectStore) -> backbones.ResolvedWeights:
    """The weights file for the run; only the demo profile falls back (loudly) to random initialisation."""
    spec = backbones.get_backbone(config.backbone)
    try:
        return backbones.resolve_weights(config.weights, spec, settings.home / "cache", store)
    except ValueError as exc:
        if not (config.profile == "demo" and config.weights == "imagenet" and config.random_init_fallback):
            raise
        log.warning("DEMO WITHOUT PRETRAINED WEIGHTS: %s -- training %s from random initialisation; "
                    "expect a much weaker model (recorded in the registry)", exc, config.backbone)
        resolved = backbones.resolve_weights("none", spec, settings.home / "cache")
        return replace(resolved, source=f"random initialisation (ImageNet weights unavailable: {exc})"[:2000])


def _put_npz(store: ObjectStore, key: str, **arrays: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return store.put(key, buf.getvalue())


def load_head(store: ObjectStore, row: dict[str, Any]) -> mc.HeadWeights:
    data = np.load(io.BytesIO(store.get(f"models/{row['model_version']}/head.npz")))
    return mc.HeadWeights(*(data[k] for k in ("w1", "b1", "gamma", "beta", "mean", "var")), float(data["eps"]),
                          data["w2"], data["b2"], float(data["dropout"]))


def _feature_config(row: dict[str, Any]) -> features.FeatureConfig:
    return features.FeatureConfig(row["backbone"], row["weights_sha256"], row["image_size"], row["config"]["seed"])


def _weights_of(row: dict[str, Any], settings: Settings, store: ObjectStore) -> backbones.ResolvedWeights:
    resolved = backbones.resolve_weights(row["config"]["weights_used"], backbones.get_backbone(row["backbone"]),
                                         settings.home / "cache", store)
    if resolved.sha256 != row["weights_sha256"]:
        raise ValueError(f"model {row['model_version']}: weights {resolved.source} have sha256 {resolved.sha256}, "
                         f"expected {row['weights_sha256']} (the file changed since training)")
    return resolved


# --- the four steps ----------------------------------------------------------------------------

def prepare_split(settings: Settings, seed: int = 0) -> dict[str, Any]:
    """Freeze (or extend, by the recorded rule) the train/val/test split."""
    engine = engine_for(settings)
    try:
        return splits.assign(engine, seed=seed)
    finally:
        engine.dispose()


def train_model(settings: Settings, config: TrainConfig, run_id: str) -> dict[str, Any]:
    """Features (cached) -> head -> threshold on validation -> model artifacts -> a registry row."""
    store, engine = open_store(settings), engine_for(settings)
    version = model_version_id(run_id, config)
    try:
        weights = _weights(config, settings, store)
        with engine.connect() as conn:
            reviewed = review.training_labels(conn)
            parts = _split_refs(conn, reviewed["labels"])
        (train_refs, y_train), (val_refs, y_val) = parts["train"], parts["val"]
        in_train = {r.image_id for r in train_refs}
        reviewed_lineage = {"train_images": sorted(i for i in reviewed["labels"] if i in in_train),
                            "review_ids": reviewed["review_ids"],
                            "conflicts_with_isic_kept_isic": reviewed["conflicts_with_isic"]}
        if not len(train_refs) or not y_val.sum():
            raise ValueError(f"split has {len(train_refs)} training and {int(y_val.sum())} validation melanomas: "
                             "ingest labelled drops first (lesion ingest) and run the split")
        fcfg = features.FeatureConfig(config.backbone, weights.sha256, config.image_size, config.seed)
        runner = features.BackboneRunner(fcfg, weights)
        train_views, s1 = features.features_for(train_refs, list(range(config.views)), fcfg, weights, store, runner)
        val_feats, s2 = features.features_for(val_refs, [0], fcfg, weights, store, runner)
        from lesion_tasks.training import fit_head

        head_model, history, head_seconds = fit_head([train_views[v] for v in range(config.views)], y_train,
                                                     val_feats[0], y_val, config.dropout, config.epochs, config.seed,
                                                     config.learning_rate)
        head = mc.HeadWeights.from_model(head_model)
        p_val, h_val, _ = mc.predict(head, val_feats[0], [r.image_id for r in val_refs], version, config.mc_samples)
        threshold = evaluation.threshold_for_sensitivity(y_val, p_val, config.target_sensitivity)
        # "uncertain" = in the most uncertain 20% of validation cases, but never below 0.2 nats
        # (p(MEL) between ~0.06 and ~0.94): a confident model should not flag confident cases
        review_rule = {"predicted_mel": True, "entropy_above": max(float(np.quantile(h_val, 0.8)), MIN_REVIEW_ENTROPY),
                       "p_mel_band": [max(0.0, threshold - 0.05), min(1.0, threshold + 0.05)],
                       "calibrated_on": f"validation: max(80th percentile of entropy, {MIN_REVIEW_ENTROPY} nats)"}
        # the full flat model, head weights copied by layer name, saved without optimizer state
        model = backbones.build_model(config.backbone, config.image_size, weights, config.dropout, config.seed)
        for name in ("head_dense", "head_bn", "head_out"):
            model.get_layer(name).set_weights(head_model.get_layer(name).get_weights())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            model.save(path)
            model_uri = store.put(f"models/{version}/model.keras", path.read_bytes())
        _put_npz(store, f"models/{version}/head.npz", **{k: np.asarray(v) for k, v in asdict(head).items()})
        store.put(f"models/{version}/train_log.json", json.dumps({"history": history, "head_seconds": head_seconds}).encode())
        with engine.connect() as conn:
            drops_used = dict(conn.execute(sa.select(images.c.drop_id, sa.func.count())
                                           .join(splits_table, splits_table.c.image_id == images.c.image_id)
                                           .group_by(images.c.drop_id)).all())
        split_summary = splits.summary(engine)
        cfg = {k: v for k, v in asdict(config).items() if k != "floors"} | {
            "floors": asdict(config.floors), "weights_used": weights.spec if weights.path else "none",
            "preprocessing": backbones.PREPROCESSING, "last_activation": backbones.get_backbone(config.backbone).last_activation}
        store.put(f"models/{version}/config.json", json.dumps(cfg, indent=1).encode(), "application/json")
        row = {
            "model_version": version, "created_at": datetime.now(UTC), "status": "candidate", "profile": config.profile,
            "backbone": config.backbone, "image_size": config.image_size, "threshold": threshold,
            "mc_samples": config.mc_samples, "config": cfg, "environment": _environment(),
            "weights_source": weights.source, "weights_sha256": weights.sha256,
            "lineage": {"run_id": run_id, "drops": drops_used, "splits": split_summary["counts"],
                        "split_rules": split_summary["rules"], "feature_config": fcfg.key,
                        "reviewed_labels": reviewed_lineage},
            "review_rule": review_rule, "model_uri": model_uri, "code_version": _code_version(), "run_id": run_id,
        }
        with engine.begin() as conn:
            conn.execute(model_versions.delete().where(model_versions.c.model_version == version)
                         .where(model_versions.c.is_champion == sa.false()))
            insert_ignore(conn, model_versions, [row], ["model_version"])
        computed = s1.computed + s2.computed
        log.info("model %s trained: threshold %.4f, backbone ran on %d images (%d reused from cache)",
                 version, threshold, computed, s1.reused + s2.reused)
        return {"model_version": version, "threshold": threshold, "head_seconds": round(head_seconds, 2),
                "feature_cache": {"computed": computed, "reused": s1.reused + s2.reused,
                                  "seconds": round(s1.seconds + s2.seconds, 2)},
                "weights": weights.source}
    finally:
        engine.dispose()


def _gradcam_examples(store: ObjectStore, row: dict[str, Any], refs: list[features.ImageRef], y: np.ndarray,
                      p: np.ndarray, settings: Settings, n: int = 4) -> list[dict[str, Any]]:
    import keras
    from PIL import Image

    from lesion_tasks.gradcam import gradcam_tape, overlay, png_bytes

    pred = (p >= row["threshold"]).astype(int)
    right = np.flatnonzero(pred == y)
    wrong = np.flatnonzero(pred != y)
    pick = list(right[np.argsort(-np.abs(p[right] - row["threshold"]))][:n]) + list(wrong[np.argsort(-np.abs(p[wrong] - row["threshold"]))][:n])
    if not pick:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(store.get(key_of(store, row["model_uri"])))
        model = keras.models.load_model(path, compile=False)
    rgb = np.stack([features.load_rgb(store, refs[i].uri, row["image_size"]) for i in pick])
    cams = gradcam_tape(model, row["config"]["last_activation"], backbones.preprocess(rgb), pred[pick])
    return [{"image_id": refs[i].image_id, "true": "MEL" if y[i] else "NV", "p_mel": float(p[i]), "right": bool(pred[i] == y[i]),
             "png": png_bytes(overlay(Image.fromarray(rgb[k]), cams[k]))} for k, i in enumerate(pick)]


def evaluate_model(settings: Settings, model_version: str) -> dict[str, Any]:
    """Full evaluation on the frozen test split (and validation), figures and the HTML report."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            row = registry.get(conn, model_version)
            parts = _split_refs(conn)
        head = load_head(store, row)
        fcfg = _feature_config(row)
        weights = _weights_of(row, settings, store)
        out: dict[str, Any] = {}
        preds = {}
        for split in ("val", "test"):
            refs, y = parts[split]
            feats, _ = features.features_for(refs, [0], fcfg, weights, store)
            p, h, mi = mc.predict(head, feats[0], [r.image_id for r in refs], model_version, row["mc_samples"])
            out[split] = evaluation.evaluate(y, p, h, mi, row["threshold"], row["config"]["bootstrap"] if split == "test" else 0,
                                             row["config"]["seed"])
            preds[split] = (refs, y, p, h)
        refs, y, p, h = preds["test"]
        truth_csv, pred_csv = evaluation.isic_csvs([r.image_id for r in refs], y, p, row["threshold"])
        base = f"models/{model_version}"
        store.put(f"{base}/test_truth_isic.csv", truth_csv.encode(), "text/csv")
        store.put(f"{base}/test_predictions_isic.csv", pred_csv.encode(), "text/csv")
        _put_npz(store, f"{base}/test_predictions.npz", ids=np.array([r.image_id for r in refs]), y=y, p_mel=p, entropy=h)
        history = json.loads(store.get(f"{base}/train_log.json"))["history"]
        test = out["test"]
        figures = {
            "training curves": report.training_curves(history),
            "ROC": report.roc_figure(y, p, row["threshold"], test["auc"]),
            "reliability": report.reliability_figure(test["reliability"], test["ece"]),
            "confusion (counts)": report.confusion_figure(test["confusion"]["matrix"], "Confusion (test)", ".0f"),
            "confusion (normalised)": report.confusion_figure(test["confusion_normalized"]["matrix"], "Confusion, row-normalised", ".2f"),
            "referral curve": report.referral_figure(test["referral"]),
        }
        for name, png in figures.items():
            store.put(f"{base}/figures/{slug(name.lower())}.png", png, "image/png")
        examples = _gradcam_examples(store, row, refs, y, p, settings)
        for e in examples:
            store.put(f"{base}/figures/gradcam-{e['image_id']}.png", e["png"], "image/png")
        stored = evaluation.json_safe(out)  # undefined metrics (NaN) become null
        metrics_uri = store.put(f"{base}/metrics.json", json.dumps(stored, indent=1).encode(), "application/json")
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                         .values(metrics=stored, metrics_uri=metrics_uri))
            row = registry.get(conn, model_version)
        report_uri = store.put(f"{base}/report.html", report.html_report(row, out, figures, examples), "text/html")
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version).values(report_uri=report_uri))
        return {"model_version": model_version, "report_uri": report_uri, "metrics": _headline(stored)}
    finally:
        engine.dispose()


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "average_precision", "ece", "brier",
            "nll", "threshold", "n", "n_mel", "ci95")
    return {split: {k: metrics[split][k] for k in keys if k in metrics[split]} for split in ("test", "val") if split in metrics}


def _compare_with_champion(settings: Settings, store: ObjectStore, row: dict[str, Any], champion: dict[str, Any],
                           parts) -> dict[str, Any]:
    refs, y = parts["test"]
    ids = [r.image_id for r in refs]
    p = {}
    for which in (row, champion):
        feats, _ = features.features_for(refs, [0], _feature_config(which), _weights_of(which, settings, store), store)
        p[which["model_version"]] = mc.predict(load_head(store, which), feats[0], ids, which["model_version"],
                                               which["mc_samples"])[0]
    delta = evaluation.paired_delta(y, p[row["model_version"]], row["threshold"], p[champion["model_version"]],
                                    champion["threshold"], n=row["config"]["bootstrap"], seed=row["config"]["seed"])
    return {"champion": champion["model_version"], "n_test": len(ids), **delta}


def gate_model(settings: Settings, model_version: str, actor: str = "lesion_retrain") -> dict[str, Any]:
    """Floors + no significant regression vs the champion; promote or keep the champion, with reasons."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            row = registry.get(conn, model_version)
            champion = registry.champion(conn)
            parts = _split_refs(conn)
        if row["metrics"] is None:
            raise ValueError(f"model version {model_version}: evaluate it before gating")
        if champion and champion["model_version"] == model_version:
            return {"model_version": model_version, "promoted": True, "reasons": ["already the champion"]}
        comparison = evaluation.json_safe(_compare_with_champion(settings, store, row, champion, parts)) if champion else None
        floors = registry.GateFloors(**row["config"]["floors"])
        passed, reasons = registry.decide(row["metrics"], comparison, floors)
        gate = evaluation.json_safe({"passed": passed, "reasons": reasons, "comparison": comparison,
                                     "floors": row["config"]["floors"], "decided_at": datetime.now(UTC).isoformat()})
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                         .values(gate=gate, status="candidate" if passed else "rejected"))
        if passed:
            registry.promote(engine, model_version, "; ".join(reasons), actor)
        else:
            log.warning("model %s NOT promoted (champion stays %s): %s", model_version,
                        champion["model_version"] if champion else None, "; ".join(r for r in reasons if r.startswith("FAIL")))
        return {"model_version": model_version, "promoted": passed, "reasons": reasons,
                "champion": model_version if passed else (champion["model_version"] if champion else None)}
    finally:
        engine.dispose()


def run(settings: Settings, config: TrainConfig, run_id: str | None = None) -> dict[str, Any]:
    """The whole retrain (what `lesion train` prints)."""
    started = time.monotonic()
    run_id = run_id or f"cli-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    split = prepare_split(settings, config.seed)
    trained = train_model(settings, config, run_id)
    evaluated = evaluate_model(settings, trained["model_version"])
    gated = gate_model(settings, trained["model_version"], actor="lesion train")
    return {
        "model_version": trained["model_version"], "promoted": gated["promoted"], "threshold": trained["threshold"],
        "metrics": evaluated["metrics"], "gate": {"reasons": gated["reasons"], "champion": gated["champion"]},
        "report_uri": evaluated["report_uri"], "feature_cache": trained["feature_cache"],
        "head_seconds": trained["head_seconds"], "weights": trained["weights"], "split": split["counts"],
        "wall_seconds": round(time.monotonic() - started, 1),
    }
