"""Metrics on the frozen test split: discrimination, calibration, uncertainty and referral.

Labels: 1 = MEL, 0 = NV. `p` is the MC-dropout mean p(MEL); a case is predicted MEL when p >= t. `t` is one
threshold, or one per case (each site's own, `thresholds_by_site`); `w` optional case weights (inverse
inclusion probabilities of a site's validation sample: the metrics then estimate the site's population).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, classification_report, confusion_matrix, roc_auc_score

ECE_BINS = 15
REFERRAL_FRACTIONS = tuple(round(f, 2) for f in np.arange(0.0, 0.501, 0.05))


def _at(t: Any, idx: Any) -> Any:
    """The threshold(s) of the cases `idx`: `t` itself when it is one threshold for all."""
    return t if np.ndim(t) == 0 else np.asarray(t)[idx]


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float, w: np.ndarray | None = None) -> float:
    """A threshold whose melanoma sensitivity on (y, p) is >= target, as high as that allows.

    The highest such threshold is the score of the k-th highest melanoma, where a test melanoma scored a
    hair lower would be missed. The threshold is the midpoint between it and the next lower score (of
    any case): the same sensitivity and specificity on (y, p), with that gap as margin. On a validation
    split the model separates perfectly, this is the middle of the gap between melanomas and nevi. With
    weights `w`, the weighted share of melanomas at or above t reaches the target.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity {target}: expected a value in (0, 1]")
    order = np.argsort(-p[y == 1], kind="stable")
    positives = p[y == 1][order]
    if len(positives) == 0:
        raise ValueError("no melanoma in the validation split: cannot choose a threshold")
    if w is None:
        k = int(np.ceil(target * len(positives)))  # this many melanomas must be at or above t
    else:
        share = np.cumsum(w[y == 1][order]) / w[y == 1].sum()
        k = int(np.searchsorted(share, target - 1e-12)) + 1
    highest = float(positives[k - 1])
    below = p[p < highest]
    return (highest + float(below.max())) / 2 if below.size else highest


def target_with_margin(floor: float, n_val: float, n_test: int | None, images_per_lesion: float = 1.0,
                      z: float = 1.645) -> float:
    """The validation rate (sensitivity, recall) to aim for so that a test split of `n_test` images still
    reaches `floor` with 95% probability: the floor plus z standard errors of the difference between two
    binomial estimates (validation and test), inflated by the images per lesion (photographs of one lesion
    are not independent evidence). `n_test=None`: the site's whole population (only the validation
    estimate's error counts); `n_val` may be an effective sample size (weighted evidence)."""
    if not n_val or n_test == 0:
        return floor
    inv_test = 0.0 if n_test is None else 1 / n_test
    return min(1.0, floor + z * float(np.sqrt(floor * (1 - floor) * images_per_lesion * (1 / n_val + inv_test))))


def effective_size(w: np.ndarray) -> float:
    """Kish's effective sample size of weights `w`: (sum w)^2 / sum w^2 (= len(w) when all are equal)."""
    w = np.asarray(w, np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum()) if len(w) else 0.0


def _safe_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    return float(roc_auc_score(y, p, sample_weight=w)) if 0 < y.sum() < len(y) else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, t: Any, w: np.ndarray | None = None) -> dict[str, Any]:
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1], sample_weight=w).ravel()
    if w is not None:  # weighted counts: rates estimate the population; n and n_mel stay case counts
        tn, fp, fn, tp = (float(v) for v in (tn, fp, fn, tp))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return {
        "n": int(len(y)), "n_mel": int(y.sum()), "threshold": float(t) if np.ndim(t) == 0 else None,
        "auc": _safe_auc(y, p, w),
        "average_precision": float(average_precision_score(y, p, sample_weight=w)) if y.sum() else float("nan"),
        "mel_sensitivity": float(sens), "mel_specificity": float(spec),
        "nv_sensitivity": float(spec), "nv_specificity": float(sens),
        "balanced_accuracy": float((sens + spec) / 2),
        "accuracy": float((tp + tn) / (tp + tn + fp + fn)) if len(y) else float("nan"),
        "ppv": float(tp / (tp + fp)) if tp + fp else float("nan"),
        "npv": float(tn / (tn + fn)) if tn + fn else float("nan"),
        "confusion": {"labels": ["NV", "MEL"], "matrix": [[int(tn), int(fp)], [int(fn), int(tp)]]},
        "confusion_normalized": {"labels": ["NV", "MEL"], "matrix": [
            [float(tn / max(tn + fp, 1)), float(fp / max(tn + fp, 1))],
            [float(fn / max(fn + tp, 1)), float(tp / max(fn + tp, 1))]]},
    }


def calibration(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE (equal-width bins on p(MEL)), Brier score, negative log-likelihood, reliability table."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            conf, freq = float(p[mask].mean()), float(y[mask].mean())
            ece += mask.mean() * abs(conf - freq)
            table.append({"bin": b, "n": int(mask.sum()), "mean_p": conf, "frac_mel": freq})
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    return {
        "ece": float(ece),
        "brier": float(np.mean((p - y) ** 2)),
        "nll": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))),
        "reliability": table,
    }


def referral_curve(y: np.ndarray, p: np.ndarray, uncertainty: np.ndarray, t: float) -> list[dict[str, Any]]:
    """Metrics on the cases kept after referring the most uncertain fraction to a clinician."""
    order = np.argsort(-uncertainty, kind="stable")
    out = []
    for frac in REFERRAL_FRACTIONS:
        keep = np.sort(order[int(round(frac * len(y))):])
        m = binary_metrics(y[keep], p[keep], _at(t, keep))
        out.append({"referred": frac, "kept": int(len(keep)), "auc": m["auc"], "mel_sensitivity": m["mel_sensitivity"],
                    "mel_specificity": m["mel_specificity"], "balanced_accuracy": m["balanced_accuracy"]})
    return out


def bootstrap_ci(y: np.ndarray, p: np.ndarray, t: Any, n: int = 1000, seed: int = 0,
                 w: np.ndarray | None = None) -> dict[str, list[float]]:
    """95% percentile intervals by resampling test cases (stratified: both classes kept; with weights `w`
    each resampled case keeps its weight, so the intervals are those of the weighted estimate)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    stats: dict[str, list[float]] = {"auc": [], "mel_sensitivity": [], "mel_specificity": [], "balanced_accuracy": []}
    for _ in range(n):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        m = binary_metrics(y[i], p[i], _at(t, i), None if w is None else w[i])
        for k in stats:
            stats[k].append(m[k])
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in stats.items()}


def paired_delta(y: np.ndarray, p_new: np.ndarray, t_new: Any, p_old: np.ndarray, t_old: Any,
                 n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Challenger minus champion on the same cases, with paired-bootstrap 95% intervals (None without resamples,
    `n` = 0: the gate then cannot tell "not worse" and says so)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def delta(i):
        a, b = binary_metrics(y[i], p_new[i], _at(t_new, i)), binary_metrics(y[i], p_old[i], _at(t_old, i))
        return a["auc"] - b["auc"], a["mel_sensitivity"] - b["mel_sensitivity"]

    point = delta(np.arange(len(y)))
    draws = np.array([delta(np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])) for _ in range(n)])

    def ci(k: int) -> list[float | None]:
        return [float(v) for v in np.nanpercentile(draws[:, k], [2.5, 97.5])] if n else [None, None]

    return {"auc_delta": float(point[0]), "auc_delta_ci95": ci(0),
            "mel_sensitivity_delta": float(point[1]), "mel_sensitivity_delta_ci95": ci(1)}


def evaluate(y: np.ndarray, p: np.ndarray, entropy: np.ndarray, mutual_info: np.ndarray, t: Any,
             bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything the report and the gate need, for one split."""
    out = binary_metrics(y, p, t)
    out.update(calibration(y, p))
    wrong = (p >= t).astype(int) != y
    out["entropy_right_mean"] = float(entropy[~wrong].mean()) if (~wrong).any() else float("nan")
    out["entropy_wrong_mean"] = float(entropy[wrong].mean()) if wrong.any() else float("nan")
    out["mutual_info_mean"] = float(mutual_info.mean())
    out["uncertainty_auc_for_errors"] = _safe_auc(wrong.astype(int), entropy)
    out["referral"] = referral_curve(y, p, entropy, t)
    out["ci95"] = bootstrap_ci(y, p, t, bootstrap, seed) if bootstrap else {}
    out["classification_report"] = classification_report(
        y, (p >= t).astype(int), labels=[0, 1], target_names=["NV", "MEL"], zero_division=0)
    return out


def clopper_pearson(successes: float, n: float, level: float = 0.95) -> list[float] | None:
    """The exact (Clopper-Pearson) interval of a proportion: successes of n trials (None without trials). With
    weighted evidence, pass the effective counts (rate x Kish's effective size): the interval of the weighted rate."""
    from scipy.stats import beta

    if n <= 0:
        return None
    x, alpha = min(max(float(successes), 0.0), float(n)), 1 - level
    low = 0.0 if x <= 0 else float(beta.ppf(alpha / 2, x, n - x + 1))
    high = 1.0 if x >= n else float(beta.ppf(1 - alpha / 2, x + 1, n - x))
    return [low, high]


def exact_rates_ci(y: np.ndarray, p: np.ndarray, t: Any, w: np.ndarray | None = None) -> dict[str, list[float] | None]:
    """Clopper-Pearson 95% intervals of sensitivity (over the melanomas) and specificity (over the nevi) at t; with
    weights, on the effective counts of each class. Exact at every count: 5 of 5 melanomas found reads
    [0.478, 1.0], never a bootstrap's collapsed [1.0, 1.0]."""
    pred = np.asarray(p) >= t
    out = {}
    for key, cls, hit in (("mel_sensitivity", 1, True), ("mel_specificity", 0, False)):
        m = y == cls
        wm = np.ones(int(m.sum())) if w is None else np.asarray(w, np.float64)[m]
        n_eff = effective_size(wm)
        rate = float(np.average(pred[m] == hit, weights=wm)) if m.any() else 0.0
        out[key] = clopper_pearson(rate * n_eff, n_eff)
    return out


def by_group(y: np.ndarray, p: np.ndarray, groups: np.ndarray, t: Any, bootstrap: int = 0, seed: int = 0,
             min_mel_for_ci: int = 30, w: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Binary metrics and calibration per group (each case's drop, or its site): a pooled figure can hide a group the
    model fails on. Sensitivity and specificity get exact (Clopper-Pearson) 95% intervals at every count; AUC and
    balanced accuracy bootstrap ones where a group has at least `min_mel_for_ci` melanomas (`ci95_method` says
    which). With weights `w` (a site's inverse inclusion probabilities), rates and AUC are weighted (the exact
    intervals on effective counts), calibration is not."""
    out = {}
    for group in sorted(set(groups.tolist())):
        m = groups == group
        wm = None if w is None else w[m]
        part = binary_metrics(y[m], p[m], _at(t, m), wm)
        if np.ndim(t):
            part["threshold"] = float(np.asarray(t)[m][0])  # one site, one threshold
        part.update({k: v for k, v in calibration(y[m], p[m]).items() if k != "reliability"})
        ci: dict[str, Any] = {}
        if bootstrap and y[m].sum() >= min_mel_for_ci and (y[m] == 0).sum():
            ci = bootstrap_ci(y[m], p[m], _at(t, m), bootstrap, seed, wm)
        exact = {k: v for k, v in exact_rates_ci(y[m], p[m], _at(t, m), wm).items() if v is not None}
        if bootstrap and exact:
            part["ci95"] = {k: v for k, v in ci.items() if k in ("auc", "balanced_accuracy")} | exact
            part["ci95_method"] = {k: "clopper-pearson" if k in exact else "bootstrap" for k in part["ci95"]}
        del part["confusion_normalized"]
        out[group] = part
    return out


def isic_csvs(image_ids: list[str], y: np.ndarray, p: np.ndarray, t: Any) -> tuple[str, str]:
    """(ground truth, predictions) in the ISIC challenge layout (`image,MEL,NV`).

    The scorer counts a case positive when its score is > 0.5; predictions are exported as a
    monotone map of p(MEL) that crosses 0.5 exactly at our threshold t, so the scorer's
    sensitivity, specificity and balanced accuracy are those at t, and its AUC is unchanged (with one
    threshold per case, each site's, the map is monotone within a site only: the pooled AUC may differ).
    """
    s = np.where(p >= t, 0.5 + 1e-6 + (0.5 - 2e-6) * (p - t) / np.maximum(1 - t, 1e-12), 0.5 * p / np.maximum(t, 1e-12))
    truth, pred = io.StringIO(), io.StringIO()
    truth_csv, pred_csv = csv.writer(truth, lineterminator="\n"), csv.writer(pred, lineterminator="\n")
    truth_csv.writerow(["image", "MEL", "NV"])
    pred_csv.writerow(["image", "MEL", "NV"])
    for i, label, score in zip(image_ids, y, s):
        truth_csv.writerow([i, float(label), float(1 - label)])
        pred_csv.writerow([i, f"{score:.9f}", f"{1 - score:.9f}"])
    return truth.getvalue(), pred.getvalue()


def json_safe(value: Any) -> Any:
    """NaN/inf (undefined metrics, e.g. AUC on one class) -> None: valid JSON for Postgres and files."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
