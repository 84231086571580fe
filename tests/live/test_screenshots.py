"""The README's screenshots of the review UI, taken from real dermoscopy: `make screenshots` runs this
module with LESION_SCREENSHOT_DIR=docs/screenshots (default build/screenshots).

A small real drop is cut from the ISIC 2017 drop of LESION_DATA_DIR (skipped, saying so, without it):
REAL_MEL + REAL_NV images with their ground-truth rows and REAL_UNLABELLED images whose rows are left out
(sent without labels, as clinic images are), in the drop's own layout (images/ + ISIC_GroundTruth.csv).
It is ingested into the live server's home under a drop id of its own, a tiny test model is trained
(on everything labelled there: the live fixture's synthetic drop and these real images) and promoted by
the gate, or by a recorded manual override if the gate refuses it, and it scores the real drop (afterwards
the champion found before, if any, is champion again). Chromium, logged in as admin, opens the queue inside
Airflow filtered to that drop (by default the open cases among the images without labels: those the model
flags) and the queue's first case: `review-queue.jpg` and `review-case.jpg` (JPEG, < 300 KB each).

It shares the live home: the review plugin reads the Connection `lesion_db`, fixed when the standalone
starts, so a database of its own would need a second standalone. What it leaves there: a drop, a retired
model version and that version's predictions of the drop; the champion found before is champion again.
The other live tests count what the database holds when they run, so their counts hold in any order, but
a later retrain would split the real labelled images in with the synthetic ones, and the champion, trained
on synthetic blobs, then measures weaker on test: test_version_collision's one-epoch run could pass the
gate against it. Hence it runs after every other live test: `tests/live/conftest.py` orders the modules
marked `pytestmark = pytest.mark.after_retrains` last, whatever the file names.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from urllib.parse import urljoin

import pytest
import sqlalchemy as sa

from lesion_tasks import pipeline
from lesion_tasks.assessment import assess
from lesion_tasks.versions import registry
from lesion_tasks.review import cases as review
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, model_versions
from tests.live.browser import SHOTS, chromium
from tests.live.browser import login as _login
from tests.live.browser import until as _until
from tests.live.test_review_ui import TINY

REAL_DROP = "isic2017-sample"
REAL_MEL, REAL_NV, REAL_UNLABELLED = 24, 24, 36  # the unlabelled: a third of them melanomas
RUN_ID = "readme-screenshots"
pytestmark = [pytest.mark.realdata, pytest.mark.after_retrains]
MAX_BYTES = 300_000


def _spread(rows: list[dict], n: int) -> list[dict]:
    """`n` rows evenly spread over `rows` (deterministic: the drop is the same at every run)."""
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def make_real_drop(source: Path, dest: Path) -> dict[str, list[str]]:
    """A small drop in the ISIC challenge layout, cut from `source` (isic2017-mel-nv): images/ and the
    ground-truth CSV rows of the labelled ones only. Near-duplicate pairs are left out."""
    with (source / "provenance.csv").open(newline="") as f:
        near_dups = {r["image"] for r in csv.DictReader(f) if r["near_dup_group"]}
    with (source / "ISIC_GroundTruth.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = sorted((r for r in reader if r["image"] not in near_dups), key=lambda r: r["image"])
    mel = _spread([r for r in rows if float(r["MEL"]) == 1.0], REAL_MEL + REAL_UNLABELLED // 3)
    nv = _spread([r for r in rows if float(r["NV"]) == 1.0], REAL_NV + REAL_UNLABELLED - REAL_UNLABELLED // 3)
    labelled = mel[:REAL_MEL] + nv[:REAL_NV]
    unlabelled = mel[REAL_MEL:] + nv[REAL_NV:]
    (dest / "images").mkdir(parents=True)
    for row in labelled + unlabelled:
        shutil.copyfile(source / "images" / f"{row['image']}.jpg", dest / "images" / f"{row['image']}.jpg")
    with (dest / "ISIC_GroundTruth.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(labelled)
    return {"labelled": [r["image"] for r in labelled], "unlabelled": sorted(r["image"] for r in unlabelled)}


def prepare(settings, data_dir: Path, tmp: Path):
    """Ingest the real drop, make a champion that scored it (trained here on everything labelled: the
    live fixture's synthetic drop and the real images); yields what the screenshots show, then puts the
    champion found before back (none, or another test's), as the review UI tests put back what they change:
    the later live tests' gate comparisons never meet this tiny model, nor one promoted by override."""
    drop = tmp / REAL_DROP  # outside the repository: the images never enter it
    chosen = make_real_drop(data_dir / "isic2017-mel-nv", drop)
    ingest(str(drop), settings, drop_id=REAL_DROP)
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        labels = dict(conn.execute(sa.select(images.c.label, sa.func.count()).where(images.c.drop_id == REAL_DROP)
                                   .group_by(images.c.label)).all())
        before = registry.version(conn, None, required=False)
    assert labels == {"MEL": REAL_MEL, "NV": REAL_NV, None: REAL_UNLABELLED}, labels

    trained = pipeline.run(settings, TINY, run_id=RUN_ID)
    version = trained["model_version"]
    promoted_by = "the gate"
    try:
        if not trained["promoted"]:  # a tiny 64 px model: the README caption says which way it became champion
            assess.promote_with_report(settings, engine, version, "manual override: README screenshots of a real "
                                       "drop need a champion; the tiny test model's numbers mean nothing",
                                       "tests/live/test_screenshots.py", override=True)
            promoted_by = f"a manual override (the gate refused: {trained['gate']['reasons']})"
        ids = chosen["labelled"] + chosen["unlabelled"]
        scored = scoring.score_range(settings, version, first=min(ids), last=max(ids), run_id=RUN_ID)
        with engine.connect() as conn:
            assert registry.version(conn, None).model_version == version
            queue = review.queue(conn, review.QueueFilter(drop_id=REAL_DROP, labelled=review.DEFAULT_LABELLED))
        flagged = sorted(c["image_id"] for c in queue["cases"])
        print(f"\nscreenshots: {len(ids)} real ISIC 2017 images ({REAL_UNLABELLED} without labels, {len(flagged)} of "
              f"them flagged) in drop {REAL_DROP}; model {version} (split {trained['split']}), champion by {promoted_by}")
        assert scored["scored"] == len(ids), scored
        # the default queue: unlabelled images the model flags for review (open), only those sent without labels
        assert 0 < queue["total"] == len(flagged) and set(flagged) <= set(chosen["unlabelled"]), queue["total"]
        yield {**chosen, "model_version": version, "queue": flagged}
    finally:
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == version)
                         .values(is_champion=False, status="retired"))
            if before is not None:
                conn.execute(model_versions.update().where(model_versions.c.model_version == before.model_version)
                             .values(is_champion=True, status="champion"))
        engine.dispose()


@pytest.fixture(scope="module")
def real_drop(data_dir, live, tmp_path_factory):
    yield from prepare(live.settings, data_dir, tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _jpeg(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.jpg"
    page.screenshot(path=str(path), type="jpeg", quality=80)
    assert 20_000 < path.stat().st_size < MAX_BYTES, f"{path}: {path.stat().st_size} bytes"
    return path


def test_readme_screenshots_from_a_real_isic_drop(live, real_drop, browser):
    context, page = _login(browser, live, "admin", viewport={"width": 1280, "height": 800})
    try:
        # the queue inside Airflow's UI (Browse -> Lesion review), filtered to the real drop
        page.goto(f"{live.base}/plugin/lesion-review")
        page.frame_locator("iframe").locator("#queue-count").wait_for(timeout=30000)
        frame = page.locator("iframe").element_handle().content_frame()
        frame.goto(f"{live.base}/lesion-review/?drop={REAL_DROP}")
        frame.wait_for_selector("#queue-count")
        assert frame.locator("select[name=drop] option:checked").inner_text() == REAL_DROP
        rows = frame.locator("#queue tbody tr")
        shown = rows.evaluate_all("rows => rows.map(r => r.dataset.imageId)")
        assert sorted(shown) == real_drop["queue"]  # the flagged real images sent without labels, nothing else
        assert {t.split(" ")[0] for t in frame.locator("#queue tbody tr td:nth-child(3) small").all_inner_texts()} == {REAL_DROP}
        assert set(frame.locator("#queue tbody tr td:nth-child(10)").all_inner_texts()) == {"–"}
        assert frame.locator("#queue tbody tr td:nth-child(2) img").count() == len(shown)  # every overlay there
        _until(frame, "() => [...document.querySelectorAll('#queue img')].slice(0, 10)"
                      ".every(i => i.complete && i.naturalWidth > 0)")
        _jpeg(page, "review-queue")

        # the queue's first case, as the queue links it
        href = urljoin(frame.url, rows.first.locator("a.case-link").get_attribute("href"))
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.goto(href)
        page.wait_for_selector("#verdict")
        _until(page, "() => ['case-image', 'case-overlay'].every(id => { const i = document.getElementById(id); "
                     "return i.complete && i.naturalWidth > 0; })")
        title = page.locator("h2").first.inner_text()
        assert shown[0] in title and f"drop {REAL_DROP}" in title
        numbers = page.locator("#case-numbers").inner_text()
        assert "p(MEL)" in numbers and real_drop["model_version"] in numbers
        assert page.locator("svg.chart rect").count() >= 20  # the MC distribution
        _jpeg(page, "review-case")
    finally:
        context.close()
