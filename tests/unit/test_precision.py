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
    assert chosen.name == "bfloat16" and "amx_bf16" in chosen.why and "3.1x faster" in chosen.why
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


def test_only_calls_made_inside_computing_are_rewritten_to_bfloat16_and_the_option_comes_back():
    """The grappler option is part of each call's configuration: a compiled function called inside
    `computing("bfloat16")` computes in bfloat16 (its products differ from float32 by bfloat16's resolution), the same
    function called outside afterwards runs its float32 instantiation bit for bit, and the option is restored."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a, b = (tf.constant(rng.normal(size=(64, 256)).astype(np.float32)) for _ in range(2))
    fn = tf.function(lambda x, y: tf.nn.relu(tf.matmul(x, y, transpose_b=True)))
    exact = fn(a, b).numpy()
    with precision.computing("bfloat16"):
        rewritten = fn(a, b).numpy()
        assert tf.config.optimizer.get_experimental_options()[precision.REWRITE] is True
    assert not tf.config.optimizer.get_experimental_options().get(precision.REWRITE, False)
    again = fn(a, b).numpy()
    with precision.computing("float32"):
        plain = fn(a, b).numpy()
    assert np.array_equal(again, exact) and np.array_equal(plain, exact)
    rel = np.abs(rewritten - exact).max() / np.abs(exact).max()
    if precision.bf16_units():  # where the CPU has the units, oneDNN runs the product in bfloat16
        assert 1e-5 < rel < 2e-2, rel
    with pytest.raises(ValueError, match="backbone precision 'half'"):
        with precision.computing("half"):
            pass
