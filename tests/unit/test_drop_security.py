"""Security of drop reading: links in store drops are never followed, no file's bytes reach a detail, and
one drop cannot write more than its budget (a small archive of many compressible entries)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks.core.db import engine_for
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, quarantine
from lesion_tasks.ingest.sources import Limits, discover_incoming
from lesion_tasks.core.store import LocalStore, ObjectNotFound
from tests import imagegen as g
from tests import reliability

PASSWD = Path("/etc/passwd")


def _rows(settings, table):
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(table)).mappings()]
    finally:
        engine.dispose()


def _store_bytes(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _store_written(root: Path, prefix: str) -> int:
    return sum(p.lstat().st_size for p in (root / prefix).rglob("*") if p.is_file() and not p.is_symlink())


def test_local_store_never_follows_a_link(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put("incoming/d/ok.jpg", b"fine")
    (tmp_path / "store/incoming/d/pw.jpg").symlink_to(PASSWD)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/ISIC_1.jpg").write_bytes(b"outside")
    (tmp_path / "store/incoming/d/sub").symlink_to(tmp_path / "outside")
    listed = {o.key: o.link for o in store.list("incoming/d/")}
    assert listed == {"incoming/d/ok.jpg": None, "incoming/d/pw.jpg": str(PASSWD),
                      "incoming/d/sub": str(tmp_path / "outside")}
    assert list(store.list("incoming/d/sub/")) == []  # nothing below a linked folder
    for key in ("incoming/d/pw.jpg", "incoming/d/sub/ISIC_1.jpg"):
        with pytest.raises(ObjectNotFound):
            store.get(key)
        assert not store.exists(key)
        with pytest.raises(ObjectNotFound):
            store.stat(key)
    assert store.get("incoming/d/ok.jpg") == b"fine"


def test_store_drop_with_links_leaves_nothing_of_their_targets(tmp_path, local_settings):
    store_root = local_settings.home / "store"
    drop = store_root / "incoming" / "linked"
    drop.mkdir(parents=True)
    (drop / "ISIC_9500000.jpg").write_bytes(g.jpeg(1))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "ISIC_9500009.jpg").write_bytes(g.jpeg(9))  # a new, valid image outside the drop
    (drop / "ISIC_9500001.jpg").symlink_to(PASSWD)
    (drop / "ISIC_GroundTruth.csv").symlink_to(PASSWD)
    (drop / "ISIC_9500002.jpg").symlink_to(outside / "ISIC_9500009.jpg")
    (drop / "more").symlink_to(outside)
    (drop / "_READY").write_bytes(b"")
    assert discover_incoming(local_settings, now=None) == ["incoming/linked"]
    result = ingest("incoming/linked", local_settings)
    assert result.accepted == 1
    assert result.reasons == {"unsafe_path": 4}
    rows = {r["entry"]: r for r in _rows(local_settings, quarantine)}
    assert set(rows) == {"ISIC_9500001.jpg", "ISIC_GroundTruth.csv", "ISIC_9500002.jpg", "more"}
    assert all(r["reason"] == "unsafe_path" and "symbolic link" in r["detail"] for r in rows.values())
    assert all(r["sha256"] is None and not r["raw_uri"].startswith("drops/") for r in rows.values())
    assert [r["image_id"] for r in _rows(local_settings, images)] == ["ISIC_9500000"]
    # neither target's bytes are anywhere in the store outside the raw drop, nor in the database
    secret, foreign = PASSWD.read_bytes()[:64], (outside / "ISIC_9500009.jpg").read_bytes()
    kept = [b for p in store_root.rglob("*") if p.is_file() and not p.is_symlink()
            and "incoming" not in p.relative_to(store_root).parts for b in [p.read_bytes()]]
    assert not any(secret[:16] in b for b in kept)
    assert not any(b == foreign for b in kept)
    assert not any(b"root:" in str(r).encode() for r in rows.values())
    reliability.record("Symbolic links in a store drop", "incoming/<drop>/ with links to /etc/passwd (as an image and as "
                       "the ground-truth CSV), to a valid image outside the drop and to an outside folder",
                       "each quarantined unsafe_path without opening its target; nothing of either in the store or "
                       "the database", f"{result.reasons['unsafe_path']} unsafe_path rows; 1 accepted (the real "
                       "image); no target bytes stored", 0, 0)


def test_a_detail_says_what_a_file_is_never_what_it_holds(tmp_path, local_settings):
    drop = tmp_path / "d"
    drop.mkdir()
    (drop / "ISIC_9600000.jpg").write_text("token=hunter2-secret\nroot:x:0:0\n")
    (drop / "ISIC_9600001.jpg").write_bytes(b"\x00\x01secret\xff\xfe" * 10)
    result = ingest(str(drop), local_settings)
    assert result.reasons == {"not_an_image": 2}
    details = {r["entry"]: r["detail"] for r in _rows(local_settings, quarantine)}
    assert details == {"ISIC_9600000.jpg": "text (32 bytes), not an image",
                       "ISIC_9600001.jpg": "binary data with no image signature (100 bytes), not an image"}


def _compressible_zip(path: Path, n: int, size: int) -> None:
    """`n` distinct entries of `size` bytes that compress ~1000x (zeros with a distinct head)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(n):
            zf.writestr(f"ISIC_97{i:05d}.jpg", i.to_bytes(4, "big") + bytes(size - 4))


def test_many_entries_just_under_the_ratio_floor_are_one_bomb(tmp_path, local_settings):
    archive = tmp_path / "amplify.zip"
    _compressible_zip(archive, 1000, 2**20 - 1024)
    result = ingest(str(archive), local_settings)
    rows = _rows(local_settings, quarantine)
    assert (result.accepted, result.quarantined, len(rows)) == (0, 1000, 1000)
    assert {r["reason"] for r in rows} == {"zip_bomb"}
    assert "as a whole" in rows[0]["detail"]
    written = _store_written(local_settings.home / "store", f"drops/{result.drop_id}")
    budget = Limits().write_budget(archive.stat().st_size)
    assert written <= budget, (written, budget)
    reliability.record("Quarantine amplification by a small archive", f"a {archive.stat().st_size / 1e6:.1f} MB zip "
                       "of 1,000 distinct entries just under 1 MiB each (compressed zeros)",
                       "at most 20x its size + 5 MB written; one quarantine row per entry",
                       f"{written} bytes written (budget {budget}); 1,000 zip_bomb rows", 0, 0)


def test_the_write_budget_bounds_what_one_drop_writes(tmp_path, local_settings):
    """Past the budget each entry is still recorded (name, size, sha256, reason); its bytes stay in the raw drop."""
    archive = tmp_path / "budget.zip"
    _compressible_zip(archive, 60, 100_000)
    limits = Limits(zip_max_ratio=1e9, write_allowance=1_000_000)  # the ratio checks off: the budget alone
    result = ingest(str(archive), local_settings, limits=limits)
    rows = _rows(local_settings, quarantine)
    assert (result.accepted, len(rows)) == (0, 60)
    copied = [r for r in rows if r["raw_uri"].startswith("drops/")]
    kept_in_raw = [r for r in rows if not r["raw_uri"].startswith("drops/")]
    assert copied and kept_in_raw
    assert all(r["raw_uri"] == f"{archive.resolve().as_uri()}!{r['entry']}" for r in kept_in_raw)
    assert all("not copied" in r["detail"] and r["sha256"] for r in kept_in_raw)
    with zipfile.ZipFile(archive) as zf:
        assert all(r["sha256"] == hashlib.sha256(zf.read(r["entry"])).hexdigest() for r in kept_in_raw)
    written = _store_written(local_settings.home / "store", f"drops/{result.drop_id}")
    assert written <= limits.write_budget(archive.stat().st_size) + 2**16  # + the manifest
    again = ingest(str(archive), local_settings, limits=limits)
    assert (again.accepted, again.quarantined) == (0, 0) and len(_rows(local_settings, quarantine)) == 60


def test_valid_images_past_the_budget_are_recorded_not_stored(tmp_path, local_settings):
    drop = tmp_path / "imgs"
    drop.mkdir()
    for i in range(4):
        (drop / f"ISIC_980000{i}.jpg").write_bytes(g.jpeg(i))
    size = sum(p.stat().st_size for p in drop.iterdir())
    limits = Limits(write_factor=1.0, write_allowance=0)  # room for about the originals alone
    result = ingest(str(drop), local_settings, limits=limits)
    assert result.accepted >= 1 and result.reasons.get("write_budget", 0) >= 1
    assert result.accepted + result.reasons["write_budget"] == 4
    assert _store_written(local_settings.home / "store", "drops") <= size + 2**16
    assert os.path.exists(drop / "ISIC_9800003.jpg")  # the raw drop is untouched
