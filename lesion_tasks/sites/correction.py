"""A site's labels correct its calibration; the corrected probabilities over all its images choose its threshold.

A clinic's few hundred labels hold a few dozen melanomas: one quantile of their low-score tail (a threshold
chosen on them alone) is noise, and so is their inverse-probability-weighted (IPW) sensitivity (its standard
deviation across draws of a 200-image sample: 0.03-0.04, measured; 0.07-0.10 at clinics the issue simulated). What
they estimate well is a correction of the calibration behind the site's unlabelled estimate (`sites.operating`),
from every labelled melanoma, nevus and other diagnosis:

    p~ = sigmoid(a + b z + c z^2 / 10),  z = logit(p)   (Steyerberg et al. 2004: recalibrate before you re-estimate)

fitted by IPW-weighted logistic regression on the out-of-sample scores of the site's labelled sample (scored by
a model that never trained on them: `sites.operating.evidence` says which), shrunk towards the identity (0, 1, 0:
the pooled calibration) by a ridge of SHRINK (CURVATURE_SHRINK times that on c) on the effective sample (the weights
rescaled to Kish's effective size, so a sample of unequal weights counts as what it is). Then, over ALL the site's
scored images, the expected sensitivity at t is sum(p~ : p >= t) / sum(p~), as the unlabelled estimate has it with
p~ for p (model-assisted estimation; Angelopoulos et al. 2023 for its prediction-powered kin).

The interval (`Corrected.at`) is a parametric-bootstrap percentile interval of the REALISED figure: BOOTSTRAP
resamples of the labelled sample, each refitting the correction, each drawing the site's labels from its own p~ and
counting the sensitivity and specificity they realise at t. It carries the sample's uncertainty about the
correction and the finite site's own spread; what it misses at a site never seen is ALLOWANCE (on the miss rate)
and SPEC_ALLOWANCE, measured by `bench/site_calibration_coverage.py` (leave-one-site-out, 50 draws of the sample
per held-out site and k). The threshold (`Corrected.operating_point`) is the highest at which the interval's lower end of
sensitivity meets the target.

Specificity is over the site's nevi: among the labelled non-melanomas, the share of other diagnoses is fitted by
score too (`fit_other`), so an image's nevus mass is (1 - p~)(1 - o~).

The labels-only IPW figures (`ipw_check`, exact Clopper-Pearson on effective counts) are shown beside the
estimate, as its check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lesion_tasks.model import evaluation, mc

SHRINK = 2.0  # ridge on the coefficients' distance from the identity, on the effective sample's log-likelihood
BOOTSTRAP = 200  # resamples of the labelled sample
LEVEL = 0.95
MIN_SLOPE = 0.05  # a correction never reverses the ranking
GRID = 400  # candidate thresholds: this many quantiles of the site's scores, at most
IDENTITY = np.array([0.0, 1.0, 0.0])
# the curvature's ridge, in multiples of SHRINK: measured (bench/site_calibration_coverage.py), a ridge of 1 x let 200
# labels bend the low tail as far as +2 logits (c = 0.6 at ISIC 2017), conservative for no coverage gained; 10 x held
# as often, at +0.02 specificity (50 x: the same as 10 x)
CURVATURE_SHRINK = 10.0
# what the bootstrap misses of the correction's error at a site never seen, measured leave-one-site-out
# (bench/site_calibration_coverage.py, 50 draws of the sample per held-out site and k): the stated bounds of
# sensitivity scale its miss rate (1 - sensitivity) by 1 + ALLOWANCE (the lower) and 1 / (1 + ALLOWANCE) (the
# upper): an error in proportion to the melanomas missed, so that a site whose model misses 0.5% is not told 4%.
# Measured 0, 0.2, 0.35, 0.5: 0.2 is the smallest at which the lower bound held in >= 90% of draws at k = 100 and 200
# at both held-out sites, but only just (45 of 50 at BCN_20000, whose own interval reaches 78%); 0.35 holds with room
# (46-50 of 50) at 0.02-0.03 of specificity (docs/sites.md, "What a clinic's labels do"). Specificity's interval
# widens by SPEC_ALLOWANCE (inside it: 49-50 of 50).
ALLOWANCE = 0.35
SPEC_ALLOWANCE = 0.05


def logit(p: np.ndarray) -> np.ndarray:
    return mc.logit(p, 1e-6)


def design(z: np.ndarray) -> np.ndarray:
    """The correction's covariates of logits `z`: 1, z and z^2 (the curvature lets the low-score tail, where a
    site's missed melanomas are, bend away from a straight line: measured, a straight logistic correction fitted on
    every BCN_20000 label still overstated sensitivity at 0.85 by 0.025-0.03, the curved one by 0.01)."""
    z = np.asarray(z, np.float64)
    return np.column_stack([np.ones(len(z)), z, z * z / 10.0])


def _newton(x: np.ndarray, y: np.ndarray, w: np.ndarray, shrink: float | np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Weighted logistic regression of `y` on `x`, a ridge of `shrink` (one per coefficient, or one for all)
    towards `prior`, the weights rescaled to Kish's effective size (a sample of unequal weights counts as what it is)."""
    w = w * evaluation.effective_size(w) / w.sum()
    ridge = np.broadcast_to(np.asarray(shrink, np.float64), prior.shape)
    beta = prior.copy()
    for _ in range(50):
        p = mc.sigmoid(x @ beta)
        grad = x.T @ (w * (p - y)) + ridge * (beta - prior)
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-9:
            break
    return beta


def fit(z: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, shrink: float = SHRINK) -> np.ndarray:
    """The coefficients of the correction p~ = sigmoid(design(z) @ beta) on logits `z` with labels `y` (1 =
    melanoma), weights `w` (IPW: 1 / inclusion probability); a ridge of `shrink` pulls beta towards (0, 1, 0), the
    identity. Newton's method on the penalised log-likelihood."""
    y = np.asarray(y, np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    beta = _newton(design(z), y, w, np.array([shrink, shrink, shrink * CURVATURE_SHRINK]), IDENTITY.copy())
    beta[1] = max(beta[1], MIN_SLOPE)
    return beta


def fit_other(z: np.ndarray, y: np.ndarray, other: np.ndarray, w: np.ndarray | None = None,
              shrink: float = SHRINK) -> np.ndarray | None:
    """Among the labelled non-melanomas, the share of other diagnoses by score: o~ = sigmoid(g0 + g1 z), a ridge
    towards their overall (weighted) share and no slope; None when the sample holds no other diagnosis (o~ = 0).
    Specificity is over nevi, so an image's nevus mass is (1 - p~)(1 - o~)."""
    keep = np.asarray(y) == 0
    other = np.asarray(other, np.float64)[keep]
    w = (np.ones(len(keep)) if w is None else np.asarray(w, np.float64))[keep]
    if not len(other) or not other.any():
        return None
    share = float(np.clip(np.average(other, weights=w), 1e-3, 1 - 1e-3))
    z = np.asarray(z, np.float64)[keep]
    return _newton(np.column_stack([np.ones(len(z)), z]), other, w, shrink, np.array([np.log(share / (1 - share)), 0.0]))


@dataclass(frozen=True)
class Figure:
    """An estimate and its interval (sensitivity or specificity at one threshold)."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Corrected:
    """A site's calibration corrected by its labels: the fitted coefficients, the bootstrap's refits, and the
    scores of all the site's images they apply to."""

    beta: np.ndarray  # (3,): intercept, slope and curvature on the logit (`design`)
    boot: np.ndarray  # (BOOTSTRAP, 3) refitted
    other: np.ndarray | None  # (2,) `fit_other`'s, None: no other diagnosis among the labels
    boot_other: list[np.ndarray | None]
    p: np.ndarray  # every scored image of the site (calibrated p_mel as scored)
    labelled: int
    melanomas: int
    effective_melanomas: float
    seed: int

    @classmethod
    def fit(cls, p_site: np.ndarray, p_labelled: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
            seed: int = 0, boot: int = BOOTSTRAP, shrink: float = SHRINK, other: np.ndarray | None = None) -> Corrected:
        """The correction from the labelled sample's out-of-sample scores `p_labelled`, labels `y` (1 = melanoma),
        `other` (1 = another diagnosis than melanoma or nevus; None: none) and IPW weights `w`, applied to the
        site's scored images `p_site`."""
        y = np.asarray(y, np.int64)
        if len(y) != len(p_labelled) or (w is not None and len(w) != len(y)) or not len(y):
            raise ValueError(f"labelled sample: {len(p_labelled)} scores, {len(y)} labels, "
                             f"{'no' if w is None else len(w)} weights: expected one of each per image, at least one")
        z = logit(p_labelled)
        w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
        other = np.zeros(len(y)) if other is None else np.asarray(other, np.float64)
        rng = np.random.default_rng(seed)
        refits, refits_other = np.empty((boot, len(IDENTITY))), []
        for i in range(boot):
            pick = rng.integers(0, len(y), len(y))
            refits[i] = fit(z[pick], y[pick], w[pick], shrink)
            refits_other.append(fit_other(z[pick], y[pick], other[pick], w[pick], shrink))
        return cls(fit(z, y, w, shrink), refits, fit_other(z, y, other, w, shrink), refits_other,
                   np.asarray(p_site, np.float64), len(y), int(y.sum()), evaluation.effective_size(w[y == 1]), seed)

    def corrected(self, beta: np.ndarray | None = None) -> np.ndarray:
        """p~ of every image of the site (the fitted correction, or `beta`)."""
        return mc.sigmoid(design(logit(self.p)) @ (self.beta if beta is None else beta))

    def _other(self, gamma: np.ndarray | None, z: np.ndarray) -> np.ndarray:
        return np.zeros(len(z)) if gamma is None else mc.sigmoid(gamma[0] + gamma[1] * z)

    def _realised(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sensitivity over the melanomas, specificity over the nevi) the site realises at each threshold, one row
        per bootstrap refit: labels drawn from that refit's p~ and o~ (seeded)."""
        rng = np.random.default_rng(self.seed + 1)
        n_above = len(self.p) - np.searchsorted(np.sort(self.p), thresholds, side="left")  # images with p >= t
        order = np.argsort(-self.p, kind="stable")
        z = logit(self.p[order])
        x = design(z)
        sens, spec = np.empty((len(self.boot), len(thresholds))), np.empty((len(self.boot), len(thresholds)))
        for i, (beta, gamma) in enumerate(zip(self.boot, self.boot_other)):
            u = rng.random((2, len(self.p)))
            mel = u[0] < mc.sigmoid(x @ beta)
            nevus = ~mel & (u[1] >= self._other(gamma, z))
            hit, nv = np.r_[0, np.cumsum(mel)], np.r_[0, np.cumsum(nevus)]  # among the k highest scores
            sens[i] = hit[n_above] / max(hit[-1], 1)
            spec[i] = (nv[-1] - nv[n_above]) / max(nv[-1], 1)
        return sens, spec

    def _estimated(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.p, kind="stable")
        q = self.corrected()[order]
        nevus = (1 - q) * (1 - self._other(self.other, logit(self.p[order])))
        cum_q, cum_nv = np.r_[0, np.cumsum(q)], np.r_[0, np.cumsum(nevus)]  # mass of the k lowest scores
        below = np.searchsorted(self.p[order], t, side="left")
        return (cum_q[-1] - cum_q[below]) / cum_q[-1], cum_nv[below] / max(cum_nv[-1], 1e-12)

    def _figures(self, thresholds: np.ndarray, allowance: float | None) -> list[tuple[Figure, Figure]]:
        """(sensitivity, specificity) at each threshold, one bootstrap pass for all of them: the estimate and its
        95% interval, widened by `allowance` (ALLOWANCE, on the miss rate) and SPEC_ALLOWANCE."""
        allowance = ALLOWANCE if allowance is None else allowance
        sens, spec = self._realised(thresholds)
        est_sens, est_spec = self._estimated(thresholds)
        (s_low, s_high), (p_low, p_high) = (np.quantile(v, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2], axis=0) for v in (sens, spec))
        return [(Figure(float(est_sens[j]), widened(s_low[j], allowance), float(1 - (1 - s_high[j]) / (1 + allowance))),
                 Figure(float(est_spec[j]), max(0.0, float(p_low[j]) - SPEC_ALLOWANCE),
                        min(1.0, float(p_high[j]) + SPEC_ALLOWANCE))) for j in range(len(thresholds))]

    def at(self, t: float, allowance: float | None = None) -> tuple[Figure, Figure]:
        """(sensitivity, specificity) at threshold `t`: the estimate and its 95% interval (`_figures`)."""
        return self._figures(np.array([t]), allowance)[0]

    def operating_point(self, target: float, allowance: float | None = None) -> tuple[float, Figure, Figure]:
        """(threshold, sensitivity, specificity): the highest threshold (a score of the site) at which the
        interval's lower end of sensitivity (the bootstrap's, its miss rate scaled by 1 + `allowance`) reaches
        `target` (the lowest score when none does), with its figures from the same bootstrap pass."""
        candidates = np.unique(np.quantile(self.p, np.linspace(0, 1, min(GRID, len(self.p)))))
        candidates = np.unique(self.p[np.searchsorted(np.sort(self.p), candidates).clip(0, len(self.p) - 1)])
        figures = self._figures(candidates, allowance)
        ok = [j for j, (sens, _) in enumerate(figures) if sens.low >= target]
        j = ok[-1] if ok else 0
        return float(candidates[j]), *figures[j]

    def choose(self, target: float, allowance: float | None = None) -> float:
        """The threshold of `operating_point`."""
        return self.operating_point(target, allowance)[0]


def widened(low: float | np.ndarray, allowance: float) -> float | np.ndarray:
    """A lower bound of sensitivity with its miss rate scaled by 1 + `allowance` (clipped at 0)."""
    out = np.maximum(0.0, 1 - (1 - np.asarray(low, np.float64)) * (1 + allowance))
    return float(out) if np.ndim(out) == 0 else out


def ipw_check(p_labelled: np.ndarray, y: np.ndarray, w: np.ndarray | None, t: float,
              nevus: np.ndarray | None = None) -> dict[str, list[float] | float | None]:
    """The labels-only figures at `t`: IPW sensitivity (over the sample's melanomas) and specificity (over its
    nevi: `nevus`, else every non-melanoma) with exact Clopper-Pearson 95% intervals on their effective counts."""
    y, p = np.asarray(y, np.int64), np.asarray(p_labelled, np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    keep = np.ones(len(y), bool) if nevus is None else (y == 1) | np.asarray(nevus, bool)
    ci = evaluation.exact_rates_ci(y[keep], p[keep], t, w[keep])
    out: dict[str, list[float] | float | None] = {}
    for key, m, hit in (("sensitivity", y == 1, True), ("specificity", keep & (y == 0), False)):
        out[key] = round(float(np.average((p[m] >= t) == hit, weights=w[m])), 4) if m.any() else None
        out[key + "_ci95"] = [round(v, 4) for v in ci["mel_" + key]] if ci["mel_" + key] else None
    out["effective_melanomas"] = round(evaluation.effective_size(w[y == 1]), 1)
    return out


def ipw_auc(p_labelled: np.ndarray, y: np.ndarray, w: np.ndarray | None, seed: int = 0,
            boot: int = BOOTSTRAP) -> tuple[float | None, list[float] | None]:
    """The site's AUC from its labelled sample (IPW-weighted, out-of-sample scores) and a 95% bootstrap interval
    over the sample (a ranking figure has no exact interval; None without both classes)."""
    y, p = np.asarray(y, np.int64), np.asarray(p_labelled, np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    if not 0 < y.sum() < len(y):
        return None, None
    auc = evaluation.binary_metrics(y, p, 0.5, w)["auc"]
    rng, values = np.random.default_rng(seed), []
    for _ in range(boot):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            values.append(evaluation.binary_metrics(y[pick], p[pick], 0.5, w[pick])["auc"])
    return float(auc), [float(v) for v in np.quantile(values, [0.025, 0.975])]
