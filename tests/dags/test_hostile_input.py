"""Hostile input beyond the ingestion corpus: metadata, archives and CSVs meant to break things.
Each is rejected or quarantined with a reason, nothing escapes its folder, and the DAG does not crash."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.core.schema import images, quarantine
from lesion_tasks.core.store import open_store
from tests import imagegen as g
from tests import reliability
from tests.helpers import run_dag

DAGS = Path(__file__).resolve().parents[2] / "dags"
SQLISH = "x'); DROP TABLE images; --"


def _hostile_drop(root: Path) -> dict[str, str]:
    """Write the drop; return {entry: expected reason} for what must be quarantined."""
    root.mkdir(parents=True)
    for i in range(1, 8):
        (root / f"ISIC_H{i:02d}.jpg").write_bytes(g.jpeg(100 + i))
    (root / "metadata.csv").write_text(
        "isic_id,age_approx,sex,anatom_site_general,lesion_id,diagnosis_1,diagnosis_2,diagnosis_3\n"
        f'ISIC_H01,40,male,anterior torso,"{SQLISH}",Benign,Benign melanocytic proliferations,Nevus\n'  # stored verbatim
        f"ISIC_H02,40,male,anterior torso,{'L' * 10_000},Benign,Benign melanocytic proliferations,Nevus\n"
        "ISIC_H03,40,male,anterior torso,IL_\x07bell,Benign,Benign melanocytic proliferations,Nevus\n"
        f"{'ISIC_' + 'Z' * 5000},40,male,anterior torso,IL_9,Benign,Benign melanocytic proliferations,Nevus\n",
        encoding="utf-8-sig")  # a BOM, as Excel writes them: must be read fine
    (root / "latin1.csv").write_bytes("image,diagnosis\nISIC_H04,n\xe6vus\n".encode("latin-1"))
    big = io.StringIO()
    big.write("image,MEL,NV\n")
    for i in range(30_000):
        big.write(f"ISIC_BIG{i:06d},0,1\n")  # 30,000 rows, none of their images present
    (root / "huge_ground_truth.csv").write_text(big.getvalue())
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as zf:
        zf.writestr("inner/ISIC_IN.jpg", g.jpeg(1))
    (root / "ISIC_H05.jpg").write_bytes(nested.getvalue())  # a zip named like an image
    (root / "ISIC_H06.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # JPEG signature, malformed header
    (root / "ISIC_H07.jpg").write_bytes(g.bomb_png(12_000))
    return {"ISIC_H02.jpg": "invalid_metadata", "ISIC_H03.jpg": "invalid_metadata", "latin1.csv": "invalid_metadata",
            "ISIC_H05.jpg": "nested_archive", "ISIC_H06.jpg": "corrupt_image", "ISIC_H07.jpg": "decompression_bomb"}


def test_hostile_drop_through_the_dag(tmp_path, embedded_airflow_env):
    from airflow.dag_processing.dagbag import DagBag

    settings = embedded_airflow_env
    store = open_store(settings)
    drop = tmp_path / "hostile"
    expected = _hostile_drop(drop)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(drop.iterdir()):
            zf.write(path, path.name)
        zf.writestr("../../etc/evil.jpg", g.jpeg(5))
    store.put("incoming/hostile.zip", buf.getvalue())
    before = {p for p in tmp_path.rglob("*")}

    run, states = run_dag(DagBag(dag_folder=str(DAGS)).get_dag("isic_ingest"))
    assert run.state == "success", states

    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        got = dict(conn.execute(sa.select(quarantine.c.entry, quarantine.c.reason)).all())
        lesion_ids = dict(conn.execute(sa.select(images.c.image_id, images.c.lesion_id)).all())
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    for entry, reason in expected.items():
        assert got.get(entry) == reason, (entry, got.get(entry))
    assert got["../../etc/evil.jpg"] == "unsafe_path"
    assert sum(r == "missing_image" for r in got.values()) == 30_001  # every huge-CSV row + the 5000-char id
    assert max(len(e) for e in got) <= 512
    assert lesion_ids["ISIC_H01"] == SQLISH and "images" in tables  # stored as data, never executed
    new_files = {p for p in tmp_path.rglob("*")} - before
    assert all((tmp_path / "home") in p.parents for p in new_files), "something escaped the store"
    assert not (tmp_path / "etc").exists()
    reliability.record("Hostile metadata, archives and images through isic_ingest",
                       "SQL-like, 10k-char and control-char values, Latin-1 and BOM CSVs, a 30k-row CSV, nested zip, "
                       "traversal entry, malformed JPEG, 144 MP bomb",
                       "each quarantined with a reason; the DAG succeeds; nothing escapes",
                       f"DAG success; {len(got)} quarantine rows with reasons; SQL text stored verbatim", 0, 0)
