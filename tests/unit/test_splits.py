"""The split: a seeded function of each lesion (so independent of the order and batches images came in),
stratified in expectation, grouped by lesion (near-duplicate group and lesion id, transitively), frozen,
extended by a recorded rule."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.data import splits
from lesion_tasks.core.schema import drops, images, model_versions, reviews
from lesion_tasks.core.schema import splits as splits_table


def _add_images(engine, n: int, start: int = 0, groups_of: int = 1, mel_every: int = 4, drop: str = "d",
                other_every: int = 0, lesion_of=lambda i: None):
    now = datetime.now(UTC)
    with engine.begin() as conn:
        db.insert_ignore(conn, drops, [{"drop_id": drop, "source": "s", "layout": "l", "fingerprint": "f", "status": "complete",
                                        "n_entries": n, "started_at": now}], ["drop_id"])
        rows = []
        for i in range(start, start + n):
            rows.append({"image_id": f"I{i:05d}", "drop_id": drop, "source_entry": f"I{i}.jpg", "sha256": f"{i:064d}",
                         "label": "MEL" if i % mel_every == 0 else "OTHER" if other_every and i % other_every == 1 else "NV",
                         "near_dup_group": f"G{i // groups_of:05d}", "lesion_id": lesion_of(i),
                         "phash": "0" * 16, "width": 1, "height": 1, "n_bytes": 1, "format": "JPEG",
                         "original_uri": "x", "normalized_uri": "x", "normalized_size": 224, "ingested_at": now})
        db.insert_ignore(conn, images, rows, ["image_id"])


def _add_verdicts(engine, labels: dict[str, str]) -> None:
    """Review-UI verdicts (`set_label`) on images ISIC left unlabelled."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(model_versions.insert().values(
            model_version="v1", created_at=now, status="champion", profile="demo", backbone="tiny", image_size=32,
            mc_samples=2, config={}, environment={}, weights_source="none", lineage={}, code_version="x", run_id="r"))
        conn.execute(images.update().where(images.c.image_id.in_(list(labels))).values(label=None))
        conn.execute(reviews.insert(), [
            {"submission_id": f"s{i}", "image_id": image_id, "model_version": "v1", "verdict": "set_label",
             "label": label, "reviewer": "dr-a", "reviewed_at": now, "p_mel": 0.5, "predicted_label": "MEL"}
            for i, (image_id, label) in enumerate(sorted(labels.items()))])


def _split_of(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(splits_table.c.image_id, splits_table.c.split)).all())


def test_initial_split_is_stratified_grouped_and_frozen(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    _add_images(engine, 400, groups_of=2)  # pairs of near-duplicates
    summary = splits.assign(engine, seed=3)
    counts = summary["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 400
    # stratified in expectation: within 3 binomial sd of the fractions (200 lesions of 2 images)
    assert abs(sum(counts["test"].values()) / 400 - 0.2) < 3 * (0.2 * 0.8 / 200) ** 0.5
    for split in ("train", "val", "test"):  # melanoma share ~25% everywhere
        n = sum(counts[split].values())
        assert abs(counts[split]["MEL"] / n - 0.25) < 3 * (0.25 * 0.75 / (n / 2)) ** 0.5, counts
    first = _split_of(engine)
    assert all(first[f"I{2 * g:05d}"] == first[f"I{2 * g + 1:05d}"] for g in range(200)), "a group straddles splits"
    assert splits.assign(engine, seed=99) == summary and _split_of(engine) == first  # frozen: reseeding changes nothing

    # a new drop: existing assignments never move; a new member of an old group joins its side
    _add_images(engine, 100, start=400, drop="d2")
    with engine.begin() as conn:
        conn.execute(images.update().where(images.c.image_id == "I00400").values(near_dup_group="G00000"))
    splits.assign(engine, seed=3)
    after = _split_of(engine)
    assert {k: after[k] for k in first} == first
    assert after["I00400"] == first["I00000"]
    with engine.connect() as conn:
        rules = dict(conn.execute(sa.select(splits_table.c.image_id, splits_table.c.rule)).all())
    assert rules["I00400"] == "group" and rules["I00000"].startswith("lesion-hash-v3:seed=3")
    assert rules["I00401"].startswith("lesion-hash-v3")
    assert 8 <= sum(after[f"I{i:05d}"] == "test" for i in range(401, 500)) <= 32  # 99 new lesions, 3 sd
    engine.dispose()


def test_the_split_does_not_depend_on_the_order_or_batches_images_came_in(tmp_path):
    """The same 600 images (three drops, photographs of one lesion across two of them) split at once, drop by
    drop, or in another order with a split between: every image gets the same split, so the same test metrics."""
    def home(name: str, batches: list[tuple[int, int, str]]) -> dict[str, str]:
        url = f"sqlite:///{tmp_path / name}"
        db.upgrade(url)
        engine = db.make_engine(url)
        for start, n, drop in batches:
            # lesion L<k>: images 2k and 2k+1, so lesions at 199/200 and 399/400 span two drops
            _add_images(engine, n, start=start, drop=drop, other_every=7, lesion_of=lambda i: f"L{i // 2}")
            splits.assign(engine, seed=5)
        split = _split_of(engine)
        engine.dispose()
        return split

    once = home("once.db", [(0, 600, "all")])
    assert len(once) == 600
    assert home("in-order.db", [(0, 199, "a"), (199, 202, "b"), (401, 199, "c")]) == once
    assert home("reversed.db", [(401, 199, "c"), (199, 202, "b"), (0, 199, "a")]) == once


def test_a_lesion_never_straddles_splits_even_through_another_group(tmp_path):
    """Images of one lesion_id under different near-duplicate groups, and a near-duplicate of one of them
    with no lesion id, form one lesion: all on one side, also when they arrive after the split froze."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    # lesion L<k> spans images 3k and 3k+1 (own groups); image 3k+2 is a near-duplicate of 3k+1 only
    _add_images(engine, 300, lesion_of=lambda i: f"L{i // 3}" if i % 3 < 2 else None, other_every=5)
    with engine.begin() as conn:
        for i in range(2, 300, 3):
            conn.execute(images.update().where(images.c.image_id == f"I{i:05d}").values(near_dup_group=f"G{i - 1:05d}"))
    summary = splits.assign(engine, seed=1)
    split = _split_of(engine)
    assert len(split) == 300  # OTHER images get a split too (they train and test the out-of-scope head)
    assert sum(summary["counts"]["test"].values()) > 0 and summary["counts"]["train"]["OTHER"] > 0
    assert all(split[f"I{3 * k:05d}"] == split[f"I{3 * k + 1:05d}"] == split[f"I{3 * k + 2:05d}"] for k in range(100))
    # later: a new photograph of lesion L7 under a new group joins L7's side, whatever its hash says
    _add_images(engine, 1, start=900, lesion_of=lambda i: "L7", drop="later")
    splits.assign(engine, seed=1)
    assert _split_of(engine)["I00900"] == split["I00021"]
    engine.dispose()


def test_too_few_labelled_images_is_a_clear_error(tmp_path):
    import pytest

    url = f"sqlite:///{tmp_path / 's.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    _add_images(engine, 12, mel_every=6)
    with pytest.raises(ValueError, match="need at least 5 of each class"):
        splits.assign(engine)
    engine.dispose()


def test_verdicts_are_training_data_unless_the_team_validates_on_them(tmp_path):
    """Default: a reviewer verdict only ever trains. LESION_VERDICTS_VALIDATE=1: verdicts split like any label
    (stratified, so a clinic labelled only in the review UI gets validation and test images of its own); a
    split once given never moves when the setting changes."""
    for validate in (False, True):
        url = f"sqlite:///{tmp_path / f's{validate}.db'}"
        db.upgrade(url)
        engine = db.make_engine(url)
        _add_images(engine, 200)
        splits.assign(engine, seed=3)
        _add_images(engine, 200, start=200, drop="clinic")  # a new clinic, its images labelled by reviewers
        verdicts = {f"I{i:05d}": ("MEL" if i % 4 == 0 else "NV") for i in range(200, 400)}
        _add_verdicts(engine, verdicts)
        splits.assign(engine, seed=3, verdicts_validate=validate)
        got = {i: s for i, s in _split_of(engine).items() if i in verdicts}
        assert len(got) == 200  # every verdict-labelled image has a split either way
        if not validate:
            assert set(got.values()) == {"train"}
        else:
            test_mel = sum(s == "test" and verdicts[i] == "MEL" for i, s in got.items())
            assert 30 <= sum(s == "test" for s in got.values()) <= 50 and 6 <= test_mel <= 14, got
            assert sum(s == "val" for s in got.values()) >= 20
            before = _split_of(engine)
            splits.assign(engine, seed=3, verdicts_validate=False)  # frozen: the setting moves nothing given
            assert _split_of(engine) == before
        engine.dispose()


def test_a_small_first_set_is_stratified_exactly_so_no_evaluation_split_is_empty(tmp_path):
    """40 images, 8 melanomas: the hash alone may leave an evaluation split short (it does at this seed);
    the first split is then stratified exactly by the rank of the lesion hash, and the rule says so."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    _add_images(engine, 40, mel_every=5, other_every=0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.image_id, images.c.label, images.c.near_dup_group, images.c.lesion_id)).all()
    lesion = splits.lesions(rows)
    hashed = {r.image_id: splits._hash_split(f"1image:{r.image_id}", 2, 0.2, 0.15) for r in rows}
    assert splits._short(hashed, rows, lesion)  # the premise: the hash leaves a split short here
    summary = splits.assign(engine, seed=2)
    for split in ("val", "test"):
        assert summary["counts"][split]["MEL"] >= 1 and summary["counts"][split]["NV"] >= 2, summary["counts"]
    assert summary["rules"] == ["initial:ranked-v3:seed=2:test=0.2:val=0.15"]
    assert splits.assign(engine, seed=2) == summary  # frozen
    engine.dispose()
