"""`lesion gc` (retention.py) on SQLite + a local store and on PostgreSQL + S3: exactly the champion, the
newest N versions and a young training claim keep their artifacts; the others lose everything under
models/<version>/ but report.html and metrics.json, and their overlays (gradcam_uri NULL); rows stay;
drops/ is untouched; a dry run and a second run delete nothing; afterwards scoring with the champion,
the review queue and UI work and `lesion check` finds the home consistent.

Eight versions: the session's trained champion (made 30 days old) and seven copies of its registry
row, with its real artifacts copied under their own names and predictions + overlays for 12 images
(`_fabricate`): training them would only take longer. On PostgreSQL + S3 the S3 server is killed in
the middle of the first real run (a fault of docs/reliability.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from lesion_tasks.versions.registry import ModelVersion
from lesion_tasks.versions import artifacts, registry
from lesion_tasks.ops import consistency, retention
from lesion_tasks.core import db, keys
from lesion_tasks.review import cases as review
from lesion_tasks.review import verdicts
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.core.schema import model_versions, prediction_samples, predictions, reviews
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import StoreError, open_store
from tests import reliability
from tests.helpers import copy_home, fresh_database, mirror_home, run_cli, start_s3_or_fail

H, D = timedelta(hours=1), timedelta(days=1)
# (version, age, status), newest first; the champion is 30 days old
VERSIONS = [("recent-3", 1 * H, "rejected"), ("recent-2", 5 * H, "candidate"), ("recent-1", 10 * H, "rejected"),
            ("claim-young", 20 * H, "training"), ("claim-stale", 3 * D, "training"),
            ("old-rejected", 15 * D, "rejected"), ("old-retired", 20 * D, "retired")]
PRUNED = ["claim-stale", "old-rejected", "old-retired"]
OTHER_FEATURES = "old-retired"  # trained on another feature configuration (seed 7), with a cache of its own
N_PREDICTIONS = 12
N_RESCORED = 5


def _engine(settings):
    return db.make_engine(settings.db_url)


def _fabricate(settings: Settings, champion: str, now: datetime) -> dict:
    """The seven versions of VERSIONS next to the champion; its first N_RESCORED predictions (and
    overlays) removed, for scoring to redo after gc; returns the feature config keys."""
    store, engine = open_store(settings), _engine(settings)
    with engine.begin() as conn:
        conn.execute(model_versions.update().where(model_versions.c.model_version == champion).values(created_at=now - 30 * D))
        champ = registry.get(conn, champion)
        preds = [dict(r) for r in conn.execute(sa.select(predictions).where(predictions.c.model_version == champion)
                                               .order_by(predictions.c.image_id)).mappings()]
        redo = [p["image_id"] for p in preds[:N_RESCORED]]
        conn.execute(predictions.delete().where(predictions.c.model_version == champion, predictions.c.image_id.in_(redo)))
    for p in preds[:N_RESCORED]:
        store.delete(p["gradcam_uri"])
    preds = preds[N_RESCORED:N_RESCORED + N_PREDICTIONS]
    base = keys.model_prefix(champion)
    champ_objects = {o.key[len(base):]: store.get(o.key) for o in store.list(base)}
    own = champ["lineage"]["feature_config"]
    other = replace(artifacts.feature_config(ModelVersion.from_row(champ)), init_seed=7).key
    rows, pred_rows, sample_rows = [], [], []
    for version, age, status in VERSIONS:
        row = {**champ, "model_version": version, "created_at": now - age, "status": status, "is_champion": False,
               "run_id": version}
        if status == "training":  # a claim: the placeholder row, the head written so far
            row.update(config={}, environment={}, lineage={"run_id": version}, weights_source="(training)", weights_sha256=None,
                       metrics=None, gate=None, review_rule=None, threshold=None, model_uri=None, report_uri=None, metrics_uri=None)
            store.put(f"models/{version}/{artifacts.HEAD}", champ_objects[artifacts.HEAD])
        else:
            seed = 7 if version == OTHER_FEATURES else champ["config"]["seed"]
            row.update(config={**champ["config"], "seed": seed},
                       lineage={**champ["lineage"], "run_id": version, "feature_config": other if seed == 7 else own},
                       **{c: champ[c].replace(base, keys.model_prefix(version)) for c in ("model_uri", "report_uri", "metrics_uri")})
            for name, data in champ_objects.items():
                store.put(keys.model_prefix(version) + name, data)
            for p in preds:
                key = keys.gradcam(version, p["drop_id"], p["image_id"])
                store.put(key, store.get(p["gradcam_uri"]), "image/png")
                pred_rows.append({**p, "model_version": version, "gradcam_uri": key, "needs_review": True,
                                  "review_reasons": "uncertain"})
                sample_rows.append({"image_id": p["image_id"], "model_version": version, "p_mel_samples": [p["p_mel"]] * 3})
        rows.append(row)
    for o in store.list(f"features/{own}/"):
        store.put(o.key.replace(own, other, 1), store.get(o.key))
    with engine.begin() as conn:
        conn.execute(model_versions.insert(), rows)
        conn.execute(predictions.insert(), pred_rows)
        conn.execute(prediction_samples.insert(), sample_rows)
    verdicts.record(engine, preds[0]["image_id"], "old-rejected", "agree", "dr-before-gc")
    engine.dispose()
    return {"own": own, "other": other, "rescore": redo}


def _snapshot(settings) -> dict[str, int]:
    return {o.key: o.size for o in open_store(settings).list("")}


def _counts(settings) -> dict[str, int]:
    engine = _engine(settings)
    with engine.connect() as conn:
        out = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
               for t in (model_versions, predictions, prediction_samples, reviews)}
        out["null_overlays"] = conn.execute(sa.select(sa.func.count()).where(predictions.c.gradcam_uri.is_(None))).scalar()
        out["pruned"] = conn.execute(sa.select(sa.func.count()).where(model_versions.c.artifacts_pruned_at.is_not(None))).scalar()
    engine.dispose()
    return out


def _doomed(before: dict[str, int], versions: list[str], feature_configs: list[str] = ()) -> set[str]:
    """What the retention rule deletes of `versions` (and of the feature caches)."""
    out = set()
    for key in before:
        top, name, rest = (key.split("/", 2) + ["", ""])[:3]
        if (top == "models" and name in versions and rest not in artifacts.KEPT_AFTER_PRUNING) \
                or (top == "predictions" and name in versions and rest.startswith("gradcam/")) \
                or (top == "features" and name in feature_configs):
            out.add(key)
    return out


def _gc_scenario(settings: Settings, champion: str, crash=None) -> dict:
    """Fabricate, dry run, gc (through `crash` when given), second run, then the claim grows stale: all
    asserted; returns what the crash observed."""
    now = datetime.now(UTC)
    fc = _fabricate(settings, champion, now)
    before, rows_before = _snapshot(settings), _counts(settings)
    kept = {champion: ["champion"], "recent-3": ["recent"], "recent-2": ["recent"], "recent-1": ["recent"],
            "claim-young": ["training"]}
    doomed = _doomed(before, PRUNED)
    by_kind = {"models": sum(k.startswith("models/") for k in doomed), "gradcam": sum(k.startswith("predictions/") for k in doomed)}
    assert by_kind["models"] >= 2 * 10 + 1 and by_kind["gradcam"] == 2 * N_PREDICTIONS

    dry = retention.collect_garbage(settings, dry_run=True)
    assert (dry["kept"], dry["pruned"], dry["newly_pruned"]) == (kept, PRUNED, PRUNED)
    assert {k: dry["deleted"][k]["objects"] for k in by_kind} == by_kind and dry["deleted"]["objects"] == len(doomed)
    assert dry["deleted"]["bytes"] == sum(before[k] for k in doomed) and dry["deleted"]["gradcam_refs_cleared"] == 2 * N_PREDICTIONS
    assert dry["feature_configs"] == {"kept": sorted([fc["own"], fc["other"]]), "dropped": [],
                                      "note": dry["feature_configs"]["note"]} and "in progress" in dry["feature_configs"]["note"]
    assert _snapshot(settings) == before and _counts(settings) == rows_before  # the dry run deleted nothing

    observed = crash(settings) if crash else retention.collect_garbage(settings)
    if not crash:
        assert observed["deleted"] == dry["deleted"] and observed["kept"] == kept
    after = _snapshot(settings)
    lost = len(set(before) - doomed - set(after))
    assert after == {k: v for k, v in before.items() if k not in doomed}  # drops/, kept versions, features untouched
    for version in ("old-rejected", "old-retired"):
        assert {k for k in after if k.startswith(f"models/{version}/")} == {f"models/{version}/{n}" for n in artifacts.KEPT_AFTER_PRUNING}
    assert not [k for k in after if k.startswith("models/claim-stale/")]
    rows = _counts(settings)
    assert rows == {**rows_before, "null_overlays": 2 * N_PREDICTIONS, "pruned": 3}  # no row deleted

    again = retention.collect_garbage(settings)
    assert (again["pruned"], again["newly_pruned"], again["deleted"]["objects"], again["deleted"]["gradcam_refs_cleared"]) \
        == (PRUNED, [], 0, 0)
    assert _snapshot(settings) == after

    for refused in (lambda: scoring.score(settings, "old-rejected"),
                    lambda: registry.promote(_engine(settings), "old-rejected", "why not", "tester", override=True)):
        with pytest.raises(ValueError, match="'old-rejected': its artifacts .* were pruned by `lesion gc`"):
            refused()

    engine = _engine(settings)  # the claim is abandoned after all: it goes, and the cache nobody kept uses with it
    with engine.begin() as conn:
        conn.execute(model_versions.update().where(model_versions.c.model_version == "claim-young").values(created_at=now - 2 * D))
    engine.dispose()
    later = retention.collect_garbage(settings)
    assert later["newly_pruned"] == ["claim-young"] and later["feature_configs"]["dropped"] == [fc["other"]]
    assert later["feature_configs"]["kept"] == [fc["own"]] and later["feature_configs"]["note"] is None
    assert _snapshot(settings) == {k: v for k, v in after.items() if k not in _doomed(after, ["claim-young"], [fc["other"]])}
    assert retention.collect_garbage(settings)["deleted"]["objects"] == 0

    rescored = scoring.score(settings)  # the champion still scores, writing overlays
    assert (rescored["model_version"], rescored["scored"]) == (champion, N_RESCORED)
    engine = _engine(settings)
    with engine.connect() as conn:
        new_overlays = conn.scalars(sa.select(predictions.c.gradcam_uri).where(predictions.c.image_id.in_(fc["rescore"]),
                                                                               predictions.c.model_version == champion)).all()
        queue = review.queue(conn, review.QueueFilter())
        old = review.queue(conn, review.QueueFilter("old-rejected", status="all"))
        reviewed = review.queue(conn, review.QueueFilter("old-rejected", status="reviewed"))
        case = review.case(conn, old["cases"][0]["image_id"], "old-rejected")
    assert len(new_overlays) == N_RESCORED and all(open_store(settings).exists(k) for k in new_overlays)
    assert queue["model_version"] == champion and queue["total"] > 0
    assert old["total"] > 0 and all(c["gradcam_uri"] is None for c in old["cases"]) and reviewed["total"] == 1
    assert case["prediction"]["gradcam_uri"] is None and case["model"]["artifacts_pruned_at"] is not None
    stored = verdicts.record(engine, queue["cases"][0]["image_id"], champion, "disagree", "dr-after-gc")
    assert stored["label"] in ("MEL", "NV")
    engine.dispose()
    report = consistency.check(settings)
    assert report["ok"], report["examples"]
    # the two abandoned claims are warnings, which do not fail the check
    assert report["warnings"] == {"stale_training_claim": 2, "unfinished_drop_object": 0, "gc_leftover": 0}
    return {"observed": observed, "kept_objects_lost": lost}


def test_gc_on_sqlite_and_a_local_store(trained_home, tmp_path):
    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    settings = copy_home(trained_home.settings, tmp_path / "home")
    _gc_scenario(settings, trained_home.version)

    async def authenticate(request):
        return Reviewer("dr-gc", True, True)

    client = TestClient(create_app(lambda: settings, authenticate, lambda nxt: f"/login?next={nxt}"))
    engine = _engine(settings)
    with engine.connect() as conn:
        image_id = conn.scalars(sa.select(predictions.c.image_id).where(predictions.c.model_version == "old-rejected")).first()
    engine.dispose()
    overlay = client.get(f"/overlay/old-rejected/{image_id}")
    assert overlay.status_code == 404 and "removed by `lesion gc`" in overlay.text
    assert client.get(f"/overlay/{trained_home.version}/{image_id}").status_code == 200
    case = client.get(f"/case/{image_id}", params={"version": "old-rejected"})
    assert case.status_code == 200 and "No Grad-CAM overlay: <code>lesion gc</code> removed it" in case.text
    assert "overlay pruned" in client.get("/", params={"version": "old-rejected", "status": "all", "labelled": "all"}).text
    assert client.get("/models").text.count("artifacts pruned") == 4
    assert client.get("/models/old-retired/report").status_code == 200  # the report is kept

    env = {"LESION_HOME": str(settings.home)}
    dry = run_cli("gc", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert json.loads(dry.stdout)["deleted"]["objects"] == 0 and json.loads(dry.stdout)["dry_run"] is True
    check = run_cli("check", env=env)
    assert check.returncode == 0 and check.stdout.strip().endswith("consistent"), check.stdout + check.stderr[-2000:]
    promote = run_cli("promote", "old-retired", "--reason", "try", env=env)
    assert promote.returncode == 2 and "pruned by `lesion gc`" in promote.stderr and "Traceback" not in promote.stderr


@pytest.fixture
def own_s3():
    """An S3 server of this test's own: it is killed."""
    server = start_s3_or_fail()
    yield server
    server.stop()


def test_gc_on_postgres_and_s3_survives_the_store_dying_midway(trained_home, postgres, own_s3, tmp_path, monkeypatch):
    with fresh_database(postgres) as url:
        settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=url, store_url="s3://gc-crash/lesion",
                                     s3_endpoint=own_s3.endpoint, s3_access_key=own_s3.access_key,
                                     s3_secret_key=own_s3.secret_key)
        db.upgrade(settings)
        mirror_home(trained_home.settings, settings)

        def crash(settings):
            """The first real run: S3 is SIGKILLed before its second deletion; restarted; then rerun."""
            real, calls = retention._delete, []

            def killing(store, objects, what):
                calls.append(what)
                if len(calls) == 2:
                    own_s3.kill()
                real(store, objects, what)

            monkeypatch.setattr(retention, "_delete", killing)
            with pytest.raises(StoreError, match=own_s3.endpoint):
                retention.collect_garbage(settings)
            monkeypatch.setattr(retention, "_delete", real)
            own_s3.restart()
            midway = consistency.check(settings)  # rows first: nothing points at a deleted object
            assert midway["ok"] and midway["warnings"]["gc_leftover"] > 0, midway
            rerun = retention.collect_garbage(settings)
            assert rerun["newly_pruned"] and rerun["deleted"]["objects"] > 0
            return {"leftovers": midway["warnings"]["gc_leftover"], "rerun": rerun["deleted"]["objects"]}

        result = _gc_scenario(settings, trained_home.version, crash)
    assert result["kept_objects_lost"] == 0
    seen = result["observed"]
    reliability.record("S3 server dies during gc", "SIGKILL of rclone serve s3 between two deletions of `lesion gc`, "
                       "then restart and rerun", "StoreError; rows marked first, so nothing points at a deleted object; "
                       "rerun finishes; kept versions, drops and feature caches intact",
                       f"StoreError; check consistent with {seen['leftovers']} leftovers (warning); rerun deleted "
                       f"{seen['rerun']}; second run 0", result["kept_objects_lost"], 0)


def test_a_version_whose_lineage_does_not_name_its_features_keeps_its_feature_cache(trained_home, tmp_path):
    """Retention and `lesion check` read every version through the registry (`registry.versions`). A champion
    whose lineage does not record its feature configuration (versions trained before it was recorded) has it
    computed from its recorded config: gc keeps its features/<config>/ and check counts it as used. Before, both
    passed a few selected columns on, the registry raised KeyError('threshold') on the partial row, the error
    was swallowed and gc deleted the champion's feature cache."""
    home = copy_home(trained_home.settings, tmp_path / "home")
    version = trained_home.version
    engine = db.make_engine(home.db_url)
    with engine.begin() as conn:
        lineage = registry.get(conn, version)["lineage"]
        key = lineage.pop("feature_config")
        conn.execute(model_versions.update().where(model_versions.c.model_version == version).values(lineage=lineage))
        v = registry.version(conn, version)
    engine.dispose()
    assert artifacts.feature_key(v) == key  # computed from the recorded config: the same configuration
    store = open_store(home)
    cached = sorted(o.key for o in store.list(f"features/{key}/"))
    assert cached
    result = retention.collect_garbage(home)
    assert result["deleted"]["features"]["objects"] == 0 and key in result["feature_configs"]["kept"]
    assert sorted(o.key for o in store.list(f"features/{key}/")) == cached
    assert consistency.check(home)["info"]["features"][key]["used_by"] == [version]
