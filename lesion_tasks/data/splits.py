"""Train / validation / test split: a function of each lesion (not of arrival order), grouped by lesion, frozen.

Every ISIC-labelled image (MEL, NV, and OTHER: the out-of-scope diagnoses train and test the
out-of-scope signal) gets a split. Images are grouped into *lesions*: the connected components of
"same near-duplicate group" and "same ISIC lesion_id", so several photographs of one lesion, or a
re-photographed copy under another id, never straddle splits.

A lesion's split is a function of the lesion itself ("lesion-hash-v3"): a seeded hash of its smallest ISIC
`lesion_id` (else of its smallest image id), test below `test_frac`, validation below `test_frac +
val_frac`. So the split does not depend on the order, the batches or the path (`incoming/` or the CLI) by
which the same images arrived, nor on what else is in the database. It is label-blind and stratified in
expectation only: a split's share of a stratum has a binomial spread (sd 0.015 for validation's 15% of 550
lesions; ISIC 2019's melanoma lesions got 10.2% at seed 0), the price of not depending on arrival.
Two exceptions can depend on the order: near-duplicates without a lesion id arriving in different drops,
when a later drop holds the lesion's smallest image id (an image joins the split its lesion already has);
and a small first set, where the hash would leave validation or test with fewer than `MIN_EVAL_LESIONS`
melanoma or nevus lesions: that first split is stratified exactly instead, each label's lesions in the
order of their hash ("initial:ranked-v3"). A split once given is frozen: later images never move existing
ones, and an image whose lesion already has a split joins it ("group"). Champion and challenger are
therefore always compared on the same test images. Splits given by earlier rules (StratifiedGroupKFold,
"initial:sgkf-v2" / "batch:sgkf-v2", and "hash-v2") stay as they were.

Reviewer labels (images ISIC gave no label, labelled in the review UI) are training data only by default
(a verdict is not histopathology): such an image joins "train" ("reviewed-train"), or its lesion's split
when that is "train"; an image whose lesion sits in validation or test is left out, so neither evaluation
split ever holds a reviewer label nor another photograph of a training lesion. A team that validates on
its reviewers' verdicts sets `LESION_VERDICTS_VALIDATE=1` (`verdicts_validate`): verdicts then join the
split like ISIC and imported labels (their lesion's split, else stratified by label x site with the rest).
Either way a split once given is frozen: changing the setting moves no image already assigned.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from datetime import UTC, datetime
from types import SimpleNamespace

import sqlalchemy as sa

from lesion_tasks.core.db import insert_ignore
from lesion_tasks.core.schema import images, splits
from lesion_tasks.data import trainset

log = logging.getLogger(__name__)
SPLIT_LABELS = ("MEL", "NV", "OTHER")
# where a new image goes when its lesion already (wrongly) sits in several splits: evaluation first
PRIORITY = ("test", "val", "train")
# a first split that would leave validation or test with fewer melanoma or nevus lesions is stratified exactly
MIN_EVAL_LESIONS = 2


def _u(key: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") / 2**64


def _hash_split(key: str, seed: int, test_frac: float, val_frac: float) -> str:
    u = _u(key, seed)
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def _short(chosen: dict[str, str], rows, lesion: dict[str, str]) -> bool:
    """Would validation or test hold fewer than MIN_EVAL_LESIONS melanoma or nevus lesions?"""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        seen.setdefault((r.label, chosen[r.image_id]), set()).add(lesion[r.image_id])
    return any(len(seen.get((label, split), ())) < MIN_EVAL_LESIONS for label in ("MEL", "NV") for split in ("val", "test"))


def _ranked(rows, lesion: dict[str, str], key: dict[str, str], seed: int, test_frac: float,
            val_frac: float) -> dict[str, str]:
    """A small first set, stratified exactly: per label, its lesions in the order of their hash, the first
    test_frac to test and the next val_frac to validation (at least one each from three lesions on)."""
    label_of: dict[str, str] = {}
    for r in rows:
        label_of.setdefault(lesion[r.image_id], r.label)
    side: dict[str, str] = {}
    for label in sorted(set(label_of.values())):
        ordered = sorted((g for g, lab in label_of.items() if lab == label), key=lambda g: (_u(key[g], seed), g))
        n = len(ordered)
        n_test = max(1, round(n * test_frac)) if n >= 3 else round(n * test_frac)
        n_val = max(1, round(n * val_frac)) if n >= 3 else round(n * val_frac)
        for k, g in enumerate(ordered):
            side[g] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return {r.image_id: side[lesion[r.image_id]] for r in rows}


def lesions(rows) -> dict[str, str]:
    """{image_id: lesion group}: connected components of shared near_dup_group or lesion_id (union-find);
    a component is named by its smallest near-duplicate group, so the name is stable as it grows."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        a = find("g\0" + r.near_dup_group)
        if r.lesion_id:
            b = find("l\0" + r.lesion_id)
            if a != b:
                parent[max(a, b)] = min(a, b)  # "g..." < "l...": a near-duplicate group names the component
    return {r.image_id: find("g\0" + r.near_dup_group)[2:] for r in rows}


def _check_initial(labels: list[str], test_frac: float) -> None:
    n_test = max(2, round(1 / test_frac))
    counts = Counter(labels)
    for name in ("MEL", "NV"):
        if counts[name] < n_test:
            raise ValueError(f"{counts[name]} labelled {name} images: need at least {n_test} of each class to freeze "
                             "a test split")


TEST_FRAC = 0.2  # the share of a site's labelled lesions that go to its frozen test split


def assign(engine: sa.Engine, seed: int = 0, test_frac: float = TEST_FRAC, val_frac: float = 0.15,
           verdicts_validate: bool = False) -> dict:
    """Give every labelled image without a split one; return counts per split and label. Reviewer labels
    are training data only unless `verdicts_validate` (module docstring)."""
    cols = (images.c.image_id, images.c.label, images.c.near_dup_group, images.c.lesion_id,
            images.c.site)
    # taken before the images are read: every drop finished before `assigned_at` had its rows read here
    # (what `lesion check` relies on to tell a labelled image that should have a split)
    now = datetime.now(UTC)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(*cols).where(images.c.label.in_(SPLIT_LABELS)).order_by(images.c.image_id)).all()
        existing = dict(conn.execute(sa.select(splits.c.image_id, splits.c.split)).all())
        reviewed = trainset.reviewer_labels(conn)["labels"]
        reviewed_rows = conn.execute(sa.select(*cols).where(images.c.image_id.in_(sorted(reviewed)))
                                     .order_by(images.c.image_id)).all() if reviewed else []
    lesion = lesions(list(rows) + list(reviewed_rows))
    if verdicts_validate:  # verdicts split like any label
        rows = sorted([*rows, *(SimpleNamespace(**(r._asdict() | {"label": reviewed[r.image_id]})) for r in reviewed_rows)],
                      key=lambda r: r.image_id)
        reviewed_rows = []
    lesion_splits: dict[str, set[str]] = {}
    for image_id, split in existing.items():
        if image_id in lesion:
            lesion_splits.setdefault(lesion[image_id], set()).add(split)
    straddling = sorted(g for g, s in lesion_splits.items() if len(s) > 1)
    if straddling:
        log.warning("split: %d lesions already straddle splits (frozen before lesion grouping), e.g. %s",
                    len(straddling), straddling[:3])
    lesion_split = {g: next(p for p in PRIORITY if p in s) for g, s in lesion_splits.items()}
    new = [r for r in rows if r.image_id not in existing]
    assigned: dict[str, tuple[str, str]] = {}
    for r in new:
        if lesion[r.image_id] in lesion_split:
            assigned[r.image_id] = (lesion_split[lesion[r.image_id]], "group")
    fresh = [r for r in new if r.image_id not in assigned]
    if fresh and not existing:
        _check_initial([r.label for r in fresh], test_frac)
    rule = f"lesion-hash-v3:seed={seed}:test={test_frac}:val={val_frac}"
    # a lesion's hash key, whatever order its images came in: its smallest ISIC lesion_id, else its smallest image id
    key: dict[str, str] = {}
    for r in [*rows, *reviewed_rows]:
        group, own = lesion[r.image_id], f"0lesion:{r.lesion_id}" if r.lesion_id else f"1image:{r.image_id}"
        key[group] = min(key.get(group, own), own)  # any lesion id before any image id
    chosen = {r.image_id: _hash_split(key[lesion[r.image_id]], seed, test_frac, val_frac) for r in fresh}
    if fresh and not existing and _short(chosen, fresh, lesion):  # a small first set: the hash may leave a split empty
        rule = f"initial:ranked-v3:seed={seed}:test={test_frac}:val={val_frac}"
        chosen = _ranked(fresh, lesion, key, seed, test_frac, val_frac)
        log.info("split: a small first set (%d lesions): stratified exactly by rank of the lesion hash",
                 len({lesion[r.image_id] for r in fresh}))
    assigned.update({i: (split, rule) for i, split in chosen.items()})
    for image_id, (split, _) in assigned.items():
        lesion_split.setdefault(lesion[image_id], split)
    left_out = 0
    for r in reviewed_rows:
        if r.image_id in existing or r.image_id in assigned:
            continue
        split = lesion_split.get(lesion[r.image_id])
        if split in (None, "train"):
            assigned[r.image_id] = ("train", "group" if split else "reviewed-train")
            lesion_split[lesion[r.image_id]] = "train"
        else:
            left_out += 1
    if left_out:
        log.info("split: %d reviewer-labelled images left out (their lesion is in val/test)", left_out)
    if assigned:
        with engine.begin() as conn:
            insert_ignore(conn, splits, [{"image_id": i, "split": s, "rule": rule, "assigned_at": now}
                                         for i, (s, rule) in sorted(assigned.items())], ["image_id"])
        log.info("split: %d images newly assigned (%s)", len(assigned), dict(Counter(s for s, _ in assigned.values())))
    return summary(engine)


def summary(engine: sa.Engine) -> dict:
    """Images per split and label (the ISIC label, else the reviewer label), the same per source drop and
    per site, and the rules used."""
    with engine.connect() as conn:
        reviewed = trainset.reviewer_labels(conn)["labels"]
        rows = conn.execute(sa.select(splits.c.split, images.c.image_id, images.c.label, images.c.drop_id,
                                      images.c.site)
                            .join(images, images.c.image_id == splits.c.image_id)).all()
        rules = sorted(set(conn.scalars(sa.select(splits.c.rule).distinct())))
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(SPLIT_LABELS, 0) for s in ("train", "val", "test")}
    by_source: dict[str, dict[str, dict[str, int]]] = {}
    by_site: dict[str, dict[str, dict[str, int]]] = {}
    for split, image_id, label, drop_id, site in rows:
        label = trainset.label_of(label, image_id, reviewed) or ("OTHER" if (label or reviewed.get(image_id)) == "OTHER" else None)
        if label:
            counts[split][label] += 1
            for table, key in ((by_source, drop_id), (by_site, site)):
                table.setdefault(key, {s: dict.fromkeys(SPLIT_LABELS, 0) for s in counts})[split][label] += 1
    return {"counts": counts, "by_source": dict(sorted(by_source.items())), "by_site": dict(sorted(by_site.items())),
            "rules": rules}
