"""A trained model version assessed: full evaluation on the frozen test split (and validation), pooled
and per source, out-of-scope recall, figures and the HTML report (`evaluate_model`); then the quality
gate against the floors and the champion, and promotion (`gate_model`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lesion_tasks import artifacts, backbones, evaluation, features, keys, mc, registry, report, scope, trainset
from lesion_tasks.db import engine_for
from lesion_tasks.schema import model_versions
from lesion_tasks.settings import Settings
from lesion_tasks.store import ObjectStore, open_store

log = logging.getLogger(__name__)


def _gradcam_examples(store: ObjectStore, row: dict[str, Any], refs: list[features.ImageRef], y: np.ndarray,
                      p: np.ndarray, settings: Settings, n: int = 4) -> list[dict[str, Any]]:
    from PIL import Image

    from lesion_tasks.gradcam import gradcam_tape, overlay, png_bytes

    pred = (p >= row["threshold"]).astype(int)
    right = np.flatnonzero(pred == y)
    wrong = np.flatnonzero(pred != y)
    pick = list(right[np.argsort(-np.abs(p[right] - row["threshold"]))][:n]) + list(wrong[np.argsort(-np.abs(p[wrong] - row["threshold"]))][:n])
    if not pick:
        return []
    model = artifacts.of(store, row).load_model(row["model_uri"])
    fcfg = artifacts.feature_config(row)
    rgb = np.stack([features.model_input(store, refs[i].uri, fcfg) for i in pick])
    cams = gradcam_tape(model, row["config"]["last_activation"], backbones.preprocess(rgb), pred[pick])
    return [{"image_id": refs[i].image_id, "true": "MEL" if y[i] else "NV", "p_mel": float(p[i]), "right": bool(pred[i] == y[i]),
             "png": png_bytes(overlay(Image.fromarray(rgb[k]), cams[k]))} for k, i in enumerate(pick)]


def _scope_recall(scope_head: scope.ScopeHead, part: tuple[list[features.ImageRef], list[str]], head: mc.HeadWeights,
                  row: dict[str, Any], fcfg: features.FeatureConfig, weights, store: ObjectStore,
                  p_other_in_scope: np.ndarray, y_in_scope: np.ndarray) -> dict[str, Any] | None:
    """Out-of-scope recall per diagnosis on one split's OTHER images (scope.recall_table)."""
    refs, diagnoses = part
    if not refs:
        return None
    feats, _ = features.features_for(refs, [0], fcfg, weights, store)
    p_mel, _, _ = mc.predict(head, feats[0], [r.image_id for r in refs], row["model_version"], row["mc_samples"])
    return scope.recall_table(scope_head.p_other(feats[0]), p_mel >= row["threshold"], diagnoses,
                              scope_head.threshold, p_other_in_scope, y_in_scope)


def evaluate_model(settings: Settings, model_version: str) -> dict[str, Any]:
    """Full evaluation on the frozen test split (and validation), figures and the HTML report."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            row = registry.get(conn, model_version)
            parts = trainset.split_refs(conn)
            oos_parts = trainset.out_of_scope_refs(conn)
        registry.ensure_writable(row["status"], row["is_champion"], model_version)
        out_artifacts = artifacts.of(store, row)
        head = out_artifacts.load_head()
        fcfg = artifacts.feature_config(row)
        weights = artifacts.weights_of(row, settings, store)
        scope_head = artifacts.load_scope_of(store, row)
        out: dict[str, Any] = {}
        preds = {}
        uncalibrated = replace(head, cal_a=1.0, cal_b=0.0)
        for split in ("val", "test"):
            refs, y = parts[split]
            feats, _ = features.features_for(refs, [0], fcfg, weights, store)
            logits = mc.logits_for(head, feats[0], [r.image_id for r in refs], model_version, row["mc_samples"])
            p, h, mi = mc.summarize(head.calibrated(logits))
            n_boot, seed = (row["config"]["bootstrap"] if split == "test" else 0), row["config"]["seed"]
            out[split] = evaluation.evaluate(y, p, h, mi, row["threshold"], n_boot, seed)
            out[split]["uncalibrated"] = evaluation.calibration(y, mc.summarize(uncalibrated.calibrated(logits))[0])
            out[split]["by_source"] = evaluation.by_source(y, p, np.array([r.drop_id for r in refs]), row["threshold"],
                                                           n_boot, seed, min_mel_for_ci=registry.MIN_SOURCE_MEL)
            preds[split] = (refs, y, p, h)
            if scope_head is not None:
                out.setdefault("out_of_scope", {})[split] = _scope_recall(
                    scope_head, oos_parts[split], head, row, fcfg, weights, store, scope_head.p_other(feats[0]), y)
        refs, y, p, h = preds["test"]
        truth_csv, pred_csv = evaluation.isic_csvs([r.image_id for r in refs], y, p, row["threshold"])
        out_artifacts.put("test_truth_isic.csv", truth_csv.encode(), "text/csv")
        out_artifacts.put("test_predictions_isic.csv", pred_csv.encode(), "text/csv")
        out_artifacts.put_npz("test_predictions.npz", ids=np.array([r.image_id for r in refs]), y=y, p_mel=p, entropy=h)
        history = out_artifacts.get_json("train_log.json")["history"]
        test = out["test"]
        figures = {
            "training curves": report.training_curves(history),
            "ROC": report.roc_figure(y, p, row["threshold"], test["auc"]),
            "reliability": report.reliability_figure(test["reliability"], test["ece"]),
            "reliability before calibration": report.reliability_figure(test["uncalibrated"]["reliability"],
                                                                        test["uncalibrated"]["ece"], "before calibration"),
            "confusion (counts)": report.confusion_figure(test["confusion"]["matrix"], "Confusion (test)", ".0f"),
            "confusion (normalised)": report.confusion_figure(test["confusion_normalized"]["matrix"], "Confusion, row-normalised", ".2f"),
            "referral curve": report.referral_figure(test["referral"]),
        }
        for name, png in figures.items():
            out_artifacts.put(f"figures/{keys.slug(name.lower())}.png", png, "image/png")
        examples = _gradcam_examples(store, row, refs, y, p, settings)
        for e in examples:
            out_artifacts.put(f"figures/gradcam-{e['image_id']}.png", e["png"], "image/png")
        stored = evaluation.json_safe(out)  # undefined metrics (NaN) become null
        metrics_uri = out_artifacts.put_json("metrics.json", stored)
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                         .values(metrics=stored, metrics_uri=metrics_uri))
            row = registry.get(conn, model_version)
        report_uri = out_artifacts.put("report.html", report.html_report(row, out, figures, examples), "text/html")
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version).values(report_uri=report_uri))
        return {"model_version": model_version, "report_uri": report_uri, "metrics": _headline(stored)}
    finally:
        engine.dispose()


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """What `lesion train --json` prints: pooled and per-source metrics, calibration, out-of-scope recall."""
    keys = ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "average_precision", "ece", "brier",
            "nll", "threshold", "n", "n_mel", "ci95")
    out: dict[str, Any] = {}
    for split in ("test", "val"):
        if split in metrics:
            m = metrics[split]
            out[split] = {k: m[k] for k in keys if k in m}
            if "uncalibrated" in m:
                out[split]["ece_before_calibration"] = m["uncalibrated"]["ece"]
            out[split]["by_source"] = {src: {k: v[k] for k in keys if k in v} for src, v in (m.get("by_source") or {}).items()}
    oos = (metrics.get("out_of_scope") or {}).get("test")
    if oos:
        out["out_of_scope_test"] = {"threshold": oos["threshold"], "all": oos["all"], "malignant": oos["malignant"],
                                    "by_diagnosis": oos["by_diagnosis"], "nv_flagged_out_of_scope": oos["nv_flagged_out_of_scope"],
                                    "mel_flagged_out_of_scope": oos["mel_flagged_out_of_scope"]}
    return out


def _compare_with_champion(settings: Settings, store: ObjectStore, row: dict[str, Any], champion: dict[str, Any],
                           parts) -> dict[str, Any]:
    refs, y = parts["test"]
    ids = [r.image_id for r in refs]
    p = {}
    for which in (row, champion):
        feats, _ = features.features_for(refs, [0], artifacts.feature_config(which),
                                         artifacts.weights_of(which, settings, store), store)
        p[which["model_version"]] = mc.predict(artifacts.of(store, which).load_head(), feats[0], ids, which["model_version"],
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
            parts = trainset.split_refs(conn)
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
