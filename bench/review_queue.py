"""The review queue page at production volume, printed as JSON.

    .venv/bin/python bench/review_queue.py [--predictions N] [--versions V] [--db-url URL]

Fills a fresh database (SQLite under a temporary LESION_HOME unless --db-url points at an empty
PostgreSQL database) with N predictions over V model versions (the last one champion, ~1/3 of its
rows flagged for review, some reviewed), then times, in one run: the queue query for the first page
of 500 open cases, the whole page rendered by the app (Jinja, 500 rows), the nights page's SQL
aggregation, and the same query on a tenth of the rows, so the ratio says how the page scales.
The browser-measured load time of a 500-case queue is printed by tests/live/test_review_ui.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from lesion_tasks.core import db
from lesion_tasks.review import cases as review
from lesion_tasks.review import trends  # noqa: E402
from lesion_tasks.core.schema import champion_history, drops, images, model_versions, predictions, reviews  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402

CHUNK = 5000


def _fill(engine: sa.Engine, n_images: int, versions: int, reviewed: int) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(drops.insert(), [{"drop_id": "bench", "source": "bench", "layout": "bench", "fingerprint": "0" * 64,
                                       "status": "complete", "n_entries": n_images, "started_at": now}])
        conn.execute(model_versions.insert(), [
            {"model_version": f"v{k}", "created_at": now - timedelta(days=versions - k), "status": "candidate",
             "profile": "demo", "backbone": "tiny", "image_size": 64, "threshold": 0.4, "mc_samples": 50, "config": {},
             "environment": {}, "weights_source": "none", "lineage": {}, "code_version": "bench", "run_id": f"r{k}",
             "is_champion": k == versions - 1} for k in range(versions)])
        # each version promoted over the one before: the champion's queue also reads its predecessor's predictions
        # of the images it has not scored (versions.succession), the path right after a promotion
        conn.execute(champion_history.insert(), [
            {"model_version": f"v{k}", "event": "promoted", "previous": f"v{k - 1}" if k else None, "reason": "bench",
             "actor": "bench", "at": now - timedelta(days=versions - k)} for k in range(versions)])
    for start in range(0, n_images, CHUNK):
        ids = [f"ISIC_{i:07d}" for i in range(start, min(start + CHUNK, n_images))]
        with engine.begin() as conn:
            conn.execute(images.insert(), [
                {"image_id": i, "drop_id": "bench", "source_entry": f"{i}.jpg", "sha256": f"{i:0>64}"[-64:],
                 "label": None, "near_dup_group": i, "phash": "0" * 16, "width": 256, "height": 256, "n_bytes": 1,
                 "format": "JPEG", "original_uri": f"file:///x/{i}.jpg", "normalized_uri": f"file:///x/n/{i}.jpg",
                 "normalized_size": 224, "ingested_at": now} for i in ids])
            for k in range(versions):
                rows = []
                for j, i in enumerate(ids):
                    u = ((start + j) * 2654435761 + k * 97) % 10007 / 10007  # deterministic spread in [0, 1)
                    rows.append({"image_id": i, "model_version": f"v{k}", "p_mel": u, "predicted_label": "MEL" if u >= 0.4 else "NV",
                                 "threshold": 0.4, "entropy": 0.693 * (1 - abs(2 * u - 1)), "mutual_info": 0.05 * u,
                                 "mc_samples": 50, "gradcam_uri": f"file:///x/g/{i}.png", "needs_review": u >= 0.67,
                                 "review_reasons": "predicted_mel" if u >= 0.67 else None, "drop_id": "bench",
                                 "run_id": f"night-{(start + j) % 14}", "scored_at": now - timedelta(days=(start + j) % 14)})
                conn.execute(predictions.insert(), rows)
    champion = f"v{versions - 1}"
    with engine.connect() as conn:
        flagged = conn.scalars(sa.select(predictions.c.image_id).where(predictions.c.model_version == champion)
                               .where(predictions.c.needs_review).order_by(predictions.c.image_id).limit(reviewed)).all()
    with engine.begin() as conn:
        conn.execute(reviews.insert(), [
            {"submission_id": f"bench-{k:08d}", "image_id": i, "model_version": champion, "verdict": "agree", "label": "MEL",
             "reviewer": "bench", "reviewed_at": now, "p_mel": 0.9, "predicted_label": "MEL"} for k, i in enumerate(flagged)])


def _median_ms(fn, repeat: int = 5) -> float:
    fn()  # warm-up (connection, statement cache)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 1)


def measure(db_url: str | None, n_predictions: int, versions: int, home: Path) -> dict:
    settings = Settings.from_env({"LESION_HOME": str(home)}, db_url=db_url)
    db.upgrade(settings)
    engine = db.make_engine(settings.db_url)
    n_images = n_predictions // versions
    t = time.perf_counter()
    _fill(engine, n_images, versions, reviewed=max(1, n_images // 100))
    db.analyze(engine, ["predictions", "reviews", "images"])  # what the nightly run's summary does
    fill_s = time.perf_counter() - t
    page = review.QueueFilter(limit=500)

    def query():
        with engine.connect() as conn:
            return review.queue(conn, page)

    def nights():
        with engine.connect() as conn:
            return trends.nightly(conn, 14)

    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    async def anyone(_request):
        return Reviewer("bench", True, True)

    client = TestClient(create_app(lambda: settings, anyone, lambda nxt: "/login"))

    def render():
        response = client.get("/")
        assert response.status_code == 200 and response.text.count("data-image-id") == 500, response.text[:300]

    out = {"predictions": n_predictions, "versions": versions, "fill_s": round(fill_s, 1),
           "open_cases": query()["total"], "queue_query_ms": _median_ms(query),
           "queue_page_rendered_ms": _median_ms(render), "nights_query_ms": _median_ms(nights, 3)}
    engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=300_000)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--db-url", default=None, help="an empty database (default: SQLite in a temporary LESION_HOME)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp:
        small = measure(None, args.predictions // 10, args.versions, Path(tmp) / "small") if args.db_url is None else None
        big = measure(args.db_url, args.predictions, args.versions, Path(tmp) / "big")
    result = {"large": big, "small": small}
    if small:
        result["page_ratio_large_over_small"] = round(big["queue_page_rendered_ms"] / small["queue_page_rendered_ms"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    main()
