"""Out of scope: lesions that are neither melanoma nor nevus (basal and squamous cell carcinoma,
actinic and benign keratoses, dermatofibroma, vascular lesions).

The melanoma head only knows MEL and NV, so it scores such a lesion as one of the two. A separate
in-scope / out-of-scope head on the same pooled backbone features (a class-balanced, standardised
logistic regression, trained on ISIC's OTHER images) gives `p_other`; an image with p_other at or
above the version's threshold is flagged `out_of_scope` for review. The threshold is chosen on the
validation split so that, together with "predicted MEL", the OTHER images and the malignant ones (BCC,
SCC, AK) are flagged at the gate's floors plus a margin: the test split is a finite sample too, and its
recall must still reach the floor with 95% probability (`evaluation.target_with_margin`). A separate head was chosen over a
third class of the melanoma head by measurement (bench/model_selection.py): it leaves the MEL/NV head,
its calibration and Monte Carlo dropout exactly as they were.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lesion_tasks.model.evaluation import clopper_pearson, target_with_margin
from lesion_tasks.model.mc import logit, sigmoid

MALIGNANT = ("BCC", "SCC", "AK")
# decision thresholds at which a version records its out-of-scope threshold (`ReviewRule.out_of_scope_by_threshold`):
# log-spaced over the range sites' operating points move in
DECISION_GRID = tuple(float(g) for g in np.round(np.geomspace(0.01, 0.9, 40), 6))  # labels.challenge_code
# a site's out-of-scope threshold follows its own images (`for_site`): the SITE_QUANTILE-th quantile of logit p_other
# over them against the same quantile over the validation in-scope images, the difference added, up to SITE_SHIFT_CAP
SITE_QUANTILE = 0.2
SITE_SHIFT_CAP = 1.0


@dataclass(frozen=True)
class ScopeHead:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    # no threshold here: it is the version's, stored once in the registry (ModelVersion.scope_threshold)

    def p_other(self, features: np.ndarray) -> np.ndarray:
        z = ((features.astype(np.float32) - self.mean) / self.scale) @ self.coef + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in asdict(self).items()})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ScopeHead:
        arrays = np.load(io.BytesIO(data))
        # files written before the threshold moved to the registry still hold one: ignored
        return cls(arrays["mean"], arrays["scale"], arrays["coef"], float(arrays["intercept"]))


def fit(x_in: np.ndarray, x_other: np.ndarray, seed: int = 0, c: float = 0.01) -> ScopeHead:
    """The head on in-scope (MEL/NV) and OTHER training features, classes weighted equally. C = 0.01: on
    validation it flags the targets' share of OTHER images at the lowest cost in nevi (0.155 of nevi vs
    0.175-0.201 for C = 1 and 0.1, 0.161 for a one-hidden-layer MLP)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if not len(x_other):
        raise ValueError("no OTHER images in the training split: the out-of-scope head needs ISIC-labelled "
                         "lesions that are neither MEL nor NV (e.g. the ISIC 2019 drop)")
    x = np.concatenate([x_in, x_other]).astype(np.float32)
    y = np.r_[np.zeros(len(x_in)), np.ones(len(x_other))]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed).fit(scaler.transform(x), y)
    return ScopeHead(scaler.mean_.astype(np.float32), np.maximum(scaler.scale_, 1e-6).astype(np.float32),
                     clf.coef_[0].astype(np.float32), float(clf.intercept_[0]))


def _needed_threshold(p_other: np.ndarray, predicted_mel: np.ndarray, target: float) -> float:
    """The highest threshold flagging at least `target` of these images together with predicted MEL."""
    if not len(p_other):
        return 1.0
    need = int(np.ceil(target * len(p_other))) - int(predicted_mel.sum())
    rest = np.sort(p_other[~predicted_mel])[::-1]
    if need <= 0:
        return 1.0
    return float(rest[min(need, len(rest)) - 1])


def choose_threshold(p_other: np.ndarray, predicted_mel: np.ndarray, diagnoses: list[str], floor: float,
                     malignant_floor: float, lesions: list[str] | None = None,
                     n_test: tuple[int | None, int | None] = (0, 0)) -> tuple[float, dict[str, float]]:
    """On validation OTHER images: the highest threshold whose recall (with predicted MEL) reaches each
    floor plus its margin (`evaluation.target_with_margin`; `n_test` = OTHER and malignant images in the
    test split, None: a site's whole population). Returns (threshold, the targets used)."""
    malignant = np.isin(np.asarray(diagnoses, dtype=object), MALIGNANT)
    lesions_arr = np.asarray(lesions if lesions else range(len(p_other)), dtype=object)
    targets = {}
    for name, mask, floor_, tested in (("all", np.ones(len(p_other), bool), floor, n_test[0]),
                                       ("malignant", malignant, malignant_floor, n_test[1])):
        per_lesion = mask.sum() / max(len(set(lesions_arr[mask].tolist())), 1)
        targets[name] = target_with_margin(floor_, int(mask.sum()), tested, per_lesion)
    t = min(_needed_threshold(p_other, predicted_mel, targets["all"]),
            _needed_threshold(p_other[malignant], predicted_mel[malignant], targets["malignant"]))
    return t, targets


def recall_table(p_other: np.ndarray, predicted_mel: np.ndarray, diagnoses: list[str], threshold: float,
                 p_other_in_scope: np.ndarray, y_in_scope: np.ndarray,
                 predicted_mel_in_scope: np.ndarray | None = None) -> dict[str, Any]:
    """Out-of-scope recall per diagnosis (flagged = out_of_scope or predicted MEL), overall, for the
    malignant ones, and the price: the share of MEL and NV images flagged out_of_scope too, and (given
    `predicted_mel_in_scope`) of nevi flagged out_of_scope without a MEL call: the review work it adds."""
    oos = p_other >= threshold
    flagged = oos | predicted_mel
    diagnoses_arr = np.array(diagnoses, dtype=object)

    def row(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        hits = {"flagged": flagged[mask], "out_of_scope": oos[mask], "predicted_mel": predicted_mel[mask]}
        return {"n": n, **{k: float(v.mean()) if n else None for k, v in hits.items()},
                "ci95": {k: clopper_pearson(int(v.sum()), n) for k, v in hits.items()}}  # exact: n may be 4

    malignant = np.isin(diagnoses_arr, MALIGNANT)
    in_scope_oos = p_other_in_scope >= threshold
    return {
        "threshold": float(threshold),
        "all": row(np.ones(len(diagnoses), bool)),
        "malignant": row(malignant),
        "by_diagnosis": {d: row(diagnoses_arr == d) for d in sorted(set(diagnoses))},
        "n_mel": int((y_in_scope == 1).sum()), "n_nv": int((y_in_scope == 0).sum()),  # what the price is out of
        "mel_flagged_out_of_scope": float(in_scope_oos[y_in_scope == 1].mean()) if (y_in_scope == 1).any() else None,
        "nv_flagged_out_of_scope": float(in_scope_oos[y_in_scope == 0].mean()) if (y_in_scope == 0).any() else None,
        **({"nv_flagged_out_of_scope_only": float((in_scope_oos & ~predicted_mel_in_scope)[y_in_scope == 0].mean())
            if (y_in_scope == 0).any() else None} if predicted_mel_in_scope is not None else {}),
    }


def site_reference(p_other_in_scope: np.ndarray) -> float | None:
    """What a site's images are compared with (`for_site`): the SITE_QUANTILE-th quantile of logit p_other over the
    validation in-scope (MEL and NV) images; None without any."""
    return float(np.quantile(logit(p_other_in_scope), SITE_QUANTILE)) if len(p_other_in_scope) else None


def for_site(threshold: float | None, reference: float | None, p_other_site: np.ndarray) -> tuple[float | None, float]:
    """(the out-of-scope threshold at a site, how far it was raised on the logit scale) from the p_other of the
    site's scored images. At a clinic whose camera or population the backbone has not seen, every lesion looks a
    little out of scope: its in-scope lesions' p_other rise together. The site's lower quantile is made of its
    in-scope lesions whenever they are more than SITE_QUANTILE of its images, so its distance from the validation
    in-scope images' is the site's shift; the threshold rises by it (never falls: a site that looks more in scope
    keeps the version's), at most SITE_SHIFT_CAP. Other diagnoses make the shift look larger than it is (with a
    share s of them the quantile is the in-scope lesions' SITE_QUANTILE / (1 - s)): the cap bounds what that takes
    from their recall. Measured leave-one-site-out (docs/model.md, "Out of scope at a new clinic")."""
    if threshold is None or reference is None or not len(p_other_site) or threshold >= 1.0:
        return threshold, 0.0
    shift = float(np.clip(np.quantile(logit(p_other_site), SITE_QUANTILE) - reference, 0.0, SITE_SHIFT_CAP))
    return float(sigmoid(logit(threshold) + shift)), shift
