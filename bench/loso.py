"""Leave-one-site-out on cached features: the harness the model and operating-point benchmarks share.

What a new clinic will see is measured on the shared sites that can carry it, held out in turn:
- `isic2017-mel-nv` (521 melanomas; sharp 256 px JPEGs);
- `bcn_20000`: the BCN_20000 images of `isic2019-84px` (the `BCN_` lesion ids, 2,848 melanomas; 84 px).
The rest of `isic2019-84px` (MSK and unlisted lesions: 27 melanomas) and the two small drops cannot be held out
alone: they always train. A held-out site contributes no image to training, validation or calibration; its
"pool" is its images outside the frozen test split (no test image is ever used to choose anything).

Pseudo-sites (`DEGRADATIONS`): the held-out site's pool, degraded, as a second test of transfer. Each says what
it tests: `coarse` (a camera of lower resolution than any training drop: 56 px, JPEG), `warm` (another light
and camera: a colour cast and a gamma change). Features of degraded copies are cached in the home too.

Replicates: replicate r trains on the other sites' training split minus a lesion-grouped 10% (a hash of r and
the lesion), with seed r, and draws its k-image validation sample with a replicate-specific key; so the spread
between replicates is what a choice has to beat (`decide`).

Heads are `Fit`s: `fit(x, y, w, x_val, y_val)` returns a scoring function (higher = more melanoma; rankings
need no calibration). The benchmarks fit them with the product's own code (`model.heads`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks.core import db  # noqa: E402
from lesion_tasks.core.db import engine_for  # noqa: E402
from lesion_tasks.core.schema import images, splits  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import key_of, open_store  # noqa: E402
from lesion_tasks.data import splits as split_rule  # noqa: E402
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.ingest.labels import challenge_code  # noqa: E402
from lesion_tasks.model import backbones, evaluation, features  # noqa: E402
from lesion_tasks.model.config import make_config  # noqa: E402
from lesion_tasks.sites import sample as site_sample  # noqa: E402
from lesion_tasks.versions import artifacts  # noqa: E402

log = logging.getLogger("bench.loso")
DROPS = ("isic2017-mel-nv", "isic2019-84px", "isic-archive-uda1-sample", "isic-cli-sample")
HELD_OUT = ("isic2017-mel-nv", "bcn_20000")
Fit = Callable[..., Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class Images:
    """Every labelled image of the shared drops, arrays aligned."""

    ids: np.ndarray
    drop: np.ndarray
    site: np.ndarray  # the pseudo-site: isic2019-84px split into bcn_20000 and the rest
    split: np.ndarray
    lesion: np.ndarray
    label: np.ndarray  # MEL, NV or OTHER
    diagnosis: np.ndarray  # challenge code (BCC, AK, ...) of OTHER images, else the label
    uri: np.ndarray

    @property
    def y(self) -> np.ndarray:
        return (self.label == "MEL").astype(np.int64)

    @property
    def in_scope(self) -> np.ndarray:
        return self.label != "OTHER"

    def pool(self, held: str) -> np.ndarray:
        """Indices of the held-out site's in-scope images outside its test split."""
        return np.flatnonzero((self.site == held) & (self.split != "test") & self.in_scope)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every harness benchmark takes: --data, --home, --replicates."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=os.environ.get("LESION_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--home", default="", help="where the drops are ingested and features cached (reuse it)")
    parser.add_argument("--replicates", type=int, default=5)
    return parser


def start(args: argparse.Namespace, prefix: str) -> tuple[Path, Settings, Images]:
    """Logging, the home (a temporary folder unless --home) and its images."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    home = Path(args.home or tempfile.mkdtemp(prefix=prefix))
    return (home, *open_home(home, Path(args.data)))


def pseudo_site(site: str, lesion_id: str | None) -> str:
    return "bcn_20000" if site == "isic2019-84px" and (lesion_id or "").startswith("BCN_") else site


def open_home(home: Path, data: Path) -> tuple[Settings, Images]:
    """The shared drops ingested with their labels into `home` (once) and split by the product's rule."""
    settings = Settings.from_env(home=home)
    db.upgrade(settings)
    engine = engine_for(settings)
    with engine.connect() as conn:
        have = conn.scalar(sa.select(sa.func.count()).select_from(images))
    if not have:
        for name in DROPS:
            ingest(str(data / name), settings)
        split_rule.assign(engine, seed=0)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(images.c.image_id, images.c.drop_id, images.c.site, images.c.lesion_id,
                                      images.c.near_dup_group, images.c.label, images.c.diagnosis,
                                      images.c.normalized_uri, splits.c.split)
                            .join(splits, splits.c.image_id == images.c.image_id)
                            .where(images.c.label.in_(("MEL", "NV", "OTHER"))).order_by(images.c.image_id)).all()
    engine.dispose()
    arr = lambda values: np.array(list(values), dtype=object)  # noqa: E731
    return settings, Images(
        ids=arr(r.image_id for r in rows), drop=arr(r.drop_id for r in rows),
        site=arr(pseudo_site(r.site, r.lesion_id) for r in rows), split=arr(r.split for r in rows),
        lesion=arr(r.lesion_id or r.near_dup_group for r in rows), label=arr(r.label for r in rows),
        diagnosis=arr(challenge_code(r.diagnosis) if r.label == "OTHER" else r.label for r in rows),
        uri=arr(r.normalized_uri for r in rows))


def feature_setup(settings: Settings, **overrides) -> tuple[features.FeatureConfig, backbones.ResolvedWeights]:
    config = make_config("demo", **overrides)
    spec = backbones.get_backbone(config.backbone)
    weights = backbones.resolve_weights(config.weights, spec, settings.home / "cache", open_store(settings))
    return artifacts.feature_config(config, weights.sha256), weights


def feature_matrix(settings: Settings, imgs: Images, **overrides) -> np.ndarray:
    """View-0 features of every image under the demo profile with `overrides` (the product's cache)."""
    fcfg, weights = feature_setup(settings, **overrides)
    refs = [features.ImageRef(i, d, u) for i, d, u in zip(imgs.ids, imgs.drop, imgs.uri)]
    feats, stats = features.features_for(refs, [0], fcfg, weights, open_store(settings))
    log.info("features %s of %d images: %s", fcfg.key, len(refs), stats)
    return feats[0]


# --- pseudo-sites ------------------------------------------------------------------------------------

def _jpeg(im: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _coarse(im: Image.Image) -> Image.Image:
    return _jpeg(im.resize((56, 56), Image.Resampling.BOX))


def _warm(im: Image.Image) -> Image.Image:
    x = np.asarray(im, np.float32) / 255.0
    x = np.clip(x ** 0.8 * np.array([1.08, 1.0, 0.86], np.float32), 0, 1)
    return Image.fromarray((x * 255).round().astype(np.uint8))


DEGRADATIONS: dict[str, tuple[Callable[[Image.Image], Image.Image], str]] = {
    "coarse": (_coarse, "a camera of lower resolution than any training drop (56 px, JPEG quality 75)"),
    "warm": (_warm, "another light and camera (red +8%, blue -14%, gamma 0.8)"),
}


def degraded_features(settings: Settings, imgs: Images, idx: np.ndarray, name: str, **overrides) -> np.ndarray:
    """Features of the images `idx` degraded by DEGRADATIONS[name] before the product's input pipeline."""
    fcfg, weights = feature_setup(settings, **overrides)
    digest = hashlib.sha256("\0".join(imgs.ids[idx]).encode()).hexdigest()[:12]
    path = settings.home / "degraded" / fcfg.key / f"{name}-{digest}.npy"
    if path.exists():
        return np.load(path)
    store, runner, degrade = open_store(settings), features.BackboneRunner(fcfg, weights), DEGRADATIONS[name][0]
    out = []
    for start in range(0, len(idx), 256):
        rgb = []
        for i in idx[start : start + 256]:
            im = degrade(Image.open(io.BytesIO(store.get(key_of(store, imgs.uri[i])))).convert("RGB"))
            rgb.append(features.prepare(im, fcfg.image_size, fcfg.effective_resolution, fcfg.color_constancy))
        out.append(runner(np.stack(rgb)))
    x = np.concatenate(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    log.info("features of %d %s copies computed", len(idx), name)
    return x


# --- the protocol --------------------------------------------------------------------------------------

def _hash_u(*parts: object) -> float:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


def training_rows(imgs: Images, held: str | None, replicate: int, split: str = "train", in_scope: bool = True) -> np.ndarray:
    """In-scope (or OTHER) images of `split` outside the held-out site, minus replicate r's lesion-grouped 10%."""
    keep = (imgs.split == split) & (imgs.in_scope == in_scope)
    if held is not None:
        keep &= imgs.site != held
    if replicate and split == "train":
        keep &= np.array([_hash_u("loso-replicate", replicate, lesion) >= 0.1 for lesion in imgs.lesion])
    return np.flatnonzero(keep)


def draw_sample(held: str, ids: np.ndarray, p0: np.ndarray, k: int, replicate: int,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `ids`, inclusion probabilities) of a k-image validation sample, drawn as `lesion sites
    sample` draws it (order sampling, the k = 0 model's top quintile weighing 4), a key per replicate."""
    w = site_sample.size_measure(dict(zip(ids, p0)), list(ids))[0] if weights is None else weights
    u = np.array([site_sample._u(f"{held}#replicate-{replicate}", i) for i in ids])
    chosen = np.argsort(u / w, kind="stable")[:k]
    return chosen, np.minimum(1.0, k * w[chosen] / w.sum())


def spec_at(y: np.ndarray, score: np.ndarray, sens: float = 0.85) -> float:
    t = evaluation.threshold_for_sensitivity(y, score, sens)
    return float(((score < t) & (y == 0)).sum() / max((y == 0).sum(), 1))


def ranking(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    return {"auc": round(float(roc_auc_score(y, score)), 4), "spec_at_sens85": round(spec_at(y, score), 4)}


def decide(current: str, table: dict[str, list[float]]) -> tuple[str, dict[str, float]]:
    """The candidate to ship from {name: per-(site, replicate) values of the criterion, in the same order}:
    the current one unless another's mean paired gain over it exceeds the spread of those paired gains (their
    standard deviation across held-out sites and replicates); of several such, the largest mean gain."""
    base = np.asarray(table[current])
    gains = {name: np.asarray(v) - base for name, v in table.items() if name != current}
    summary = {name: round(float(g.mean()), 4) for name, g in gains.items()}
    movers = {name: float(g.mean()) for name, g in gains.items() if g.mean() > max(g.std(ddof=1), 0.0)}
    return (max(movers, key=movers.get) if movers else current), summary
