"""Adapting to a new site from its own labels: the k-shot curve, printed as JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/site_adaptation.py [--data ../shared/data]
        [--site isic2017-mel-nv] [--k 0,50,100,200,400] [--home DIR] [--site-weight 5]

One shared source is the new site: it is ingested without its labels (`--site`), the others with theirs,
and the demo profile is trained on them (k = 0). Then, exactly as a clinic would, for each k: the site's
validation sample is extended to k (`lesion sites sample`), the truth of those k images is imported
(`lesion labels import`) and the model retrained. Each version is scored on the site's images outside the
sample (the remaining images, whose labels stay hidden): AUC, and sensitivity and specificity at the
site's threshold (`thresholds_by_site`), with 95% bootstrap intervals; the share flagged out_of_scope
(all of them MEL or NV, so every flag is false); the threshold's own IPW estimate
(cross-fitted, on the sample) against that truth; and the wall time of the retrain after the import.
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

import sqlalchemy as sa  # noqa: E402

log = logging.getLogger("bench.site_adaptation")
CODES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def truth_of(drop: Path) -> dict[str, str]:
    """{image id: challenge code} from a challenge drop's one-hot ground-truth CSV."""
    table = next(drop.glob("*GroundTruth*.csv"))
    with table.open(newline="") as fh:
        return {row["image"]: next(c for c in CODES if float(row.get(c) or 0) >= 0.5) for row in csv.DictReader(fh)}


def unlabelled_copy(drop: Path, dest: Path) -> Path:
    """The drop's images without its ground truth: what a clinic sends."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted((drop / "images").glob("*.jpg")):
        target = dest / path.name
        if not target.exists():
            shutil.copyfile(path, target)
    return dest


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
    parser.add_argument("--k", default="0,50,100,200,400")
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
    if args.site not in drops:
        raise SystemExit(f"--site {args.site!r}: expected one of {sorted(drops)}")
    truth = truth_of(data / args.site)
    started = time.monotonic()
    for name in sorted(drops - {args.site}):
        ingest(str(data / name), settings)
    ingest(str(unlabelled_copy(data / args.site, home / "clinic" / args.site)), settings, site=args.site)
    ingest_seconds = time.monotonic() - started
    curve = []
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
        started = time.monotonic()
        result = pipeline.run(settings, config, run_id=f"k{k}-w{config.site_weight:g}")
        retrain_seconds = time.monotonic() - started
        own = result["thresholds_by_site"].get(args.site, {})
        melanomas = sum(truth[r["image_id"]] == "MEL" for r in drawn["images"]) if drawn else 0
        point = {"k": k, "sample_melanomas": melanomas, "retrain_seconds": round(retrain_seconds, 1),
                 "model_version": result["model_version"], "promoted": result["promoted"],
                 "threshold_chosen_on": own.get("chosen_on"), "threshold_method": own.get("method"),
                 "ipw_estimate": {k2: round(float(v), 4) for k2, v in own.get("validation", {}).items()
                                  if k2 in ("mel_sensitivity", "mel_specificity", "auc") and v is not None},
                 "remaining": remaining(settings, result["model_version"], args.site, truth, args.bootstrap)}
        log.info("k=%d: %s", k, json.dumps(point))
        curve.append(point)
    print(json.dumps({"site": args.site, "home": str(home), "ingest_seconds": round(ingest_seconds, 1),
                      "site_weight": config.site_weight, "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
