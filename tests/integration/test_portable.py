"""Portable references: the database holds store-relative keys, so a home copied to another path, or a
bucket's objects moved to another bucket and prefix, keep working; old absolute rows are migrated."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.core.schema import drops, images, model_versions, predictions, quarantine
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import S3Store, open_store
from tests.helpers import N_IMAGES, copy_home, mirror_home, run_cli

REF_COLUMNS = [(images, "original_uri"), (images, "normalized_uri"), (quarantine, "raw_uri"), (drops, "manifest_uri"),
               (model_versions, "model_uri"), (model_versions, "report_uri"), (model_versions, "metrics_uri"),
               (predictions, "gradcam_uri")]


def _refs(settings: Settings) -> list[str]:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        refs = [v for table, col in REF_COLUMNS for v in conn.scalars(sa.select(table.c[col])) if v is not None]
    engine.dispose()
    return refs


def _unscore(settings: Settings) -> None:
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM prediction_samples"))
        conn.execute(predictions.delete())
    engine.dispose()


def test_a_copied_home_scores_with_its_own_champion(trained_home, tmp_path):
    """Copy a whole home (SQLite + local store), remove the copy it came from, score with the CLI."""
    first = copy_home(trained_home.settings, tmp_path / "first")
    moved = copy_home(first, tmp_path / "elsewhere" / "home")
    shutil.rmtree(first.home)  # nothing may still point into the old path
    refs = _refs(moved)
    assert refs and not [r for r in refs if "://" in r], "the database must hold keys, not absolute URIs"
    store = open_store(moved)
    assert all(store.exists(r) for r in refs if "!" not in r)
    _unscore(moved)
    result = run_cli("score", "--json", env={"LESION_HOME": str(moved.home), "LESION_DB_URL": "",
                                              "LESION_STORE_URL": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"scored": %d' % N_IMAGES in result.stdout
    gradcams = [r for r in _refs(moved) if r.startswith("predictions/")]
    assert len(gradcams) == N_IMAGES and all(store.exists(k) for k in gradcams)
    assert not first.home.exists()


def test_objects_moved_to_another_bucket_and_prefix(trained_home, pg_s3_settings, s3_server, tmp_path):
    """Production shape: rows on PostgreSQL, objects moved from one bucket/prefix to another."""
    mirror_home(trained_home.settings, pg_s3_settings)
    old = open_store(pg_s3_settings)
    new = S3Store(f"moved-{old.bucket}"[:63], "restored/deeper", s3_server.endpoint, s3_server.access_key,
                  s3_server.secret_key)
    for obj in old.list():
        new.put(obj.key, old.get(obj.key))
        old.delete(obj.key)
    assert not list(old.list())
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=pg_s3_settings.db_url,
                                 store_url=new.url, s3_endpoint=s3_server.endpoint,
                                 s3_access_key=s3_server.access_key, s3_secret_key=s3_server.secret_key)
    _unscore(settings)
    result = scoring.score(settings, run_id="after-move")
    assert result["scored"] == N_IMAGES
    refs = _refs(settings)
    assert not [r for r in refs if "://" in r]
    assert all(new.exists(r) for r in refs if "!" not in r)


OLD_BASE = "file:///old/home/store"  # where an earlier home lived (not this test's store)


def _old_rows(now):
    return {
        drops: [{"drop_id": "d1", "source": f"{OLD_BASE}/incoming/d1", "layout": "x", "fingerprint": "f",
                 "status": "complete", "n_entries": 2, "manifest_uri": f"{OLD_BASE}/drops/d1/manifest.json",
                 "started_at": now},
                {"drop_id": "d2", "source": "file:///data/sent/d2", "layout": "x", "fingerprint": "g",
                 "status": "complete", "n_entries": 0, "manifest_uri": "s3://bkt/pre/fix/drops/d2/manifest.json",
                 "started_at": now}],
        images: [{"image_id": "ISIC_1", "drop_id": "d1", "source_entry": "ISIC_1.jpg", "sha256": "a" * 64, "label": "MEL",
                  "near_dup_group": "g1", "phash": "0" * 16, "width": 9, "height": 9, "n_bytes": 1, "format": "JPEG",
                  "original_uri": f"{OLD_BASE}/drops/d1/original/ISIC_1.jpg",
                  "normalized_uri": f"{OLD_BASE}/drops/d1/normalized/224/ISIC_1.jpg", "normalized_size": 224,
                  "ingested_at": now}],
        quarantine: [{"drop_id": "d1", "entry": "bad.jpg", "reason": "empty_file", "detail": "-", "quarantined_at": now,
                      "raw_uri": f"{OLD_BASE}/drops/d1/quarantine/0123456789-bad.jpg"},
                     {"drop_id": "d2", "entry": "bomb.jpg", "reason": "zip_bomb", "detail": "-", "quarantined_at": now,
                      "raw_uri": "file:///data/sent/d2.zip!bomb.jpg"}],
        model_versions: [{"model_version": "v1", "created_at": now, "status": "champion", "profile": "demo",
                          "backbone": "tiny", "image_size": 64, "mc_samples": 10, "config": {}, "environment": {},
                          "weights_source": "none", "lineage": {}, "code_version": "0", "run_id": "r",
                          "is_champion": True, "model_uri": "s3://bkt/pre/fix/models/v1/model.keras",
                          "report_uri": "s3://bkt/pre/fix/models/v1/report.html", "metrics_uri": None}],
        predictions: [{"image_id": "ISIC_1", "model_version": "v1", "p_mel": 0.9, "predicted_label": "MEL",
                       "threshold": 0.5, "entropy": 0.3, "mutual_info": 0.01, "mc_samples": 10, "needs_review": True,
                       "gradcam_uri": f"{OLD_BASE}/predictions/v1/gradcam/d1/ISIC_1.png", "drop_id": "d1",
                       "run_id": "n", "scored_at": now}],
    }


def _snapshot(url):
    engine = db.make_engine(url)
    with engine.connect() as conn:
        out = {(t.name, c): sorted(conn.scalars(sa.select(t.c[c])), key=str) for t, c in REF_COLUMNS}
        out[("drops", "source")] = sorted(conn.scalars(sa.select(drops.c.source)))
    engine.dispose()
    return out


def test_migration_rewrites_absolute_uris_as_keys_and_back(any_db_url, tmp_path):
    old_url = any_db_url
    """A 0005 database written under another path/bucket: upgrade gives keys (whatever the old base),
    downgrade gives absolute URIs of the configured store."""
    assert db.upgrade(old_url, "0005_reviews") == "0005_reviews"
    engine = db.make_engine(old_url)
    with engine.begin() as conn:
        for table, rows in _old_rows(datetime.now(UTC)).items():
            conn.execute(table.insert(), rows)
    engine.dispose()
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=old_url,
                                 store_url=f"{OLD_BASE}")
    assert db.upgrade(settings, "0006_portable_refs") == "0006_portable_refs"
    after = _snapshot(old_url)
    assert after[("images", "original_uri")] == ["drops/d1/original/ISIC_1.jpg"]
    assert after[("images", "normalized_uri")] == ["drops/d1/normalized/224/ISIC_1.jpg"]
    assert after[("drops", "manifest_uri")] == ["drops/d1/manifest.json", "drops/d2/manifest.json"]
    assert after[("quarantine", "raw_uri")] == ["drops/d1/quarantine/0123456789-bad.jpg", "file:///data/sent/d2.zip!bomb.jpg"]
    assert after[("model_versions", "model_uri")] == ["models/v1/model.keras"]
    assert after[("model_versions", "report_uri")] == ["models/v1/report.html"]
    assert after[("model_versions", "metrics_uri")] == [None]
    assert after[("predictions", "gradcam_uri")] == ["predictions/v1/gradcam/d1/ISIC_1.png"]
    # a drop taken from the configured store's incoming/ is known by its key; a local folder stays a file URI
    assert after[("drops", "source")] == ["file:///data/sent/d2", "incoming/d1"]

    moved = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=old_url, store_url="s3://new-bucket/p")
    with pytest.raises(RuntimeError, match="store URL"):
        db.downgrade(old_url, "0005_reviews")  # no store to make absolute URIs of
    assert db.downgrade(moved, "0005_reviews") == "0005_reviews"
    back = _snapshot(old_url)
    assert back[("images", "original_uri")] == ["s3://new-bucket/p/drops/d1/original/ISIC_1.jpg"]
    assert back[("predictions", "gradcam_uri")] == ["s3://new-bucket/p/predictions/v1/gradcam/d1/ISIC_1.png"]
    assert back[("drops", "source")] == ["file:///data/sent/d2", "s3://new-bucket/p/incoming/d1"]
    assert "file:///data/sent/d2.zip!bomb.jpg" in back[("quarantine", "raw_uri")]
    assert db.upgrade(moved, "0006_portable_refs") == "0006_portable_refs"
    assert _snapshot(old_url) == after
