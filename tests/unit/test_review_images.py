"""The review UI's image routes stay within a memory bound, whatever the originals are (ITEM 4), a flood
of them from one viewer holds none of the server's worker threads and is refused past that viewer's
queue (probe finding 1), and the queue's paging parameters are bounded (ITEM 10).

A real drop is ingested into an embedded home (SQLite + local store): an 8000 x 7900 PNG (63.2 MP,
under ingest's 64 MP limit, PNG has no reduced-scale decoding), a 4000 x 3000 PNG (12 MP, decoded
for the large view) and an EXIF-rotated JPEG. The memory test runs the app in a child process and
reads the child's peak RSS (VmHWM, reset just before the requests) around 8 parallel requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from lesion_tasks.core import db
from lesion_tasks.review import cases as review
from lesion_tasks.core.schema import images
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import key_of, open_store
from lesion_tasks.ops.synthetic import textured
from lesion_tasks.review import previews
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
HELD_PIXELS = 500_000  # `HeldDecodes` holds decodes of at least this many pixels (not the 224 px normalised copies)
FLOOD = 100


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from lesion_tasks.ingest.drop import ingest

    tmp = tmp_path_factory.mktemp("review-images")
    settings = Settings.from_env({"LESION_HOME": str(tmp / "home")})
    db.upgrade(settings)
    drop = tmp / "big-originals"
    drop.mkdir()
    textured(8000, 7900).save(drop / f"{BIG}.png", compress_level=6)
    textured(4000, 3000).save(drop / f"{MID}.png", compress_level=6)
    sideways = textured(2400, 1600)
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


@pytest.fixture(autouse=True)
def fresh_gate(monkeypatch):
    """Every test starts with the decode slots free."""
    monkeypatch.setattr(previews, "gate", previews.Gate())


def _app(settings):
    from lesion_tasks.review.web import Reviewer, create_app

    async def authenticate(request):  # the caller may name another user
        return Reviewer(request.headers.get("x-test-user", "dr-images"), True, False)

    return create_app(lambda: settings, authenticate, lambda nxt: f"/login?next={nxt}")


def _client(settings):
    from fastapi.testclient import TestClient

    return TestClient(_app(settings))


class HeldDecodes:
    """Decodes of images of at least HELD_PIXELS are held inside Pillow's `load` until `release` is set;
    `now` counts those held, `most` the most at once."""

    def __init__(self, monkeypatch):
        from PIL import ImageFile

        self.changed, self.release = threading.Condition(), threading.Event()
        self.now = self.most = 0
        original_load = ImageFile.ImageFile.load

        def load(image):
            if image.size[0] * image.size[1] < HELD_PIXELS or getattr(image, "_counted", False):
                return original_load(image)
            image._counted = True
            with self.changed:
                self.now += 1
                self.most = max(self.most, self.now)
                self.changed.notify_all()
            try:
                self.release.wait(60)
                return original_load(image)
            finally:
                with self.changed:
                    self.now -= 1

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)

    def wait_until(self, predicate) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, 60), f"{self.now} decodes held"


def _gate_reaches(counts: dict) -> None:
    gate = previews.gate
    with gate._changed:
        assert gate._changed.wait_for(lambda: gate.counts() == counts, 60), gate.counts()


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
    """8 parallel large views of a 12 MP PNG by 8 users: at most 2 are decoded at once, the others wait for
    their turn (and then find the view cached). No timing: the decodes are held until all 8 requests have
    asked for a turn, then the number decoding is read."""
    settings, _ = home
    client = _client(settings)
    decodes = HeldDecodes(monkeypatch)
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(lambda user: _size(client.get(f"/image/{MID}?size=large", headers={"X-Test-User": user})),
                               f"dr-{k}") for k in range(PARALLEL)]
        try:
            decodes.wait_until(lambda: decodes.now >= previews.DECODE_SLOTS)
            _gate_reaches({"decoding": previews.DECODE_SLOTS, "waiting": PARALLEL - previews.DECODE_SLOTS})
            decoding = decodes.now
        finally:
            decodes.release.set()
        sizes = [f.result() for f in futures]
    assert sizes == [(1024, 768)] * PARALLEL
    assert decoding == decodes.most == previews.DECODE_SLOTS == 2


def _hold_both_slots(client, decodes: HeldDecodes, pool: ThreadPoolExecutor) -> list:
    """Two other users' large views of the rotated JPEG (decoded at half scale: 0.96 MP), held mid-decode."""
    holders = [pool.submit(client.get, f"/image/{ROTATED}?size=large", headers={"X-Test-User": user})
               for user in ("holder-a", "holder-b")]
    decodes.wait_until(lambda: decodes.now == previews.DECODE_SLOTS)
    return holders


def test_a_request_that_cannot_get_a_decode_slot_is_told_to_retry(home, monkeypatch):
    settings, _ = home
    client = _client(settings)
    monkeypatch.setattr(previews, "DECODE_WAIT_S", 0.2)
    decodes = HeldDecodes(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        holders = _hold_both_slots(client, decodes, pool)
        try:
            busy = client.get(f"/image/{MID}?size=large")
            plain = client.get(f"/image/{MID}")  # the normalised copy needs no decoding
        finally:
            decodes.release.set()
        assert [_size(h.result()) for h in holders] == [(683, 1024)] * 2
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5", busy.text
    assert "no slot came free within 0.2 s" in busy.text
    assert plain.status_code == 200
    assert _size(client.get(f"/image/{MID}?size=large")) == (1024, 768)


def test_a_second_large_view_of_an_image_is_served_from_the_cache(home, monkeypatch):
    """Large views are cached like overlays: once made, asking again takes no decode slot, so it is served
    while both slots are held (before, it waited DECODE_WAIT_S for one, then got 503)."""
    settings, rows = home
    client = _client(settings)
    monkeypatch.setattr(previews, "DECODE_WAIT_S", 2.0)
    first, big = client.get(f"/image/{MID}?size=large"), client.get(f"/image/{BIG}?size=large")
    assert (first.headers["x-lesion-view"], big.headers["x-lesion-view"]) == ("original", "normalized")
    decodes = HeldDecodes(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        holders = _hold_both_slots(client, decodes, pool)
        try:
            again, big_again = client.get(f"/image/{MID}?size=large"), client.get(f"/image/{BIG}?size=large")
            held = decodes.now
        finally:
            decodes.release.set()
        assert [h.result().status_code for h in holders] == [200, 200]
    assert held == previews.DECODE_SLOTS
    assert (again.status_code, again.headers.get("x-lesion-view"), again.content) == (200, "original", first.content)
    assert (big_again.status_code, big_again.headers.get("x-lesion-view"), big_again.content) == (200, "normalized", big.content)
    store = open_store(settings)
    assert big.content == store.get(key_of(store, rows[BIG].normalized_uri))


def test_a_flood_of_large_views_from_one_viewer_holds_no_worker_thread(home, monkeypatch):
    """The probe's flood: one viewer sends 100 large views at once while both decode slots are busy, to the app
    on one event loop with anyio's pool of worker threads for sync routes (as in Airflow's API server, whose
    task heartbeat and state routes share that pool). Past its own queue the viewer is refused at once (429),
    the requests that wait hold no worker thread, and a sync page answers while the slots are still held.
    Before: each request held a thread while it waited (DECODE_WAIT_S, shortened here) and the page waited
    behind them."""
    import anyio
    import httpx

    settings, _ = home
    monkeypatch.setattr(previews, "DECODE_WAIT_S", 10.0)
    decodes = HeldDecodes(monkeypatch)
    app = _app(settings)

    async def flood() -> dict:
        threads = anyio.to_thread.current_default_thread_limiter()
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                     timeout=120) as client:
            def get(path: str, user: str) -> asyncio.Future:
                return asyncio.ensure_future(client.get(path, headers={"X-Test-User": user}))

            holders = [get(f"/image/{MID}?size=large", user) for user in ("holder-a", "holder-b")]
            try:
                # waited for in a thread outside anyio's pool
                await loop.run_in_executor(None, decodes.wait_until, lambda: decodes.now == previews.DECODE_SLOTS)
                viewer = [get(f"/image/{(ROTATED, BIG, MID)[k % 3]}?size=large", "dr-flood") for k in range(FLOOD)]
                while sum(t.done() for t in viewer) < FLOOD - previews.USER_WAITING:
                    await asyncio.wait([t for t in viewer if not t.done()], return_when=asyncio.FIRST_COMPLETED)
                seen = {"threads_busy": threads.borrowed_tokens, "gate": previews.gate.counts()}
                page = await get("/", "dr-other")
                seen.update(page=page.status_code, held_after_page=decodes.now)
            finally:
                decodes.release.set()
            answers = await asyncio.gather(*viewer)
            seen["holders"] = [(h.status_code, h.headers.get("x-lesion-view")) for h in await asyncio.gather(*holders)]
        refused = [a for a in answers if a.status_code == 429]
        seen["statuses"] = dict(sorted(Counter(a.status_code for a in answers).items()))
        seen["refusals_say_so"] = all(a.headers["retry-after"] == "5" and "user 'dr-flood'" in a.text for a in refused)
        return seen

    seen = asyncio.run(flood())
    waiting = previews.USER_WAITING
    assert seen["statuses"] == {200: waiting, 429: FLOOD - waiting}, seen
    assert seen["refusals_say_so"], seen
    assert seen["gate"] == {"decoding": 2, "waiting": waiting}, seen
    assert seen["threads_busy"] == previews.DECODE_SLOTS, seen  # the two held decodes; none for the waiting
    assert seen["page"] == 200 and seen["held_after_page"] == previews.DECODE_SLOTS, seen
    assert seen["holders"] == [(200, "original")] * 2, seen
    reliability.record("A flood of large views from one viewer", f"{FLOOD} concurrent large views by one viewer while "
                       "both decode slots were busy; the app on one event loop with anyio's 40 worker threads",
                       "the viewer's excess refused at once (429); waiting requests hold no worker thread; sync "
                       "routes still answer", f"{FLOOD - waiting} refused 429 at once, {waiting} waited and got 200; "
                       f"{seen['threads_busy']} worker threads busy (the held decodes); the queue page answered "
                       "while the slots were held", 0, 0)


def test_the_gate_takes_turns_per_user_and_refuses_past_its_bounds(monkeypatch):
    """One user decodes one image at a time (another user gets the other slot, and a freed one before the
    first user's earlier requests), waits in a queue of USER_WAITING (then TooMany), all users in one of
    DECODE_WAITING (then Busy); a waiter that times out or goes away leaves the queue."""
    gate = previews.Gate(2)
    holds: dict[str, asyncio.Event] = {}
    order: list[str] = []

    async def scenario() -> None:
        async def ask(name: str) -> None:
            holds[name] = asyncio.Event()
            async with gate.turn(name.split("#")[0]):
                order.append(name)
                await holds[name].wait()

        def start(name: str) -> asyncio.Future:
            return asyncio.ensure_future(ask(name))

        async def until(predicate) -> None:
            for _ in range(1000):
                if predicate():
                    return
                await asyncio.sleep(0)
            raise AssertionError((gate.counts(), order))

        tasks = [start("a#1")]
        await until(lambda: order == ["a#1"])
        tasks += [start(f"a#{k}") for k in range(2, 2 + previews.USER_WAITING)]  # a slot is free, but not for "a"
        await until(lambda: gate.counts() == {"decoding": 1, "waiting": previews.USER_WAITING})
        tasks.append(start("b#1"))
        await until(lambda: order == ["a#1", "b#1"])  # another user gets the free slot
        with pytest.raises(previews.TooMany, match="user 'a' has 1 image"):
            await ask("a#late")
        tasks += [start(f"u{k}#1") for k in range(previews.DECODE_WAITING - previews.USER_WAITING)]
        await until(lambda: gate.counts()["waiting"] == previews.DECODE_WAITING)
        with pytest.raises(previews.Busy, match=f"{previews.DECODE_WAITING} requests waiting"):
            await ask("d#1")
        gone = tasks.pop()
        gone.cancel()  # the client went away: it leaves the queue
        await until(lambda: gate.counts()["waiting"] == previews.DECODE_WAITING - 1)
        monkeypatch.setattr(previews, "DECODE_WAIT_S", 0.01)
        with pytest.raises(previews.Busy, match="no slot came free within 0.01 s"):
            await ask("e#1")
        monkeypatch.setattr(previews, "DECODE_WAIT_S", 30.0)
        assert gate.counts() == {"decoding": 2, "waiting": previews.DECODE_WAITING - 1}
        holds["b#1"].set()
        await until(lambda: len(order) == 3)
        assert order[2] == "u0#1"  # not "a#2", first in the queue: "a" is decoding already
        holds["a#1"].set()
        await until(lambda: len(order) == 4)
        assert order[3] == "a#2"  # "a" may decode again
        for hold in holds.values():
            hold.set()
        await asyncio.gather(*tasks)
        assert len(order) == len(tasks) and gate.counts() == {"decoding": 0, "waiting": 0}

    asyncio.run(scenario())


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
