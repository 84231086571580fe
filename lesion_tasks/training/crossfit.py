"""Cross-fitting: out-of-fold scores over all of a site's labelled training and validation images.

A clinic labels a few hundred images (its validation sample, `sites.sample`), so a fixed validation
split leaves it a dozen melanomas: too few to choose a threshold on. Instead its labelled train+val images
are cut into folds by lesion (stratified by label); for each fold the head is refitted without that fold's
images (calibrated on the validation split minus the fold, early-stopped on it), and the fold is scored by
that head. Every one of the site's labelled images then has an out-of-sample score, IPW-weighted by its
inclusion probability, on which the site's threshold is chosen and its validation figures are estimated.
The site's test split stays untouched: its figures, and the site's status, still rest on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lesion_tasks.data import trainset
from lesion_tasks.model import mc
from lesion_tasks.sites.thresholds import OutOfFold

log = logging.getLogger(__name__)
FOLDS = 5


@dataclass(frozen=True)
class Labelled:
    """The labelled images of one split: features per augmentation view, labels (1 = MEL), ids, sites, lesions."""

    views: list[np.ndarray]
    y: np.ndarray
    ids: list[str]
    sites: np.ndarray
    lesions: np.ndarray

    def without(self, drop: np.ndarray) -> Labelled:
        keep = ~drop
        return Labelled([v[keep] for v in self.views], self.y[keep], [i for i, k in zip(self.ids, keep) if k],
                        self.sites[keep], self.lesions[keep])


def out_of_fold(site: str, train: Labelled, val: Labelled, fit, version: str, mc_samples: int, seed: int,
                sample_weight=None) -> OutOfFold | None:
    """Out-of-fold scores of `site`'s train+val images, or None when it holds fewer than 2 melanomas or
    nevi (no fold could hold both). `fit(train_views, y, x_val, y_val, sample_weight)` returns a Keras head
    (`heads.fit` with the run's settings); `sample_weight(ids)` the training weight of each image."""
    in_train, in_val = train.sites == site, val.sites == site
    y = np.concatenate([train.y[in_train], val.y[in_val]])
    lesions = np.concatenate([train.lesions[in_train], val.lesions[in_val]])
    n_mel, n_nv = int(y.sum()), int(len(y) - y.sum())
    folds = min(FOLDS, n_mel, n_nv, len(set(lesions.tolist())))
    if folds < 2:
        return None
    x0 = np.concatenate([train.views[0][in_train], val.views[0][in_val]])
    ids = [i for i, k in zip(train.ids, in_train) if k] + [i for i, k in zip(val.ids, in_val) if k]
    fold_of = np.empty(len(y), np.int64)
    for k, (_, part) in enumerate(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                                  .split(np.zeros(len(y)), y, lesions)):
        fold_of[part] = k
    p = np.empty(len(y), np.float64)
    calibrated_logits = None
    n_train = int(in_train.sum())
    for k in range(folds):
        out_train = np.zeros(len(train.y), bool)
        out_train[np.flatnonzero(in_train)[fold_of[:n_train] == k]] = True
        out_val = np.zeros(len(val.y), bool)
        out_val[np.flatnonzero(in_val)[fold_of[n_train:] == k]] = True
        t, v = train.without(out_train), val.without(out_val)
        if not v.y.sum() or v.y.sum() == len(v.y):
            raise ValueError(f"site {site}: fold {k} leaves validation with one class only: cannot cross-fit")
        head = mc.HeadWeights.from_model(fit(t.views, t.y, v.views[0], v.y,
                                             None if sample_weight is None else sample_weight(t.ids)))
        cal_a, cal_b = mc.fit_calibration(mc.logits_for(head, v.views[0], v.ids, version, mc_samples, seed), v.y)
        head = replace(head, cal_a=cal_a, cal_b=cal_b)
        mine = fold_of == k
        fold_ids = [i for i, m in zip(ids, mine) if m]
        fold_logits = head.cal_a * mc.logits_for(head, x0[mine], fold_ids, version, mc_samples, seed) + head.cal_b
        if calibrated_logits is None:
            calibrated_logits = np.empty((len(y), fold_logits.shape[1]), fold_logits.dtype)
        calibrated_logits[mine] = fold_logits
        p[mine], _, _ = mc.summarize(mc.sigmoid(calibrated_logits[mine]))
        log.info("site %s: fold %d/%d scored (%d images, %d melanomas)", site, k + 1, folds, int(mine.sum()),
                 int(y[mine].sum()))
    return OutOfFold(ids, y, p, lesions, folds, calibrated_logits, fold_of)


def training_weights(ids: list[str], pi: dict[str, float], site_weight: float) -> np.ndarray | None:
    """The training weight of each image: `site_weight` for a site's own labelled images (those of its
    validation sample: an inclusion probability `pi`, NaN outside every sample), 1 for the rest; None when no
    image is in a sample (every weight 1)."""
    sampled = np.array([not np.isnan(pi[i]) for i in ids], bool)
    return np.where(sampled, site_weight, 1.0) if sampled.any() else None


def sampled_sites(train: Labelled, val: Labelled, pi: dict[str, float], fit, version: str, mc_samples: int, seed: int,
                  site_weight: float) -> dict[str, tuple[OutOfFold, np.ndarray]]:
    """{site: (out-of-fold scores, their IPW weights 1/pi)} for every site with labelled images from its
    validation sample: the sites a fixed validation split leaves with too few melanomas."""
    sites = sorted({s for i, s in zip(train.ids + val.ids, [*train.sites, *val.sites]) if not np.isnan(pi[i])})
    out = {}
    for site in sites:
        oof = out_of_fold(site, train, val, fit, version, mc_samples, seed,
                          lambda ids: training_weights(ids, pi, site_weight))
        if oof is not None:
            out[site] = (oof, trainset.ipw(np.array([pi[i] for i in oof.ids])))
    return out
