"""Fingerprint of what training and scoring produce, to prove a refactor changed no behaviour.

On a fresh home: synthetic drops (always) and, with --real, the shared ISIC 2017 drop on the demo profile.
Trains, evaluates, gates, scores; prints one JSON object of sha256 digests (metrics, thresholds, review
rule, head weights, every prediction and every stored MC sample) and a few readable values. Run it before
and after a change with the same arguments: the digests must be equal.

    python tools/behaviour_fingerprint.py [--real] [--head mlp] [--scope-floors 0.95,0.97] > before.json

`--head` and `--scope-floors` set what a change of defaults changed on purpose (e.g. issue 33's head and
out-of-scope floors), so the rest of the behaviour can be compared with the code before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks import pipeline
from lesion_tasks.model.config import make_config
from lesion_tasks.core import db
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.versions.registry import GateFloors  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402
from lesion_tasks.ops.synthetic import make_drop  # noqa: E402


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(settings: Settings, version: str) -> dict:
    store = open_store(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT threshold, metrics, review_rule, gate FROM model_versions "
                                   "WHERE model_version = :v"), {"v": version}).mappings().one()
        preds = conn.execute(sa.text("SELECT image_id, p_mel, entropy, mutual_info, predicted_label, needs_review, "
                                     "review_reasons, p_other FROM predictions WHERE model_version = :v "
                                     "ORDER BY image_id"), {"v": version}).all()
        samples = conn.execute(sa.text("SELECT image_id, p_mel_samples FROM prediction_samples WHERE model_version = :v "
                                       "ORDER BY image_id"), {"v": version}).all()
    engine.dispose()
    metrics = json.loads(store.get(f"models/{version}/metrics.json"))
    load = (lambda v: json.loads(v) if isinstance(v, str) else v)
    gate = load(row["gate"]) or {}
    return {
        "threshold": row["threshold"],
        "test_auc": metrics["test"]["auc"], "test_sensitivity": metrics["test"]["mel_sensitivity"],
        "metrics": _digest(metrics), "review_rule": _digest(load(row["review_rule"])),
        "gate_reasons": gate.get("reasons"),
        "head": hashlib.sha256(store.get(f"models/{version}/head.npz")).hexdigest()[:16],
        "predictions": _digest([list(p) for p in preds]), "n_predictions": len(preds),
        "mc_samples": _digest([[s[0], s[1].hex() if isinstance(s[1], bytes) else s[1]] for s in samples]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the demo profile on the shared ISIC 2017 drop")
    parser.add_argument("--head", default=None, help="the head kind (default: the profile's)")
    parser.add_argument("--scope-floors", default=None, help="OTHER,MALIGNANT flagged floors (default: the profile's)")
    args = parser.parse_args()
    chosen = {"head": args.head} if args.head else {}
    scope_floors = ({"out_of_scope_flagged": float(args.scope_floors.split(",")[0]),
                     "malignant_flagged": float(args.scope_floors.split(",")[1])} if args.scope_floors else {})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"LESION_HOME": f"{tmp}/synthetic"})
        db.upgrade(settings)
        ingest(str(make_drop(Path(tmp) / "labelled", n_images=300, seed=11)), settings)
        ingest(str(make_drop(Path(tmp) / "other", n_images=40, seed=13, melanoma_fraction=0.0, other_fraction=1.0)),
               settings)
        config = make_config("demo", backbone="tiny", image_size=64, weights="none", effective_resolution=48,
                                     floors=GateFloors(min_melanomas=5, **scope_floors), epochs=150, views=2, bootstrap=200,
                                     target_sensitivity=0.97, seed=1, **chosen)
        version = pipeline.run(settings, config, run_id="fingerprint")["model_version"]
        scoring.score(settings, version, run_id="fingerprint-night")
        out["synthetic_tiny"] = _fingerprint(settings, version)
        data = Path(os.environ.get("LESION_DATA_DIR", REPO.parent / "shared" / "data")) / "isic2017-mel-nv"
        if args.real and data.is_dir():
            settings = Settings.from_env({"LESION_HOME": f"{tmp}/real"})
            db.upgrade(settings)
            ingest(str(data), settings)
            config = make_config("demo", bootstrap=200, floors=GateFloors(**scope_floors), **chosen)
            version = pipeline.run(settings, config, run_id="fingerprint")["model_version"]
            scoring.score(settings, version, run_id="fingerprint-night", limit=300)
            out["isic2017_demo"] = _fingerprint(settings, version)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
