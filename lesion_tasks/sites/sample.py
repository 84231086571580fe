"""A site's validation sample: which of its images to label first (`lesion sites sample SITE --size N`).

Labelling a few hundred random images of a new clinic yields a couple of dozen melanomas: too few to choose
a threshold or to validate on. So the sample over-represents the likely melanomas, and records how:

- Size measure: an image in the top quintile of the champion's p_mel at the site weighs `HIGH_WEIGHT` (4),
  every other image 1, so the top quintile makes up about half of the sample. Without a champion every
  image weighs 1 (a uniform sample, said so in `stratum`).
- Order sampling (sequential Poisson): image i's key is u_i / w_i, u_i uniform from a hash of (site, image
  id); the sample is the images with the smallest keys. Deterministic, and a larger size takes the next
  keys: the sample extends, never redraws. Images of a later night join the candidates of later draws only;
  rows already drawn keep their rank and probability.
- Inclusion probability: pi_i = min(1, c * w_i), c = n / sum of w over the site's images (n the size drawn so
  far), raised where some pi reach 1 so that they still sum to n (`scale`).
  A draw that adds rows runs in one locked transaction (concurrent draws of a site take turns) and then gives
  EVERY row its stratum and pi under its own size measure and n: the probabilities always come from one measure
  (a new champion's, once it extends the sample; rows it did not choose carry its probabilities, the
  approximation order sampling makes anyway). `lesion check` reports a sample whose rows are not so. Metrics estimated from the labelled sample weight each image by 1 / pi_i
  (`trainset.sample_weights`), so they estimate the site's whole population.

The champion must have scored the site's images for p_mel: the site's unscored ones are scored first
(`lesion_tasks.cli.sample_site` passes `nightly.score` with `site`; other sites' backlogs wait for their night).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.db import engine_for, insert_ignore, take_turns
from lesion_tasks.core.keys import site_key
from lesion_tasks.core.schema import images, predictions, site_samples
from lesion_tasks.core.settings import Settings
from lesion_tasks.ingest.sources import stored_site
from lesion_tasks.versions import registry

log = logging.getLogger(__name__)
HIGH_QUANTILE = 0.8  # the top quintile of p_mel at the site ...
HIGH_WEIGHT = 4.0  # ... weighs this much: with N >> n it is about half of the sample
MAX_SIZE = 100_000


def _u(site: str, image_id: str) -> float:
    """A uniform (0, 1] number fixed by (site, image): the sample's randomness, reproducible anywhere."""
    return (int.from_bytes(hashlib.sha256(f"site-sample-v1\0{site}\0{image_id}".encode()).digest()[:8], "big") + 1) / 2**64


def size_measure(p_mel: dict[str, float] | None, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """(weights, strata) of the site's images `ids` from the champion's p_mel (None: no champion)."""
    if p_mel is None:
        return np.ones(len(ids)), ["uniform (no champion)"] * len(ids)
    p = np.array([p_mel[i] for i in ids])
    cut = float(np.quantile(p, HIGH_QUANTILE)) if len(p) else 1.0
    high = p >= cut
    return np.where(high, HIGH_WEIGHT, 1.0), ["top_p_mel_quintile" if h else "rest" for h in high]


def _weight(stratum: str) -> float:
    return HIGH_WEIGHT if stratum == "top_p_mel_quintile" else 1.0


def _state(conn: sa.Connection, site: str, version: str | None) -> tuple[list[str], list[Any], dict[str, float] | None]:
    ids = list(conn.scalars(sa.select(images.c.image_id).where(images.c.site == site).order_by(images.c.image_id)))
    drawn = conn.execute(sa.select(site_samples).where(site_samples.c.site == site).order_by(site_samples.c.rank)).all()
    p_mel = None
    if version is not None:
        p_mel = dict(conn.execute(sa.select(predictions.c.image_id, predictions.c.p_mel)
                                  .join(images, images.c.image_id == predictions.c.image_id)
                                  .where(predictions.c.model_version == version, images.c.site == site)).all())
    return ids, drawn, p_mel


def draw(settings: Settings, site: str, size: int = 200,
         score_site: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """The first `size` images of SITE's validation sample, drawing (and recording) as many as are missing.
    The size measure needs the champion's p_mel on every image of the site: `score_site(version, site)` scores
    the site's unscored ones first (nightly scoring, wired by the caller: `lesion_tasks.cli.sample_site`);
    without it, unscored images are a ValueError saying so. SITE is matched as ingest names sites (`keys.site_key`,
    case-blind), and the result names the site as stored."""
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"--size {size}: expected 1..{MAX_SIZE}")
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            site = stored_site(conn, site_key(site, "SITE"))  # named as at ingest: "clinicx" finds "ClinicX"
            champion = registry.version(conn, None, required=False)
            version = champion.model_version if champion and champion.artifacts_pruned_at is None else None
            ids, drawn, p_mel = _state(conn, site, version)
            if not ids:
                known = sorted(conn.scalars(sa.select(images.c.site).distinct()))
                raise ValueError(f"site {site!r}: no images; known sites: {', '.join(known[:20]) or 'none'}")
        if len(drawn) < size and version is not None and len(p_mel) < len(ids):
            if score_site is None:
                raise ValueError(f"site {site!r}: {len(ids) - len(p_mel)} of its {len(ids)} images are not scored by "
                                 f"champion {version} yet: score them first (lesion sites sample does)")
            log.info("site %s: %d of its %d images not scored by champion %s yet: scoring them first",
                     site, len(ids) - len(p_mel), len(ids), version)
            score_site(version, site)  # the site's images only, not the whole home's backlog
            with engine.connect() as conn:
                ids, drawn, p_mel = _state(conn, site, version)
        if len(drawn) < size:
            with engine.begin() as conn:
                take_turns(conn, f"site-sample:{site}")  # concurrent draws of a site: one after the other
                ids, drawn, p_mel = _state(conn, site, version)  # as it is now, under the lock
                if len(drawn) < size:
                    added = _extend(conn, site, ids, drawn, p_mel, size)
                    ids, drawn, _ = _state(conn, site, version)
                    log.info("site %s: validation sample extended by %d to %d of %d images (%s)", site, added,
                             len(drawn), len(ids), f"size measure from champion {version}" if version else "uniform: no champion")
        with engine.connect() as conn:
            chosen = drawn[:size]
            labels = dict(conn.execute(sa.select(images.c.image_id, images.c.label)
                                       .where(images.c.image_id.in_([r.image_id for r in chosen]))).all()) if chosen else {}
    finally:
        engine.dispose()
    out = [{"image_id": r.image_id, "inclusion_probability": r.inclusion_probability, "stratum": r.stratum,
            "rank": r.rank, "label": labels.get(r.image_id)} for r in chosen]
    return {"site": site, "size": len(out), "site_images": len(ids), "drawn_by": version, "images": out,
            "labelled": sum(1 for r in out if r["label"]), "melanomas": sum(1 for r in out if r["label"] == "MEL")}


def scale(weights: np.ndarray, n: int) -> float:
    """c with sum_i min(1, c * w_i) = n: inclusion probabilities proportional to size, those that would pass 1
    held at 1 and the rest scaled up to keep the sample's size (n / sum w while no image reaches 1; a census,
    n >= the site's images, makes every pi 1)."""
    w = np.sort(np.asarray(weights, dtype=float))[::-1]
    if n >= len(w):
        return float("inf")
    k = 0  # the k largest are held at 1
    while (c := (n - k) / float(w[k:].sum())) * w[k] > 1.0:
        k += 1
    return c


def _extend(conn: sa.Connection, site: str, ids: list[str], drawn: list[Any], p_mel: dict[str, float] | None,
            size: int) -> int:
    """Draw the next keys up to `size` rows, then give EVERY row its stratum and inclusion probability under this
    draw's size measure (inside the draw's locked transaction): the sample's probabilities always come from one
    measure and one n, whoever drew its earlier rows. Returns how many rows were added."""
    if p_mel is not None and len(p_mel) < len(ids):
        raise ValueError(f"site {site!r}: {len(ids) - len(p_mel)} of its {len(ids)} images are not scored by the "
                         "champion: score them first (lesion sites sample does)")
    weights, strata = size_measure(p_mel, ids)
    taken = {r.image_id for r in drawn}
    keys = sorted((_u(site, i) / w, i, s) for i, w, s in zip(ids, weights, strata) if i not in taken)
    now = datetime.now(UTC)
    rows = [{"site": site, "image_id": i, "rank": len(drawn) + k, "stratum": s, "inclusion_probability": 0.0,
             "drawn_at": now} for k, (_, i, s) in enumerate(keys[: size - len(drawn)])]
    insert_ignore(conn, site_samples, rows, ["site", "image_id"])
    c = scale(weights, len(drawn) + len(rows))
    measure = {i: (s, float(min(1.0, c * w))) for i, w, s in zip(ids, weights, strata)}
    for r in conn.execute(sa.select(site_samples.c.image_id, site_samples.c.stratum, site_samples.c.inclusion_probability)
                          .where(site_samples.c.site == site)).all():
        stratum, pi = measure[r.image_id]
        if (r.stratum, r.inclusion_probability) != (stratum, pi):
            conn.execute(site_samples.update().where(site_samples.c.site == site, site_samples.c.image_id == r.image_id)
                         .values(stratum=stratum, inclusion_probability=pi))
    return len(rows)


def consistency(conn: sa.Connection) -> list[tuple[str, str]]:
    """(site, problem) for each site whose recorded sample cannot be one draw's: ranks not 0..n-1, or inclusion
    probabilities that are not min(1, c * weight(stratum)) for one c (`_extend` writes them so; two draws that
    interleaved, or strata of two measures, break it). `lesion check` reports them."""
    problems: list[tuple[str, str]] = []
    rows = conn.execute(sa.select(site_samples.c.site, site_samples.c.rank, site_samples.c.stratum,
                                  site_samples.c.inclusion_probability).order_by(site_samples.c.site, site_samples.c.rank))
    by_site: dict[str, list[Any]] = {}
    for r in rows:
        by_site.setdefault(r.site, []).append(r)
    for site, sample in by_site.items():
        if [r.rank for r in sample] != list(range(len(sample))):
            problems.append((site, f"ranks are not 0..{len(sample) - 1}"))
        per_weight = {round(r.inclusion_probability / _weight(r.stratum), 12) for r in sample
                      if r.inclusion_probability < 1.0}
        if len(per_weight) > 1:
            problems.append((site, f"inclusion probabilities of more than one draw: {len(per_weight)} values per unit "
                                   f"weight ({', '.join(f'{c:.6g}' for c in sorted(per_weight)[:3])}), expected one "
                                   "size measure and one n"))
    return problems


def summary(result: dict[str, Any]) -> str:
    lines = [f"site {result['site']}: validation sample of {result['size']} (of {result['site_images']} images), "
             f"{result['labelled']} of {result['size']} labelled, {result['melanomas']} melanomas"]
    lines += [f"  {r['rank'] + 1:>4}  {r['image_id']}  pi={r['inclusion_probability']:.4f}  {r['stratum']}"
              f"{'  ' + r['label'] if r['label'] else ''}" for r in result["images"]]
    return "\n".join(lines)
