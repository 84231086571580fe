"""A model version's artifacts in the store, under `models/<version>/`: the one place that knows
their names, how they are written and how they are read back.

- `model.keras`   the full flat model (backbone + head), saved without optimizer state
- `head.npz`      the head's weights as arrays (MC dropout and Grad-CAM run on them, no Keras) and its
                  calibration
- `scope.npz`     the out-of-scope head and threshold (`scope.py`), when the version has one
- `config.json`, `train_log.json`, `metrics.json`, `report.html`, `figures/*.png`, test CSVs, the test and
  validation predictions (`val_predictions.npz`: what the first night of a version is compared with)
- what a version keeps once `lesion gc` pruned it (`KEPT_AFTER_PRUNING`); its Grad-CAM overlays live under
  `keys.gradcam_prefix(version)` (retention and consistency both use these)

Writes are only made by the run that claimed the version in the registry (`registry.claim`), and
never after promotion: a champion's artifacts do not change, except the gate section of `report.html`
(`assess.write_gate_report`: the decision, promotions and overrides as they happen). Reads turn a missing or unreadable
artifact into a ValueError that names the version and the artifact.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lesion_tasks.core import keys
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectNotFound, ObjectStore, check_key, key_of
from lesion_tasks.model import backbones, mc, scope
from lesion_tasks.model.config import TrainConfig
from lesion_tasks.model.features import FeatureConfig
from lesion_tasks.versions.registry import ModelVersion, pruned_message

MODEL = "model.keras"
HEAD = "head.npz"
SCOPE = "scope.npz"
CONFIG = "config.json"
TRAIN_LOG = "train_log.json"
METRICS = "metrics.json"
REPORT = "report.html"
TEST_PREDICTIONS = "test_predictions.npz"
VAL_PREDICTIONS = "val_predictions.npz"  # p_mel and entropy on validation: the shift check's reference on a first night
KEPT_AFTER_PRUNING = (REPORT, METRICS)  # what a pruned version keeps under models/<version>/


def figure(name: str) -> str:
    """A report figure's artifact name."""
    return f"figures/{keys.slug(name.lower())}.png"


def gradcam_example(image_id: str) -> str:
    return f"figures/gradcam-{image_id}.png"


class ArtifactError(ValueError):
    """A model version's artifact is missing or unreadable."""


class ModelArtifacts:
    def __init__(self, store: ObjectStore, version: str):
        self.store, self.version = store, version
        self.prefix = keys.model_prefix(version)

    def key(self, name: str) -> str:
        return self.prefix + check_key(name)

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write one artifact; return its key (what the registry stores)."""
        self.store.put(self.key(name), data, content_type)
        return self.key(name)

    def get(self, name: str) -> bytes:
        try:
            return self.store.get(self.key(name))
        except ObjectNotFound:
            raise ArtifactError(f"model {self.version}: artifact {self.key(name)} is missing from the store "
                                f"{self.store.url}") from None

    def put_json(self, name: str, value: Any) -> str:
        return self.put(name, json.dumps(value, indent=1).encode(), "application/json")

    def get_json(self, name: str) -> Any:
        return json.loads(self.get(name))

    def put_npz(self, name: str, **arrays: np.ndarray) -> str:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return self.put(name, buf.getvalue())

    def save_model(self, model) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL
            model.save(path)
            return self.put(MODEL, path.read_bytes())

    def load_model(self, ref: str | None = None):
        """The saved Keras model (`ref`: the registry's model_uri, default the version's model.keras)."""
        import keras

        key = key_of(self.store, ref) if ref else self.key(MODEL)
        try:
            data = self.store.get(key)
        except ObjectNotFound:
            raise ArtifactError(f"model {self.version}: artifact {key} is missing from the store {self.store.url}; "
                                "nothing written (retrain, or promote another version)") from None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / MODEL
                path.write_bytes(data)
                return keras.models.load_model(path, compile=False)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            detail = " ".join(str(exc).split())[:300]  # Keras' messages run to pages
            raise ArtifactError(f"model {self.version}: artifact {key} is unreadable ({type(exc).__name__}: {detail}); "
                                "nothing written") from None

    def save_head(self, head: mc.HeadWeights) -> str:
        return self.put_npz(HEAD, **{k: np.asarray(v) for k, v in asdict(head).items()})

    def _parsed(self, name: str, parse):
        """`parse(bytes)` of an artifact; a missing or unreadable one is an ArtifactError naming it."""
        data = self.get(name)  # ArtifactError when missing
        try:
            return parse(data)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"model {self.version}: artifact {self.key(name)} is unreadable "
                                f"({type(exc).__name__}: {exc})") from None

    def load_head(self) -> mc.HeadWeights:
        def parse(raw: bytes) -> mc.HeadWeights:
            data = np.load(io.BytesIO(raw))
            calibration = {k: float(data[k]) for k in ("cal_a", "cal_b") if k in data.files}  # absent before 0.8
            return mc.HeadWeights(*(data[k] for k in ("w1", "b1", "gamma", "beta", "mean", "var")), float(data["eps"]),
                                  data["w2"], data["b2"], float(data["dropout"]), **calibration)

        return self._parsed(HEAD, parse)

    def validation_predictions(self) -> dict[str, np.ndarray] | None:
        """{"p_mel", "entropy"} on the validation split, as evaluated; None for versions evaluated before they
        were stored."""
        if not self.store.exists(self.key(VAL_PREDICTIONS)):
            return None
        return self._parsed(VAL_PREDICTIONS, lambda raw: {k: np.load(io.BytesIO(raw))[k] for k in ("p_mel", "entropy")})

    def save_scope(self, head: scope.ScopeHead) -> str:
        return self.put(SCOPE, head.to_bytes())

    def load_scope(self) -> scope.ScopeHead:
        return self._parsed(SCOPE, scope.ScopeHead.from_bytes)


def of(store: ObjectStore, v: ModelVersion) -> ModelArtifacts:
    """The artifacts of a model version; an ArtifactError naming it when `lesion gc` pruned them."""
    if v.artifacts_pruned_at is not None:
        raise ArtifactError(f"{pruned_message(v.model_version, v.artifacts_pruned_at)}: it cannot score "
                            "or be evaluated (score with the champion, or retrain); nothing written")
    return ModelArtifacts(store, v.model_version)


def feature_config(source: ModelVersion | TrainConfig, weights_sha256: str | None = None,
                   precision: str = "float32") -> FeatureConfig:
    """The feature cache configuration of a model version (at the backbone precision it was trained in), or of a
    training run (its TrainConfig, the weights' sha256 and the precision it runs in): the one builder for both."""
    if isinstance(source, ModelVersion):
        weights_sha256, precision = source.weights_sha256, source.precision
    return FeatureConfig(source.backbone, weights_sha256, source.image_size, source.seed,
                         effective_resolution=source.effective_resolution, color_constancy=source.color_constancy,
                         precision=precision)


def feature_key(v: ModelVersion) -> str | None:
    """The feature cache configuration `v` was trained on, as recorded (`lineage.feature_config`), else as its
    recorded config gives it (versions from before it was recorded); None while a claim still trains."""
    if v.lineage.get("feature_config"):
        return v.lineage["feature_config"]
    return feature_config(v).key if v.config else None


def load_scope_of(store: ObjectStore, v: ModelVersion) -> scope.ScopeHead | None:
    """A version's out-of-scope head, None when it has none (trained without OTHER images, or before 0.8).
    Its threshold is the registry's (`ModelVersion.scope_threshold`), stored there only."""
    return of(store, v).load_scope() if v.scope_threshold is not None else None


def weights_of(v: ModelVersion, settings: Settings, store: ObjectStore) -> backbones.ResolvedWeights:
    """The backbone weights a model version recorded, checked against its recorded sha256."""
    resolved = backbones.resolve_weights(v.weights_used, backbones.get_backbone(v.backbone), settings.home / "cache", store)
    if resolved.sha256 != v.weights_sha256:
        raise ArtifactError(f"model {v.model_version}: weights {resolved.source} have sha256 {resolved.sha256}, "
                            f"expected {v.weights_sha256} (the file changed since training)")
    return resolved


def digests(store: ObjectStore, v: ModelVersion) -> dict[str, str]:
    """sha256 digests of what decides a version's calls, read from its stored artifacts ("head": the head's weights
    and calibration, the out-of-scope head, the review rule with every threshold) and of its recorded training
    config ("config"). Two versions with both equal decide every image alike (`assess.gate_model`: promoting one
    over the other is a no-op). ArtifactError when the artifacts are gone."""
    saved = of(store, v)
    h = hashlib.sha256()
    for name, value in sorted(asdict(saved.load_head()).items()):
        array = np.ascontiguousarray(np.asarray(value))
        h.update(f"{name}:{array.dtype}:{array.shape}:".encode())
        h.update(array.tobytes())
    try:
        h.update(saved.get(SCOPE))
    except ArtifactError:  # a version without an out-of-scope head (no OTHER images in training)
        h.update(b"no out-of-scope head")
    h.update(json.dumps(v.review_rule.to_json(), sort_keys=True, default=str).encode())
    return {"head": h.hexdigest(),
            "config": hashlib.sha256(json.dumps(dict(v.config), sort_keys=True, default=str).encode()).hexdigest()}
