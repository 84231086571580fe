"""A trained model version assessed: full evaluation on the frozen test split (and validation), pooled
and per source, out-of-scope recall, figures and the HTML report (`evaluate_model`); then the quality
gate against the evidence, the floors and the champion, promotion, and the report's gate section brought
up to date (`gate_model`; `promote_with_report` for a manual override)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.assessment import gate, report
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import champion_history
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, open_store
from lesion_tasks.data import trainset
from lesion_tasks.model import attention, backbones, evaluation, features, mc, scope
from lesion_tasks.sites import status as sites
from lesion_tasks.sites.thresholds import MIN_SITE_MEL
from lesion_tasks.versions import artifacts, predict, registry

log = logging.getLogger(__name__)
MIN_SITE_CI_MEL = 5  # melanomas a site's test split needs for bootstrap intervals
ATTENTION_PER_CELL = 16  # test cases per MEL/NV x right/wrong whose Grad-CAM attention the report measures
REPORT = artifacts.REPORT  # the one artifact written again after promotion: its gate section follows the decisions


@dataclass
class Assessment:
    """What `compute_metrics` measured: the metrics (as stored) and the test split's predictions."""

    version: registry.ModelVersion
    raw: dict[str, Any]  # as computed (undefined metrics are NaN): what the report and figures read
    metrics: dict[str, Any]  # as stored (NaN -> null)
    test_refs: list[features.ImageRef]
    test_y: np.ndarray
    test: predict.Predictions
    test_sites: list[str]
    val: predict.Predictions | None = None


def _gradcam_examples(store: ObjectStore, v: registry.ModelVersion, refs: list[features.ImageRef], y: np.ndarray,
                      p: np.ndarray, t: np.ndarray, n: int = 4,
                      per_cell: int = ATTENTION_PER_CELL) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The report's Grad-CAM examples (the n most confident right and wrong test cases) and where Grad-CAM
    looks on test cases: up to `per_cell` drawn (seeded) from each of MEL/NV x right/wrong, the share of each
    map's mass inside the segmented lesion (`attention.py`), summarised per cell (`attention.summary`)."""
    from PIL import Image

    from lesion_tasks.model.gradcam import gradcam_tape, overlay, png_bytes

    pred = (p >= t).astype(int)
    right = np.flatnonzero(pred == y)
    wrong = np.flatnonzero(pred != y)
    pick = list(right[np.argsort(-np.abs(p[right] - t[right]))][:n]) + list(wrong[np.argsort(-np.abs(p[wrong] - t[wrong]))][:n])
    rng = np.random.default_rng(v.seed)
    cells = [np.flatnonzero((y == label) & ((pred == y) == ok)) for label in (1, 0) for ok in (True, False)]
    sample = sorted({int(i) for c in cells for i in (rng.choice(c, min(per_cell, len(c)), replace=False) if len(c) else [])})
    todo = sorted(set(pick) | set(sample))
    if not todo:
        return [], attention.summary(y, pred, {}) | {"per_cell": per_cell}
    model = artifacts.of(store, v).load_model(v.model_uri)
    fcfg = artifacts.feature_config(v)
    x = np.stack([features.model_input(store, refs[i].uri, fcfg) for i in todo])
    rgb = dict(zip(todo, x))
    cams = dict(zip(todo, gradcam_tape(model, v.last_activation, backbones.preprocess(x), pred[todo])))
    share = {i: attention.attention_on_lesion(rgb[i], cams[i]) for i in todo}
    examples = [{"image_id": refs[i].image_id, "true": "MEL" if y[i] else "NV", "p_mel": float(p[i]),
                 "right": bool(pred[i] == y[i]), "on_lesion": share[i],
                 "png": png_bytes(overlay(Image.fromarray(rgb[i]), cams[i]))} for i in pick]
    return examples, attention.summary(y, pred, {i: share[i] for i in sample}) | {"per_cell": per_cell}


def predict_refs(settings: Settings, store: ObjectStore, v: registry.ModelVersion, refs: list[features.ImageRef],
                  head: mc.HeadWeights | None = None, scope_head: scope.ScopeHead | None = None,
                  sites: list[str] | None = None) -> predict.Predictions:
    """`predict.predict` on the cached features of `refs` (computed once, reused across versions and runs),
    each at its site's threshold."""
    feats, _ = features.features_for(refs, [0], artifacts.feature_config(v), artifacts.weights_of(v, settings, store), store)
    head = head if head is not None else artifacts.of(store, v).load_head()
    return predict.predict(v, head, feats[0], [r.image_id for r in refs], scope_head, sites=sites)


def compute_metrics(settings: Settings, model_version: str) -> Assessment:
    """Every metric of a version on validation and the frozen test split: pooled, per source, calibration
    before and after, out-of-scope recall per diagnosis. Writes nothing."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            v = registry.version(conn, model_version)
            parts = trainset.split_refs(conn)
            oos_parts = trainset.out_of_scope_refs(conn)
            site_lists = {k: trainset.site_of(conn, [r.image_id for r in part[0]]) for k, part in [*parts.items(), *(
                (f"oos_{s}", p) for s, p in oos_parts.items())]}
            weights = {k: trainset.sample_weights(conn, [r.image_id for r in parts[k][0]]) for k in ("val", "test")}
    finally:
        engine.dispose()
    head = artifacts.of(store, v).load_head()
    scope_head = artifacts.load_scope_of(store, v)
    uncalibrated = replace(head, cal_a=1.0, cal_b=0.0)
    out: dict[str, Any] = {}
    preds = {}
    for split in ("val", "test"):
        refs, y = parts[split]
        pr = predict_refs(settings, store, v, refs, head, scope_head, site_lists[split])
        # intervals on validation too: the gate asks whether its AUC is above chance (gate.decide);
        # every case decided at its site's threshold (the pooled one where the site has none of its own)
        out[split] = evaluation.evaluate(y, pr.p_mel, pr.entropy, pr.mutual_info, pr.thresholds, v.bootstrap, v.seed)
        out[split]["threshold"] = v.threshold
        out[split]["thresholds_applied"] = ("per site" if np.any(pr.thresholds != v.threshold) else "pooled")
        out[split]["uncalibrated"] = evaluation.calibration(y, mc.summarize(uncalibrated.calibrated(pr.logits))[0])
        out[split]["by_source"] = evaluation.by_group(y, pr.p_mel, np.array([r.drop_id for r in refs]), pr.thresholds,
                                                       v.bootstrap, v.seed, min_mel_for_ci=MIN_SITE_MEL)
        # per site: weighted by inverse inclusion probability where a site's images come from its validation sample,
        # with (weighted) intervals from a handful of melanomas on: a small site's figures need them most
        out[split]["by_site"] = evaluation.by_group(y, pr.p_mel, np.array(site_lists[split], dtype=object), pr.thresholds,
                                                     v.bootstrap, v.seed, min_mel_for_ci=MIN_SITE_CI_MEL,
                                                     w=weights[split])
        preds[split] = pr
        if scope_head is not None and oos_parts[split][0]:
            other_refs, diagnoses = oos_parts[split]
            other = predict_refs(settings, store, v, other_refs, head, scope_head, site_lists[f"oos_{split}"])
            table = scope.recall_table(other.p_other, other.is_mel.astype(bool), diagnoses, v.scope_threshold, pr.p_other, y,
                                       pr.is_mel.astype(bool))
            # per site (counts, unweighted): a new clinic's BCC and AK called NV without a flag is what it must see
            oos_sites, in_sites = np.array(site_lists[f"oos_{split}"], dtype=object), np.array(site_lists[split], dtype=object)
            table["by_site"] = {site: scope.recall_table(
                other.p_other[m], other.is_mel[m].astype(bool), [d for d, k in zip(diagnoses, m) if k], v.scope_threshold,
                pr.p_other[in_sites == site], y[in_sites == site], pr.is_mel[in_sites == site].astype(bool))
                for site in sorted(set(oos_sites.tolist())) for m in [oos_sites == site]}
            out.setdefault("out_of_scope", {})[split] = table
        elif scope_head is not None:
            out.setdefault("out_of_scope", {})[split] = None
    refs, y = parts["test"]
    return Assessment(v, out, evaluation.json_safe(out), refs, y, preds["test"], site_lists["test"], preds["val"])


def publish_metrics(settings: Settings, assessment: Assessment) -> str:
    """The assessment as the version's artifacts (ISIC CSVs, test predictions, figures, metrics.json, the
    report, its gate section pending) and its registry row; returns the report's key."""
    store, engine = open_store(settings), engine_for(settings)
    v, refs, y, pr = assessment.version, assessment.test_refs, assessment.test_y, assessment.test
    out, stored = assessment.raw, assessment.metrics
    try:
        saved = artifacts.of(store, v)
        truth_csv, pred_csv = evaluation.isic_csvs([r.image_id for r in refs], y, pr.p_mel, pr.thresholds)
        saved.put("test_truth_isic.csv", truth_csv.encode(), "text/csv")
        saved.put("test_predictions_isic.csv", pred_csv.encode(), "text/csv")
        saved.put_npz(artifacts.TEST_PREDICTIONS, ids=np.array([r.image_id for r in refs]), y=y, p_mel=pr.p_mel,
                      entropy=pr.entropy)
        if assessment.val is not None:
            saved.put_npz(artifacts.VAL_PREDICTIONS, ids=np.array(assessment.val.image_ids), p_mel=assessment.val.p_mel,
                          entropy=assessment.val.entropy)
        history = saved.get_json(artifacts.TRAIN_LOG)["history"]
        test = out["test"]
        figures = {
            "training curves": report.training_curves(history),
            "ROC": report.roc_figure(y, pr.p_mel, v.threshold, test["auc"]),
            "reliability": report.reliability_figure(test["reliability"], test["ece"]),
            "reliability before calibration": report.reliability_figure(test["uncalibrated"]["reliability"],
                                                                        test["uncalibrated"]["ece"], "before calibration"),
            "confusion (counts)": report.confusion_figure(test["confusion"]["matrix"], "Confusion (test)", ".0f"),
            "confusion (normalised)": report.confusion_figure(test["confusion_normalized"]["matrix"], "Confusion, row-normalised", ".2f"),
            "referral curve": report.referral_figure(test["referral"]),
        }
        for name, png in figures.items():
            saved.put(artifacts.figure(name), png, "image/png")
        examples, out["test"]["attention"] = _gradcam_examples(store, v, refs, y, pr.p_mel, pr.thresholds)
        stored["test"]["attention"] = evaluation.json_safe(out["test"]["attention"])
        log.info("Grad-CAM attention on the lesion (test sample): %s", "; ".join(
            f"{cell} {c['mean_on_lesion']:.2f} (n={c['n_measured']}, off {c['off_lesion']})"
            for cell, c in out["test"]["attention"]["cells"].items() if c["n_measured"]) or "nothing measured")
        for e in examples:
            saved.put(artifacts.gradcam_example(e["image_id"]), e["png"], "image/png")
        registry.record_metrics(engine, v.model_version, stored, saved.put_json(artifacts.METRICS, stored))
        sites.record_evaluations(engine, v, stored)
        with engine.connect() as conn:
            recorded = registry.version(conn, v.model_version)
        # the gate has not decided on these metrics yet: its section says so until gate_model rewrites it
        report_uri = saved.put(REPORT, report.html_report(replace(recorded, gate=None), out, figures, examples), "text/html")
        registry.record_report(engine, v.model_version, report_uri)
        return report_uri
    finally:
        engine.dispose()


def evaluate_model(settings: Settings, model_version: str) -> dict[str, Any]:
    """Full evaluation on the frozen test split (and validation), figures and the HTML report: the DAG's
    `evaluate_model` task, `compute_metrics` then `publish_metrics`."""
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            v = registry.version(conn, model_version)
    finally:
        engine.dispose()
    registry.ensure_writable(v.status, v.is_champion, model_version)
    assessment = compute_metrics(settings, model_version)
    report_uri = publish_metrics(settings, assessment)
    return {"model_version": model_version, "report_uri": report_uri, "metrics": _headline(assessment.metrics)}


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
            for part in ("by_source", "by_site"):
                out[split][part] = {src: {k: v[k] for k in keys if k in v} for src, v in (m.get(part) or {}).items()}
    oos = (metrics.get("out_of_scope") or {}).get("test")
    if oos:
        out["out_of_scope_test"] = {"threshold": oos["threshold"], "all": oos["all"], "malignant": oos["malignant"],
                                    "by_diagnosis": oos["by_diagnosis"], "nv_flagged_out_of_scope": oos["nv_flagged_out_of_scope"],
                                    "mel_flagged_out_of_scope": oos["mel_flagged_out_of_scope"],
                                    "nv_flagged_out_of_scope_only": oos.get("nv_flagged_out_of_scope_only")}
    return out


def _compare_with_champion(settings: Settings, store: ObjectStore, v: registry.ModelVersion,
                           champion: registry.ModelVersion, parts) -> dict[str, Any]:
    refs, y = parts["test"]
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            test_sites = trainset.site_of(conn, [r.image_id for r in refs])
    finally:
        engine.dispose()
    pr = {which.model_version: predict_refs(settings, store, which, refs, sites=test_sites) for which in (v, champion)}
    new, old = pr[v.model_version], pr[champion.model_version]
    delta = evaluation.paired_delta(y, new.p_mel, new.thresholds, old.p_mel, old.thresholds, n=v.bootstrap, seed=v.seed)
    # and at every site with enough test melanomas of its own, each version at its threshold there (paired,
    # unweighted: the same cases under both versions, so a sampling weight would cancel in the question)
    sites = np.array(test_sites, dtype=object)
    by_site = {}
    for site in sorted(set(test_sites)):
        m = sites == site
        if int(y[m].sum()) >= MIN_SITE_MEL and int((y[m] == 0).sum()) >= 1:
            by_site[site] = {"n_test": int(m.sum()), "n_mel": int(y[m].sum()), **evaluation.paired_delta(
                y[m], new.p_mel[m], new.thresholds[m], old.p_mel[m], old.thresholds[m], n=v.bootstrap, seed=v.seed)}
    return {"champion": champion.model_version, "n_test": len(refs), **delta, "by_site": by_site}


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
        v = registry.version(conn, model_version)
        history = _history(conn, model_version)
    saved = artifacts.ModelArtifacts(store, model_version)  # not artifacts.of: a pruned version keeps its report
    try:
        old = saved.get(REPORT)
    except artifacts.ArtifactError as exc:
        log.warning("model %s: no report to bring up to date (%s)", model_version, exc)
        return None
    key = saved.put(REPORT, report.with_gate(old, report.gate_section(v, history)), "text/html")
    if v.report_uri is None:
        registry.record_report(engine, model_version, key)
    return key


def promote_with_report(settings: Settings, engine: sa.Engine, model_version: str, reason: str, actor: str,
                        override: bool = False) -> str | None:
    """`registry.promote`, then the reports of the new and the previous champion say so."""
    previous = registry.promote(engine, model_version, reason, actor, override=override)
    store = open_store(settings)
    for version in {model_version, previous} - {None}:
        write_gate_report(store, engine, version)
    return previous


def _identical(store: ObjectStore, v: registry.ModelVersion, champion: registry.ModelVersion) -> bool:
    """The version's head and config digests equal the champion's (`artifacts.digests`): it decides alike."""
    try:
        return artifacts.digests(store, v) == artifacts.digests(store, champion)
    except artifacts.ArtifactError as exc:
        log.warning("model %s: not compared for identity with the champion (%s)", v.model_version, exc)
        return False


def _key_metrics(v: registry.ModelVersion) -> dict[str, Any]:
    test = (v.metrics or {}).get("test") or {}
    return {k: test.get(k) for k in ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "threshold",
                                     "n", "n_mel")}


def gate_model(settings: Settings, model_version: str, actor: str = "lesion_retrain") -> dict[str, Any]:
    """Evidence + floors + no significant regression vs the champion; promote or keep the champion, with
    reasons; then the version's report (and a replaced champion's) tells the outcome."""
    store, engine = open_store(settings), engine_for(settings)
    try:
        with engine.connect() as conn:
            v = registry.version(conn, model_version)
            champion = registry.version(conn, "champion", required=False)
            parts = trainset.split_refs(conn)
        if v.metrics is None:
            raise ValueError(f"model version {model_version}: evaluate it before gating")
        if champion and champion.model_version == model_version:
            write_gate_report(store, engine, model_version)  # a retried task: the report may not say so yet
            return {"model_version": model_version, "promoted": True, "reasons": ["already the champion"], "checks": [],
                    "champion": model_version}
        if champion and _identical(store, v, champion):
            reason = (f"identical to the champion {champion.model_version} (the same head and config digests): "
                      "promoting it would change nothing, so the champion stays and its predictions and verdicts with it")
            log.info("model %s NOT promoted: %s", model_version, reason)
            registry.record_gate(engine, model_version, {"passed": False, "identical_to": champion.model_version,
                                                         "reasons": [reason], "checks": [],
                                                         "decided_at": datetime.now(UTC).isoformat()}, False)
            write_gate_report(store, engine, model_version)
            return {"model_version": model_version, "promoted": False, "reasons": [reason], "checks": [],
                    "champion": champion.model_version, "identical_to": champion.model_version}
        comparison = evaluation.json_safe(_compare_with_champion(settings, store, v, champion, parts)) if champion else None
        decision = gate.decide(v.metrics, comparison, v.floors, v)
        if v.weights_fallback:  # the demo profile's loud fallback: said, never deciding
            decision = decision.with_note("weights", f"not the asked-for weights: {v.weights_fallback}; used: "
                                                     f"{v.weights_source}", fallback=v.weights_fallback)
        passed = decision.passed
        record = evaluation.json_safe(decision.to_json() | {
            "comparison": comparison, "champion_metrics": _key_metrics(champion) if champion else None,
            "floors": dict(v.floors_recorded), "decided_at": datetime.now(UTC).isoformat()})
        registry.record_gate(engine, model_version, record, passed)
        if passed:
            promote_with_report(settings, engine, model_version, "; ".join(decision.reasons), actor)
        else:
            log.warning("model %s NOT promoted (champion stays %s): %s", model_version,
                        champion.model_version if champion else None, "; ".join(c.line for c in decision.failed))
            write_gate_report(store, engine, model_version)
        return {"model_version": model_version, "promoted": passed, "reasons": decision.reasons,
                "checks": record["checks"],
                "champion": model_version if passed else (champion.model_version if champion else None)}
    finally:
        engine.dispose()
