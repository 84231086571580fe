"""Backbones and weights: ImageNet fails fast offline with instructions, files and store URIs load,
and the paper's model has exactly the paper's parameter counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lesion_tasks.model import backbones
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store
from tests import reliability


def _no_network(monkeypatch) -> list:
    """Record (and refuse) every download and connection attempt."""
    import socket

    import keras

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(keras.utils, "get_file", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_imagenet_without_the_file_fails_fast_and_says_how(tmp_path, monkeypatch):
    """Fast means: with downloads off, no download or connection is even attempted (no timeout to wait)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("LESION_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("LESION_WEIGHTS_DOWNLOAD", "0")  # never touch the network in tests
    attempts = _no_network(monkeypatch)
    with pytest.raises(ValueError) as err:
        backbones.resolve_weights("imagenet", backbones.get_backbone("resnet101v2"), tmp_path)
    assert attempts == []
    message = str(err.value)
    assert "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5" in message and "LESION_WEIGHTS_DOWNLOAD=0" in message
    assert "--weights /path/to/" in message and "s3://" in message and "LESION_WEIGHTS_DIR" in message
    assert str(tmp_path / "keras" / "models") in message  # where it looked


def test_imagenet_download_failure_says_how(tmp_path, monkeypatch):
    """With downloads on and no network: one attempt, then the same instructions (not a traceback)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("LESION_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("LESION_WEIGHTS_DOWNLOAD", "1")
    attempts = _no_network(monkeypatch)
    with pytest.raises(ValueError, match="could not be downloaded \\(OSError: network disabled") as err:
        backbones.resolve_weights("imagenet", backbones.get_backbone("resnet101v2"), tmp_path)
    assert len(attempts) == 1 and attempts[0][0] == "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert "--weights /path/to/" in str(err.value) and "LESION_WEIGHTS_DIR" in str(err.value)


def test_paper_profile_without_weights_fails_fast_never_falls_back(tmp_path):
    from tests.helpers import run_cli

    env = {"LESION_HOME": str(tmp_path), "KERAS_HOME": str(tmp_path / "k"), "LESION_WEIGHTS_DIR": str(tmp_path / "none"),
           "LESION_WEIGHTS_DOWNLOAD": "0"}
    out = run_cli("train", "--profile", "paper", "--json", env=env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "ImageNet weights for resnet101v2" in json.loads(out.stdout)["error"]
    # and without labelled data the error says what to do
    out = run_cli("train", "--backbone", "tiny", "--weights", "none", "--json", env=env, timeout=300)
    assert out.returncode == 2 and "ingest labelled drops first" in json.loads(out.stdout)["error"]


def test_local_weights_are_read_only_from_the_weights_dirs(tmp_path, monkeypatch):
    """A trigger form cannot make a worker read (or probe for) any file: /etc/passwd is refused before
    it is opened, with where weights may live; an operator can opt in to any path."""
    monkeypatch.setenv("LESION_WEIGHTS_DIR", str(tmp_path / "weights"))
    tiny = backbones.get_backbone("tiny")
    for probe in ("/etc/passwd", "/no/such.h5", str(tmp_path / "weights" / ".." / "elsewhere.h5")):
        with pytest.raises(ValueError, match="read only from .*weights.*LESION_WEIGHTS_ANY_PATH=1") as err:
            backbones.resolve_weights(probe, tiny, tmp_path)
        assert "no such file" not in str(err.value)  # the answer is the same whether the file exists or not
    monkeypatch.setenv("LESION_WEIGHTS_ANY_PATH", "1")
    with pytest.raises(ValueError, match="'/no/such.h5': no such file"):
        backbones.resolve_weights("/no/such.h5", tiny, tmp_path)
    reliability.record("Weights path probing", "weights=/etc/passwd, a missing file, a path escaping the weights dir",
                       "refused before the file is opened, same answer whether it exists", "ValueError naming the weights dirs", 0, 0)


def _write_mobilenet_weights(path):
    import keras

    keras.utils.set_random_seed(7)
    model = keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None, input_shape=(224, 224, 3))
    model.save_weights(path)
    return model


def test_weights_from_a_file_and_from_the_object_store(tmp_path, s3_settings_kwargs, monkeypatch):
    monkeypatch.setenv("LESION_WEIGHTS_DIR", str(tmp_path))
    path = tmp_path / "mobilenet_random.weights.h5"
    written = _write_mobilenet_weights(path)
    spec = backbones.get_backbone("mobilenet025")
    local = backbones.resolve_weights(str(path), spec, tmp_path / "cache")
    store = open_store(Settings.from_env({"LESION_HOME": str(tmp_path)}, **s3_settings_kwargs))
    store.put("weights/mobilenet_random.weights.h5", path.read_bytes())
    remote = backbones.resolve_weights(f"{store.url}/weights/mobilenet_random.weights.h5", spec, tmp_path / "cache", store)
    assert local.sha256 == remote.sha256 and remote.source.startswith("s3://")
    for resolved in (local, remote):
        model = backbones.build_model("mobilenet025", 224, resolved, dropout=0.5)
        np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0], written.get_layer("conv1").get_weights()[0])


def test_flat_graph_with_reachable_last_activation():
    model = backbones.build_model("tiny", 64, backbones.resolve_weights("none", backbones.get_backbone("tiny"), None), 0.5)
    names = [layer.name for layer in model.layers]
    assert "tiny_last_relu" in names and names[-5:] == list(backbones.HEAD_LAYERS)
    assert not any(hasattr(layer, "layers") for layer in model.layers), "nested model: Grad-CAM target unreachable"
    assert all(not layer.trainable or layer.name.startswith("head_") for layer in model.layers if layer.weights)
