"""Nightly scoring: the one-backbone-pass shortcuts equal the naive computations, every image is
scored once, reruns rewrite identical numbers, overlays are bounded, the views answer.

On the session's trained home (tests/conftest.py): read as it is, scored again on a copy."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from lesion_tasks.versions.registry import ModelVersion
from lesion_tasks.versions import artifacts, registry
from lesion_tasks.data import trainset
from lesion_tasks.model import backbones, features, gradcam, mc
from lesion_tasks.core import db
from lesion_tasks.scoring import nightly as scoring, overlays
from lesion_tasks.core.schema import images, predictions
from lesion_tasks.core.store import key_of, open_store
from tests.helpers import BIG_ORIGINAL, N_IMAGES, OTHER_DROP, copy_home

VOLATILE = {"run_id", "scored_at"}


@pytest.fixture(scope="module")
def scored_home(trained_home):
    """The shared home: labelled and unlabelled images (one a big original), trained, scored once."""
    return trained_home.settings, trained_home.version, trained_home.scored


@pytest.fixture(scope="module")
def scored_copy(trained_home, tmp_path_factory):
    """A copy of it to score again."""
    return copy_home(trained_home.settings, tmp_path_factory.mktemp("scoring") / "home")


def _rows(settings, version):
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(predictions).where(predictions.c.model_version == version)
                            .order_by(predictions.c.image_id)).mappings().all()
    engine.dispose()
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _model(settings, version, tmp_path):
    import keras

    store = open_store(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        row = registry.get(conn, version)
        refs = trainset.split_refs(conn)["test"][0][:8]
    engine.dispose()
    path = tmp_path / "model.keras"
    path.write_bytes(store.get(key_of(store, row["model_uri"])))
    rgb = np.stack([features.load_rgb(store, r.uri, row["image_size"]) for r in refs])
    return row, keras.models.load_model(path, compile=False), backbones.preprocess(rgb), [r.image_id for r in refs], store


def test_every_image_scored_once_with_valid_numbers(scored_home, scored_copy):
    settings, version, first = scored_home
    rows = _rows(settings, version)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        n_images = conn.execute(sa.select(sa.func.count()).select_from(images)).scalar()
    engine.dispose()
    assert first == {"model_version": version, "scored": n_images, "skipped": 0,
                     "needs_review": sum(r["needs_review"] for r in rows), "seconds": first["seconds"],
                     "precision": {"precision": "float32", "why": "the version's own (trained in it)"},
                     "operating_points": first["operating_points"]}
    # the run ended by estimating each scored site's operating point; every case carries its site's threshold
    points = first["operating_points"]
    assert points and {p["method"] for p in points.values()} <= {"pooled", "unlabelled", "labelled"}, points
    assert sum(p["images"] for p in points.values()) == N_IMAGES
    assert len(rows) == n_images == N_IMAGES
    for r in rows:
        assert 0 <= r["p_mel"] <= 1 and 0 <= r["entropy"] <= math.log(2) + 1e-9 and r["mutual_info"] >= 0
        assert r["predicted_label"] == ("MEL" if r["p_mel"] >= r["threshold"] else "NV")
        assert r["mc_samples"] == 50 and r["gradcam_uri"].endswith(f"/{r['drop_id']}/{r['image_id']}.npy")
        assert r["needs_review"] == bool(r["review_reasons"])
        if r["predicted_label"] == "MEL":
            assert "predicted_mel" in r["review_reasons"]
        # "uncertain" is about the decision: over 30% of the MC samples across the case's threshold
        assert ("uncertain" in (r["review_reasons"] or "").split(",")) == (r["decision_uncertainty"] > 0.3), r
        assert round(r["threshold"], 9) in {round(p["threshold"], 9) for p in points.values()}
        on = r["attention_on_lesion"]
        assert on is None or 0 <= on <= 1
        off = r["predicted_label"] == "MEL" and on is not None and on < 0.5
        assert ("attention_off_lesion" in (r["review_reasons"] or "").split(",")) == off, r
    assert sum(r["attention_on_lesion"] is not None for r in rows) > len(rows) / 2  # synthetic lesions segment
    assert any("uncertain" in (r["review_reasons"] or "") for r in rows)
    again = scoring.score(scored_copy)
    assert (again["scored"], again["skipped"]) == (0, n_images)
    assert _rows(scored_copy, version) == rows  # nothing rewritten


def test_out_of_scope_lesions_are_flagged(scored_home):
    """Scoring stores p_other from the version's out-of-scope head and flags `out_of_scope` exactly when
    it reaches the version's threshold; the synthetic basal cell carcinomas are mostly caught."""
    settings, version, _ = scored_home
    rows = _rows(settings, version)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        row = registry.get(conn, version)
    engine.dispose()
    threshold = row["review_rule"]["out_of_scope_above"]
    assert all(r["p_other"] is not None and 0 <= r["p_other"] <= 1 for r in rows)
    for r in rows:
        assert ("out_of_scope" in (r["review_reasons"] or "")) == (r["p_other"] >= threshold)
    other = [r for r in rows if r["drop_id"] == OTHER_DROP]
    flagged = [r for r in other if {"out_of_scope", "predicted_mel"} & set((r["review_reasons"] or "").split(","))]
    assert len(other) == 40 and len(flagged) >= 30
    store = open_store(settings)
    refs = [features.ImageRef(r["image_id"], r["drop_id"], "") for r in other[:5]]
    with engine.connect() as conn:
        uris = dict(conn.execute(sa.select(images.c.image_id, images.c.normalized_uri)
                                 .where(images.c.image_id.in_([r.image_id for r in refs]))).all())
    engine.dispose()
    refs = [features.ImageRef(r.image_id, r.drop_id, uris[r.image_id]) for r in refs]
    feats, _ = features.features_for(refs, [0], artifacts.feature_config(ModelVersion.from_row(row)), artifacts.weights_of(ModelVersion.from_row(row), settings, store), store)
    np.testing.assert_allclose(artifacts.load_scope_of(store, ModelVersion.from_row(row)).p_other(feats[0]), [r["p_other"] for r in other[:5]],
                               atol=1e-4)


def test_rerun_rewrites_identical_numbers_and_overlays(scored_home, scored_copy):
    _, version, _ = scored_home
    settings = scored_copy
    store = open_store(settings)
    before = _rows(settings, version)
    pngs = {r["image_id"]: store.get(key_of(store, r["gradcam_uri"])) for r in before[:20]}
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(predictions.delete().where(predictions.c.model_version == version))
    engine.dispose()
    assert scoring.score(settings)["scored"] == len(before)
    assert _rows(settings, version) == before
    assert {i: store.get(key_of(store, u)) for i, u in ((r["image_id"], r["gradcam_uri"]) for r in before[:20])} == pngs


def _original_uri(settings, image_id: str) -> str:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        uri = conn.scalar(sa.select(images.c.original_uri).where(images.c.image_id == image_id))
    engine.dispose()
    return uri


def test_the_map_is_stored_and_the_overlay_drawn_on_the_original_at_bounded_size(scored_home):
    """Scoring stores the low-resolution map (a few hundred bytes); the overlay is drawn from it on the
    original, at most 1024 px."""
    settings, version, _ = scored_home
    store = open_store(settings)
    row = next(r for r in _rows(settings, version) if r["image_id"] == BIG_ORIGINAL)
    stored = store.get(key_of(store, row["gradcam_uri"]))
    heat = gradcam.map_from_bytes(stored)
    assert len(stored) < 1024 and heat.shape[0] == heat.shape[1] <= 16 and 0 <= heat.min() and heat.max() <= 1
    overlay = Image.open(io.BytesIO(overlays.overlay_png(store, row["gradcam_uri"], _original_uri(settings, BIG_ORIGINAL))))
    assert overlay.format == "PNG" and overlay.size == (1024, 683)


def test_materialised_overlays_are_the_pictures_drawn_on_demand(scored_home, tmp_path):
    """LESION_GRADCAM_MATERIALIZE=1 writes the overlay PNG at scoring (no map): the same picture, up to the
    map's float16 rounding, as the one drawn on demand from the default home's map."""
    _, version, _ = scored_home
    on_demand = scored_home[0]
    materialised = replace(copy_home(on_demand, tmp_path / "home"), gradcam_materialize=True)
    engine = db.make_engine(materialised.db_url)
    with engine.begin() as conn:
        conn.execute(predictions.delete().where(predictions.c.image_id == BIG_ORIGINAL))
    engine.dispose()
    assert scoring.score(materialised)["scored"] == 1
    row = next(r for r in _rows(materialised, version) if r["image_id"] == BIG_ORIGINAL)
    assert row["gradcam_uri"].endswith(f"/{BIG_ORIGINAL}.png")
    store = open_store(materialised)
    written = np.asarray(Image.open(io.BytesIO(store.get(key_of(store, row["gradcam_uri"])))), np.int16)
    demand_row = next(r for r in _rows(on_demand, version) if r["image_id"] == BIG_ORIGINAL)
    drawn = np.asarray(Image.open(io.BytesIO(overlays.overlay_png(
        open_store(on_demand), demand_row["gradcam_uri"], _original_uri(on_demand, BIG_ORIGINAL)))), np.int16)
    assert written.shape == drawn.shape and np.abs(written - drawn).max() <= 2


def test_head_only_mc_equals_naive_full_model_mc(scored_home, tmp_path):
    """T full forward passes with the same dropout masks give the same samples (max |diff| <= 1e-5)."""
    import keras

    settings, version, _ = scored_home
    row, model, x, ids, store = _model(settings, version, tmp_path)
    head = artifacts.of(store, ModelVersion.from_row(row)).load_head()
    masks = mc.dropout_masks(ids, version, 50, head.w1.shape[1], head.dropout)  # the ensemble: 128 + D units
    to_bn = keras.Model(model.input, model.get_layer("head_bn").output)
    out = model.get_layer("head_out")
    naive = np.stack([out(to_bn(x, training=False).numpy() * masks[:, t, :]).numpy()[:, mc.MEL] for t in range(50)], 1)
    pooled = scoring.load_scoring_model(store, ModelVersion.from_row(row)).run_backbone(x)[1]
    fast = mc.mc_samples(replace(head, cal_a=1.0, cal_b=0.0), pooled, masks)  # the Keras head is uncalibrated
    assert np.abs(fast - naive).max() <= 1e-5
    logit = np.log(naive) - np.log1p(-naive)
    calibrated = 1 / (1 + np.exp(-(head.cal_a * logit + head.cal_b)))
    assert np.abs(mc.mc_samples(head, pooled, masks) - calibrated).max() <= 1e-4


def test_attention_on_lesion_is_measured_on_the_model_input_and_the_predicted_class_map(scored_home, tmp_path):
    """The stored share equals the segmentation of the image as the model saw it against the reference
    Grad-CAM (a GradientTape through the whole model) of the predicted class."""
    from lesion_tasks.model import attention

    settings, version, _ = scored_home
    row, model, _, ids, store = _model(settings, version, tmp_path)
    stored = {r["image_id"]: r for r in _rows(settings, version)}
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        uris = dict(conn.execute(sa.select(images.c.image_id, images.c.normalized_uri).where(images.c.image_id.in_(ids))).all())
    engine.dispose()
    rgb = np.stack([features.model_input(store, uris[i], artifacts.feature_config(ModelVersion.from_row(row))) for i in ids])
    pred = np.array([stored[i]["predicted_label"] == "MEL" for i in ids], np.int64)
    cams = gradcam.gradcam_tape(model, row["config"]["last_activation"], backbones.preprocess(rgb), pred)
    for i, image, cam in zip(ids, rgb, cams):
        expected = attention.attention_on_lesion(image, cam)
        got = stored[i]["attention_on_lesion"]
        assert (got is None) == (expected is None) and (got is None or got == pytest.approx(expected, abs=2e-3)), i


def test_views_one_row_per_image_and_review_queue(scored_home):
    settings, version, _ = scored_home
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        latest = conn.execute(sa.text("SELECT image_id, model_version FROM v_latest_predictions")).all()
        queue = conn.execute(sa.text("SELECT image_id, needs_review, known_label FROM v_review_queue")).all()
        flagged = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(predictions.c.needs_review)).scalar()
    engine.dispose()
    assert len(latest) == len({i for i, _ in latest}) == N_IMAGES and {v for _, v in latest} == {version}
    assert len(queue) == flagged and all(q.needs_review for q in queue)


def test_a_failing_site_sends_every_case_to_review_and_the_night_says_why(trained_home, tmp_path):
    """A site where the champion's own evidence is below a floor (`site_evaluations` status failing): every
    one of its cases tonight goes to review (`site_failing`), the summary names the floor, the alert says so."""
    from datetime import UTC, datetime

    from lesion_tasks.core.schema import site_evaluations
    from lesion_tasks.ops import alerts

    settings = copy_home(trained_home.settings, tmp_path / "home")
    version = trained_home.version
    engine = db.make_engine(settings.db_url)
    below = {"n_mel": 40, "mel_sensitivity": 0.45, "mel_specificity": 0.7, "auc": 0.7, "balanced_accuracy": 0.62,
             "ci95": {"mel_sensitivity": [0.30, 0.55], "mel_specificity": [0.6, 0.8], "auc": [0.6, 0.8],
                      "balanced_accuracy": [0.55, 0.7]}}
    with engine.begin() as conn:
        site_ids = list(conn.scalars(sa.select(images.c.image_id).where(images.c.drop_id == OTHER_DROP)))
        conn.execute(predictions.delete().where(predictions.c.image_id.in_(site_ids)))
        conn.execute(site_evaluations.update().where(site_evaluations.c.model_version == version,
                                                     site_evaluations.c.site == OTHER_DROP)
                     .values(status="failing", melanomas_evidence=40, metrics=below, evaluated_at=datetime.now(UTC)))
    assert scoring.score(settings, run_id="failing-night")["scored"] == len(site_ids) > 0
    with engine.connect() as conn:
        reasons = dict(conn.execute(sa.select(predictions.c.image_id, predictions.c.review_reasons)
                                    .where(predictions.c.run_id == "failing-night")).all())
    engine.dispose()
    assert set(reasons) == set(site_ids) and all("site_failing" in (r or "") for r in reasons.values()), reasons
    night = scoring.summarize(settings, "champion", "failing-night", [])
    failing = night["sites"]["failing"]
    assert night["sites"]["failing_sites"] == [OTHER_DROP] and failing[OTHER_DROP]["images"] == len(site_ids)
    floor = trained_home.config.floors.mel_sensitivity  # the trained home's own floors (tests/helpers.py)
    assert f"mel_sensitivity 95% CI up to 0.550 < {floor}" in failing[OTHER_DROP]["why"], failing
    alert = alerts.site_failing(night, {"review": "http://ui/"})
    assert alert.kind == "site_failing" and OTHER_DROP in alert.subject and f"{len(site_ids)} case(s)" in alert.subject
    assert "Every one of them went to review" in alert.text() and failing[OTHER_DROP]["why"] in alert.text()


def test_a_first_night_is_compared_with_the_validation_split(trained_home, monkeypatch):
    """No earlier night of the version (the first one, after a backlog, say): the shift check compares the
    night with the version's predictions on its validation split instead of saying "not compared (0 before)"."""
    from lesion_tasks.versions import artifacts
    from lesion_tasks.ops import alerts

    settings, version = trained_home.settings, trained_home.version
    val = artifacts.ModelArtifacts(open_store(settings), version).validation_predictions()
    assert val is not None and len(val["p_mel"]) == len(val["entropy"]) > 0
    monkeypatch.setattr(alerts, "MIN_REFERENCE", 5)  # the shared home's validation split is small
    monkeypatch.setattr(alerts, "MIN_TONIGHT", 5)
    result = alerts.shift(settings, version, "night-1")  # the only night: nothing before it
    assert result["reference"] == "the validation split (no earlier night of this version)"
    assert result["n_reference"] == len(val["p_mel"]) and "p_mel" in result and "note" not in result
    assert result["p_mel"]["mean_reference"] == round(float(np.mean(val["p_mel"])), 4)
    text = alerts.distribution_shift(result, {}).text()
    assert "this version's predictions on its validation split (its first night" in text and " on validation " in text


def test_a_sites_first_night_under_a_new_version_is_compared_with_its_earlier_drops(trained_home, home_copy, tmp_path,
                                                                                    monkeypatch):
    """Right after a promotion the new champion scores a site's earlier drops and its newest night in one run, so
    no earlier run of the version exists there: the site's check compares the newest drop with the earlier ones
    (a night of melanomas after one of nevi is a shift) instead of "not compared (0 before)"; a site with one drop
    stays uncompared, with its reason."""
    from lesion_tasks.ingest.drop import ingest
    from lesion_tasks.ops import alerts
    from lesion_tasks.ops.synthetic import make_drop

    monkeypatch.setattr(alerts, "MIN_TONIGHT", 20)
    monkeypatch.setattr(alerts, "MIN_REFERENCE", 40)
    for name, n, seed, mel in (("east-1", 60, 71, 0.0), ("east-2", 30, 72, 1.0), ("west-1", 40, 73, 0.3)):
        drop = make_drop(tmp_path / name, n_images=n, seed=seed, melanoma_fraction=mel, size=96)
        (drop / "metadata.csv").unlink()
        ingest(str(drop), home_copy, drop_id=name, site=name.split("-")[0])
    assert scoring.score(home_copy, run_id="after-promotion")["scored"] == 130
    result = alerts.shift(home_copy, trained_home.version, "after-promotion")
    east = result["by_site"]["east"]
    assert east["tonight_drop"] == "east-2" and (east["n_tonight"], east["n_reference"]) == (30, 60), east
    assert east["reference"] == "the site's earlier drops (first run of this version there)"
    assert east["p_mel"]["mean_tonight"] > east["p_mel"]["mean_reference"] and east["shifted"], east
    assert "east" in result["shifted_sites"] and result["shifted"]
    west = result["by_site"]["west"]
    assert not west["shifted"] and west["note"].startswith("not compared") and "tonight_drop" not in west, west
    text = alerts.distribution_shift(result, {}).text()
    assert "Site east (n = 30 tonight, drop east-2 vs 60 of the site's earlier drops):" in text
