"""The head chosen by how it does at clinics it never saw: a leave-one-site-out table, printed as JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/loso_selection.py [--home DIR]
        [--data ../shared/data] [--k 200] [--replicates 5] [--backbone NAME] [--cs 0.001,0.003,0.01,0.03]
        [--only NAME,...]

On the harness of bench/loso.py (each of ISIC 2017 and BCN_20000 held out in turn, its test split never used;
replicates that each leave out a different 10% of the training lesions and draw their own validation sample),
each candidate head is refitted on cached features and measured at the held-out site:
- k = 0: AUC and specificity at sensitivity 0.85 over the site's pool, before any label of its own;
- k = --k: its validation sample drawn as `lesion sites sample` draws it (the size measure from the current
  head's k = 0 scores, the same sample for every candidate, so comparisons are paired), its labels added to
  training at `site_weight`, measured on the rest of the pool;
- the degraded pseudo-sites of the harness (k = 0): a coarser camera, another light;
- pooled validation (all sites' training split -> validation split), for reference only.

Candidates: the current head (`mlp`: the paper's Dense 128 -> BN -> dropout), the linear head (standardised,
class-balanced logistic regression) across C, and their ensemble (the mean of the two logits), all fitted by
the product's own code (`model.heads`); scores are deterministic (dropout off). The decision (`loso.decide`): the criterion is the mean of AUC at
k = 0 and at k = --k per (held-out site, replicate); a candidate replaces the current head only when its mean
paired gain exceeds the standard deviation of those paired gains.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import loso  # noqa: E402

from lesion_tasks.model import heads, mc  # noqa: E402
from lesion_tasks.model.config import make_config  # noqa: E402

log = logging.getLogger("bench.loso_selection")
CURRENT = "mlp"


def head_fit(kind: str, c: float, seed: int, config) -> loso.Fit:
    """A candidate, fitted by model.heads exactly as retraining fits it; scores are the head's logit."""
    def fit(x, y, w, x_val, y_val):
        model, _, _ = heads.fit(kind, x, y, x_val, y_val, config.dropout, config.epochs, seed, config.learning_rate,
                                c=c, sample_weight=w)
        return mc.HeadWeights.from_model(model).deterministic
    return fit


def candidates(cs: tuple[float, ...]) -> dict[str, tuple[str, float]]:
    return {CURRENT: ("mlp", 0.0)} | {f"linear C={c:g}": ("linear", c) for c in cs} | {
        f"ensemble C={c:g}": ("ensemble", c) for c in cs}


def run(imgs: loso.Images, x: np.ndarray, degraded: dict, names: dict[str, tuple[str, float]], k: int,
        replicates: int, site_weight: float, config) -> dict:
    y = imgs.y
    rows: dict[str, dict] = {n: {"held_out": {}} for n in names}
    for held in loso.HELD_OUT:
        pool = imgs.pool(held)
        for n in names:
            rows[n]["held_out"][held] = []
        for r in range(replicates):
            started = time.monotonic()
            tr, va = loso.training_rows(imgs, held, r), loso.training_rows(imgs, held, r, "val")
            k0 = {n: head_fit(kind, c, r, config)(x[tr], y[tr], None, x[va], y[va]) for n, (kind, c) in names.items()}
            chosen, _ = loso.draw_sample(held, imgs.ids[pool], k0[CURRENT](x[pool]), k, r)
            sample, rest = pool[chosen], np.setdiff1d(pool, pool[chosen])
            x_k, y_k = np.concatenate([x[tr], x[sample]]), np.concatenate([y[tr], y[sample]])
            w_k = np.r_[np.ones(len(tr)), np.full(len(sample), site_weight)]
            for n, (kind, c) in names.items():
                at_k = head_fit(kind, c, r, config)(x_k, y_k, w_k, x[va], y[va])
                rep = {"replicate": r, "k0": loso.ranking(y[pool], k0[n](x[pool])),
                       "k": loso.ranking(y[rest], at_k(x[rest])), "sample_melanomas": int(y[sample].sum())}
                rep |= {name: loso.ranking(y[pool], k0[n](dx)) for name, dx in degraded[held].items()}
                rows[n]["held_out"][held].append(rep)
            log.info("%s held out, replicate %d: %d heads in %.0f s; AUC k=0 %s", held, r, len(names),
                     time.monotonic() - started,
                     ", ".join(f"{n} {rows[n]['held_out'][held][-1]['k0']['auc']}" for n in names))
    return rows


def summarise(rows: dict, pooled: dict) -> dict:
    out = {}
    for n, row in rows.items():
        s = {"pooled_val": pooled[n]}
        for held, reps in row["held_out"].items():
            s[held] = {f"{part}_{m}": round(float(np.mean([q[part][m] for q in reps])), 4)
                       for part in reps[0] if part not in ("replicate", "sample_melanomas") for m in ("auc", "spec_at_sens85")}
            s[held]["auc_k0_sd"] = round(float(np.std([q["k0"]["auc"] for q in reps], ddof=1)), 4) if len(reps) > 1 else None
        s["criterion"] = [0.5 * (q["k0"]["auc"] + q["k"]["auc"]) for reps in row["held_out"].values() for q in reps]
        out[n] = s
    return out


def main() -> None:
    parser = loso.parser(__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--backbone", default=make_config("demo").backbone)
    parser.add_argument("--cs", default="0.001,0.003,0.01,0.03", help="the linear head's C values to try")
    parser.add_argument("--only", default="", help="comma-separated candidate names (the current head always runs)")
    args = parser.parse_args()
    home, settings, imgs = loso.start(args, "loso-selection-")
    config = make_config("demo", backbone=args.backbone)
    x = loso.feature_matrix(settings, imgs, backbone=args.backbone)
    degraded = {held: {name: loso.degraded_features(settings, imgs, imgs.pool(held), name, backbone=args.backbone)
                       for name in loso.DEGRADATIONS} for held in loso.HELD_OUT}
    names = candidates(tuple(float(c) for c in args.cs.split(",")))
    if args.only:
        names = {n: v for n, v in names.items() if n == CURRENT or n in args.only.split(",")}
    y, tr, va = imgs.y, loso.training_rows(imgs, None, 0), loso.training_rows(imgs, None, 0, "val")
    pooled = {n: loso.ranking(y[va], head_fit(kind, c, 0, config)(x[tr], y[tr], None, x[va], y[va])(x[va]))
              for n, (kind, c) in names.items()}
    rows = run(imgs, x, degraded, names, args.k, args.replicates, config.site_weight, config)
    table = summarise(rows, pooled)
    choice, gains = loso.decide(CURRENT, {n: s["criterion"] for n, s in table.items()})
    print(json.dumps({"home": str(home), "backbone": args.backbone, "k": args.k, "replicates": args.replicates,
                      "degradations": {n: why for n, (_, why) in loso.DEGRADATIONS.items()},
                      "table": {n: {k: v for k, v in s.items() if k != "criterion"} for n, s in table.items()},
                      "mean_gain_over_current": gains, "choice": choice, "replicates_raw": rows}, indent=1))


if __name__ == "__main__":
    main()
