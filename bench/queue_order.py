"""What the first page of the review queue holds at a new site's night: true melanomas among the first 25 rows,
in the old default order (`decision`: the least sure decision first) and the new one (`priority`), printed as JSON
(`p_mel_order`: the highest p(MEL) first, for reference).

    LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/queue_order.py [--home DIR] [--data ../shared/data]
        [--site isic2017-mel-nv] [--nights 5] [--night-size 360] [--seed 0]

--home: a home where the demo profile was trained with the site held out as a new site and all of its images were
scored as a night scores them (`bench/site_adaptation.py --k 0 [--k ...] --home DIR` makes one; there only its
validation sample may carry labels). Only its database is read, from a copy (the home is never changed).
Without --home, one is built first in a temporary folder by `bench/site_adaptation.py --k 0` (≈ 4 min).
The site's truth comes from the shared drops' ground-truth CSVs (`--data`). A night is `--night-size` of the
site's unlabelled images, drawn without replacement (`--nights` disjoint draws); on the copy each night's
predictions get a drop id of their own, and the page is `cases.queue` as the UI's default shows it (open,
unlabelled, the site filter) restricted to that drop. `view_agrees`: `v_review_queue.queue_rank` lists the
night's open unlabelled cases in the same order as the UI's default. The target: at least twice the site's
melanoma rate among the first 25 rows, and (issue 37) at least 10 of 25 at ISIC 2017 held out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from lesion_tasks.core import db  # noqa: E402
from lesion_tasks.core.schema import images, predictions, splits  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.review import cases  # noqa: E402

PAGE = 25
HAM10000 = ("ISIC_0024306", "ISIC_0034320")  # never trained on


def truth(data: Path) -> dict[str, bool]:
    """{image id: is melanoma} from every shared drop's one-hot ground-truth CSV."""
    out: dict[str, bool] = {}
    for table in sorted(data.glob("*/*GroundTruth*.csv")):
        with table.open(newline="") as fh:
            out.update({row["image"]: float(row["MEL"]) >= 0.5 for row in csv.DictReader(fh)})
    return out


def build_home(site: str, data: Path, home: Path) -> None:
    """The site held out, the demo profile trained on the other drops and the site's images scored (k = 0)."""
    cmd = [sys.executable, str(REPO / "bench" / "site_adaptation.py"), "--site", site, "--k", "0", "--home", str(home),
           "--data", str(data), "--bootstrap", "20"]
    print(f"no --home: building one ({' '.join(cmd)})", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def first_page(conn: sa.Connection, night: str, site: str, sort: str) -> list[str]:
    f = cases.QueueFilter(drop_id=night, site=site, sort=sort, labelled=cases.DEFAULT_LABELLED, limit=cases.MAX_PAGE)
    return [c["image_id"] for c in cases.queue(conn, f)["cases"]]


def measure(home: Path, data: Path, site: str, nights: int, size: int, seed: int) -> dict:
    is_mel = truth(data)
    settings = Settings.from_env({"LESION_HOME": str(home)})
    db.upgrade(settings)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        version = cases.resolve_version(conn, None)
        if version is None:
            raise SystemExit(f"{home}: no champion: expected a home where the site's images were scored")
        trained_on_ham = conn.scalar(sa.select(sa.func.count()).select_from(splits).where(
            splits.c.split == "train", splits.c.image_id.between(*HAM10000)))
        if trained_on_ham:
            raise SystemExit(f"{home}: {trained_on_ham} HAM10000 images in the training split: refused")
        site_ids = conn.scalars(sa.select(images.c.image_id).where(images.c.site == site)).all()
        unlabelled = sorted(conn.scalars(sa.select(images.c.image_id).where(images.c.site == site, images.c.label.is_(None))))
    known = [i for i in site_ids if i in is_mel]
    if not known or len(unlabelled) < nights * size:
        raise SystemExit(f"site {site!r}: {len(site_ids)} images ({len(known)} with truth in {data}, "
                         f"{len(unlabelled)} unlabelled): expected at least --nights x --night-size = {nights * size} unlabelled")
    rate = sum(is_mel[i] for i in known) / len(known)
    drawn = np.random.default_rng(seed).permutation(unlabelled)
    rows, orders = [], {"old_order": "decision", "new_order": cases.DEFAULT_SORT, "p_mel_order": "p_mel"}
    found: dict[str, list[int]] = {k: [] for k in orders}
    ranks: dict[str, list[float]] = {k: [] for k in orders}
    for k in range(nights):
        ids, night = [str(i) for i in drawn[k * size:(k + 1) * size]], f"queue-order-night-{k}"
        with engine.begin() as conn:
            for start in range(0, len(ids), 500):
                conn.execute(predictions.update().where(predictions.c.model_version == version,
                                                        predictions.c.image_id.in_(ids[start:start + 500]))
                             .values(drop_id=night))
        with engine.connect() as conn:
            pages = {key: first_page(conn, night, site, sort) for key, sort in orders.items()}
            ranked = conn.scalars(sa.text("SELECT image_id FROM v_review_queue WHERE drop_id = :d AND known_label IS NULL "
                                          "AND queue_rank IS NOT NULL ORDER BY queue_rank"), {"d": night}).all()
        queue = pages["new_order"]
        for key, page in pages.items():
            found[key].append(sum(is_mel.get(i, False) for i in page[:PAGE]))
            mel_ranks = [r + 1 for r, i in enumerate(page) if is_mel.get(i, False)]
            ranks[key].append(statistics.median(mel_ranks) if mel_ranks else None)
        rows.append({"night": night, "images": len(ids), "melanomas": sum(is_mel.get(i, False) for i in ids),
                     "open_cases": len(queue), "melanomas_in_queue": sum(is_mel.get(i, False) for i in queue),
                     "view_agrees": list(ranked) == queue})
    engine.dispose()
    out = {"site": site, "model_version": version, "melanoma_rate": round(rate, 4), "site_images": len(site_ids),
           "night_size": size, "nights": rows}
    for key, sort in orders.items():
        out[key] = {"sort": sort, "mel_in_first_25": found[key], "mean": round(statistics.mean(found[key]), 2),
                    "min": min(found[key]), "median_melanoma_rank": ranks[key]}
    out["target"] = {"text": ">= 10 of 25 (ISIC 2017 held out), and >= twice the site's melanoma rate",
                     "twice_the_rate": round(2 * rate * PAGE, 1),
                     "met": out["new_order"]["mean"] >= max(10, 2 * rate * PAGE) if site == "isic2017-mel-nv"
                     else out["new_order"]["mean"] >= 2 * rate * PAGE}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default="", help="a scored home (see above); default: build one")
    parser.add_argument("--data", default=os.environ.get("LESION_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--site", default="isic2017-mel-nv")
    parser.add_argument("--nights", type=int, default=5)
    parser.add_argument("--night-size", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="queue-order-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "built"
        if not args.home:
            build_home(args.site, data, home)
        if not (home / "lesion.db").is_file():
            raise SystemExit(f"--home {home}: no lesion.db there (build one: bench/site_adaptation.py --k 0 --home DIR)")
        copy = Path(tmp) / "copy"
        copy.mkdir()
        for name in ("lesion.db", "lesion.db-wal"):  # the queue reads rows only: the store stays behind
            if (home / name).is_file():
                shutil.copyfile(home / name, copy / name)
        result = measure(copy, data, args.site, args.nights, args.night_size, args.seed)
    print(json.dumps({"home": args.home or "(built)", **result}, indent=1))


if __name__ == "__main__":
    main()
