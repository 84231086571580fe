"""`--profile paper` (ResNet101V2, 224 px) end to end on a handful of images, with a weights file
the test writes from a randomly initialised backbone. The parameter counts are the paper's Table II."""

from __future__ import annotations

import pytest

from lesion_tasks import pipeline
from lesion_tasks.model.config import make_config
from lesion_tasks.model import backbones
from lesion_tasks.core import db
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.settings import Settings
from lesion_tasks.ops.synthetic import make_drop


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    import keras

    path = tmp_path_factory.mktemp("weights") / "resnet101v2_random.weights.h5"
    keras.utils.set_random_seed(5)
    keras.applications.ResNet101V2(include_top=False, weights=None, input_shape=(224, 224, 3)).save_weights(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LESION_WEIGHTS_DIR", str(path.parent))  # local weight files are read only from there
        yield path


def test_paper_parameter_counts(resnet_weights):
    weights = backbones.resolve_weights(str(resnet_weights), backbones.get_backbone("resnet101v2"), None)
    model = backbones.build_model("resnet101v2", 224, weights, dropout=0.5)
    head = {name: backbones.count_params(model, [name]) for name in ("head_dense", "head_bn", "head_out")}
    assert head == {"head_dense": 262_272, "head_bn": 512, "head_out": 258}
    assert model.count_params() - sum(head.values()) == 42_626_560
    assert model.get_layer("post_relu").output.shape[1:] == (7, 7, 2048)
    assert model.get_layer("head_dropout").rate == 0.5


def test_paper_profile_end_to_end(resnet_weights, tmp_path):
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")})
    db.upgrade(settings)
    ingest(str(make_drop(tmp_path / "drop", n_images=40, seed=21, melanoma_fraction=0.4)), settings)
    config = make_config("paper", weights=str(resnet_weights), epochs=3, views=1, mc_samples=10, bootstrap=50)
    result = pipeline.run(settings, config, run_id="paper-check")
    assert result["model_version"].startswith("paper-resnet101v2-")
    split = result["split"]
    assert sum(split["test"].values()) > 0
    # training ran every train and validation image through ResNet101V2 exactly once (test: at evaluation)
    assert result["feature_cache"]["computed"] == sum(split["train"].values()) + sum(split["val"].values())
    assert result["weights"] == str(resnet_weights.resolve())
    test = result["metrics"]["test"]
    assert 0 <= test["auc"] <= 1 and test["n"] > 0
    assert isinstance(result["promoted"], bool) and result["gate"]["reasons"]
