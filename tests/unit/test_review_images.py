"""The review UI's image routes stay within a memory bound, whatever the originals are (ITEM 4), and
the queue's paging parameters are bounded (ITEM 10).

A real drop is ingested into an embedded home (SQLite + local store): an 8000 x 7900 PNG (63.2 MP,
under ingest's 64 MP limit, PNG has no reduced-scale decoding), a 4000 x 3000 PNG (12 MP, decoded
for the large view) and an EXIF-rotated JPEG. The memory test runs the app in a child process and
reads the child's peak RSS (VmHWM, reset just before the requests) around 8 parallel requests.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from lesion_tasks.core import db
from lesion_tasks.review import cases as review
from lesion_tasks.core.schema import images
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import key_of, open_store
from tests import reliability

REPO = Path(__file__).resolve().parents[2]
BIG = "ISIC_9800001"      # 8000 x 7900 PNG, 63.2 MP
MID = "ISIC_9800002"      # 4000 x 3000 PNG, 12 MP
ROTATED = "ISIC_9800003"  # 2400 x 1600 JPEG stored sideways, EXIF orientation 6 (upright: 1600 x 2400)
PARALLEL = 8
# Peak RSS growth allowed for 8 parallel large views. Measured on the 2-core dev machine: before the fix
# the 63 MP PNG cost 3.0-4.2 GB (each request decoded the whole original and copied it twice, all at
# once) and the 12 MP one 0.88 GB; after it, 5 MB (never decoded: the normalised copy) and 130-145 MB
# (two decodes at a time).
RSS_BOUND_MB = 400


def _pattern(width: int, height: int) -> Image.Image:
    """Smooth colours and a fine texture: a PNG of a few MB that decodes to width x height x 3 bytes."""
    x, y = np.arange(width, dtype=np.uint32)[None, :], np.arange(height, dtype=np.uint32)[:, None]
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = (x * 255 // width).astype(np.uint8)
    rgb[..., 1] = (y * 255 // height).astype(np.uint8)
    rgb[..., 2] = ((x ^ y) & 0x3F).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from lesion_tasks.ingest.drop import ingest

    tmp = tmp_path_factory.mktemp("review-images")
    settings = Settings.from_env({"LESION_HOME": str(tmp / "home")})
    db.upgrade(settings)
    drop = tmp / "big-originals"
    drop.mkdir()
    _pattern(8000, 7900).save(drop / f"{BIG}.png", compress_level=6)
    _pattern(4000, 3000).save(drop / f"{MID}.png", compress_level=6)
    sideways = _pattern(2400, 1600)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    sideways.save(drop / f"{ROTATED}.jpg", quality=90, exif=exif)
    result = ingest(str(drop), settings, drop_id="big-originals")
    assert (result.accepted, result.quarantined) == (3, 0), result.as_json()
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = {r.image_id: r for r in conn.execute(sa.select(images))}
    engine.dispose()
    assert (rows[BIG].width, rows[BIG].height, rows[BIG].format) == (8000, 7900, "PNG")
    return settings, rows


def _client(settings):
    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    async def authenticate(request):
        return Reviewer("dr-images", True, False)

    return TestClient(create_app(lambda: settings, authenticate, lambda nxt: f"/login?next={nxt}"))


def _size(response) -> tuple[int, int]:
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as im:
        assert im.format == "JPEG"
        return im.size


# --- what the routes answer ------------------------------------------------------------------------

def test_large_views_are_bounded_and_upright(home):
    settings, rows = home
    client = _client(settings)
    assert _size(client.get(f"/image/{MID}?size=large")) == (1024, 768)  # decoded, downscaled
    assert _size(client.get(f"/image/{ROTATED}?size=large")) == (683, 1024)  # EXIF orientation applied
    assert _size(client.get(f"/image/{ROTATED}?size=thumb")) == (192, 192)
    # past the decoding budget: the normalised copy made at ingest, never the 63 MP original
    big = client.get(f"/image/{BIG}?size=large")
    store = open_store(settings)
    assert _size(big) == (224, 224)
    assert big.content == store.get(key_of(store, rows[BIG].normalized_uri))
    assert big.headers["x-lesion-view"] == "normalized"
    assert _size(client.get(f"/image/{BIG}?size=thumb")) == (192, 192)
    assert _size(client.get(f"/image/{BIG}")) == (224, 224)
    assert client.get("/image/ISIC_0000000?size=large").status_code == 404
    assert client.get(f"/image/{BIG}?size=huge").status_code == 400


def test_an_original_over_the_budget_is_never_decoded_even_if_its_row_says_otherwise(home, monkeypatch):
    """The budget is checked on the image's own header, not only on the row's width x height."""
    from PIL import ImageFile

    settings, rows = home
    client = _client(settings)
    engine = db.make_engine(settings.db_url)
    loads = []
    original_load = ImageFile.ImageFile.load

    def load(self):
        loads.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    try:
        with engine.begin() as conn:  # a row that lies about the size of its original
            conn.execute(images.update().where(images.c.image_id == BIG).values(width=800, height=790))
        assert _size(client.get(f"/image/{BIG}?size=large")) == (224, 224)
    finally:
        with engine.begin() as conn:
            conn.execute(images.update().where(images.c.image_id == BIG).values(width=8000, height=7900))
        engine.dispose()
    assert (8000, 7900) not in loads and all(w * h <= 16_000_000 for w, h in loads), loads


def test_parallel_decodes_are_capped(home, monkeypatch):
    """8 parallel large views of a 12 MP PNG: at most 2 are decoded at once, the others wait. No timing:
    the decodes are held until all 8 requests have asked for a slot, then the number decoding is read."""
    from PIL import ImageFile

    from lesion_tasks.review import previews

    settings, _ = home
    client = _client(settings)
    changed, release = threading.Condition(), threading.Event()
    state = {"asked": 0, "now": 0, "most": 0}
    original_load = ImageFile.ImageFile.load

    class CountedSlots:  # the real semaphore, counting who asked
        def __init__(self):
            self.inner = threading.BoundedSemaphore(previews.DECODE_SLOTS)

        def acquire(self, timeout=None):
            with changed:
                state["asked"] += 1
                changed.notify_all()
            return self.inner.acquire(timeout=timeout)

        def release(self):
            self.inner.release()

    def load(self):
        if self.size[0] * self.size[1] < 1_000_000 or getattr(self, "_counted", False):
            return original_load(self)
        self._counted = True
        with changed:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            changed.notify_all()
        try:
            release.wait(60)  # held until the test has seen every request ask for a slot
            return original_load(self)
        finally:
            with changed:
                state["now"] -= 1

    monkeypatch.setattr(previews, "_decode_slots", CountedSlots())
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(lambda: _size(client.get(f"/image/{MID}?size=large"))) for _ in range(PARALLEL)]
        with changed:
            assert changed.wait_for(lambda: state["asked"] == PARALLEL and state["now"] >= previews.DECODE_SLOTS, 60), state
            decoding = state["now"]
        release.set()
        sizes = [f.result() for f in futures]
    assert sizes == [(1024, 768)] * PARALLEL
    assert decoding == state["most"] == previews.DECODE_SLOTS == 2, state


def test_a_request_that_cannot_get_a_decode_slot_is_told_to_retry(home, monkeypatch):
    from lesion_tasks.review import previews

    settings, _ = home
    client = _client(settings)
    monkeypatch.setattr(previews, "DECODE_WAIT_S", 0.2)
    held = [previews._decode_slots.acquire(timeout=5) for _ in range(previews.DECODE_SLOTS)]
    try:
        assert all(held)
        busy = client.get(f"/image/{MID}?size=large")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert client.get(f"/image/{MID}").status_code == 200  # the normalised copy needs no decoding
    finally:
        for _ in held:
            previews._decode_slots.release()
    assert _size(client.get(f"/image/{MID}?size=large")) == (1024, 768)


CHILD = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from fastapi.testclient import TestClient
from lesion_tasks.review.web import Reviewer, create_app
from lesion_tasks.core.settings import Settings

home, path, warmup, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
settings = Settings.from_env({"LESION_HOME": home})

async def authenticate(request):
    return Reviewer("dr-memory", True, False)

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

client = TestClient(create_app(lambda: settings, authenticate, lambda nxt: "/login"))
assert client.get(warmup).status_code == 200  # imports, engine, store, Pillow's codecs
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak (VmHWM) starts again from the current RSS
baseline = status("VmRSS")
with ThreadPoolExecutor(n) as pool:
    answers = list(pool.map(lambda _: client.get(path), range(n)))
print(json.dumps({"baseline_kb": baseline, "peak_kb": status("VmHWM"),
                  "statuses": [a.status_code for a in answers], "bytes": [len(a.content) for a in answers]}))
"""


def _peak_growth_mb(settings, path: str) -> float:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak RSS")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", CHILD, str(settings.home), path, f"/image/{ROTATED}?size=thumb",
                             str(PARALLEL)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["statuses"] == [200] * PARALLEL, out
    growth = (out["peak_kb"] - out["baseline_kb"]) / 1024
    print(f"{path}: {PARALLEL} parallel requests, peak RSS {out['peak_kb'] / 1024:.0f} MB, "
          f"{growth:.0f} MB over the baseline {out['baseline_kb'] / 1024:.0f} MB")
    return growth


@pytest.mark.parametrize("image_id", [BIG, MID])
def test_peak_memory_of_parallel_large_views_is_bounded(home, image_id):
    settings, _ = home
    growth = _peak_growth_mb(settings, f"/image/{image_id}?size=large")
    assert growth < RSS_BOUND_MB, f"{PARALLEL} parallel large views of {image_id} grew the RSS by {growth:.0f} MB"
    if image_id == BIG:
        reliability.record("A viewer requesting huge originals in parallel", f"{PARALLEL} parallel large views of an "
                           "8000x7900 PNG (63 MP)", f"peak RSS growth under {RSS_BOUND_MB} MB; decodes capped",
                           f"{growth:.0f} MB over the baseline", 0, 0)


# --- ITEM 10: paging parameters ----------------------------------------------------------------------

def test_queue_filter_bounds_the_offset():
    assert review.QueueFilter(offset=review.MAX_OFFSET).offset == review.MAX_OFFSET
    with pytest.raises(ValueError, match=r"offset=100000000000000000000: expected 0 to 1000000000"):
        review.QueueFilter(offset=10**20)
    with pytest.raises(ValueError, match=r"offset=-1: expected 0 to"):
        review.QueueFilter(offset=-1)


@pytest.mark.parametrize("query, message", [
    (f"offset={10**20}", "offset=100000000000000000000: expected 0 to 1000000000"),
    (f"offset={2**63}", f"offset={2**63}: expected 0 to 1000000000"),
    (f"limit={10**20}", "limit=100000000000000000000: expected 1 to 1000"),
    ("offset=-5", "offset=-5: expected 0 to 1000000000"),
])
def test_huge_paging_values_are_a_clear_400(home, query, message):
    settings, _ = home
    response = _client(settings).get(f"/?{query}")
    assert response.status_code == 400 and response.text == message
    if query.startswith("offset=1000"):
        reliability.record("Absurd paging values in the review UI", "/?offset=10**20, 2**63, -5; limit=10**20",
                           "a 400 naming the value and the range", "400 with the message; no 500", 0, 0)


def test_an_offset_past_sqlite_integers_never_reaches_the_database(home):
    """The cause of the 500: SQLite (and PostgreSQL's BIGINT) cannot bind 10**20."""
    settings, _ = home
    engine = db.make_engine(settings.db_url)
    try:
        with engine.connect() as conn, pytest.raises(OverflowError):
            conn.execute(sa.select(images.c.image_id).offset(10**20)).all()
    finally:
        engine.dispose()
    response = _client(settings).get("/?offset=" + "9" * 5000)
    assert response.status_code in (400, 422), (response.status_code, response.text[:200])
