"""Which label an image trains and is evaluated with: the one training-label policy.

- The ISIC label (`images.label`, from the drop's ground truth or metadata) always wins.
- Where ISIC gave no label, the latest reviewer verdict (review UI) counts: MEL or NV for the binary
  task, OTHER ("neither") for the out-of-scope head; by default it is training data only (`splits.assign`
  keeps such images out of validation and test; `LESION_VERDICTS_VALIDATE=1` lets them split like any label).
- A reviewer disagreeing with an ISIC label is counted as a conflict in the model's lineage, never applied.
- Only MEL and NV enter the binary task; OTHER images (every other ISIC diagnosis) train and test the
  out-of-scope signal (`out_of_scope_refs`); unlabelled images are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.schema import images, reviews, site_samples, splits
from lesion_tasks.ingest.labels import challenge_code
from lesion_tasks.model.features import ImageRef

BINARY = ("MEL", "NV")


def latest_reviews() -> sa.Subquery:
    """id of the latest review per image (a verdict belongs to the image, whichever model version was shown)."""
    return sa.select(reviews.c.image_id, sa.func.max(reviews.c.id).label("review_id")).group_by(reviews.c.image_id).subquery()


def reviewer_labels(conn: sa.Connection) -> dict[str, Any]:
    """Reviewer labels that become training data: {"labels": {image_id: MEL|NV|OTHER}, "review_ids",
    "conflicts_with_isic"} (see the module's policy)."""
    latest = latest_reviews()
    rows = conn.execute(sa.select(reviews.c.image_id, reviews.c.label, reviews.c.id, images.c.label.label("isic"))
                        .join(latest, latest.c.review_id == reviews.c.id)
                        .join(images, images.c.image_id == reviews.c.image_id)
                        .order_by(reviews.c.image_id)).all()
    used = {r.image_id: r.label for r in rows if r.isic is None}  # reviews.label is MEL, NV or OTHER
    return {"labels": used,
            "review_ids": sorted(r.id for r in rows if r.image_id in used),
            "conflicts_with_isic": sorted(r.image_id for r in rows if r.isic is not None and r.label != r.isic)}


def label_of(isic_label: str | None, image_id: str, reviewed: dict[str, str]) -> str | None:
    """The label an image trains with (MEL, NV), or None when it is not in the binary task."""
    label = isic_label or reviewed.get(image_id)
    return label if label in BINARY else None


def split_refs(conn: sa.Connection, reviewed: dict[str, str] | None = None
               ) -> dict[str, tuple[list[ImageRef], np.ndarray]]:
    """Images and labels (1 = MEL) per split, by `label_of`; `reviewed` defaults to `reviewer_labels`."""
    reviewed = reviewer_labels(conn)["labels"] if reviewed is None else reviewed
    rows = conn.execute(
        sa.select(images.c.image_id, images.c.drop_id, images.c.normalized_uri, images.c.label, splits.c.split)
        .join(splits, splits.c.image_id == images.c.image_id).order_by(images.c.image_id)).all()
    out = {}
    for split in ("train", "val", "test"):
        part = [(r, label_of(r.label, r.image_id, reviewed)) for r in rows if r.split == split]
        part = [(r, label) for r, label in part if label]
        out[split] = ([ImageRef(r.image_id, r.drop_id, r.normalized_uri) for r, _ in part],
                      np.array([1 if label == "MEL" else 0 for _, label in part], np.int64))
    return out


def lesion_of(conn: sa.Connection, image_ids: list[str]) -> list[str]:
    """The ISIC lesion_id of each image, else its near-duplicate group (for lesion-level resampling)."""
    rows = dict(conn.execute(sa.select(images.c.image_id, sa.func.coalesce(images.c.lesion_id, images.c.near_dup_group))
                             .where(images.c.image_id.in_(image_ids))).all()) if image_ids else {}
    return [rows[i] for i in image_ids]


def site_of(conn: sa.Connection, image_ids: list[str]) -> list[str]:
    """The site of each image (`images.site`)."""
    rows = dict(conn.execute(sa.select(images.c.image_id, images.c.site)
                             .where(images.c.image_id.in_(image_ids))).all()) if image_ids else {}
    return [rows[i] for i in image_ids]


def inclusion_probabilities(conn: sa.Connection, image_ids: list[str]) -> np.ndarray:
    """Each image's inclusion probability in its site's validation sample (`site_samples`), NaN for an image
    outside every sample (ISIC drops, labelled in full)."""
    pi = dict(conn.execute(sa.select(site_samples.c.image_id, site_samples.c.inclusion_probability)
                           .where(site_samples.c.image_id.in_(image_ids))).all()) if image_ids else {}
    return np.array([pi[i] if pi.get(i) else np.nan for i in image_ids], dtype=np.float64)


def sample_weights(conn: sa.Connection, image_ids: list[str]) -> np.ndarray:
    """Inverse inclusion probability of each image in its site's validation sample, 1 for an image outside
    every sample: the weight that makes a site's metrics estimate its whole population rather than the
    melanoma-rich sample."""
    return ipw(inclusion_probabilities(conn, image_ids))


def ipw(pi: np.ndarray) -> np.ndarray:
    """1/pi, and 1 where pi is NaN (an image outside every sample)."""
    pi = np.asarray(pi, dtype=np.float64)
    return np.where(np.isnan(pi), 1.0, 1.0 / np.where(np.isnan(pi), 1.0, pi))


def out_of_scope_refs(conn: sa.Connection, reviewed: dict[str, str] | None = None
                      ) -> dict[str, tuple[list[ImageRef], list[str]]]:
    """OTHER images (ISIC's, and reviewer-labelled ones in training) and their diagnoses as challenge codes
    (BCC, AK, ...; "OTHER" where a reviewer gave none) per split; `reviewed` defaults to `reviewer_labels`."""
    reviewed = reviewer_labels(conn)["labels"] if reviewed is None else reviewed
    by_reviewer = sorted(i for i, label in reviewed.items() if label == "OTHER")
    rows = conn.execute(
        sa.select(images.c.image_id, images.c.drop_id, images.c.normalized_uri, images.c.diagnosis, splits.c.split)
        .join(splits, splits.c.image_id == images.c.image_id)
        .where(sa.or_(images.c.label == "OTHER", sa.and_(images.c.label.is_(None), images.c.image_id.in_(by_reviewer))))
        .order_by(images.c.image_id)).all()
    return {split: ([ImageRef(r.image_id, r.drop_id, r.normalized_uri) for r in rows if r.split == split],
                    [challenge_code(r.diagnosis) for r in rows if r.split == split]) for split in ("train", "val", "test")}
