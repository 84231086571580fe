"""The real ISIC drops from ../shared/data (LESION_DATA_DIR), through the real `lesion` CLI."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile

import pytest
import sqlalchemy as sa

from lesion_tasks.core.schema import images
from tests.helpers import run_cli

pytestmark = pytest.mark.realdata


def _ingest(source, home, *extra):
    out = run_cli("ingest", str(source), "--json", *extra, env={"LESION_HOME": str(home)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_isic2017_challenge_layout(data_dir, tmp_path):
    home = tmp_path / "home"
    drop = data_dir / "isic2017-mel-nv"
    first = _ingest(drop, home)
    assert (first["accepted"], first["quarantined"], first["duplicates"]) == (2358, 0, 0)
    assert first["labels"] == {"MEL": 521, "NV": 1837}
    assert first["layout"] == "challenge-ground-truth+diagnosis-csv"

    again = _ingest(drop, home)
    assert (again["accepted"], again["quarantined"], again["duplicates"]) == (0, 0, 0)
    assert again["totals"]["accepted"] == 2358

    engine = sa.create_engine(f"sqlite:///{home / 'lesion.db'}")
    with engine.connect() as conn:
        rows = {r.image_id: r for r in conn.execute(sa.select(images))}
    engine.dispose()
    provenance = list(csv.DictReader(open(drop / "provenance.csv")))
    # labels agree with the independent provenance file, image by image
    assert all(rows[p["image"]].label == p["diagnosis"] for p in provenance)
    # every known re-photographed pair shares a near-duplicate group
    groups: dict[str, set[str]] = {}
    for p in provenance:
        if p["near_dup_group"]:
            groups.setdefault(p["near_dup_group"], set()).add(rows[p["image"]].near_dup_group)
    assert len(groups) == 9 and all(len(g) == 1 for g in groups.values())
    assert sum(1 for r in rows.values() if r.near_dup_group != r.image_id) < 40  # groups stay small
    assert all(r.normalized_size == 224 and r.sha256 for r in rows.values())


def test_uda1_json_sidecars_folder_and_zip(data_dir, tmp_path):
    folder = data_dir / "isic-archive-uda1-sample"
    first = _ingest(folder, tmp_path / "home")
    assert (first["accepted"], first["quarantined"]) == (28, 0)
    assert first["labels"] == {"MEL": 14, "NV": 14}
    assert first["layout"] == "json-sidecars"
    assert _ingest(folder, tmp_path / "home")["accepted"] == 0

    # the same drop as a .zip (wrapped in a top folder, as people zip them) into a fresh home
    archive = tmp_path / "uda1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"uda1/{path.name}")
    zipped = _ingest(archive, tmp_path / "home2")
    assert (zipped["drop_id"], zipped["accepted"], zipped["labels"]) == ("uda1", 28, {"MEL": 14, "NV": 14})

    # the same images sent again as another drop: all duplicates, nothing accepted twice
    copy = tmp_path / "uda1-resent"
    shutil.copytree(folder, copy)
    resent = _ingest(copy, tmp_path / "home")
    assert (resent["accepted"], resent["duplicates"]) == (0, 28)


def test_drop_id_reused_for_other_content_is_refused(data_dir, tmp_path):
    home = tmp_path / "home"
    _ingest(data_dir / "isic-archive-uda1-sample", home, "--drop-id", "night-1")
    out = run_cli("ingest", str(data_dir / "isic2017-mel-nv"), "--drop-id", "night-1", env={"LESION_HOME": str(home)})
    assert out.returncode == 2
    assert "drop id 'night-1' was already used" in out.stderr


def test_isic2019_84px_all_diagnoses(data_dir, tmp_path):
    """12,914 images of all eight diagnoses: 47 byte-identical copies under other ids are duplicates,
    everything else accepted; non-MEL/NV diagnoses kept as OTHER (scored, never trained on); rerun adds 0."""
    drop = data_dir / "isic2019-84px"
    if not drop.is_dir():
        pytest.skip(f"{drop} not found (an older copy of the shared data)")
    home = tmp_path / "home"
    first = _ingest(drop, home)
    assert (first["accepted"], first["quarantined"], first["duplicates"]) == (12867, 0, 47)
    assert first["labels"] == {"MEL": 2875, "NV": 4316, "OTHER": 5676}
    assert first["layout"] == "challenge-ground-truth+challenge-metadata"
    again = _ingest(drop, home)
    assert (again["accepted"], again["totals"]["accepted"]) == (0, 12867)
    engine = sa.create_engine(f"sqlite:///{home / 'lesion.db'}")
    with engine.connect() as conn:
        with_lesion = conn.execute(sa.select(sa.func.count()).where(images.c.lesion_id.is_not(None))).scalar()
        sizes = set(conn.execute(sa.select(images.c.width, images.c.height).distinct()).all())
    engine.dispose()
    assert with_lesion == 12523  # lesion ids from the metadata CSV (12,570 rows; 47 duplicates not accepted)
    assert sizes == {(84, 84)}
    _check_diagnoses_and_lesion_split(home)


def _check_diagnoses_and_lesion_split(home):
    """The challenge class of each OTHER image is kept (the out-of-scope report is per diagnosis), and
    the split keeps every lesion -- same lesion_id or near-duplicate group, transitively -- on one side,
    stratified by label: each split holds its share of every diagnosis."""
    from collections import Counter

    from lesion_tasks.data import splits
    from lesion_tasks.core.schema import splits as splits_table

    engine = sa.create_engine(f"sqlite:///{home / 'lesion.db'}")
    with engine.connect() as conn:
        diagnoses = dict(conn.execute(sa.select(images.c.diagnosis, sa.func.count()).group_by(images.c.diagnosis)).all())
    assert diagnoses == {"MEL": 2875, "NV": 4316, "BCC": 2802, "BKL": 1511, "AK": 697, "SCC": 431, "DF": 124, "VASC": 111}
    summary = splits.assign(engine, seed=0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.image_id, images.c.lesion_id, images.c.near_dup_group, images.c.label,
                                      splits_table.c.split)
                            .join(splits_table, splits_table.c.image_id == images.c.image_id)).all()
    engine.dispose()
    assert len(rows) == 12867  # every labelled image, OTHER included
    for column in ("lesion_id", "near_dup_group"):
        sides: dict[str, set[str]] = {}
        for r in rows:
            if getattr(r, column):
                sides.setdefault(getattr(r, column), set()).add(r.split)
        assert not [k for k, v in sides.items() if len(v) > 1], f"a {column} straddles splits"
    counts = Counter((r.label, r.split) for r in rows)
    # a function of each lesion, stratified in expectation: per label, the lesions' shares within 4 binomial sd
    lesion = splits.lesions(rows)
    by_lesion = {(r.label, lesion[r.image_id]): r.split for r in rows}
    for label in ("MEL", "NV", "OTHER"):
        sides = Counter(split for (lab, _), split in by_lesion.items() if lab == label)
        n = sum(sides.values())
        for split, frac in (("test", 0.2), ("val", 0.15)):
            assert abs(sides[split] / n - frac) < 4 * (frac * (1 - frac) / n) ** 0.5, (label, sides)
    assert summary["by_source"]["isic2019-84px"]["test"] == {k: counts[k, "test"] for k in ("MEL", "NV", "OTHER")}
