"""What the clinical additions cost nightly scoring, end to end (store reads, backbone, MC dropout,
Grad-CAM overlays, database upserts), printed as JSON.

On a scratch home with a trained champion and unscored images (it writes predictions there):

    LESION_HOME=... LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/scoring_cost.py [--chunk 200] [--rounds 3]

Alternating id ranges of equal size are scored with the champion as it is (effective resolution,
calibration, out-of-scope head) and with the same model stripped of the effective-resolution step and
the out-of-scope head (what scoring did before): the ratio of images per second is measured in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from lesion_tasks.versions import registry
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.core.db import engine_for  # noqa: E402
from lesion_tasks.core.schema import images, predictions  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env()
    engine = engine_for(settings)
    with engine.connect() as conn:
        row = registry.version(conn, None)
        scored = sa.select(predictions.c.image_id).where(predictions.c.model_version == row.model_version)
        ids = list(conn.scalars(sa.select(images.c.image_id).where(images.c.image_id.not_in(scored))
                                .order_by(images.c.image_id).limit(2 * args.chunk * args.rounds)))
    engine.dispose()
    if len(ids) < 2 * args.chunk * args.rounds:
        raise SystemExit(f"{len(ids)} unscored images: need {2 * args.chunk * args.rounds} (a scratch home)")
    full = scoring.load_scoring_model(open_store(settings), row)
    before = replace(full, scope_head=None, input_config=replace(full.input_config, effective_resolution=0, color_constancy=""))
    size = row.image_size
    full.run_backbone(np.zeros((1, size, size, 3), np.float32))  # trace once: both modes share the compiled pass
    totals = {"now": [0, 0.0], "before": [0, 0.0]}
    for k in range(args.rounds):
        for j, (name, model) in enumerate((("before", before), ("now", full)) if k % 2 == 0 else (("now", full), ("before", before))):
            part = ids[(2 * k + j) * args.chunk:(2 * k + j + 1) * args.chunk]
            result = scoring.score_range(settings, row.model_version, first=part[0], last=part[-1], model=model,
                                         run_id=f"bench-{name}")
            totals[name][0] += result["scored"]
            totals[name][1] += result["seconds"]
    rate = {name: n / s for name, (n, s) in totals.items()}
    print(json.dumps({"model_version": row.model_version, "images_per_round_and_mode": args.chunk, "rounds": args.rounds,
                      "images_per_second": {k: round(v, 1) for k, v in rate.items()},
                      "throughput_now_over_before": round(rate["now"] / rate["before"], 3),
                      "note": "before = same model without the effective-resolution step and the out-of-scope head"}, indent=1))


if __name__ == "__main__":
    main()
