"""The label-import log is the provenance of ground truth and must agree with the labels (probe finding 2): two
imports racing for the same images on PostgreSQL (both once said "imported 40" and the log recorded the loser's
labels as imported), a rerun after the images arrived (the log kept "rejected unknown_image"), and a log written
before migration 0017."""

from __future__ import annotations

import hashlib
import threading

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.core.schema import images, label_imports
from lesion_tasks.core.settings import Settings
from lesion_tasks.ingest import label_import
from tests import reliability
from tests.helpers import wait_for_lock_waiters
from tests.unit.test_label_import import add_images, labels_of


def _settings(tmp_path, url: str) -> Settings:
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=url)
    db.upgrade(settings)
    return settings


def _csv(path, rows):
    path.write_text("image_id,diagnosis,label_source\n" + "".join(f"{i},{d},histopathology\n" for i, d in rows))
    return path


def _log(settings) -> list[dict]:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(label_imports).order_by(label_imports.c.id))]
    engine.dispose()
    return rows


def _latest(log: list[dict]) -> dict:
    """The latest entry of each (file, line): what the row did to the labels."""
    return {(r["file_sha256"], r["line"]): r for r in log}


def test_two_imports_racing_for_the_same_images_leave_a_log_that_agrees(pg_url, tmp_path):
    """The MEL file's import starts first and the NV file's second, while the test holds the 40 images' rows
    locked; both queue behind that lock, and it is released only once both wait: the NV import decides after the
    MEL import has committed (the finding: 1.5 s apart, both "imported 40")."""
    settings = _settings(tmp_path, pg_url)
    ids = [f"ISIC_R{i:03d}" for i in range(40)]
    add_images(settings, ids)
    files = {"MEL": _csv(tmp_path / "mel.csv", [(i, "MEL") for i in ids]),
             "NV": _csv(tmp_path / "nv.csv", [(i, "NV") for i in ids])}
    results: dict = {}

    def run(label):
        try:
            results[label] = label_import.import_labels(files[label], settings)
        except Exception as exc:  # noqa: BLE001  (reported by the assertions below)
            results[label] = exc

    engine = db.make_engine(pg_url)
    holder = engine.connect()
    held = holder.begin()
    holder.execute(sa.select(images.c.image_id).where(images.c.image_id.in_(ids)).with_for_update()).all()
    threads = []
    for label in ("MEL", "NV"):
        threads.append(threading.Thread(target=run, args=(label,), daemon=True))
        threads[-1].start()
        wait_for_lock_waiters(engine, len(threads), threads, "the imports")
    held.commit()
    holder.close()
    for t in threads:
        t.join(120)
    engine.dispose()
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert (results["MEL"]["imported"], results["NV"]["imported"]) == (40, 0), results
    assert results["NV"]["reasons"] == {"conflicts_with_label": 40}, results["NV"]
    labels = labels_of(settings, ids)
    assert set(labels.values()) == {"MEL"}, labels
    log = _log(settings)
    contradicting = [r for r in log if r["outcome"] == "imported" and r["label"] != labels[r["image_id"]]]
    assert contradicting == [], contradicting[:3]
    latest = list(_latest(log).values())
    assert sorted((r["outcome"], r["reason"], r["label"]) for r in latest) == sorted(
        [("imported", None, "MEL")] * 40 + [("rejected", "conflicts_with_label", "NV")] * 40)
    reliability.record("Two label imports racing for the same images", "PostgreSQL: MEL and NV files for 40 "
                       "images, the NV import deciding after the MEL import committed (rows held locked by the test)",
                       "one imports, the other is logged conflicts_with_label; the log agrees with the labels",
                       f"MEL imported {results['MEL']['imported']}, NV rejected {results['NV']['rejected']} "
                       f"conflicts_with_label; {len(contradicting)} log entries contradict the labels", 0, 0)


def test_a_rerun_after_the_images_arrive_logs_the_labels_imported(any_db_url, tmp_path):
    settings = _settings(tmp_path, any_db_url)
    add_images(settings, ["ISIC_A"])
    path = _csv(tmp_path / "labels.csv", [("ISIC_A", "MEL"), ("ISIC_LATE1", "NV"), ("ISIC_LATE2", "MEL")])
    first = label_import.import_labels(path, settings)
    assert (first["imported"], first["reasons"]) == (1, {"unknown_image": 2})
    add_images(settings, ["ISIC_LATE1", "ISIC_LATE2"])  # ingested after the labels arrived
    second = label_import.import_labels(path, settings)
    assert (second["imported"], second["unchanged"], second["rejected"]) == (2, 1, 0)
    third = label_import.import_labels(path, settings)
    labels = labels_of(settings, ["ISIC_A", "ISIC_LATE1", "ISIC_LATE2"])
    assert labels == {"ISIC_A": "MEL", "ISIC_LATE1": "NV", "ISIC_LATE2": "MEL"}
    log = _log(settings)
    latest = {r["image_id"]: (r["outcome"], r["reason"], r["label"]) for r in _latest(log).values()}
    assert latest == {i: ("imported", None, label) for i, label in labels.items()}, latest  # once: unknown_image
    assert (first["logged"], second["logged"], third["logged"], third["unchanged"]) == (3, 2, 0, 3)  # idle: nothing
    history = [(r["image_id"], r["outcome"], r["reason"], r["run_id"]) for r in log]
    assert history[1:3] == [("ISIC_LATE1", "rejected", "unknown_image", first["run_id"]),
                            ("ISIC_LATE2", "rejected", "unknown_image", first["run_id"])], history
    assert [h[3] for h in history[3:]] == [second["run_id"]] * 2
    reliability.record("Labels rerun after their images arrived", f"{settings.db_url.split(':')[0]}: a file "
                       "imported before 2 of its images were ingested, rerun after, then again",
                       "the log ends saying imported (earlier rejection kept as history); an idle rerun logs nothing",
                       f"latest entries: {sorted({v[0] for v in latest.values()})}; reruns logged "
                       f"{second['logged']} then {third['logged']}", 0, 0)


def test_a_log_from_before_migration_0017_reruns_as_its_first_run(any_db_url, tmp_path):
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=any_db_url)
    db.upgrade(settings, "0016_site_operating_points")
    add_images(settings, ["ISIC_A"])
    path = _csv(tmp_path / "labels.csv", [("ISIC_A", "NV"), ("ISIC_LATE", "MEL")])
    engine = db.make_engine(any_db_url)
    with engine.begin() as conn:  # what the import logged before 0017: one entry per (file, line)
        conn.execute(sa.text("UPDATE images SET label = 'NV', diagnosis = 'NV', label_source = 'import:histopathology'"))
        conn.execute(sa.text(
            "INSERT INTO label_imports (file_sha256, line, image_id, label, label_source, outcome, reason, imported_at) "
            "VALUES (:sha, 2, 'ISIC_A', 'NV', 'import:histopathology', 'imported', NULL, CURRENT_TIMESTAMP), "
            "(:sha, 3, 'ISIC_LATE', NULL, 'import:histopathology', 'rejected', 'unknown_image', CURRENT_TIMESTAMP)"),
            {"sha": hashlib.sha256(path.read_bytes()).hexdigest()})
    engine.dispose()
    db.upgrade(settings)
    assert {r["run_id"] for r in _log(settings)} == {_log(settings)[0]["file_sha256"]}
    add_images(settings, ["ISIC_LATE"])
    rerun = label_import.import_labels(path, settings)
    assert (rerun["imported"], rerun["unchanged"], rerun["logged"]) == (1, 1, 1)
    assert [(r["line"], r["outcome"]) for r in _log(settings)] == [(2, "imported"), (3, "rejected"), (3, "imported")]
    assert db.downgrade(settings, "0016_site_operating_points") == "0016_site_operating_points"
    engine = db.make_engine(any_db_url)
    with engine.connect() as conn:  # the latest entry of each line kept
        assert conn.execute(sa.text("SELECT line, outcome FROM label_imports ORDER BY id")).all() == [
            (2, "imported"), (3, "imported")]
    engine.dispose()
