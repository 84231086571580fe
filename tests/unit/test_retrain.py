"""The pure parts of test_retrain.py (no trained home, no training): see tests/integration/test_retrain.py for the rest."""

from __future__ import annotations


import pytest

from lesion_tasks.model.config import make_config


def test_make_config_validates():
    with pytest.raises(ValueError, match="profile 'fast'"):
        make_config("fast")
    with pytest.raises(ValueError, match="backbone 'vgg'"):
        make_config("demo", backbone="vgg")
    with pytest.raises(ValueError, match="epochs=0"):
        make_config("demo", epochs=0)
    assert make_config("paper").backbone == "resnet101v2"
