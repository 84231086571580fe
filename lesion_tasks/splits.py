"""Train / validation / test split: stratified by label, grouped by near-duplicate group, frozen.

The first call freezes the split of every labelled (MEL/NV) image with StratifiedGroupKFold (test =
one fold of 1/test_frac, validation = one fold of the rest). Later images never move existing ones:
an image whose near-duplicate group already has a split joins it ("group"), and a new group is
placed by a hash of its id ("hash-v1": deterministic, label-blind, so stratified in expectation).
Champion and challenger are therefore always compared on the same test images.

Reviewer labels (images ISIC gave no label, labelled in the review UI) are training data only: such an
image joins "train" ("reviewed-train"), or its near-duplicate group's split when that is "train"; an
image whose group sits in validation or test is left out, so neither evaluation split ever holds a
reviewer label nor a near-duplicate of a training image.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa
from sklearn.model_selection import StratifiedGroupKFold

from lesion_tasks import trainset
from lesion_tasks.db import insert_ignore
from lesion_tasks.schema import images, splits

log = logging.getLogger(__name__)


def _hash_split(group: str, seed: int, test_frac: float, val_frac: float) -> str:
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{group}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def _initial(ids: list[str], labels: np.ndarray, groups: np.ndarray, seed: int, test_frac: float,
             val_frac: float) -> dict[str, str]:
    n_test = max(2, round(1 / test_frac))
    for name, count in Counter(labels.tolist()).items():
        if count < n_test:
            raise ValueError(f"{count} labelled {name} images: need at least {n_test} of each class to freeze a test split")
    first = StratifiedGroupKFold(n_splits=n_test, shuffle=True, random_state=seed)
    rest, test = next(first.split(ids, labels, groups))
    n_val = max(2, round((1 - test_frac) / val_frac))
    second = StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=seed + 1)
    train, val = next(second.split(rest, labels[rest], groups[rest]))
    out = {ids[i]: "test" for i in test}
    out.update({ids[rest[i]]: "val" for i in val})
    out.update({ids[rest[i]]: "train" for i in train})
    return out


def assign(engine: sa.Engine, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.15) -> dict:
    """Give every labelled image without a split one; return counts per split and label."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.image_id, images.c.label, images.c.near_dup_group)
                            .where(images.c.label.in_(("MEL", "NV"))).order_by(images.c.image_id)).all()
        existing = dict(conn.execute(sa.select(splits.c.image_id, splits.c.split)).all())
    now = datetime.now(UTC)
    new = [r for r in rows if r.image_id not in existing]
    assigned: dict[str, tuple[str, str]] = {}
    if new and not existing:
        rule = f"initial:sgkf:seed={seed}:test={test_frac}:val={val_frac}"
        chosen = _initial([r.image_id for r in new], np.array([r.label for r in new]),
                          np.array([r.near_dup_group for r in new]), seed, test_frac, val_frac)
        assigned = {i: (s, rule) for i, s in chosen.items()}
    elif new:
        group_split = {r.near_dup_group: existing[r.image_id] for r in rows if r.image_id in existing}
        for r in new:
            if r.near_dup_group in group_split:
                assigned[r.image_id] = (group_split[r.near_dup_group], "group")
            else:
                split = _hash_split(r.near_dup_group, seed, test_frac, val_frac)
                group_split[r.near_dup_group] = split
                assigned[r.image_id] = (split, f"hash-v1:seed={seed}:test={test_frac}:val={val_frac}")
    with engine.connect() as conn:
        reviewed = trainset.reviewer_labels(conn)["labels"]
        reviewed_rows = conn.execute(sa.select(images.c.image_id, images.c.near_dup_group)
                                     .where(images.c.image_id.in_(sorted(reviewed)))
                                     .order_by(images.c.image_id)).all() if reviewed else []
    group_split = {r.near_dup_group: existing.get(r.image_id) or assigned.get(r.image_id, (None,))[0] for r in rows}
    left_out = 0
    for r in reviewed_rows:
        if r.image_id in existing:
            continue
        split = group_split.get(r.near_dup_group)
        if split in (None, "train"):
            assigned[r.image_id] = ("train", "group" if split else "reviewed-train")
            group_split[r.near_dup_group] = "train"
        else:
            left_out += 1
    if left_out:
        log.info("split: %d reviewer-labelled images left out (their near-duplicate group is in val/test)", left_out)
    if assigned:
        with engine.begin() as conn:
            insert_ignore(conn, splits, [{"image_id": i, "split": s, "rule": rule, "assigned_at": now}
                                         for i, (s, rule) in sorted(assigned.items())], ["image_id"])
        log.info("split: %d images newly assigned (%s)", len(assigned), dict(Counter(s for s, _ in assigned.values())))
    return summary(engine)


def summary(engine: sa.Engine) -> dict:
    """Images per split and label (the ISIC label, else the reviewer label) and the rules used."""
    with engine.connect() as conn:
        reviewed = trainset.reviewer_labels(conn)["labels"]
        rows = conn.execute(sa.select(splits.c.split, images.c.image_id, images.c.label)
                            .join(images, images.c.image_id == splits.c.image_id)).all()
        rules = sorted(set(conn.scalars(sa.select(splits.c.rule).distinct())))
    counts: dict[str, dict[str, int]] = {s: {"MEL": 0, "NV": 0} for s in ("train", "val", "test")}
    for split, image_id, label in rows:
        label = trainset.label_of(label, image_id, reviewed)
        if label:
            counts[split][label] += 1
    return {"counts": counts, "rules": rules}
