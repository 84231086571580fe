"""The backbone in bfloat16 (model/precision.py, issue 38): training records its precision and caches its features
apart; a version scores in its own precision, whatever the setting at night, and the run says which; Grad-CAM from
the head's gradient still equals a GradientTape through the whole model. The suite otherwise runs float32
(tests/conftest.py)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks import pipeline
from lesion_tasks.core import db
from lesion_tasks.core.schema import prediction_samples, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.model import backbones, gradcam, mc
from lesion_tasks.ops.synthetic import make_drop
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.versions import artifacts, registry
from tests.helpers import copy_home, tiny_config


# the tiny backbone only: randomly initialised Keras MobileNets pass on activations of ~1e-12 (the multi-scale
# MobileNet case compared noise until 2026-12-06), and real-weight networks under this test's random head give maps
# with one or two non-zero cells, whose ReLU flips under any rounding
@pytest.mark.parametrize("backbone,size,weights", [("tiny", 64, "none")])
def test_fast_gradcam_equals_gradient_tape_in_bfloat16(backbone, size, weights):
    """The fast Grad-CAM needs no gradient through the backbone (head weights times activations, in float32):
    from the activations of the backbone's pass in bfloat16 it still equals a GradientTape through the whole
    float32 model, within what bfloat16's 8-bit mantissa leaves of the activations (rel. diff <= 2e-2; float32:
    1e-4); the pass did compute in bfloat16 (its activations differ from float32's)."""
    import keras
    import tensorflow as tf

    from lesion_tasks.model import precision

    resolved = backbones.resolve_weights(weights, backbones.get_backbone(backbone), None)
    model = backbones.build_model(backbone, size, resolved, 0.5, seed=3)
    rng = np.random.default_rng(0)
    model.get_layer("head_bn").set_weights([rng.uniform(0.5, 2, 128), rng.normal(0, .5, 128), rng.normal(0, .5, 128),
                                            rng.uniform(0.5, 2, 128)])
    kernel, bias = model.get_layer("head_out").get_weights()
    model.get_layer("head_out").set_weights([kernel * 0.05, bias])  # a softmax away from saturation: maps not ~0
    x = rng.uniform(-1, 1, (6, size, size, 3)).astype(np.float32)
    last = backbones.get_backbone(backbone).last_activation
    cut = keras.Model(model.input, [model.get_layer(last).output, model.get_layer("head_gap").output])
    fn = precision.compiled(cut, x.shape, "bfloat16")  # the scoring's pass (nightly.load_scoring_model)
    with precision.computing("bfloat16"):
        activations, pooled = (t.numpy() for t in fn(tf.constant(x)))
    exact = np.asarray(cut(x, training=False)[0])
    if precision.bf16_units():
        assert not np.array_equal(activations, exact)
    head = mc.HeadWeights.from_model(model)
    cls = (head.deterministic(pooled) >= 0.5).astype(np.int64)
    fast = gradcam.gradcam_fast(activations, gradcam.head_gradient(head, pooled, cls), normalize=False)
    tape = gradcam.gradcam_tape(model, last, x, cls, normalize=False)
    assert np.linalg.norm(tape) > 1e-6
    assert np.linalg.norm(fast - tape) / np.linalg.norm(tape) <= 2e-2


def test_a_version_scores_in_its_own_precision_whatever_the_setting(trained_home, tmp_path, monkeypatch):
    """The trained home's champion was trained in float32: with LESION_BACKBONE_PRECISION=bfloat16 set at night it
    still scores in float32 (decisions move across precisions: docs/model.md), bit for bit as before, and says so."""
    settings = copy_home(trained_home.settings, tmp_path / "home")
    version = trained_home.version
    engine = db.make_engine(settings.db_url)
    columns = ("image_id", "p_mel", "entropy", "mutual_info", "predicted_label", "needs_review", "review_reasons", "p_other")
    with engine.begin() as conn:
        before = conn.execute(sa.select(*(predictions.c[c] for c in columns)).order_by(predictions.c.image_id)).all()
        conn.execute(prediction_samples.delete())
        conn.execute(predictions.delete())
    monkeypatch.setenv("LESION_BACKBONE_PRECISION", "bfloat16")
    scored = scoring.score(settings, run_id="night-setting-bf16")
    assert scored["scored"] == len(before)
    assert scored["precision"] == {"precision": "float32", "why": "the version's own (trained in it)"}
    assert scoring.summarize(settings, "champion", "night-setting-bf16", [scored])["precision"] == ["float32"]
    with engine.connect() as conn:
        after = conn.execute(sa.select(*(predictions.c[c] for c in columns)).order_by(predictions.c.image_id)).all()
    engine.dispose()
    assert after == before and version == trained_home.version


def test_a_version_trained_in_bfloat16_records_it_and_caches_its_features_apart(tmp_path, monkeypatch):
    """Training in bfloat16: the version's lineage says so (and why), its features live under a cache key of their
    own, and its evaluation read them there (nothing under the float32 key)."""
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")})
    db.upgrade(settings)
    ingest(str(make_drop(tmp_path / "labelled", n_images=160, seed=5)), settings)
    monkeypatch.setenv("LESION_BACKBONE_PRECISION", "bfloat16")
    trained = pipeline.run(settings, tiny_config(epochs=20, bootstrap=0, target_sensitivity=0.9), run_id="bf16")
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        v = registry.version(conn, trained["model_version"])
    engine.dispose()
    assert v.precision == "bfloat16" and v.lineage["backbone_precision"]["why"].startswith("LESION_BACKBONE_PRECISION=bfloat16")
    key = artifacts.feature_config(v).key
    assert v.lineage["feature_config"] == key == artifacts.feature_key(v)
    float32_key = artifacts.feature_config(replace(v, precision="float32")).key
    store = open_store(settings)
    assert key != float32_key and list(store.list(f"features/{key}/")) and not list(store.list(f"features/{float32_key}/"))
    assert trained["metrics"]["test"]["auc"] is not None
    # at night it scores in bfloat16 too, even where the setting now says float32: the decisions its evaluation
    # measured (its test images' p_mel as evaluated, `test_predictions.npz`, within bfloat16's resolution)
    monkeypatch.setenv("LESION_BACKBONE_PRECISION", "float32")
    scored = scoring.score(settings, trained["model_version"], run_id="night-bf16")
    assert scored["precision"]["precision"] == "bfloat16"
    evaluated = np.load(io.BytesIO(store.get(f"models/{v.model_version}/test_predictions.npz")))
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        night = dict(conn.execute(sa.select(predictions.c.image_id, predictions.c.p_mel)
                                  .where(predictions.c.run_id == "night-bf16")).all())
    engine.dispose()
    p_night = np.array([night[i] for i in evaluated["ids"].tolist()])
    assert np.abs(p_night - evaluated["p_mel"]).max() <= 0.02

