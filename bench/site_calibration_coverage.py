"""Does a site's labelled operating point keep its promise? Coverage of the stated interval, as JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/site_calibration_coverage.py --home /tmp/loso-home
        [--data ../shared/data] [--replicates 5] [--draws 10] [--k 100,200] [--design top_quintile,band]

Issue 35 on the harness of bench/loso.py: ISIC 2017 and BCN_20000 held out in turn. For each of `--replicates`
heads (trained on the other sites, calibrated on their validation split, as retraining calibrates) the held-out
site's images outside its test split are scored: its melanomas and nevi, and (BCN_20000) its 4,276 other diagnoses,
as a clinic's nights hold them. Then `--draws` validation samples per head and k are drawn as `lesion sites sample`
draws them (order sampling with the size measure of each `--design`, a key per draw), and their labels correct the
calibration (`sites.correction`): the threshold is the highest whose stated 95% lower bound of sensitivity reaches
0.85. Against the truth of the rest of the site (its melanomas and nevi outside the sample):
- `lower_held`: the stated lower bound of sensitivity at or below the realised sensitivity (the promise; the issue
  asks for >= 90% of draws at k = 100 and 200 at both sites), and `within`: the realised one inside the interval;
- the realised sensitivity and specificity, and the best specificity any threshold reaches at sensitivity 0.85 on
  the same images (`spec_gap` = best - realised);
- the labels-only IPW sensitivity at the same threshold (`sites.correction.ipw_check`) and how often its exact
  interval held, for comparison;
- the sample's melanomas (count and effective count).
Heads are refitted on cached features (no full retrain): 2 sites x 5 heads x 10 draws x 2 k in a few minutes.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import loso  # noqa: E402
from unlabelled_operating_point import calibrated_head  # noqa: E402

from lesion_tasks.model.config import make_config  # noqa: E402
from lesion_tasks.sites import correction, operating, sample  # noqa: E402

log = logging.getLogger("bench.site_calibration_coverage")
TARGET = 0.85
DESIGNS = ("top_quintile", "band")  # the product's, and the one measured against it (docs/sites.md)
BAND_LOGIT = 1.0


def size_measure(design: str, ids: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The sample's size measure under `design` (DESIGNS): the product's (`sites.sample`: the top quintile of p
    weighing 4), or `band`: also the images within BAND_LOGIT of the site's unlabelled operating point weighing 4."""
    w, _ = sample.size_measure(dict(zip(ids, p)), list(ids))
    if design == "band":
        t0 = operating.choose(p, TARGET)
        near = np.abs(correction.logit(p) - correction.logit(np.array([t0]))[0]) <= BAND_LOGIT
        w = np.where(near, sample.HIGH_WEIGHT, w)
    elif design != "top_quintile":
        raise ValueError(f"--design {design!r}: expected one of {DESIGNS}")
    return w


def one_draw(held: str, ids: np.ndarray, p: np.ndarray, y: np.ndarray, in_scope: np.ndarray, k: int, key: int,
             design: str, allowances: list[float]) -> dict[float, dict]:
    chosen, pi = loso.draw_sample(held, ids, p, k, key, size_measure(design, ids, p))
    corr = correction.Corrected.fit(p, p[chosen], y[chosen], 1 / pi, seed=key, other=~in_scope[chosen])
    return {a: realised(corr, chosen, pi, p, y, in_scope, k, key, a) for a in allowances}


def realised(corr: correction.Corrected, chosen: np.ndarray, pi: np.ndarray, p: np.ndarray, y: np.ndarray,
             in_scope: np.ndarray, k: int, key: int, allowance: float) -> dict:
    t, sens, spec = corr.operating_point(TARGET, allowance)
    rest = np.ones(len(p), bool)
    rest[chosen] = False
    rest &= in_scope
    truth, score = y[rest], p[rest]
    real_sens = float((score[truth == 1] >= t).mean())
    real_spec = float((score[truth == 0] < t).mean())
    check = correction.ipw_check(p[chosen], y[chosen], 1 / pi, t, nevus=in_scope[chosen])
    return {"k": k, "draw": key, "threshold": round(t, 5), "beta": [round(float(v), 3) for v in corr.beta],
            "melanomas": corr.melanomas, "effective_melanomas": round(corr.effective_melanomas, 1),
            "stated": {"sensitivity": [round(sens.estimate, 4), round(sens.low, 4), round(sens.high, 4)],
                       "specificity": [round(spec.estimate, 4), round(spec.low, 4), round(spec.high, 4)]},
            "realised": [round(real_sens, 4), round(real_spec, 4)],
            "best_spec_at_sens85": round(loso.spec_at(truth, score, TARGET), 4),
            "lower_held": bool(sens.low <= real_sens), "within": bool(sens.low <= real_sens <= sens.high),
            "spec_within": bool(spec.low <= real_spec <= spec.high),
            "ipw": check, "ipw_lower_held": bool(check["sensitivity_ci95"] is not None and check["sensitivity_ci95"][0] <= real_sens)}


def summary(rows: list[dict]) -> dict:
    def share(key: str) -> str:
        return f"{sum(r[key] for r in rows)}/{len(rows)}"

    real = np.array([r["realised"] for r in rows])
    gap = np.array([r["best_spec_at_sens85"] - r["realised"][1] for r in rows])
    return {"draws": len(rows), "lower_held": share("lower_held"), "within": share("within"),
            "spec_within": share("spec_within"),
            "ipw_lower_held": share("ipw_lower_held"),
            "realised_sens": {"mean": round(float(real[:, 0].mean()), 4), "min": round(float(real[:, 0].min()), 4),
                              "reached_0.85": f"{int((real[:, 0] >= TARGET).sum())}/{len(rows)}"},
            "realised_spec_mean": round(float(real[:, 1].mean()), 4),
            "spec_gap": {"mean": round(float(gap.mean()), 4), "max": round(float(gap.max()), 4)},
            "stated_low_mean": round(float(np.mean([r["stated"]["sensitivity"][1] for r in rows])), 4),
            "ipw_sens_sd": round(float(np.std([r["ipw"]["sensitivity"] for r in rows])), 4),
            "melanomas_mean": round(float(np.mean([r["melanomas"] for r in rows])), 1)}


def main() -> None:
    parser = loso.parser(__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=10, help="validation samples per head and k")
    parser.add_argument("--k", default="100,200")
    parser.add_argument("--design", default=",".join(DESIGNS))
    parser.add_argument("--allowances", default=f"0,0.2,{correction.ALLOWANCE:g},0.5",
                        help="scalings of the miss rate's bootstrap bound (sites.correction.ALLOWANCE)")
    args = parser.parse_args()
    home, settings, imgs = loso.start(args, "coverage-")
    config = make_config("demo")
    x = loso.feature_matrix(settings, imgs)
    ks, designs = [int(k) for k in args.k.split(",")], args.design.split(",")
    allowances = sorted({float(a) for a in args.allowances.split(",")})
    result = {"home": str(home), "target": TARGET, "shrink": correction.SHRINK, "bootstrap": correction.BOOTSTRAP,
              "product": {"design": "top_quintile", "allowance": correction.ALLOWANCE},
              "held_out": {}}
    for held in loso.HELD_OUT:
        site_rows = np.flatnonzero((imgs.site == held) & (imgs.split != "test"))
        ids, y, in_scope = imgs.ids[site_rows], imgs.y[site_rows], imgs.in_scope[site_rows]
        rows: dict[str, list[dict]] = {f"{d} k={k} allowance={a:g}": [] for d in designs for k in ks for a in allowances}
        unlabelled = []
        for r in range(args.replicates):
            tr, va = loso.training_rows(imgs, held, r), loso.training_rows(imgs, held, r, "val")
            p = calibrated_head(imgs, x, tr, va, r, config)(site_rows).mean(axis=1)
            t0 = operating.choose(p, TARGET)
            unlabelled.append([round(float((p[in_scope & (y == 1)] >= t0).mean()), 4),
                               round(float((p[in_scope & (y == 0)] < t0).mean()), 4)])
            for d in designs:
                for k in ks:
                    for i in range(args.draws):
                        for a, row in one_draw(held, ids, p, y, in_scope, k, r * 1000 + i, d, allowances).items():
                            rows[f"{d} k={k} allowance={a:g}"].append(row)
                    log.info("%s, head %d, %s k=%d: %s", held, r, d, k, json.dumps(
                        {a: summary(rows[f"{d} k={k} allowance={a:g}"]) for a in allowances}))
        result["held_out"][held] = {"n": int(len(site_rows)), "n_mel": int(y.sum()),
                                    "unlabelled_k0_realised": unlabelled,
                                    "summary": {name: summary(v) for name, v in rows.items()},
                                    "draws": rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
