"""Backbone features, computed once and cached in the object store.

With a frozen backbone, training the head only needs pooled features. They are cached per
(image, backbone, weights, preprocessing, input size, augmentation view), one `.npz` per drop and
view under `features/<config hash>/view<k>/<drop>.npz`, so a retrain on unchanged data runs the
backbone zero times and a new drop only computes its own images.

Augmentation views: view 0 is the image as is (what scoring sees); views 1..K apply a seeded random
rotation, flips, brightness and contrast change, fixed per (view, image) so the cache stays valid.

What the backbone sees (`model_input`, used alike by training, evaluation and scoring): the normalised
copy, optionally brought to one *effective resolution* first (downsampled with an antialiasing filter,
then resized to the input size), so sharp 256 px and blurry 84 px drops look alike and sharpness cannot
stand in for the diagnosis; and optionally colour-normalised by Shades of Gray (Finlayson & Trezzi 2004,
Minkowski p = 6), the usual correction for the light and camera of another clinic.

The backbone computes in the configuration's precision (`model.precision`: float32, or bfloat16 on the CPU's
matrix units); the cached features are float32 either way, and the precision is part of the cache's key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance

from lesion_tasks.core import keys
from lesion_tasks.core.store import ObjectNotFound, ObjectStore, key_of
from lesion_tasks.model import backbones
from lesion_tasks.model import precision as precision_

log = logging.getLogger(__name__)
BATCH = 32


@dataclass(frozen=True)
class FeatureConfig:
    backbone: str
    weights_sha256: str | None
    image_size: int
    init_seed: int = 0  # only matters without a weights file (seeded random initialisation)
    preprocessing: str = backbones.PREPROCESSING
    effective_resolution: int = 0  # 0: the normalised copy as is
    color_constancy: str = ""  # "" or "shades_of_gray"
    precision: str = "float32"  # the backbone's (`model.precision`): bfloat16 features never mix with float32 ones

    @property
    def key(self) -> str:
        weights = self.weights_sha256 or f"random-init:seed={self.init_seed}"
        look = [self.effective_resolution, self.color_constancy] if self.effective_resolution or self.color_constancy else []
        # float32 keys stay what they were; bfloat16 names its route (`model.precision.ROUTE`): the Keras-policy
        # route's features (issue 38's first version) are not the rewrite's
        computed = [f"{self.precision}:{precision_.ROUTE}"] if self.precision != "float32" else []
        text = json.dumps([self.backbone, weights, self.image_size, self.preprocessing, *look, *computed])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    drop_id: str
    uri: str  # the normalised RGB copy


@dataclass
class CacheStats:
    computed: int = 0  # images run through the backbone (per view)
    reused: int = 0
    seconds: float = 0.0
    by_view: dict[int, int] = field(default_factory=dict)


COLOR_CONSTANCY = ("", "shades_of_gray")
SHADES_OF_GRAY_P = 6


def shades_of_gray(rgb: np.ndarray, p: int = SHADES_OF_GRAY_P) -> np.ndarray:
    """Shades of Gray colour constancy: the illuminant is the per-channel Minkowski p-norm mean; each
    channel is scaled so that it becomes neutral grey (the image's overall brightness kept)."""
    x = rgb.astype(np.float32)
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    gain = illuminant.mean() / np.maximum(illuminant, 1e-6)
    return np.clip(x * gain, 0, 255).round().astype(np.uint8)


def load_rgb(store: ObjectStore, uri: str, size: int, effective_resolution: int = 0, color_constancy: str = "") -> np.ndarray:
    """The model input of an image: its normalised copy at `size`, through the effective resolution and
    colour constancy of the feature configuration (see the module doc)."""
    return prepare(Image.open(io.BytesIO(store.get(key_of(store, uri)))), size, effective_resolution, color_constancy)


def prepare(im: Image.Image, size: int, effective_resolution: int = 0, color_constancy: str = "") -> np.ndarray:
    """`load_rgb` of an image already opened."""
    im = im.convert("RGB")
    if effective_resolution and min(im.size) > effective_resolution:
        im = im.resize((effective_resolution, effective_resolution), Image.Resampling.BOX)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(im)
    return shades_of_gray(rgb) if color_constancy == "shades_of_gray" else rgb


def model_input(store: ObjectStore, uri: str, config: FeatureConfig) -> np.ndarray:
    return load_rgb(store, uri, config.image_size, config.effective_resolution, config.color_constancy)


def augment(rgb: np.ndarray, image_id: str, view: int) -> np.ndarray:
    """View `view` of an image: 0 = unchanged; else rotation, flips, brightness, contrast (seeded)."""
    if view == 0:
        return rgb
    seed = int.from_bytes(hashlib.sha256(f"view{view}\0{image_id}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rgb)
    im = im.rotate(float(rng.uniform(-180, 180)), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.85, 1.15)))
    im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.85, 1.15)))
    return np.asarray(im)


class BackboneRunner:
    """The feature model, built on first use, run in fixed-size compiled batches."""

    def __init__(self, config: FeatureConfig, weights: backbones.ResolvedWeights):
        self.config, self.weights = config, weights
        self._fn = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self._fn is None:
            model = backbones.feature_model(self.config.backbone, self.config.image_size, self.weights, self.config.init_seed)
            size = self.config.image_size
            self._fn = precision_.compiled(model, (BATCH, size, size, 3), self.config.precision)
        out = []
        for start in range(0, len(images), BATCH):
            chunk = backbones.preprocess(images[start : start + BATCH])
            n = len(chunk)
            if n < BATCH:  # pad: one traced shape for every batch
                chunk = np.concatenate([chunk, np.zeros((BATCH - n, *chunk.shape[1:]), np.float32)])
            with precision_.computing(self.config.precision):
                out.append(self._fn(tf.constant(chunk)).numpy()[:n])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _load(store: ObjectStore, key: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(io.BytesIO(store.get(key)))
    except ObjectNotFound:
        return {}
    return dict(zip(data["ids"].tolist(), data["features"]))


def features_for(refs: Sequence[ImageRef], views: Sequence[int], config: FeatureConfig,
                 weights: backbones.ResolvedWeights, store: ObjectStore,
                 runner: BackboneRunner | None = None) -> tuple[dict[int, np.ndarray], CacheStats]:
    """{view: (N, C) features in the order of `refs`}, computing only what the cache lacks."""
    runner = runner or BackboneRunner(config, weights)
    stats = CacheStats()
    started = time.monotonic()
    by_drop: dict[str, list[ImageRef]] = {}
    for ref in refs:
        by_drop.setdefault(ref.drop_id, []).append(ref)
    store.put(keys.feature_config(config.key), json.dumps(config.__dict__, sort_keys=True).encode(), "application/json")
    result: dict[int, dict[str, np.ndarray]] = {v: {} for v in views}
    for view in views:
        for drop_id, drop_refs in sorted(by_drop.items()):
            key = keys.features(config.key, view, drop_id)
            cached = _load(store, key)
            missing = [r for r in drop_refs if r.image_id not in cached]
            stats.reused += len(drop_refs) - len(missing)
            if missing:
                log.info("features %s view %d drop %s: running the backbone on %d images (%d cached)",
                         config.backbone, view, drop_id, len(missing), len(cached))
                for start in range(0, len(missing), 256):
                    part = missing[start : start + 256]
                    rgb = np.stack([augment(model_input(store, r.uri, config), r.image_id, view) for r in part])
                    for r, f in zip(part, runner(rgb)):
                        cached[r.image_id] = f
                stats.computed += len(missing)
                stats.by_view[view] = stats.by_view.get(view, 0) + len(missing)
                ids = sorted(cached)
                buf = io.BytesIO()
                np.savez(buf, ids=np.array(ids), features=np.stack([cached[i] for i in ids]).astype(np.float32))
                store.put(key, buf.getvalue())
            result[view].update(cached)
    stats.seconds = time.monotonic() - started
    return {v: np.stack([result[v][r.image_id] for r in refs]) if refs else np.zeros((0, 0)) for v in views}, stats
