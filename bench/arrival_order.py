"""The same drops, two arrival orders, the same figures: printed as JSON.

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/arrival_order.py [--data ../shared/data]
        [--home DIR] [--profile demo]

Home "at_once": the three labelled shared drops ingested, then one retrain (what `lesion ingest` of all three
then `lesion train` does). Home "one_by_one": the drops arrive in the reverse order with the split extended
after each (what `incoming/` with a retrain between drops does). Both train the same profile on the embedded
defaults (SQLite + local store). Printed: per home the split counts and the test metrics (pooled and per
site), whether every image has the same split in both homes, and whether the test metrics are equal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks import pipeline  # noqa: E402
from lesion_tasks.core import db  # noqa: E402
from lesion_tasks.core.db import engine_for  # noqa: E402
from lesion_tasks.core.schema import splits as splits_table  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.ingest.drop import ingest  # noqa: E402
from lesion_tasks.training import retrain  # noqa: E402
from lesion_tasks.model.config import make_config  # noqa: E402

import sqlalchemy as sa  # noqa: E402

DROPS = ("isic2017-mel-nv", "isic-archive-uda1-sample", "isic2019-84px")
KEYS = ("n", "n_mel", "auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy")


def run(home: Path, data: Path, order: tuple[str, ...], split_each: bool, profile: str) -> dict:
    settings = Settings.from_env(home=home)
    db.upgrade(settings)
    config = make_config(profile)
    started = time.monotonic()
    for name in order:
        ingest(str(data / name), settings)
        if split_each:
            retrain.prepare_split(settings, config)  # what lesion_retrain's first task does
    result = pipeline.run(settings, config, run_id="arrival-order")
    engine = engine_for(settings)
    with engine.connect() as conn:
        assigned = dict(conn.execute(sa.select(splits_table.c.image_id, splits_table.c.split)).all())
    engine.dispose()
    test = result["metrics"]["test"]
    return {"order": list(order), "split_after_each_drop": split_each, "split": result["split"],
            "promoted": result["promoted"], "gate_reasons": result["gate"]["reasons"], "threshold": result["threshold"],
            "test": {k: test.get(k) for k in KEYS},
            "test_by_site": {s: {k: m.get(k) for k in KEYS} for s, m in test.get("by_site", {}).items()},
            "seconds": round(time.monotonic() - started, 1), "_splits": assigned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("LESION_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--home", default="")
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    root = Path(args.home or tempfile.mkdtemp(prefix="arrival-order-"))
    data = Path(args.data)
    homes = {"at_once": run(root / "at_once", data, DROPS, False, args.profile),
             "one_by_one": run(root / "one_by_one", data, tuple(reversed(DROPS)), True, args.profile)}
    a, b = (homes[k].pop("_splits") for k in ("at_once", "one_by_one"))
    moved = sorted(i for i in set(a) | set(b) if a.get(i) != b.get(i))
    print(json.dumps({"home": str(root), "profile": args.profile, **homes, "images_with_another_split": len(moved),
                      "examples": moved[:10], "same_test_metrics": homes["at_once"]["test"] == homes["one_by_one"]["test"]},
                     indent=1))


if __name__ == "__main__":
    main()
