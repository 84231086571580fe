"""A drop full of bad input: every kind is quarantined with its own reason code, every good image
beside them is accepted, every entry is accounted for, and nothing is written outside the store."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, quarantine
from lesion_tasks.ingest.sources import Limits
from lesion_tasks.core.store import open_store
from tests import imagegen as g

LIMITS = Limits(max_bytes=1_500_000)
GOOD = {  # image id -> bytes; all must be accepted
    "ISIC_G01": g.jpeg(1), "ISIC_G02": g.grayscale_png(2), "ISIC_G03": g.rgba_png(3),
    "ISIC_G04": g.cmyk_jpeg(4), "ISIC_G05": g.png16(5), "ISIC_G06": g.exif_rotated_jpeg(),
}
GOOD_SUFFIX = {"ISIC_G02": ".png", "ISIC_G03": ".png", "ISIC_G05": ".png"}

# entry -> (bytes, expected reason)
BAD_FILES = {
    "images/ISIC_B01.jpg": (b"", "empty_file"),
    "images/ISIC_B02.jpg": (b"this is a note, not a photo\n", "not_an_image"),
    "images/ISIC_B03.jpg": (g.truncated_jpeg(), "truncated_image"),
    "images/ISIC_B04.png": (g.corrupt_png(), "corrupt_image"),
    "images/ISIC_B05.png": (g.bomb_png(), "decompression_bomb"),
    "images/ISIC_B06.png": (g.tiny_png(), "too_small"),
    "images/ISIC_B07.png": (g.sliver_png(), "extreme_aspect_ratio"),
    "images/ISIC_B08.gif": (g.gif(), "unsupported_format"),
    "images/ISIC_B09.tif": (g.multipage_tiff(), "multi_frame"),
    "images/ISIC_B10.png": (g.noisy_png(800), "file_too_large"),
    "images/ISIC_B12.jpg": (g.jpeg(12), "multi_hot_label"),
    "images/ISIC_B13.jpg": (g.jpeg(13), "invalid_label"),
    "images/ISIC_B14.jpg": (g.jpeg(14), "conflicting_label"),
    "images/ISIC_B15.jpg": (g.jpeg(15), "invalid_metadata"),
    "images/ISIC_Z16.jpg": (g.jpeg(1), "duplicate"),  # same bytes as ISIC_G01 (sorted after it)
    "zz_extra/ISIC_G01.jpg": (g.jpeg(99), "image_id_conflict"),  # same id as a good image, other bytes
    "images/bad name!.jpg": (g.jpeg(17), "invalid_image_id"),
    "images/ISIC_B18.jpg": (g.jpeg(18), "invalid_sidecar"),
}
GROUND_TRUTH = """image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK
ISIC_G01,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
ISIC_G02,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
ISIC_G03,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0
ISIC_G04,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0
ISIC_B11,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
ISIC_B12,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
ISIC_B13,0.5,0.5,0.0,0.0,0.0,0.0,0.0,0.0,0.0
ISIC_B14,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0
"""
SECOND_OPINION = "image,diagnosis\nISIC_B14,nevus\nISIC_G01,melanoma\n"
CHALLENGE_METADATA = "image,age_approx,anatom_site_general,lesion_id,sex\nISIC_G01,55,anterior torso,IL_1,male\nISIC_B15,40,the moon,IL_2,female\n"
EXPECTED_LABELS = {"ISIC_G01": "MEL", "ISIC_G02": "NV", "ISIC_G03": "OTHER", "ISIC_G04": None, "ISIC_G05": None, "ISIC_G06": None}


def _write_corpus(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "zz_extra").mkdir()
    for image_id, data in GOOD.items():
        (root / "images" / f"{image_id}{GOOD_SUFFIX.get(image_id, '.jpg')}").write_bytes(data)
    for entry, (data, _) in BAD_FILES.items():
        (root / entry).write_bytes(data)
    (root / "ISIC_GroundTruth.csv").write_text(GROUND_TRUTH)
    (root / "second_opinion.csv").write_text(SECOND_OPINION)
    (root / "ISIC_Metadata.csv").write_text(CHALLENGE_METADATA)
    (root / "images" / "ISIC_B18.json").write_text("{not json")
    (root / "images" / "ISIC_G06.json").write_text(json.dumps({"name": "ISIC_G06", "meta": {"clinical": {"diagnosis": None, "sex": "female"}}}))
    (root / ".DS_Store").write_bytes(b"junk")


def _expected_reasons() -> dict[str, str]:
    expected = {entry: reason for entry, (_, reason) in BAD_FILES.items()}
    expected["ISIC_GroundTruth.csv#ISIC_B11"] = "missing_image"
    return expected


def _snapshot(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def _check(settings, result, expected: dict[str, str]):
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        got = {r.entry: r.reason for r in conn.execute(sa.select(quarantine.c.entry, quarantine.c.reason))}
        labels = dict(conn.execute(sa.select(images.c.image_id, images.c.label)).all())
        raw = dict(conn.execute(sa.select(quarantine.c.entry, quarantine.c.raw_uri)).all())
    engine.dispose()
    assert got == expected
    assert len(set(expected.values())) >= 15, "the corpus must cover at least 15 kinds of bad input"
    assert labels == EXPECTED_LABELS
    assert result.accepted == len(GOOD)
    assert result.duplicates == 1 and result.quarantined == len(expected) - 1
    assert result.reasons == {r: list(expected.values()).count(r) for r in set(expected.values())}
    # raw bytes of quarantined files are kept in the store
    store = open_store(settings)
    kept = raw["images/ISIC_B02.jpg"]
    assert kept.startswith(f"drops/{result.drop_id}/quarantine/")  # a key, relative to the store
    assert store.get(kept) == BAD_FILES["images/ISIC_B02.jpg"][0]
    # every entry of the drop is in the manifest with an outcome
    manifest = json.loads(store.get(f"drops/{result.drop_id}/manifest.json"))
    return {e["entry"]: e["outcome"] for e in manifest["entries"]}


def test_bad_folder_drop(tmp_path, local_settings, caplog):
    drop = tmp_path / "bad-drop"
    _write_corpus(drop)
    os.symlink("/etc/passwd", drop / "images" / "ISIC_B19.jpg")
    expected = _expected_reasons() | {"images/ISIC_B19.jpg": "unsafe_path"}
    before = _snapshot(tmp_path, local_settings.home)
    with caplog.at_level(logging.INFO, logger="lesion_tasks.ingest.drop"):
        result = ingest(str(drop), local_settings, limits=LIMITS)
    outcomes = _check(local_settings, result, expected)
    # the progress line counts as the result does: the duplicate is not "quarantined"
    progress = [r.getMessage() for r in caplog.records if " images (accepted " in r.getMessage()][-1]
    assert (f"(accepted {result.accepted}, duplicates {result.duplicates}, quarantined {result.quarantined})"
            in progress), progress
    on_disk = {p.relative_to(drop).as_posix() for p in drop.rglob("*") if p.is_file() or p.is_symlink()}
    assert on_disk <= set(outcomes), f"entries missing from the manifest: {on_disk - set(outcomes)}"
    assert outcomes[".DS_Store"] == "ignored" and outcomes["second_opinion.csv"] == "auxiliary"
    assert _snapshot(tmp_path, local_settings.home) == before, "something was written outside the store"
    # a rerun of the finished drop changes nothing
    again = ingest(str(drop), local_settings, limits=LIMITS)
    assert (again.accepted, again.quarantined, again.duplicates) == (0, 0, 0)
    _check(local_settings, result, expected)


def test_bad_zip_drop_with_traversal_and_bomb(tmp_path, local_settings):
    folder = tmp_path / "src"
    _write_corpus(folder)
    archive = tmp_path / "bad-zip.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
        zf.writestr("../escape/ISIC_B20.jpg", g.jpeg(20))
        zf.writestr("/abs/ISIC_B21.jpg", g.jpeg(21))
        zf.writestr("images/ISIC_B22.jpg", b"\0" * 30_000_000)  # 30 MB of zeros: ~1000x
    expected = _expected_reasons() | {"../escape/ISIC_B20.jpg": "unsafe_path", "/abs/ISIC_B21.jpg": "unsafe_path",
                                      "images/ISIC_B22.jpg": "zip_bomb"}
    before = _snapshot(tmp_path, local_settings.home)
    result = ingest(str(archive), local_settings, limits=Limits(max_bytes=1_500_000))
    assert result.drop_id == "bad-zip"
    _check(local_settings, result, expected)
    assert _snapshot(tmp_path, local_settings.home) == before
    assert not (tmp_path / "escape").exists()


def test_cli_reports_bad_source_clearly(tmp_path):
    from tests.helpers import run_cli

    env = {"LESION_HOME": str(tmp_path / "home")}
    missing = run_cli("ingest", str(tmp_path / "nope"), "--json", env=env)
    assert missing.returncode == 2
    assert "no such folder, zip file, or object" in json.loads(missing.stdout)["error"]
    not_zip = tmp_path / "fake.zip"
    not_zip.write_bytes(b"PK not really")
    broken = run_cli("ingest", str(not_zip), env=env)
    assert broken.returncode == 2 and "not a readable zip archive" in broken.stderr
    assert "Traceback" not in broken.stderr


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_corpus_through_the_cli_never_crashes(tmp_path, layout):
    """The real console script on the corpus (default limits): exit 0 and a JSON summary."""
    from tests.helpers import run_cli

    drop = tmp_path / "cli-drop"
    _write_corpus(drop)
    source = drop
    if layout == "zip":
        source = tmp_path / "cli-drop.zip"
        with zipfile.ZipFile(source, "w") as zf:
            for path in sorted(drop.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(drop).as_posix())
    out = run_cli("ingest", str(source), "--json", env={"LESION_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) >= {"drop_id", "accepted", "quarantined", "duplicates", "reasons"}
    assert summary["accepted"] == len(GOOD) + 1  # at default limits the 2 MB noise PNG is fine
    assert summary["reasons"]["duplicate"] == summary["duplicates"] == 1
