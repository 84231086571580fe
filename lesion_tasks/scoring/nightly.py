"""Nightly scoring: every image without a prediction from a model version gets one.

Per batch of images, ONE compiled backbone pass yields the last activation map A and its global
average (the pooled features). From the pooled features the head is sampled T times in one
vectorised call (`mc.py`: calibrated p_mel, entropy, mutual information, seeded per image and model
version), the out-of-scope head gives p_other (`scope.py`; flag `out_of_scope`), and Grad-CAM of the
predicted class is A weighted by the head's analytic gradient (`gradcam.py`): no backprop through the
backbone; its share inside the lesion is measured on the input image (`attention.py`, flag
`attention_off_lesion`). The images go in as the model version saw them in training (`features.model_input`).
What is stored under the model version is the low-resolution Grad-CAM map (`keys.gradcam_map`, a few
hundred bytes): no original decoded, no overlay drawn or encoded on the hot path. The overlay on the
original image, at a bounded size, is drawn on demand (`overlays.py`; the review UI, `lesion gradcam-url`),
or at scoring with LESION_GRADCAM_MATERIALIZE=1 (`keys.gradcam`). Rows are upserted, so a rerun rewrites
identical numbers and never duplicates. Batches go through a bounded pipeline (`score_range`): the next
batch is read and the previous ones' maps and rows are written while the backbone runs, a row only once
its map object exists; at most a few batches are in flight, so memory does not grow with the number of
images.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.core.db import analyze, engine_for, upsert
from lesion_tasks.core.schema import images, prediction_samples, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, open_store
from lesion_tasks.model import attention, backbones, features, gradcam, mc, scope
from lesion_tasks.model import precision as precision_
from lesion_tasks.scoring import overlays, priority
from lesion_tasks.sites import nights, operating
from lesion_tasks.sites import status as site_status
from lesion_tasks.versions import artifacts, predict, registry

log = logging.getLogger(__name__)
BATCH = 32
SHARD_SIZE = 512
SETTLE_CHUNK = 5000  # flipped cases deleted and scored again per step by `settle`
WRITE_BEHIND = 2  # batches whose Grad-CAM maps and rows may still be being written while the next is scored


@dataclass
class ScoringModel:
    info: registry.ModelVersion
    head: mc.HeadWeights
    run_backbone: Any  # (N, S, S, 3) preprocessed -> (activations (N, H, W, K), pooled (N, K))
    scope_head: scope.ScopeHead | None = None  # None: the version flags nothing as out of scope
    input_config: features.FeatureConfig | None = None  # what the backbone sees (effective resolution, colour)
    # sites where this version's evidence puts it below a floor (site_evaluations): all their cases go to review
    failing_sites: frozenset[str] = frozenset()
    precision: precision_.Precision = precision_.Precision("float32", "as given")  # the backbone's, this run
    # the sites' recorded operating points (`sites.operating`): each site's cases are decided at its own
    applied: Mapping[str, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.info.model_version


def load_scoring_model(store: ObjectStore, v: registry.ModelVersion,
                       precision: precision_.Precision | None = None) -> ScoringModel:
    """The saved model cut at (last activation, pooled features), compiled for fixed batches, its backbone in
    `precision` (default: the version's own, `model.precision.of_version`: the decisions its evaluation measured;
    the saved model is float32, its compiled pass is rewritten for bfloat16 by `model.precision.computing`)."""
    import keras
    import tensorflow as tf

    chosen = precision or precision_.of_version(v.precision)
    saved = artifacts.of(store, v)
    model = saved.load_model(v.model_uri)  # ArtifactError (a ValueError) names what is missing or broken
    head = saved.load_head()
    cut = keras.Model(model.input, [model.get_layer(v.last_activation).output,
                                     model.get_layer("head_gap").output])
    fn = precision_.compiled(cut, (BATCH, v.image_size, v.image_size, 3), chosen.name)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        if n < BATCH:  # one traced shape for every batch
            batch = np.concatenate([batch, np.zeros((BATCH - n, *batch.shape[1:]), np.float32)])
        with precision_.computing(chosen.name):
            activations, pooled = fn(tf.constant(batch))
        return activations.numpy()[:n], pooled.numpy()[:n]

    log.info("model %s scores with its backbone in %s (%s)", v.model_version, chosen.name, chosen.why)
    return ScoringModel(v, head, run, artifacts.load_scope_of(store, v), artifacts.feature_config(v), precision=chosen)


def _unscored(conn: sa.Connection, version: str, first: str | None = None, last: str | None = None,
              limit: int | None = None, site: str | None = None, image_ids: list[str] | None = None) -> list[sa.Row]:
    scored = sa.select(predictions.c.image_id).where(predictions.c.model_version == version)
    query = (sa.select(images.c.image_id, images.c.drop_id, images.c.site.label("site"), images.c.normalized_uri,
                       images.c.original_uri)
             .where(images.c.image_id.not_in(scored)).order_by(images.c.image_id))
    if site is not None:
        query = query.where(images.c.site == site)
    if image_ids is not None:
        query = query.where(images.c.image_id.in_(image_ids))
    if first is not None:
        query = query.where(images.c.image_id >= first)
    if last is not None:
        query = query.where(images.c.image_id <= last)
    return conn.execute(query.limit(limit) if limit else query).all()


def _chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


@dataclass(frozen=True)
class ShardPlan:
    """What a night scores: id-range shards of one version's unscored images, or why there is nothing."""

    model_version: str | None
    shards: list[dict[str, Any]]
    reason: str | None  # None: shards to score; NO_CHAMPION: no model to score with; NOTHING_NEW: all scored

    NO_CHAMPION = "no_champion"
    NOTHING_NEW = "nothing_new"


def plan_shards(settings: Settings, model_version: str = "champion", shard_size: int = SHARD_SIZE,
                limit: int | None = None) -> ShardPlan:
    """Unscored images of the model version cut into shards, and why there are none when there are none: first
    shards of image ids (`priority.first_to_score`: the previous champion's open cases, the latest nights), then
    id ranges of the rest (small XCom values: references only)."""
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            v = registry.version(conn, model_version, required=False)
            if v is None:
                log.warning("no champion model yet: nothing to score (train one with lesion_retrain / lesion train)")
                return ShardPlan(None, [], ShardPlan.NO_CHAMPION)
            ids = [r.image_id for r in _unscored(conn, v.model_version, limit=limit)]
            first = priority.first_to_score(conn, ids)
    finally:
        engine.dispose()
    rest = sorted(set(ids) - set(first))
    shards = ([{"model_version": v.model_version, "image_ids": part, "n": len(part)} for part in _chunks(first, shard_size)]
              + [{"model_version": v.model_version, "first": part[0], "last": part[-1], "n": len(part)}
                 for part in _chunks(rest, shard_size)])
    log.info("model %s: %d unscored images in %d shards (%d first: the previous champion's open cases and the latest "
             "nights)", v.model_version, len(ids), len(shards), len(first))
    return ShardPlan(v.model_version, shards, None if shards else ShardPlan.NOTHING_NEW)


def score_batch(model: ScoringModel, rgb: np.ndarray, image_ids: list[str], mc_samples: int,
                sites: list[str] | None = None) -> tuple[predict.Predictions, np.ndarray]:
    """One batch, one backbone pass: the version's predictions (`predict.predict`, as in its evaluation;
    each image at its site's threshold) and the Grad-CAM heatmaps of the predicted class."""
    activations, pooled = model.run_backbone(backbones.preprocess(rgb))
    pr = predict.predict(model.info, model.head, pooled, image_ids, model.scope_head, mc_samples, sites, model.applied)
    heat = gradcam.gradcam_fast(activations, gradcam.head_gradient(model.head, pooled, pr.is_mel))
    return pr, heat


def _rows(model: ScoringModel, batch: list[sa.Row], pr: predict.Predictions, uris: list[str],
          on_lesion: list[float | None], samples: int, run_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prediction rows and MC-sample rows of one scored batch whose Grad-CAM maps are stored, with the share
    of each Grad-CAM map on the lesion (None: no lesion segmented)."""
    now = datetime.now(UTC)
    rows, sample_rows = [], []
    decision = pr.decision_uncertainty
    for k, r in enumerate(batch):
        other = None if pr.p_other is None else float(pr.p_other[k])
        reasons = pr.reasons(k) + predict.scored_reasons(model.info.review_rule, bool(pr.is_mel[k]), on_lesion[k],
                                                         r.site in model.failing_sites)
        rows.append({"image_id": r.image_id, "model_version": model.version, "p_mel": float(pr.p_mel[k]), "p_other": other,
                     "predicted_label": "MEL" if pr.is_mel[k] else "NV", "threshold": float(pr.thresholds[k]),
                     "entropy": float(pr.entropy[k]), "mutual_info": float(pr.mutual_info[k]), "mc_samples": samples,
                     "decision_uncertainty": float(decision[k]), "attention_on_lesion": on_lesion[k],
                     "gradcam_uri": uris[k], "needs_review": bool(reasons), "review_reasons": ",".join(reasons) or None,
                     "drop_id": r.drop_id, "run_id": run_id, "scored_at": now})
        sample_rows.append({"image_id": r.image_id, "model_version": model.version,
                            "p_mel_samples": [round(float(v), 6) for v in pr.samples[k]]})
    return rows, sample_rows


def score_range(settings: Settings, model_version: str = "champion", first: str | None = None, last: str | None = None,
                limit: int | None = None, mc_samples: int | None = None, run_id: str | None = None,
                batch_size: int = BATCH, model: ScoringModel | None = None, site: str | None = None,
                image_ids: list[str] | None = None) -> dict[str, Any]:
    """Score the unscored images of one id range (a shard; of one `site` where given), batch by batch, as a pipeline: while the
    backbone runs on batch k (TensorFlow releases the GIL), batch k+1 is read and the maps and rows of
    the batches before are written by background threads. A batch's rows are upserted once all its
    Grad-CAM objects exist, batch after batch in order; the first failed read or write fails the shard."""
    store, engine = open_store(settings), engine_for(settings)
    run_id = run_id or f"cli-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    started = time.monotonic()
    try:
        with engine.connect() as conn:
            v = registry.version(conn, model_version)
            if v.artifacts_pruned_at is not None:  # refused even with nothing left to score
                raise ValueError(registry.pruned_message(v.model_version, v.artifacts_pruned_at) + ": it cannot score")
            todo = _unscored(conn, v.model_version, first, last, limit, site, image_ids)
        if not todo:
            return {"model_version": v.model_version, "scored": 0, "needs_review": 0, "seconds": 0.0, "precision": None}
        model = model or load_scoring_model(store, v)
        with engine.connect() as conn:
            failing = nights.failing_sites(conn, v.model_version)
            applied = operating.applied(conn, v)
        model = replace(model, failing_sites=failing, applied=applied)
        if failing:
            log.warning("model %s is below a floor at %d site(s) (%s): every case of theirs goes to review",
                        v.model_version, len(failing), ", ".join(sorted(failing)))
        samples = mc_samples or v.mc_samples
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        io_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="score-io")  # store reads, maps, attention
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-db")  # upserts, in batch order
        pending: deque[Future] = deque()  # the batches written behind the backbone, oldest first
        scored = flagged = 0
        last_log = started

        def read(batch: list[sa.Row]) -> list[Future]:
            return [io_pool.submit(features.model_input, store, r.normalized_uri, model.input_config) for r in batch]

        def write(batch: list[sa.Row], pr: predict.Predictions, maps: list[Future], on_lesion: list[Future],
                  previous: Future | None) -> tuple[int, int]:
            if previous is not None:
                previous.result()  # a failed batch stops the ones after it, as if they ran one at a time
            rows, sample_rows = _rows(model, batch, pr, [f.result() for f in maps], [f.result() for f in on_lesion],
                                      samples, run_id)
            with engine.begin() as conn:
                upsert(conn, predictions, rows, ["image_id", "model_version"])
                upsert(conn, prediction_samples, sample_rows, ["image_id", "model_version"])
            return len(rows), sum(r["needs_review"] for r in rows)

        def collect(future: Future) -> None:  # raises what the batch's writes raised
            nonlocal scored, flagged, last_log
            n, n_flagged = future.result()
            scored, flagged = scored + n, flagged + n_flagged
            if time.monotonic() - last_log > 10 or scored == len(todo):
                last_log = time.monotonic()
                log.info("model %s: scored %d/%d images (%d need review), %.1f images/s", model.version, scored,
                         len(todo), flagged, scored / max(last_log - started, 1e-9))

        try:
            reading = read(batches[0])
            for k, batch in enumerate(batches):
                rgb = np.stack([f.result() for f in reading])
                if k + 1 < len(batches):
                    reading = read(batches[k + 1])  # prefetch: read while this batch is scored
                pr, heatmaps = score_batch(model, rgb, [r.image_id for r in batch], samples, [r.site for r in batch])
                maps = [io_pool.submit(overlays.store_gradcam, store, model.version, r, heat, settings.gradcam_materialize)
                        for r, heat in zip(batch, heatmaps)]
                # on the pixels the model saw, off the backbone's thread like the overlays
                on_lesion = [io_pool.submit(attention.attention_on_lesion, image, heat) for image, heat in zip(rgb, heatmaps)]
                pending.append(writer.submit(write, batch, pr, maps, on_lesion, pending[-1] if pending else None))
                while pending and (pending[0].done() or len(pending) > WRITE_BEHIND):  # bounded; fails early
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        finally:  # on an error: queued reads and writes are dropped, running ones end
            io_pool.shutdown(cancel_futures=True)
            writer.shutdown(cancel_futures=True)
        return {"model_version": model.version, "scored": scored, "needs_review": flagged,
                "seconds": round(time.monotonic() - started, 2), "precision": model.precision.record()}
    finally:
        engine.dispose()


def score(settings: Settings, model_version: str = "champion", mc_samples: int | None = None, limit: int | None = None,
          run_id: str | None = None, site: str | None = None) -> dict[str, Any]:
    """What `lesion score` prints: {"model_version", "scored", "skipped", "needs_review", "operating_points"}; with
    `site`, only that site's unscored images are scored. The run ends as a nightly one does (`settle`): the
    operating points of the sites it scored are re-estimated and its cases decided at them."""
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            version = registry.version(conn, model_version).model_version
            skipped = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                                   .where(predictions.c.model_version == version)).scalar()
    finally:
        engine.dispose()
    run_id = run_id or f"cli-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    result = score_range(settings, version, limit=limit, mc_samples=mc_samples, run_id=run_id, site=site)
    settled = settle(settings, version, run_id) if result["scored"] else None
    if result["scored"]:
        _refresh_statistics(settings)
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            flagged = conn.scalar(sa.select(sa.func.count()).select_from(predictions).where(
                predictions.c.run_id == run_id, predictions.c.model_version == version, predictions.c.needs_review))
    finally:
        engine.dispose()
    return {"model_version": version, "scored": result["scored"], "skipped": skipped, "needs_review": int(flagged or 0),
            "seconds": result["seconds"], "precision": result["precision"],
            "operating_points": None if settled is None else {s: {k: p[k] for k in ("threshold", "method", "images")}
                                                              for s, p in settled["sites"].items()}}


def settle(settings: Settings, model_version: str = "champion", run_id: str | None = None) -> dict[str, Any]:
    """After a scoring run: re-estimate the operating point of every site the run scored and of every site with a
    labelled validation sample (its labels may be new: `sites.operating`, from all of the site's scored images,
    tonight's included) and decide the run's cases at it, so that a new site's
    first night is already decided at its own point. A case whose decision does not change is updated in place
    (threshold, decision uncertainty, review reasons, from its stored MC samples); a case whose MEL/NV call flips
    is scored again (its Grad-CAM map is of the predicted class). Earlier nights keep the decisions they were
    given (each prediction's `threshold` says at what). A rerun changes nothing. Returns
    {"model_version", "run_id", "sites": {site: operating point}, "updated", "rescored"}."""
    engine = engine_for(settings)
    try:
        with engine.begin() as conn:
            v = registry.version(conn, model_version, required=False)
            if v is None:
                return {"model_version": None, "run_id": run_id, "sites": {}, "updated": 0, "rescored": 0}
            in_run = sa.select(images.c.site).join(predictions, predictions.c.image_id == images.c.image_id).where(
                predictions.c.model_version == v.model_version)
            if run_id is not None:
                in_run = in_run.where(predictions.c.run_id == run_id)
            sites = sorted(set(conn.scalars(in_run.distinct())) | operating.sampled_sites(conn))
            points = operating.estimate(conn, v, sites, run_id)
            site_status.record_labels(conn, v, points)
            failing = nights.failing_sites(conn, v.model_version)
            updated, flipped = operating.redecide(conn, v, run_id, points, failing)
    finally:
        engine.dispose()
    rescored = 0
    if flipped:
        log.info("model %s: %d cases of run %s change their MEL/NV call at their sites' operating points: scoring "
                 "them again", v.model_version, len(flipped), run_id)
        for start in range(0, len(flipped), SETTLE_CHUNK):  # bounded id lists (SQLite's variable limit)
            part = flipped[start : start + SETTLE_CHUNK]
            engine = engine_for(settings)
            try:
                with engine.begin() as conn:
                    for table in (prediction_samples, predictions):
                        conn.execute(table.delete().where(table.c.model_version == v.model_version, table.c.image_id.in_(part)))
            finally:
                engine.dispose()
            rescored += score_range(settings, v.model_version, run_id=run_id, image_ids=part)["scored"]
    return {"model_version": v.model_version, "run_id": run_id, "updated": updated, "rescored": rescored,
            "sites": {s: op.to_json() for s, op in points.items()}}


def _refresh_statistics(settings: Settings) -> None:
    engine = engine_for(settings)
    try:
        analyze(engine, ["predictions", "prediction_samples"])
    finally:
        engine.dispose()


def summarize(settings: Settings, model_version: str, run_id: str, results: list[dict[str, Any]],
              settled: dict[str, Any] | None = None) -> dict[str, Any]:
    """After the shards (and `settle`): what this run scored, what is still unscored (should be 0), each site's
    operating point and what its review flags cost. `model_version` may be "champion"."""
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            v = registry.version(conn, model_version, required=False)
            if v is None:
                return {"model_version": None, "run_id": run_id, "shards": 0, "scored": 0, "still_unscored": None,
                        "note": "no champion model yet"}
            model_version = v.model_version
            remaining = len(_unscored(conn, model_version))
            in_run = conn.execute(sa.select(sa.func.count(), sa.func.sum(sa.cast(predictions.c.needs_review, sa.Integer)))
                                  .where(predictions.c.run_id == run_id)).one()
            by_site = nights.site_statuses(conn, model_version, run_id)
    finally:
        engine.dispose()
    if in_run[0]:
        _refresh_statistics(settings)
    # the backbone precision each shard scored in (`model.precision`): a night that mixed machines says so
    used = sorted({r["precision"]["precision"] for r in results if r.get("precision")})
    summary = {"model_version": model_version, "run_id": run_id, "shards": len(results), "precision": used,
               "scored": sum(r["scored"] for r in results), "rows_of_this_run": in_run[0],
               "needs_review": int(in_run[1] or 0), "still_unscored": remaining, "sites": nights.night_sites(by_site)}
    if settled is not None:
        summary["operating_points"] = {name: {k: point[k] for k in ("threshold", "method", "images", "sensitivity")}
                                       for name, point in settled.get("sites", {}).items()}
        summary["settled"] = {"updated": settled.get("updated", 0), "rescored": settled.get("rescored", 0)}
    if summary["sites"]["mostly_unvalidated"]:
        log.warning("nightly scoring: %s", summary["sites"]["note"])
    log.info("nightly scoring summary: %s", summary)
    return summary
