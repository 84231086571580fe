"""One viewer flooding the review UI with image requests, and what the server's other routes feel; JSON.

    .venv/bin/python bench/review_flood.py [--flood 100] [--huge 3] [--decodable 3] [--rounds 1]

A real drop is ingested into a fresh embedded home (SQLite + local store): `--huge` 8000x8000 PNG
originals (64 MP, ingest's limit: past the decoding budget, shown as their normalised copy) and
`--decodable` 4000x4000 PNGs (16 MP: decoded for the large view), each with a stored Grad-CAM map of a
champion's prediction. The review app runs under uvicorn in a child process (as in Airflow's API server:
one event loop, anyio's pool of 40 worker threads for sync routes). One viewer sends `--flood`
concurrent requests (threads of httpx clients), first large views (`/image/<id>?size=large`), then
on-demand overlays (`/overlay/<version>/<id>`), while another user loads the queue page (a plain sync
route of the same app) again and again. Printed: the flood's status counts, the queue page's median
and worst time during the floods, and the server's RSS before and after (`--rounds` floods each).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from PIL import Image  # noqa: E402

from lesion_tasks.core import db, keys  # noqa: E402
from lesion_tasks.core.schema import images, model_versions, predictions  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402
from lesion_tasks.model import gradcam  # noqa: E402
from lesion_tasks.ops.synthetic import textured  # noqa: E402

VERSION = "flood-v1"


def _home(root: Path, huge: int, decodable: int) -> tuple[Settings, list[str]]:
    from lesion_tasks.ingest.drop import ingest

    settings = Settings.from_env({"LESION_HOME": str(root / "home")})
    db.upgrade(settings)
    drop = root / "flood-drop"
    drop.mkdir()
    sides = [8000] * huge + [4000] * decodable
    turns = [None, *Image.Transpose]  # each image another way round: not a duplicate of the others
    assert len(sides) <= len(turns), f"{len(sides)} images: expected at most {len(turns)}"
    for k, side in enumerate(sides):
        picture = textured(side, side)
        (picture.transpose(turns[k]) if turns[k] is not None else picture).save(drop / f"ISIC_97{k:05d}.png", compress_level=6)
    result = ingest(str(drop), settings, drop_id="flood")
    assert (result.accepted, result.quarantined) == (len(sides), 0), result.as_json()
    store, engine, now = open_store(settings), db.make_engine(settings.db_url), datetime.now(UTC)
    heat = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    with engine.begin() as conn:
        rows = conn.execute(sa.select(images.c.image_id, images.c.drop_id).order_by(images.c.image_id)).all()
        conn.execute(model_versions.insert().values(
            model_version=VERSION, created_at=now, status="champion", profile="demo", backbone="tiny", image_size=224,
            threshold=0.5, mc_samples=2, config={}, environment={}, weights_source="none", lineage={},
            code_version="bench", run_id="bench", is_champion=True))
        conn.execute(predictions.insert(), [
            {"image_id": r.image_id, "model_version": VERSION, "p_mel": 0.6, "predicted_label": "MEL", "threshold": 0.5,
             "entropy": 0.67, "mutual_info": 0.01, "mc_samples": 2, "needs_review": True, "review_reasons": "predicted_mel",
             "drop_id": r.drop_id, "run_id": "bench", "scored_at": now,
             "gradcam_uri": store.put(keys.gradcam_map(VERSION, r.drop_id, r.image_id), gradcam.map_bytes(heat))}
            for r in rows])
    engine.dispose()
    return settings, [r.image_id for r in rows]


def _serve(home: str, port: int) -> None:
    """The child: the review app under uvicorn; the caller names itself in X-Bench-User."""
    import uvicorn

    from lesion_tasks.review.web import Reviewer, create_app

    settings = Settings.from_env({"LESION_HOME": home})

    async def authenticate(request):
        return Reviewer(request.headers.get("x-bench-user", "dr-bench"), True, False)

    app = create_app(lambda: settings, authenticate, lambda nxt: "/login")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", backlog=2048)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def _flood(base: str, paths: list[str], n: int, timings: list[float], page_statuses: Counter) -> Counter:
    """`n` concurrent requests of one viewer (round robin over `paths`) while another user loads the queue
    page again and again; its times go to `timings`, its statuses to `page_statuses`."""
    done = threading.Event()

    def queue_page() -> None:
        with httpx.Client(base_url=base, timeout=120, headers={"X-Bench-User": "dr-other"}) as client:
            while not done.is_set():
                started = time.perf_counter()
                page_statuses[client.get("/").status_code] += 1
                timings.append(time.perf_counter() - started)

    def one(k: int) -> int:
        with httpx.Client(base_url=base, timeout=120, headers={"X-Bench-User": "dr-flood"}) as client:
            try:
                return client.get(paths[k % len(paths)]).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

    timer = threading.Thread(target=queue_page)
    timer.start()
    try:
        with ThreadPoolExecutor(n) as pool:
            statuses = Counter(pool.map(one, range(n)))
    finally:
        done.set()
        timer.join()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=100, help="concurrent requests of the one viewer")
    parser.add_argument("--huge", type=int, default=3, help="8000x8000 PNG originals")
    parser.add_argument("--decodable", type=int, default=3, help="4000x4000 PNG originals")
    parser.add_argument("--rounds", type=int, default=1, help="floods of each kind")
    parser.add_argument("--serve", nargs=2, metavar=("HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return _serve(args.serve[0], int(args.serve[1]))
    with tempfile.TemporaryDirectory(prefix="review-flood-") as tmp:
        settings, ids = _home(Path(tmp), args.huge, args.decodable)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(settings.home), str(port)],
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)  # starting up
            quiet = [httpx.get(f"{base}/", timeout=30) for _ in range(5)]  # warm: imports, engine, templates
            assert all(r.status_code == 200 for r in quiet)
            rss_before = _rss_mb(server.pid)
            large, overlay = [f"/image/{i}?size=large" for i in ids], [f"/overlay/{VERSION}/{i}" for i in ids]
            during: list[float] = []
            pages: Counter = Counter()
            statuses = {"large": Counter(), "overlay": Counter()}
            for _ in range(args.rounds):
                statuses["large"] += _flood(base, large, args.flood, during, pages)
                statuses["overlay"] += _flood(base, overlay, args.flood, during, pages)
            rss_after = _rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps({
        "flood_requests": 2 * args.rounds * args.flood,
        "status_counts": {kind: {str(k): v for k, v in sorted(c.items(), key=str)} for kind, c in statuses.items()},
        "sync_route_requests": len(during), "sync_route_statuses": {str(k): v for k, v in pages.items()},
        "sync_route_p50_s": round(statistics.median(during), 3) if during else None,
        "sync_route_max_s": round(max(during), 3) if during else None,
        "rss_mb_before": round(rss_before), "rss_mb_after": round(rss_after),
        "images": {"8000x8000": args.huge, "4000x4000": args.decodable}, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
