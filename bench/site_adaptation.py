"""Adapting to a new site from its own labels: the k-shot curve, printed as JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/site_adaptation.py [--data ../shared/data]
        [--site isic2017-mel-nv|bcn_20000] [--k 0,100,200] [--home DIR] [--site-weight 5] [--retrain]

One shared source is the new site: it is ingested without its labels (`--site`), the others with theirs,
and the demo profile is trained on them (k = 0); the site's images are scored as a night scores them, which
estimates its operating point from its unlabelled images (`sites.operating`). Then, exactly as a clinic would,
for each k: the site's validation sample is extended to k (`lesion sites sample`), the truth of those k images is
imported (`lesion labels import`) and the next settling (`nightly.settle`) re-estimates the site's operating point
with the labels correcting its calibration (`sites.correction`) and re-decides its cases; with `--retrain` the
model is retrained after each import instead (its labels then scored out of fold). `as_decided` holds what the
product decided on the site's images outside the sample against their truth: AUC; the stated estimate and
interval against the realised sensitivity and specificity (`lower_bound_held`); the best specificity any
threshold reaches at sensitivity 0.85 on the same images; the nevi, melanomas and other diagnoses flagged by each
reason; the other diagnoses silently called NV; and `labels_to_next_status`. `remaining` scores the same images
again with the version's own threshold (`thresholds_by_site`, with bootstrap intervals) for comparison.
`--site bcn_20000` holds out the BCN_20000 images of
the ISIC 2019 drop (lesion ids `BCN_...`, a pseudo-site as in bench/loso.py) and trains on the rest of it.
Everything runs on the embedded defaults (SQLite + local store) in --home (a temporary folder if unset;
features are cached there, so a second run with the same --home only retrains).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks import cli, pipeline  # noqa: E402
from lesion_tasks.core import db  # noqa: E402
from lesion_tasks.core.db import engine_for  # noqa: E402
from lesion_tasks.core.schema import images  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.ingest.label_import import import_labels  # noqa: E402
from lesion_tasks.versions import artifacts, registry
from lesion_tasks.assessment import assess  # noqa: E402
from lesion_tasks.model.config import make_config  # noqa: E402
from lesion_tasks.model import evaluation, features  # noqa: E402
from lesion_tasks.scoring import nightly  # noqa: E402

import sqlalchemy as sa  # noqa: E402

log = logging.getLogger("bench.site_adaptation")
BCN = "bcn_20000"  # --site: the BCN_20000 images of the ISIC 2019 drop, held out as a pseudo-site
CODES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def truth_of(drop: Path) -> dict[str, str]:
    """{image id: challenge code} from a challenge drop's one-hot ground-truth CSV."""
    table = next(drop.glob("*GroundTruth*.csv"))
    with table.open(newline="") as fh:
        return {row["image"]: next(c for c in CODES if float(row.get(c) or 0) >= 0.5) for row in csv.DictReader(fh)}


def unlabelled_copy(drop: Path, dest: Path, keep: set[str] | None = None) -> Path:
    """The drop's images (those in `keep`, else all) without its ground truth: what a clinic sends."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted((drop / "images").glob("*.jpg")):
        target = dest / path.name
        if (keep is None or path.stem in keep) and not target.exists():
            shutil.copyfile(path, target)
    return dest


def labelled_copy(drop: Path, dest: Path, drop_ids: set[str]) -> Path:
    """The challenge drop without the images in `drop_ids`: its images, ground truth and metadata, filtered."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for path in sorted((drop / "images").glob("*.jpg")):
        target = dest / "images" / path.name
        if path.stem not in drop_ids and not target.exists():
            shutil.copyfile(path, target)
    for table in drop.glob("*.csv"):
        with table.open(newline="") as fh, (dest / table.name).open("w", newline="") as out:
            rows = csv.DictReader(fh)
            writer = csv.DictWriter(out, rows.fieldnames)
            writer.writeheader()
            writer.writerows(r for r in rows if r["image"] not in drop_ids)
    return dest


def bcn_ids(drop: Path) -> set[str]:
    """The images of BCN_20000 inside the ISIC 2019 drop (lesion ids `BCN_...`): a pseudo-site, as in bench/loso.py."""
    with (drop / "ISIC_2019_Training_Metadata.csv").open(newline="") as fh:
        return {r["image"] for r in csv.DictReader(fh) if (r.get("lesion_id") or "").startswith("BCN_")}


def as_decided(settings: Settings, version: str, site: str, truth: dict[str, str], excluded: set[str]) -> dict:
    """What the product decided at the site (the predictions table, at the site's operating point) against the
    truth, on its images outside `excluded` (the validation sample): the operating point it states (estimate,
    interval) and the realised sensitivity and specificity there; the share of nevi, melanomas and other diagnoses
    flagged, by reason; the other diagnoses called NV with no flag at all; and the pooled threshold's figures on
    the same images, for comparison."""
    from lesion_tasks.core.schema import predictions
    from lesion_tasks.sites import status as site_status

    engine = engine_for(settings)
    with engine.connect() as conn:
        v = registry.version(conn, version)
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.p_mel, predictions.c.threshold,
                                      predictions.c.predicted_label, predictions.c.review_reasons)
                            .join(images, images.c.image_id == predictions.c.image_id)
                            .where(images.c.site == site, predictions.c.model_version == version)).all()
        listed = next(s for s in site_status.overview_of(conn)["sites"] if s["site"] == site)
        point = listed["operating_point"]
    engine.dispose()
    rows = [r for r in rows if r.image_id not in excluded and r.image_id in truth]
    y = np.array([truth[r.image_id] for r in rows], dtype=object)
    p = np.array([r.p_mel for r in rows])
    mel_call = np.array([r.predicted_label == "MEL" for r in rows])
    reasons = [set((r.review_reasons or "").split(",")) - {""} for r in rows]
    flagged = np.array([bool(x) for x in reasons])

    def share(mask: np.ndarray, cond: np.ndarray) -> float | None:
        return round(float(cond[mask].mean()), 4) if mask.any() else None

    def by_reason(mask: np.ndarray) -> dict[str, float | None]:
        out = {"mel_call": share(mask, mel_call), "any_flag": share(mask, flagged),
               "added_by_other_flags": share(mask, flagged & ~mel_call)}
        for reason in ("uncertain", "near_threshold", "out_of_scope", "attention_off_lesion", "site_failing"):
            out[reason + "_without_mel_call"] = share(mask, np.array([reason in x for x in reasons]) & ~mel_call)
        return out

    mel, nv, other = y == "MEL", y == "NV", ~np.isin(y, ("MEL", "NV"))
    realised_sens, realised_spec = float(mel_call[mel].mean()), float(1 - mel_call[nv].mean())
    sens = point["sensitivity"]
    pooled = float(v.threshold)
    in_scope = mel | nv
    y_in, p_in = mel[in_scope].astype(np.int64), p[in_scope]
    best = evaluation.binary_metrics(y_in, p_in, evaluation.threshold_for_sensitivity(y_in, p_in, 0.85))
    return {"n": int(len(rows)), "n_mel": int(mel.sum()), "n_nv": int(nv.sum()), "n_other": int(other.sum()),
            "operating_point": point, "status": listed["status"], "evidence": listed["evidence"],
            "needed": listed["needed"], "auc": round(float(best["auc"]), 4),
            "realised": {"mel_sensitivity": round(realised_sens, 4), "mel_specificity": round(realised_spec, 4)},
            "best_specificity_at_sensitivity_0.85": round(float(best["mel_specificity"]), 4),
            "lower_bound_held": bool(sens["low"] is not None and sens["low"] <= realised_sens),
            "sensitivity_within_interval": bool(sens["low"] is not None and sens["low"] <= realised_sens <= sens["high"]),
            "estimate_minus_realised": {"sensitivity": round(sens["estimate"] - realised_sens, 4) if sens["estimate"] is not None else None,
                                        "specificity": round(point["specificity"]["estimate"] - realised_spec, 4)
                                        if point["specificity"]["estimate"] is not None else None},
            "flagged": {"nevi": by_reason(nv), "melanomas": by_reason(mel), "other_diagnoses": by_reason(other)},
            "other_silently_nv": share(other, ~mel_call & ~flagged),
            "at_pooled_threshold": {"threshold": round(pooled, 5),
                                    "mel_sensitivity": round(float((p[mel] >= pooled).mean()), 4),
                                    "mel_specificity": round(float((p[nv] < pooled).mean()), 4)}}


def ci(y: np.ndarray, p: np.ndarray, t: float, n: int, seed: int = 0) -> dict[str, list[float]]:
    rng, out = np.random.default_rng(seed), {"auc": [], "mel_sensitivity": [], "mel_specificity": []}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        m = evaluation.binary_metrics(y[idx], p[idx], t)
        for key in out:
            out[key].append(m[key])
    return {k: [round(float(np.quantile(v, 0.025)), 4), round(float(np.quantile(v, 0.975)), 4)] for k, v in out.items()}


def remaining(settings: Settings, version: str, site: str, truth: dict[str, str], bootstrap: int) -> dict:
    """The version's figures on the site's MEL/NV images outside its validation sample, at the site's threshold."""
    engine, store = engine_for(settings), open_store(settings)
    with engine.connect() as conn:
        v = registry.version(conn, version)
        sampled = set(conn.scalars(sa.text("SELECT image_id FROM site_samples WHERE site = :s"), {"s": site}))
        rows = conn.execute(sa.select(images.c.image_id, images.c.drop_id, images.c.normalized_uri)
                            .where(images.c.site == site).order_by(images.c.image_id)).all()
    engine.dispose()
    refs = [features.ImageRef(r.image_id, r.drop_id, r.normalized_uri) for r in rows
            if r.image_id not in sampled and truth.get(r.image_id) in ("MEL", "NV")]
    pred = assess.predict_refs(settings, store, v, refs, scope_head=artifacts.load_scope_of(store, v),
                               sites=[site] * len(refs))
    y = np.array([truth[r.image_id] == "MEL" for r in refs], np.int64)
    t = float(pred.thresholds[0])
    m = evaluation.binary_metrics(y, pred.p_mel, t)
    return {"n": len(y), "n_mel": int(y.sum()), "threshold": round(t, 5),
            **{k: round(float(m[k]), 4) for k in ("auc", "mel_sensitivity", "mel_specificity")},
            "specificity_at_sensitivity_0.85": round(float(evaluation.binary_metrics(
                y, pred.p_mel, evaluation.threshold_for_sensitivity(y, pred.p_mel, 0.85))["mel_specificity"]), 4),
            # every remaining image is MEL or NV: each out_of_scope flag is a false one
            "out_of_scope_flagged": None if pred.p_other is None else round(float(np.mean(pred.p_other >= v.scope_threshold)), 4),
            "ci95": ci(y, pred.p_mel, t, bootstrap)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("LESION_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--site", default="isic2017-mel-nv", help="the shared source treated as the new site")
    parser.add_argument("--k", default="0,100,200")
    parser.add_argument("--retrain", action="store_true", help="retrain after each import (else the k = 0 champion "
                        "stays and the labels correct its operating point)")
    parser.add_argument("--home", default="")
    parser.add_argument("--site-weight", type=float, default=None, help="TrainConfig.site_weight (default: its own)")
    parser.add_argument("--bootstrap", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    data = Path(args.data)
    home = Path(args.home or tempfile.mkdtemp(prefix="site-adaptation-"))
    settings = Settings.from_env(home=home)
    db.upgrade(settings)
    config = make_config("demo", site_weight=args.site_weight)
    drops = {"isic2017-mel-nv", "isic2019-84px", "isic-archive-uda1-sample", "isic-cli-sample"}
    if args.site not in drops | {BCN}:
        raise SystemExit(f"--site {args.site!r}: expected one of {sorted(drops | {BCN})}")
    started = time.monotonic()
    if args.site == BCN:  # the rest of the ISIC 2019 drop trains, with its labels; BCN_20000's images come unlabelled
        source = data / "isic2019-84px"
        truth, held = truth_of(source), bcn_ids(source)
        for name in sorted(drops - {"isic2019-84px"}):
            ingest(str(data / name), settings)
        ingest(str(labelled_copy(source, home / "drops" / "isic2019-84px-without-bcn", held)), settings)
        ingest(str(unlabelled_copy(source, home / "clinic" / BCN, held)), settings, site=BCN)
    else:
        truth = truth_of(data / args.site)
        for name in sorted(drops - {args.site}):
            ingest(str(data / name), settings)
        ingest(str(unlabelled_copy(data / args.site, home / "clinic" / args.site)), settings, site=args.site)
    ingest_seconds = time.monotonic() - started
    curve, result = [], None
    for k in [int(x) for x in args.k.split(",")]:
        drawn = None
        if k:
            drawn = cli.sample_site(settings, args.site, k)
            labels = home / f"labels-{k}.csv"
            with labels.open("w", newline="") as fh:
                out = csv.writer(fh)
                out.writerow(["image_id", "diagnosis", "label_source"])
                out.writerows([r["image_id"], truth[r["image_id"]], "bench"] for r in drawn["images"])
            imported = import_labels(labels, settings)
            log.info("k=%d: %s", k, imported)
        retrain_seconds = None
        if result is None or args.retrain:
            started = time.monotonic()
            result = pipeline.run(settings, config, run_id=f"k{k}-w{config.site_weight:g}")
            retrain_seconds = round(time.monotonic() - started, 1)
        own = result["thresholds_by_site"].get(args.site, {})
        melanomas = sum(truth[r["image_id"]] == "MEL" for r in drawn["images"]) if drawn else 0
        scoring = {}
        if result["promoted"]:  # the site's images scored as a night would: its operating point estimated, applied
            started = time.monotonic()
            scoring = nightly.score(settings, site=args.site, run_id=f"night-k{k}")
            if k and not args.retrain:  # the labels arrived after the night: the next settling re-decides the site
                scoring = {**scoring, **nightly.settle(settings, "champion", None)}
            scoring["seconds_with_settling"] = round(time.monotonic() - started, 1)
        point = {"k": k, "sample_melanomas": melanomas, "retrain_seconds": retrain_seconds,
                 "model_version": result["model_version"], "promoted": result["promoted"],
                 "threshold_chosen_on": own.get("chosen_on"), "threshold_method": own.get("method"),
                 "remaining": remaining(settings, result["model_version"], args.site, truth, args.bootstrap),
                 "scoring": {k2: scoring.get(k2) for k2 in ("scored", "needs_review", "updated", "rescored",
                                                             "seconds_with_settling")},
                 "as_decided": as_decided(settings, result["model_version"], args.site, truth,
                                          {r["image_id"] for r in drawn["images"]} if drawn else set())
                 if result["promoted"] else None}
        log.info("k=%d: %s", k, json.dumps(point))
        curve.append(point)
    print(json.dumps({"site": args.site, "home": str(home), "ingest_seconds": round(ingest_seconds, 1),
                      "site_weight": config.site_weight, "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
