"""Backbone and preprocessing chosen by measurement, on the validation split only.

Runs on an ingested home (LESION_HOME, e.g. the three shared drops) after `splits.assign`: for each
candidate feature configuration it computes (cached) pooled features of the training and validation
images, fits a class-balanced logistic-regression probe on training features, and prints JSON with
validation AUC and specificity at 0.85 sensitivity, pooled and per source drop, plus how a threshold
chosen on pooled validation transfers to each source; then compares the two out-of-scope designs (a
separate in-scope/OTHER head vs a third class) on the best configuration.

    LESION_HOME=... LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/model_selection.py
"""

from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from lesion_tasks.model import backbones, evaluation, features
from lesion_tasks.data import trainset
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store

CANDIDATES = [  # (backbone, input size, effective resolution, colour constancy)
    ("mobilenet025_multiscale", 224, 0, ""),
    ("mobilenet025_multiscale", 224, 84, ""),
    ("mobilenet025_multiscale", 224, 84, "shades_of_gray"),
    ("mobilenet025_multiscale", 224, 0, "shades_of_gray"),
    ("mobilenet025_multiscale", 128, 84, ""),
    ("mobilenet025", 224, 84, ""),
    ("effnet_lite0", 224, 84, ""),
    ("effnet_lite0", 224, 0, ""),
    ("effnet_lite2_multiscale", 256, 0, ""),
    ("effnet_lite2_multiscale", 256, 84, ""),
]


def spec_at(y, p, sens=0.85):
    t = evaluation.threshold_for_sensitivity(y, p, sens)
    return float(((p < t) & (y == 0)).sum() / max((y == 0).sum(), 1)), t


def probe(xtr, ytr, xva):
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000).fit(scaler.transform(xtr), ytr)
    return clf.predict_proba(scaler.transform(xva))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env()
    store, engine = open_store(settings), engine_for(settings)
    with engine.connect() as conn:
        parts = trainset.split_refs(conn)
        other = trainset.out_of_scope_refs(conn)
    (tr, ytr), (va, yva) = parts["train"], parts["val"]
    src_va = np.array([r.drop_id for r in va])
    only = sys.argv[1:]
    results = []
    for backbone, size, eff, cc in CANDIDATES:
        name = f"{backbone}@{size}/eff{eff or 'none'}/{cc or 'rgb'}"
        if only and not any(o in name for o in only):
            continue
        spec = backbones.get_backbone(backbone)
        weights = backbones.resolve_weights("imagenet", spec, settings.home / "cache", store)
        cfg = features.FeatureConfig(backbone, weights.sha256, size, 0, effective_resolution=eff, color_constancy=cc)
        started = time.monotonic()
        feats, _ = features.features_for(tr + va, [0], cfg, weights, store)
        xtr, xva = feats[0][: len(tr)], feats[0][len(tr):]
        p = probe(xtr, ytr, xva)[:, 1]
        spec_pooled, t = spec_at(yva, p)
        row = {"config": name, "val_auc": round(roc_auc_score(yva, p), 4), "val_spec_at_sens85": round(spec_pooled, 4),
               "seconds": round(time.monotonic() - started, 1), "per_source": {}}
        for src in sorted(set(src_va)):
            m = src_va == src
            if yva[m].sum() >= 10 and (yva[m] == 0).sum() >= 10:
                row["per_source"][src] = {"auc": round(roc_auc_score(yva[m], p[m]), 4),
                                          "spec_at_sens85": round(spec_at(yva[m], p[m])[0], 4),
                                          "sens_at_pooled_threshold": round(float((p[m][yva[m] == 1] >= t).mean()), 4)}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"candidates": results}
    if results and other["val"][0]:
        best = max(results, key=lambda r: (r["per_source"].get("isic2017-mel-nv", {}).get("auc", 0), r["val_auc"]))
        out["chosen"] = best["config"]
        out["out_of_scope"] = compare_out_of_scope(best["config"], settings, store, parts, other)
    print(json.dumps(out, indent=1))


def compare_out_of_scope(name, settings, store, parts, other):
    """Separate in-scope/OTHER head vs third class: OTHER flagged at the threshold that flags 95% of
    validation OTHER, and the share of validation MEL/NV that threshold flags too."""
    backbone, rest = name.split("@")
    size, eff, cc = rest.split("/")
    spec = backbones.get_backbone(backbone)
    weights = backbones.resolve_weights("imagenet", spec, settings.home / "cache", store)
    cfg = features.FeatureConfig(backbone, weights.sha256, int(size), 0,
                                 effective_resolution=0 if eff == "effnone" else int(eff[3:]),
                                 color_constancy="" if cc == "rgb" else cc)
    (tr, ytr), (va, yva) = parts["train"], parts["val"]
    otr, ova = other["train"][0], other["val"][0]
    feats, _ = features.features_for(tr + va + otr + ova, [0], cfg, weights, store)
    f = feats[0]
    xtr, xva = f[: len(tr)], f[len(tr): len(tr) + len(va)]
    xotr, xova = f[len(tr) + len(va): len(tr) + len(va) + len(otr)], f[len(tr) + len(va) + len(otr):]
    out = {}
    y3 = np.concatenate([ytr, np.full(len(otr), 2)])
    p3 = probe(np.concatenate([xtr, xotr]), y3, np.concatenate([xva, xova]))
    yb = np.concatenate([np.zeros(len(tr)), np.ones(len(otr))])
    pb = probe(np.concatenate([xtr, xotr]), yb, np.concatenate([xva, xova]))[:, 1]
    for design, score in (("third_class", p3[:, 2]), ("separate_head", pb)):
        s_in, s_out = score[: len(va)], score[len(va):]
        t = np.quantile(s_out, 0.05)
        out[design] = {"auc_other_vs_in_scope": round(roc_auc_score(np.r_[np.zeros(len(va)), np.ones(len(ova))], score), 4),
                       "mel_nv_flagged_at_95pct_other": round(float((s_in >= t).mean()), 4),
                       "nv_flagged_at_95pct_other": round(float((s_in[yva == 0] >= t).mean()), 4)}
    return out


if __name__ == "__main__":
    main()
