"""A trained model version assessed: full evaluation on the frozen test split (and validation), pooled
and per source, out-of-scope recall, figures and the HTML report (`evaluate_model`); then the quality
gate against the evidence, the floors and the champion, promotion, and the report's gate section brought
up to date (`gate_model`; `promote_with_report` for a manual override)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.lifecycle import artifacts, registry, report, trainset
from lesion_tasks.model import backbones, evaluation, features, mc, scope
from lesion_tasks.core import keys
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import champion_history, model_versions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, open_store

log = logging.getLogger(__name__)
# the one artifact written again after promotion: the gate section of the report follows the decisions
REPORT = "report.html"


def _gradcam_examples(store: ObjectStore, row: dict[str, Any], refs: list[features.ImageRef], y: np.ndarray,
                      p: np.ndarray, settings: Settings, n: int = 4) -> list[dict[str, Any]]:
    from PIL import Image

    from lesion_tasks.model.gradcam import gradcam_tape, overlay, png_bytes

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
    p_mel, _, _ = mc.predict(head, feats[0], [r.image_id for r in refs], row["model_version"], row["mc_samples"],
                             mc.mask_seed(row))
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
            logits = mc.logits_for(head, feats[0], [r.image_id for r in refs], model_version, row["mc_samples"],
                                   mc.mask_seed(row))
            p, h, mi = mc.summarize(head.calibrated(logits))
            # intervals on validation too: the gate asks whether its AUC is above chance (registry.decide)
            n_boot, seed = row["config"]["bootstrap"], row["config"]["seed"]
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
        # the gate has not decided on these metrics yet: its section says so until gate_model rewrites it
        report_uri = out_artifacts.put(REPORT, report.html_report(row | {"gate": None}, out, figures, examples), "text/html")
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
                                               which["mc_samples"], mc.mask_seed(which))[0]
    delta = evaluation.paired_delta(y, p[row["model_version"]], row["threshold"], p[champion["model_version"]],
                                    champion["threshold"], n=row["config"]["bootstrap"], seed=row["config"]["seed"])
    return {"champion": champion["model_version"], "n_test": len(ids), **delta}


def _history(conn: sa.Connection, model_version: str) -> list[dict[str, Any]]:
    """champion_history events that made `model_version` champion or replaced it, oldest first."""
    query = (sa.select(champion_history).where(sa.or_(champion_history.c.model_version == model_version,
                                                      champion_history.c.previous == model_version))
             .order_by(champion_history.c.id))
    return [dict(r) for r in conn.execute(query).mappings()]


def write_gate_report(store: ObjectStore, engine: sa.Engine, model_version: str) -> str | None:
    """Rewrite the gate section of the version's report.html (same key) from the registry: decision,
    reasons, champion compared with, promotions and overrides. The report is the one artifact rewritten
    after promotion; its metrics and figures stay as evaluated. None when the version has no report."""
    with engine.connect() as conn:
        row = registry.get(conn, model_version)
        history = _history(conn, model_version)
    saved = artifacts.ModelArtifacts(store, model_version)  # not artifacts.of: a pruned version keeps its report
    try:
        old = saved.get(REPORT)
    except artifacts.ArtifactError as exc:
        log.warning("model %s: no report to bring up to date (%s)", model_version, exc)
        return None
    key = saved.put(REPORT, report.with_gate(old, report.gate_section(row, history)), "text/html")
    if row["report_uri"] is None:
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version).values(report_uri=key))
    return key


def promote_with_report(settings: Settings, engine: sa.Engine, model_version: str, reason: str, actor: str,
                        override: bool = False) -> str | None:
    """`registry.promote`, then the reports of the new and the previous champion say so."""
    previous = registry.promote(engine, model_version, reason, actor, override=override)
    store = open_store(settings)
    for version in {model_version, previous} - {None}:
        write_gate_report(store, engine, version)
    return previous


def _key_metrics(row: dict[str, Any]) -> dict[str, Any]:
    test = (row.get("metrics") or {}).get("test") or {}
    return {k: test.get(k) for k in ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "threshold",
                                     "n", "n_mel")}


def gate_model(settings: Settings, model_version: str, actor: str = "lesion_retrain") -> dict[str, Any]:
    """Evidence + floors + no significant regression vs the champion; promote or keep the champion, with
    reasons; then the version's report (and a replaced champion's) tells the outcome."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            row = registry.get(conn, model_version)
            champion = registry.champion(conn)
            parts = trainset.split_refs(conn)
        if row["metrics"] is None:
            raise ValueError(f"model version {model_version}: evaluate it before gating")
        if champion and champion["model_version"] == model_version:
            write_gate_report(store, engine, model_version)  # a retried task: the report may not say so yet
            return {"model_version": model_version, "promoted": True, "reasons": ["already the champion"],
                    "champion": model_version}
        comparison = evaluation.json_safe(_compare_with_champion(settings, store, row, champion, parts)) if champion else None
        floors = registry.GateFloors(**row["config"]["floors"])
        passed, reasons = registry.decide(row["metrics"], comparison, floors)
        source = row["weights_source"] or ""
        if "demo fallback" in source or source.startswith("random initialisation (ImageNet"):
            reasons.append(f"NOTE not the asked-for weights: {source}")  # the demo profile's loud fallback
        gate = evaluation.json_safe({"passed": passed, "reasons": reasons, "comparison": comparison,
                                     "champion_metrics": _key_metrics(champion) if champion else None,
                                     "floors": row["config"]["floors"], "decided_at": datetime.now(UTC).isoformat()})
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == model_version)
                         .values(gate=gate, status="candidate" if passed else "rejected"))
        if passed:
            promote_with_report(settings, engine, model_version, "; ".join(reasons), actor)
        else:
            log.warning("model %s NOT promoted (champion stays %s): %s", model_version,
                        champion["model_version"] if champion else None, "; ".join(r for r in reasons if r.startswith("FAIL")))
            write_gate_report(store, engine, model_version)
        return {"model_version": model_version, "promoted": passed, "reasons": reasons,
                "champion": model_version if passed else (champion["model_version"] if champion else None)}
    finally:
        engine.dispose()
