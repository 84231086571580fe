"""Head settings chosen by leave-one-site-out validation as well as pooled validation, printed as JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/loso_selection.py [--home DIR]
        [--data ../shared/data] [--k 200] [--replicates 2] [--only NAME,...]

An unseen clinic rewards what transfers, and the pooled validation split does not show it. On the demo
profile's cached features of the shared drops (ingested with their labels into --home; a temporary folder
if unset, features cached there), each candidate head is measured three ways:

- pooled: trained on the training split, AUC and specificity at sensitivity 0.85 on the validation split;
- leave-one-site-out, k = 0: each site with enough melanomas (ISIC 2017, ISIC 2019) held out in turn,
  trained on the other sites' training split, measured on the held-out site's images outside its test split
  (its "pool": no test image is ever used to choose anything);
- leave-one-site-out, k = --k: the held-out site's validation sample drawn from its pool exactly as
  `lesion sites sample` draws it (order sampling, the k = 0 model's top p_mel quintile weighing 4, a
  replicate-specific hash), its labels added to training at `site_weight`, measured on the rest of the pool:
  AUC, specificity at sensitivity 0.85, and the sensitivity / specificity reached by a threshold chosen on
  out-of-fold scores of the sample (5 folds by lesion, IPW-weighted, `target_with_margin` at z = 0, 1.0 and
  1.645 on the Kish effective number of melanomas), as retraining chooses a site's threshold; and the
  calibration on the rest (Brier, ECE) of the pooled Platt scaling against a per-site one fitted on the
  sample's out-of-fold scores (IPW-weighted).

The product's own cross-fitting (training/crossfit.py) also recalibrates each fold and scores with MC
dropout; here every head scores deterministically (a monotone calibration does not move a ranking, and
within a fold does not move the threshold).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks.core import db  # noqa: E402
from lesion_tasks.core.db import engine_for  # noqa: E402
from lesion_tasks.core.schema import images, splits  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.versions import artifacts
from lesion_tasks.data import splits as split_rule, trainset  # noqa: E402
from lesion_tasks.model.config import make_config  # noqa: E402
from lesion_tasks.model import backbones, evaluation, features, training  # noqa: E402
from lesion_tasks.model.features import ImageRef  # noqa: E402
from lesion_tasks.sites import sample as site_sample  # noqa: E402

log = logging.getLogger("bench.loso_selection")
DROPS = ("isic2017-mel-nv", "isic2019-84px", "isic-archive-uda1-sample", "isic-cli-sample")
HELD_OUT = ("isic2017-mel-nv", "isic2019-84px")  # the others hold 14 and 15 melanomas
Z = (0.0, 1.0, 1.645)
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def keras_head(dropout: float, learning_rate: float, epochs: int, seed: int) -> Fit:
    """The product's head (the paper's Dense(128)-BN-Dropout-Dense(2)), fitted as retraining fits it."""
    def fit(x, y, w, x_val, y_val, w_val):
        head, _, _ = training.fit_head([x], y, x_val, y_val, dropout=dropout, epochs=epochs, seed=seed,
                                       learning_rate=learning_rate, sample_weight=w)
        return lambda z: head.predict(z.astype(np.float32), verbose=0, batch_size=1024)[:, 1]
    return fit


def logistic(c: float) -> Fit:
    """A class-balanced logistic regression on standardised features (the model-selection probe)."""
    def fit(x, y, w, x_val, y_val, w_val):
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(x), y, sample_weight=w)
        return lambda z: clf.predict_proba(scaler.transform(z))[:, 1]
    return fit


def candidates(seed: int) -> dict[str, Fit]:
    demo = make_config("demo")
    return {
        f"paper head (demo: dropout {demo.dropout:g}, lr {demo.learning_rate:g})":
            keras_head(demo.dropout, demo.learning_rate, demo.epochs, seed),
        "paper head, dropout 0.7": keras_head(0.7, demo.learning_rate, demo.epochs, seed),
        "logistic C=0.01": logistic(0.01),
        "logistic C=0.1": logistic(0.1),
        "logistic C=1": logistic(1.0),
    }


def spec_at(y: np.ndarray, p: np.ndarray, sens: float = 0.85) -> float:
    return float(evaluation.binary_metrics(y, p, evaluation.threshold_for_sensitivity(y, p, sens))["mel_specificity"])


def figures(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"n": int(len(y)), "n_mel": int(y.sum()), "auc": round(float(evaluation.binary_metrics(y, p, 0.5)["auc"]), 4),
            "spec_at_sens85": round(spec_at(y, p), 4)}


def draw(site: str, ids: list[str], p0: np.ndarray, k: int, replicate: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, inclusion probabilities) of a k-image validation sample, as `lesion sites sample` draws it."""
    w, _ = site_sample.size_measure(dict(zip(ids, p0)), ids)
    u = np.array([site_sample._u(f"{site}#replicate-{replicate}", i) for i in ids])  # the product's keys, per replicate
    chosen = np.argsort(u / w, kind="stable")[:k]
    return chosen, np.minimum(1.0, k * w[chosen] / w.sum())


def oof_threshold(fit: Fit, base: tuple, xs, ys, lesions, pi, site_weight: float, seed: int
                  ) -> tuple[dict[float, float], np.ndarray]:
    """({z: threshold}, out-of-fold scores): thresholds from IPW-weighted out-of-fold scores of the sample
    (its labels added to `base` training)."""
    x_tr, y_tr, w_tr, x_va, y_va, w_va = base
    p = np.empty(len(ys))
    for train, fold in StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(xs, ys, lesions):
        predict = fit(np.concatenate([x_tr, xs[train]]), np.concatenate([y_tr, ys[train]]),
                      np.concatenate([w_tr, np.full(len(train), site_weight)]), x_va, y_va, w_va)
        p[fold] = predict(xs[fold])
    ipw = trainset.ipw(pi)
    ess = evaluation.effective_size(ipw[ys == 1])
    return {z: float(evaluation.threshold_for_sensitivity(ys, p, evaluation.target_with_margin(0.85, ess, None, z=z), ipw))
            for z in Z}, p


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))[:, None]


def platt(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A (weighted) Platt scaling of scores p fitted on labels y."""
    clf = LogisticRegression(C=1e4, max_iter=1000).fit(_logit(p), y, sample_weight=w)
    return lambda q: clf.predict_proba(_logit(q))[:, 1]


def calibration(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Brier score, expected calibration error (10 equal-width bins) and mean p against the melanoma rate."""
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).mean() for b in range(10) if (bins == b).any())
    return {"brier": round(float(np.mean((p - y) ** 2)), 4), "ece": round(float(ece), 4),
            "mean_p": round(float(p.mean()), 4), "mel_rate": round(float(y.mean()), 4)}


def load(settings: Settings, data: Path) -> dict:
    engine = engine_for(settings)
    with engine.connect() as conn:
        have = conn.scalar(sa.select(sa.func.count()).select_from(images))
    if not have:
        for name in DROPS:
            ingest(str(data / name), settings)
        split_rule.assign(engine, seed=0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.image_id, images.c.drop_id, images.c.normalized_uri, images.c.label,
                                      images.c.site, splits.c.split)
                            .join(splits, splits.c.image_id == images.c.image_id)
                            .where(images.c.label.in_(("MEL", "NV"))).order_by(images.c.image_id)).all()
        lesions = np.array(trainset.lesion_of(conn, [r.image_id for r in rows]), object)
    engine.dispose()
    config = make_config("demo")
    store = open_store(settings)
    spec = backbones.get_backbone(config.backbone)
    weights = backbones.resolve_weights(config.weights, spec, settings.home / "cache", store)
    refs = [ImageRef(r.image_id, r.drop_id, r.normalized_uri) for r in rows]
    feats, stats = features.features_for(refs, [0], artifacts.feature_config(config, weights.sha256), weights, store)
    log.info("features of %d images: %s", len(refs), stats)
    return {"x": feats[0], "y": np.array([r.label == "MEL" for r in rows], np.int64), "ids": [r.image_id for r in rows],
            "site": np.array([r.site for r in rows], object), "split": np.array([r.split for r in rows], object),
            "lesion": lesions}


def measure(name: str, fit: Fit, d: dict, k: int, replicates: int, site_weight: float, seed: int) -> dict:
    x, y, site, split = d["x"], d["y"], d["site"], d["split"]
    ones = np.ones(len(y))
    tr, va = split == "train", split == "val"
    started = time.monotonic()
    pooled = figures(y[va], fit(x[tr], y[tr], ones[tr], x[va], y[va], ones[va])(x[va]))
    out = {"candidate": name, "pooled_val": pooled, "held_out": {}}
    for held in HELD_OUT:
        others_tr, others_va = tr & (site != held), va & (site != held)
        pool = np.flatnonzero((site == held) & (split != "test"))
        base = (x[others_tr], y[others_tr], ones[others_tr], x[others_va], y[others_va], ones[others_va])
        p0 = fit(*base)(x[pool])
        row = {"k0": figures(y[pool], p0), "k": k, "replicates": []}
        for r in range(replicates):
            chosen, pi = draw(held, [d["ids"][i] for i in pool], p0, k, r)
            sample, rest = pool[chosen], np.setdiff1d(pool, pool[chosen])
            xs, ys = x[sample], y[sample]
            predict = fit(np.concatenate([base[0], xs]), np.concatenate([base[1], ys]),
                          np.concatenate([base[2], np.full(len(ys), site_weight)]), *base[3:])
            p = predict(x[rest])
            rep = {"sample_melanomas": int(ys.sum()), **figures(y[rest], p), "at_oof_threshold": {}}
            thresholds, p_oof = oof_threshold(fit, base, xs, ys, d["lesion"][sample], pi, site_weight, seed + r)
            # calibration on the rest: pooled Platt (on the other sites' validation, as retraining does) vs
            # a Platt of the site's own out-of-fold scores, IPW-weighted (per-site calibration)
            pooled_cal = platt(predict(base[3]), base[4])
            rep["calibration"] = {"pooled": calibration(y[rest], pooled_cal(p)),
                                  "site": calibration(y[rest], platt(pooled_cal(p_oof), ys, trainset.ipw(pi))(pooled_cal(p)))}
            for z, t in thresholds.items():
                m = evaluation.binary_metrics(y[rest], p, t)
                rep["at_oof_threshold"][f"z={z:g}"] = {"threshold": round(t, 4), "sens": round(float(m["mel_sensitivity"]), 4),
                                                      "spec": round(float(m["mel_specificity"]), 4)}
            row["replicates"].append(rep)
            log.info("%s, %s held out, replicate %d: %s", name, held, r, json.dumps(rep))
        reps = row["replicates"]
        row["mean"] = {"auc": round(float(np.mean([q["auc"] for q in reps])), 4),
                       "spec_at_sens85": round(float(np.mean([q["spec_at_sens85"] for q in reps])), 4),
                       **{f"brier_{c}": round(float(np.mean([q["calibration"][c]["brier"] for q in reps])), 4)
                          for c in ("pooled", "site")},
                       **{zk: {m: round(float(np.mean([q["at_oof_threshold"][zk][m] for q in reps])), 4)
                               for m in ("sens", "spec")} for zk in reps[0]["at_oof_threshold"]}}
        out["held_out"][held] = row
    out["loso_mean_auc_k0"] = round(float(np.mean([h["k0"]["auc"] for h in out["held_out"].values()])), 4)
    out["loso_mean_auc_k"] = round(float(np.mean([h["mean"]["auc"] for h in out["held_out"].values()])), 4)
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("LESION_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--home", default="")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--site-weight", type=float, default=make_config("demo").site_weight)
    parser.add_argument("--only", default="", help="comma-separated substrings of candidate names")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    home = Path(args.home or tempfile.mkdtemp(prefix="loso-selection-"))
    settings = Settings.from_env(home=home)
    db.upgrade(settings)
    d = load(settings, Path(args.data))
    only = [o for o in args.only.split(",") if o]
    results = [measure(name, fit, d, args.k, args.replicates, args.site_weight, args.seed)
               for name, fit in candidates(args.seed).items() if not only or any(o in name for o in only)]
    print(json.dumps({"home": str(home), "k": args.k, "site_weight": args.site_weight, "candidates": results,
                      "best_pooled": max(results, key=lambda r: r["pooled_val"]["auc"])["candidate"],
                      "best_loso_k0": max(results, key=lambda r: r["loso_mean_auc_k0"])["candidate"],
                      "best_loso_k": max(results, key=lambda r: r["loso_mean_auc_k"])["candidate"]}, indent=1))


if __name__ == "__main__":
    main()
