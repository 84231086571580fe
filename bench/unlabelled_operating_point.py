"""A site's operating point from its own unlabelled images, measured at clinics the model never saw; JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/unlabelled_operating_point.py [--home DIR]
        [--data ../shared/data] [--replicates 5] [--margins 0,0.02,0.05,0.08]

The groundwork of issue 34, on the harness of bench/loso.py (ISIC 2017 and BCN_20000 held out in turn, 5
lesion-grouped replicates). The demo profile's head is trained on the other sites and calibrated as retraining
calibrates it (Platt scaling of its MC-dropout samples on their validation split); its calibrated p_mel (the MC
mean) is computed over the held-out site's images outside its test split, whose labels stay unused. With
calibrated p, the expected sensitivity at a threshold t is sum(p_i : p_i >= t) / sum(p_i), the expected
specificity sum(1 - p_i : p_i < t) / sum(1 - p_i). The threshold is the highest whose estimated sensitivity
reaches 0.85 + margin. Then the site's truth: the realised sensitivity and specificity there, the estimate's
error, and the best specificity any threshold reaches at sensitivity 0.85 on the same images.

Which images the estimate rests on (`--sets`): `in_scope` (the site's melanomas and nevi: the truth's view),
`all` (every image, its other diagnoses too: what a clinic's night holds) and `all_but_flagged` (every image the
out-of-scope head does not flag, at the version's out-of-scope threshold). Realised figures are always on its
melanomas and nevi. BCN_20000's pool holds 4,276 other diagnoses; ISIC 2017's none.

For the product's set (`all`), at each margin, the review work and the safety the threshold brings, under the
product's review rule (`versions.registry`: uncertain above REVIEW_DECISION_UNCERTAINTY of the MC samples, near
within NEAR_THRESHOLD_LOGIT on the logit scale; the out-of-scope threshold chosen for that decision threshold
on the validation OTHER images, as retraining records it): `nv_added_by_other_flags` (the share of the site's
nevi flagged without a MEL call) and `other_silently_nv` (its other diagnoses called NV with no flag). The
product's margin (`sites.operating.MARGIN`) is the smallest at which every replicate at both sites reaches 0.85
with at most 5% of other diagnoses silently NV; at it, `interval_covers` counts the replicates whose realised
sensitivity and specificity lie inside the interval the product states (`sites.operating.interval`).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import loso  # noqa: E402

from lesion_tasks.model import evaluation, heads, mc, scope  # noqa: E402
from lesion_tasks.sites import operating  # noqa: E402
from lesion_tasks.versions import predict, registry  # noqa: E402
from lesion_tasks.model.config import make_config  # noqa: E402

log = logging.getLogger("bench.unlabelled_operating_point")
TARGET = 0.85
RULES = ("test_margin", "population", "product")  # out-of-scope thresholds at a site's point (`scope_rule`)


def flags(samples: np.ndarray, p_other: np.ndarray, t: float, scope_above: float) -> tuple[np.ndarray, np.ndarray]:
    """(MEL call, any other flag) per image under the product's review rule at threshold t."""
    p = samples.mean(axis=1)
    mel = p >= t
    uncertain = predict.decision_uncertainty(samples, np.full(len(p), t), mel.astype(np.int64)) > registry.REVIEW_DECISION_UNCERTAINTY
    logit = lambda q: np.log(np.clip(q, 1e-7, 1 - 1e-7) / (1 - np.clip(q, 1e-7, 1 - 1e-7)))  # noqa: E731
    near = np.abs(logit(p) - logit(np.float64(t))) <= registry.NEAR_THRESHOLD_LOGIT
    return mel, uncertain | near | (p_other >= scope_above)


def calibrated_head(imgs: loso.Images, x: np.ndarray, tr: np.ndarray, va: np.ndarray, seed: int, config):
    y = imgs.y
    model, _, _ = heads.fit(config.head, x[tr], y[tr], x[va], y[va], config.dropout, config.epochs, seed,
                            config.learning_rate, c=config.head_c)
    head = mc.HeadWeights.from_model(model)
    a, b = mc.fit_calibration(mc.logits_for(head, x[va], list(imgs.ids[va]), "bench", config.mc_samples, seed), y[va])
    head = replace(head, cal_a=a, cal_b=b)
    return lambda idx: head.calibrated(mc.logits_for(head, x[idx], list(imgs.ids[idx]), "bench", config.mc_samples, seed))


def one(imgs: loso.Images, x: np.ndarray, held: str, r: int, margins: list[float], config) -> dict:
    y = imgs.y
    tr, va = loso.training_rows(imgs, held, r), loso.training_rows(imgs, held, r, "val")
    samples_of = calibrated_head(imgs, x, tr, va, r, config)
    p_of = lambda idx: samples_of(idx).mean(axis=1)  # noqa: E731
    pool = imgs.pool(held)
    other = np.flatnonzero((imgs.site == held) & (imgs.split != "test") & ~imgs.in_scope)
    s_in = samples_of(pool)
    s_other = samples_of(other) if len(other) else np.zeros((0, s_in.shape[1]))
    p_in, p_other_dx = s_in.mean(axis=1), s_other.mean(axis=1)
    # the out-of-scope head and its threshold, as retraining sets them (MEL calls at the pooled threshold)
    otr, ova = loso.training_rows(imgs, held, r, in_scope=False), loso.training_rows(imgs, held, r, "val", in_scope=False)
    n_test = int(((imgs.split == "test") & (imgs.label == "MEL") & (imgs.site != held)).sum())
    t_pooled = evaluation.threshold_for_sensitivity(y[va], p_of(va), evaluation.target_with_margin(TARGET, int(y[va].sum()), n_test))
    sh = scope.fit(x[tr], x[otr])
    po_val, p_val_other = sh.p_other(x[ova]), p_of(ova)
    test_other = (imgs.split == "test") & ~imgs.in_scope & (imgs.site != held)
    n_test_other = (int(test_other.sum()), int((test_other & np.isin(imgs.diagnosis, scope.MALIGNANT)).sum()))
    po_in, po_other = sh.p_other(x[pool]), (sh.p_other(x[other]) if len(other) else np.zeros(0))
    reference = scope.site_reference(sh.p_other(x[va]))

    def scope_rule(t: float, rule: str = "product") -> float:
        """The out-of-scope threshold at decision threshold t: as retraining records it for a site's point (the
        site population's margin) and `sites.operating` raises it by the site's shift ("product"), or the grid
        with the test split's margin and no shift (before issue 33's last part: "test_margin"), or "population"."""
        chosen = scope.choose_threshold(po_val, p_val_other >= t, list(imgs.diagnosis[ova]), config.floors.out_of_scope_flagged,
                                        config.floors.malignant_flagged, list(imgs.lesion[ova]),
                                        n_test_other if rule == "test_margin" else (None, None))[0]
        return scope.for_site(chosen, reference, np.r_[po_in, po_other])[0] if rule == "product" else chosen

    t_scope = scope_rule(t_pooled, "test_margin")  # the pooled threshold's, as the gate measures it
    flagged_in, flagged_other = po_in >= t_scope, po_other >= t_scope
    sets = {"in_scope": p_in, "all": np.r_[p_in, p_other_dx], "all_but_flagged": np.r_[p_in[~flagged_in], p_other_dx[~flagged_other]]}
    truth, yp = y[pool], lambda t: evaluation.binary_metrics(y[pool], p_in, t)

    def scope_share(rule: str, t: float) -> dict[str, float]:
        """The site's melanomas and nevi flagged out of scope; its other diagnoses flagged (MEL call or out of scope)."""
        above = scope_rule(t, rule)
        out = {"threshold": round(float(above), 4), "in_scope_flagged": round(float((po_in >= above).mean()), 4)}
        if len(other):
            hit = (p_other_dx >= t) | (po_other >= above)
            out |= {"other_flagged": round(float(hit.mean()), 4),
                    "malignant_flagged": round(float(hit[np.isin(imgs.diagnosis[other], scope.MALIGNANT)].mean()), 4)}
        return out
    best = loso.spec_at(truth, p_in, TARGET)
    out = {"replicate": r, "n": int(len(pool)), "n_mel": int(truth.sum()), "n_other": int(len(other)),
           "auc": round(float(evaluation.binary_metrics(truth, p_in, 0.5)["auc"]), 4), "best_spec_at_sens85": round(best, 4),
           "pooled_threshold": {"threshold": round(float(t_pooled), 4), "sens": round(float(yp(t_pooled)["mel_sensitivity"]), 4),
                                "spec": round(float(yp(t_pooled)["mel_specificity"]), 4)},
           "estimate_at_pooled": {name: [round(v, 4) for v in operating.estimated(p, t_pooled)] for name, p in sets.items()},
           "by_set": {}}
    for name, p in sets.items():
        rows = {}
        for m in margins:
            t = operating.choose(p, TARGET, m)
            est_sens, est_spec = operating.estimated(p, t)
            real = yp(t)
            rows[f"margin={m:g}"] = {"threshold": round(t, 4), "estimated": [round(est_sens, 4), round(est_spec, 4)],
                                     "realised": [round(float(real["mel_sensitivity"]), 4), round(float(real["mel_specificity"]), 4)]}
            if name == "all" and abs(m - operating.MARGIN) < 1e-9:  # the product's margin: does its interval hold?
                sens, spec = operating.interval(p, t)
                rows[f"margin={m:g}"]["interval"] = {"sensitivity": sens.to_json(), "specificity": spec.to_json(),
                                                     "covered": [bool(sens.low <= real["mel_sensitivity"] <= sens.high),
                                                                 bool(spec.low <= real["mel_specificity"] <= spec.high)]}
            if name == "all":  # the review work and the other diagnoses released at this threshold
                scope_above = scope_rule(t)
                mel, other_flags = flags(s_in, po_in, t, scope_above)
                rows[f"margin={m:g}"]["nv_added_by_other_flags"] = round(float((other_flags & ~mel)[truth == 0].mean()), 4)
                rows[f"margin={m:g}"]["nv_mel_calls"] = round(float(mel[truth == 0].mean()), 4)
                if len(other):
                    mel_o, flags_o = flags(s_other, po_other, t, scope_above)
                    rows[f"margin={m:g}"]["other_silently_nv"] = round(float((~mel_o & ~flags_o).mean()), 4)
                if abs(m - operating.MARGIN) < 1e-9:  # out of scope at the product's point, rule by rule
                    rows[f"margin={m:g}"]["out_of_scope"] = {rule: scope_share(rule, t) for rule in RULES}
        out["by_set"][name] = rows
    log.info("%s held out, replicate %d: %s", held, r, json.dumps(out["by_set"]["all"]))
    return out


def summary(reps: list[dict], margins: list[float]) -> dict:
    out = {"auc": round(float(np.mean([q["auc"] for q in reps])), 4),
           "best_spec_at_sens85": round(float(np.mean([q["best_spec_at_sens85"] for q in reps])), 4)}
    for name in reps[0]["by_set"]:
        rows = {}
        for m in margins:
            key = f"margin={m:g}"
            err = [q["by_set"][name][key]["estimated"][0] - q["by_set"][name][key]["realised"][0] for q in reps]
            real = [q["by_set"][name][key]["realised"] for q in reps]
            rows[key] = {"sens_error_mean": round(float(np.mean(err)), 4), "sens_error_max": round(float(np.max(err)), 4),
                         "realised_sens_min": round(float(min(r[0] for r in real)), 4),
                         "realised_spec_mean": round(float(np.mean([r[1] for r in real])), 4),
                         "reached_0.85": f"{sum(r[0] >= TARGET for r in real)}/{len(real)}"}
            if "interval" in reps[0]["by_set"][name][key]:
                covered = [q["by_set"][name][key]["interval"]["covered"] for q in reps]
                rows[key]["interval_covers"] = {"sensitivity": f"{sum(c[0] for c in covered)}/{len(covered)}",
                                                "specificity": f"{sum(c[1] for c in covered)}/{len(covered)}"}
            if "out_of_scope" in reps[0]["by_set"][name][key]:
                rows[key]["out_of_scope"] = {}
                for rule in RULES:
                    got = [q["by_set"][name][key]["out_of_scope"][rule] for q in reps]
                    rows[key]["out_of_scope"][rule] = {
                        "in_scope_flagged_mean": round(float(np.mean([g["in_scope_flagged"] for g in got])), 4),
                        "in_scope_flagged_max": round(float(max(g["in_scope_flagged"] for g in got)), 4),
                        **{f"{k}_min": round(float(min(g[k] for g in got)), 4) for k in ("other_flagged", "malignant_flagged")
                           if k in got[0]}}
            for extra in ("nv_added_by_other_flags", "other_silently_nv"):
                if extra in reps[0]["by_set"][name][key]:
                    rows[key][extra + "_max"] = round(float(max(q["by_set"][name][key][extra] for q in reps)), 4)
        out[name] = rows
    return out


def main() -> None:
    parser = loso.parser(__doc__.split("\n")[0])
    parser.add_argument("--margins", default="0,0.05,0.08,0.1,0.12")
    args = parser.parse_args()
    home, settings, imgs = loso.start(args, "unlabelled-op-")
    config = make_config("demo")
    x = loso.feature_matrix(settings, imgs)
    margins = [float(m) for m in args.margins.split(",")]
    result = {"home": str(home), "target": TARGET, "head": f"{config.head} C={config.head_c:g}", "held_out": {}}
    for held in loso.HELD_OUT:
        reps = [one(imgs, x, held, r, margins, config) for r in range(args.replicates)]
        result["held_out"][held] = {"summary": summary(reps, margins), "replicates": reps}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
