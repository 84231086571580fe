"""The backbone's precision (model/precision.py): bfloat16 only where the CPU has the units (or it is forced),
float32 exactly as before, a bad setting named; bfloat16 features never share a cache key with float32 ones."""

from __future__ import annotations

import hashlib
import json

import pytest

from lesion_tasks.model import precision
from lesion_tasks.model.features import FeatureConfig

AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_auto_takes_bfloat16_only_for_a_backbone_measured_faster_and_where_the_cpu_has_the_units():
    assert precision.bf16_units(AMX) == ["amx_bf16", "avx512_bf16"] and precision.bf16_units(OLD) == []
    chosen = precision.choose("resnet101v2", "auto", AMX)
    assert chosen.name == "bfloat16" and "amx_bf16" in chosen.why and "1.8x faster" in chosen.why
    demo = precision.choose("mobilenet025_multiscale", "auto", AMX)  # slower in bfloat16 here: float32
    assert demo.name == "float32" and "not faster in bfloat16" in demo.why
    old = precision.choose("resnet101v2", "auto", OLD)
    assert old.name == "float32" and "no bfloat16 units" in old.why
    assert precision.choose("resnet101v2", "", OLD).name == "float32"  # empty is auto


def test_a_setting_forces_either_and_says_so_and_a_bad_one_is_named():
    forced = precision.choose("resnet101v2", "float32", AMX)
    assert forced.name == "float32" and forced.why == "LESION_BACKBONE_PRECISION=float32"
    emulated = precision.choose("tiny", "bfloat16", OLD)
    assert emulated.name == "bfloat16" and "emulated, slower" in emulated.why
    with pytest.raises(ValueError, match=r"LESION_BACKBONE_PRECISION='fp16': expected one of auto, float32, bfloat16"):
        precision.choose("tiny", "fp16", AMX)
    assert precision.choose("tiny", " BFloat16 ", AMX).record() == {
        "precision": "bfloat16", "why": "LESION_BACKBONE_PRECISION=bfloat16 (this CPU has amx_bf16, avx512_bf16)"}


def test_the_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("LESION_BACKBONE_PRECISION", "float32")
    assert precision.choose("resnet101v2", cpuinfo=AMX).name == "float32"
    monkeypatch.setenv("LESION_BACKBONE_PRECISION", "auto")
    assert precision.choose("resnet101v2", cpuinfo=AMX).name == "bfloat16"


def test_a_version_scores_in_its_own_precision_and_says_what_this_cpu_makes_of_it():
    assert precision.of_version("float32", OLD).record() == {"precision": "float32", "why": "the version's own (trained in it)"}
    assert precision.of_version("bfloat16", AMX).why == "the version's own (trained in it)"
    assert "emulated, slower" in precision.of_version("bfloat16", OLD).why
    with pytest.raises(ValueError, match="backbone precision 'fp8'"):
        precision.of_version("fp8")


def test_float32_feature_keys_are_what_they_were_and_bfloat16_ones_differ():
    """A CPU without the units (or float32 forced) reads the feature caches written before precisions existed."""
    config = FeatureConfig("mobilenet025_multiscale", "ab" * 32, 224, effective_resolution=84)
    before = hashlib.sha256(json.dumps(["mobilenet025_multiscale", "ab" * 32, 224, config.preprocessing, 84, ""])
                            .encode()).hexdigest()[:16]
    assert config.key == before
    bf16 = FeatureConfig("mobilenet025_multiscale", "ab" * 32, 224, effective_resolution=84, precision="bfloat16")
    assert bf16.key != before


def test_layers_built_in_a_scope_compute_in_bfloat16_and_the_policy_comes_back():
    import keras

    with precision.scope("bfloat16"):
        layer = keras.layers.Dense(2)
    assert layer.compute_dtype == "bfloat16" and layer.variable_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="backbone precision 'half'"):
        with precision.scope("half"):
            pass
    assert keras.config.dtype_policy().name == "float32"
