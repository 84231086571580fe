"""`lesion labels import` on files that are too big or are not label files (probe finding 4): refused with a named
error (the CLI's exit 2) before being read whole, and a large file imported in batches (300,000 distinct ids once
gave sqlite's "too many SQL variables"). Memory at the cap is measured by bench/label_import_memory.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from lesion_tasks import cli
from lesion_tasks.core import db
from lesion_tasks.core.schema import drops, images, label_imports
from lesion_tasks.ingest import label_import
from tests import reliability


def add_images(settings, ids) -> None:
    """Image rows as ingest writes them (no label), without the images themselves."""
    now = datetime.now(UTC)
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        db.insert_ignore(conn, drops, [{"drop_id": "d", "source": "s", "layout": "folder", "fingerprint": "f",
                                        "status": "complete", "n_entries": 0, "started_at": now}], ["drop_id"])
        conn.execute(images.insert(), [
            {"image_id": i, "drop_id": "d", "source_entry": i, "sha256": i, "near_dup_group": i, "phash": "0",
             "width": 1, "height": 1, "n_bytes": 1, "format": "JPEG", "original_uri": "o", "normalized_uri": "n",
             "normalized_size": 1, "ingested_at": now} for i in ids])
    engine.dispose()


def labels_of(settings, ids) -> dict:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        found = dict(conn.execute(sa.select(images.c.image_id, images.c.label).where(images.c.image_id.in_(ids))).all())
    engine.dispose()
    return found


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends, from any file (Linux /proc/self/io)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_files_over_the_cap_are_refused_before_they_are_read(local_settings, tmp_path, monkeypatch, capsys):
    sparse = tmp_path / "sparse.csv"
    with open(sparse, "wb") as fh:
        fh.truncate(2**30)  # 1 GiB of nothing on disk: the old reader held all of it before refusing
    before = _bytes_read()
    with pytest.raises(ValueError, match=rf"sparse.csv: {2**30} bytes, expected at most {label_import.MAX_BYTES}"):
        label_import.import_labels(sparse, local_settings)
    read_sparse = _bytes_read() - before
    assert read_sparse < 2**16, read_sparse  # refused by its size: not read

    monkeypatch.setattr(label_import, "MAX_BYTES", 2**20)  # a device has no size: read up to the cap, then refused
    before = _bytes_read()
    with pytest.raises(ValueError, match=r"/dev/zero: more than 1048576 bytes, expected at most 1048576"):
        label_import.import_labels("/dev/zero", local_settings)  # once MemoryError
    read_zero = _bytes_read() - before
    assert 2**20 < read_zero < 2**20 + 2**16, read_zero

    for name, value in (("LESION_HOME", str(tmp_path / "home")), ("LESION_DB_URL", local_settings.db_url),
                        ("LESION_STORE_URL", local_settings.store_url)):
        monkeypatch.setenv(name, value)
    assert cli.main(["labels", "import", str(sparse), "--json"]) == 2
    assert "expected at most" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    reliability.record("Label file over the size cap", "`lesion labels import` of a 1 GiB sparse file and of "
                       "/dev/zero", "refused with a named error (exit 2) before being read whole",
                       f"refused; {read_sparse} bytes of the sparse file read, {read_zero} of /dev/zero "
                       f"(cap {2**20})", 0, 0)


def test_300000_distinct_ids_import_in_batches_and_a_rerun_logs_nothing(local_settings, tmp_path):
    known = ["ISIC_K1", "ISIC_K2", "ISIC_K3"]
    add_images(local_settings, known)
    path = tmp_path / "many.csv"
    with open(path, "w") as fh:
        fh.write("image_id,diagnosis\n")
        fh.writelines(f"ID_{i:06d},NV\n" for i in range(300_000))
        fh.writelines(f"{i},MEL\n" for i in known)
    result = label_import.import_labels(path, local_settings)  # once: sqlite "too many SQL variables"
    assert (result["rows"], result["imported"], result["reasons"]) == (300_003, 3, {"unknown_image": 300_000})
    assert result["logged"] == 300_003
    assert labels_of(local_settings, known) == dict.fromkeys(known, "MEL")
    again = label_import.import_labels(path, local_settings)
    assert (again["unchanged"], again["rejected"], again["logged"]) == (3, 300_000, 0)  # nothing new to log
    engine = db.make_engine(local_settings.db_url)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(label_imports)) == 300_003
    engine.dispose()
    reliability.record("Label file of 300,000 distinct ids", "`lesion labels import` on SQLite, then rerun",
                       "imported in batches, no database error; the rerun logs nothing",
                       f"{result['imported']} imported, {result['rejected']} unknown_image; rerun logged "
                       f"{again['logged']}", 0, 0)


@pytest.mark.parametrize("body, error", [
    (b"ISIC_1,MEL\nISIC_2," + b"x" * (50 * 2**20) + b"\n", r"line 3 is longer than 131072 bytes"),  # once _csv.Error
    (b"ISIC_1,MEL\nISIC_2,\"" + (b"y" * 60_000 + b"\n") * 3,  # an open quote: one field over many lines
     r"line 5: field larger than field limit \(131072\); expected CSV rows"),
    (b"ISIC_1,MEL\nISIC_2,N\xe9vus\n", r"line 3: not UTF-8 text \(invalid continuation byte at byte 8"),
])
def test_bad_text_is_refused_by_name_and_applies_nothing(local_settings, tmp_path, body, error):
    add_images(local_settings, ["ISIC_1", "ISIC_2"])
    path = tmp_path / "bad.csv"
    path.write_bytes(b"image_id,diagnosis\n" + body)
    with pytest.raises(ValueError, match=rf"labels file {path}: {error}"):
        label_import.import_labels(path, local_settings)
    assert labels_of(local_settings, ["ISIC_1", "ISIC_2"]) == {"ISIC_1": None, "ISIC_2": None}  # one transaction
    if b"x" * 2**20 in body:
        reliability.record("Label file with a 50 MB line", "`lesion labels import` of a row of 50 MB",
                           "refused with a named error (exit 2); nothing applied",
                           "ValueError naming the file and line 3; its first row not applied", 0, 0)
