"""Near-duplicate grouping at volume: seconds to assign groups to N images whose perceptual hashes are
all identical (the worst case of the old quadratic index: 225 s for 100,000) and all distinct.
Prints one JSON object.

    .venv/bin/python bench/neardup_grouping.py [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lesion_tasks.ingest.neardup import NearDupIndex


def timed(hashes: list[int]) -> float:
    index = NearDupIndex()
    started = time.perf_counter()
    for i, h in enumerate(hashes):
        index.assign(f"ISIC_{i:07d}", h)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    n = parser.parse_args().n
    rng = np.random.default_rng(0)
    distinct = [int(h) for h in rng.integers(0, 2**63, n, dtype=np.int64)]
    same = timed([0x8F3C00FF00FF3C8F] * n)
    spread = timed(distinct)
    small = timed([0x8F3C00FF00FF3C8F] * (n // 10))
    print(json.dumps({"images": n, "shared_hash_seconds": round(same, 2), "distinct_hash_seconds": round(spread, 2),
                      "shared_hash_seconds_at_n_over_10": round(small, 3),
                      "growth_10x_images": round(same / max(small, 1e-9), 1)}))


if __name__ == "__main__":
    main()
