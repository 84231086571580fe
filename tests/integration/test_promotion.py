"""A promotion keeps what a clinic sees (issue 37): the new champion scores the previous champion's open cases and
the latest nights first (`scoring.priority`), a verdict stays with its image, and the queue shows the previous
champion's predictions, marked as such, until the new champion has scored them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.core.schema import model_versions, predictions
from lesion_tasks.core.store import open_store
from lesion_tasks.review import cases as review
from lesion_tasks.scoring import nightly
from lesion_tasks.versions import registry, succession
from tests.helpers import N_IMAGES, champion_row, copy_home

NEW = "promoted-next"


@pytest.fixture(scope="module")
def promoted(trained_home, tmp_path_factory):
    """A copy of the trained home with a verdict on one open case, then a second version (the champion's model under
    another config: not identical) promoted over the first; nothing scored by it yet."""
    settings = copy_home(trained_home.settings, tmp_path_factory.mktemp("promotion") / "home")
    store, engine = open_store(settings), db.make_engine(settings.db_url)
    with engine.connect() as conn:
        champ = champion_row(conn)
        first = review.queue(conn, review.QueueFilter(limit=1))["cases"][0]["image_id"]
    review.record(engine, first, champ["model_version"], "agree", "dr-a", submission_id="sub-promotion-1")
    for name in ("model.keras", "head.npz", "train_log.json", "scope.npz"):
        store.put(f"models/{NEW}/{name}", store.get(f"models/{champ['model_version']}/{name}"))
    with engine.begin() as conn:
        conn.execute(model_versions.insert().values(**champ | {
            "model_version": NEW, "status": "candidate", "is_champion": False, "config": champ["config"] | {"note": "next"},
            "run_id": "promotion", "model_uri": f"models/{NEW}/model.keras", "report_uri": None}))
    registry.promote(engine, NEW, "test: a new champion", "test")
    yield settings, engine, champ["model_version"], first
    engine.dispose()


def test_the_new_champion_scores_the_open_cases_first(promoted):
    settings, engine, previous, reviewed = promoted
    with engine.connect() as conn:
        assert succession.previous_champion(conn) == previous
        open_cases = set(conn.scalars(sa.select(predictions.c.image_id).where(
            predictions.c.model_version == previous, predictions.c.needs_review, predictions.c.image_id != reviewed)))
    plan = nightly.plan_shards(settings, shard_size=1000)
    assert plan.model_version == NEW and sum(s["n"] for s in plan.shards) == N_IMAGES
    ids = plan.shards[0]["image_ids"]
    assert 0 < len(open_cases) < N_IMAGES and set(ids[: len(open_cases)]) == open_cases  # the open cases first
    assert reviewed not in ids[: len(open_cases)]  # a reviewed case is not waiting for anyone


def test_a_night_counts_the_champions_predictions_only(promoted):
    """The Nights page counted every version's predictions of a day (three scorings of the same images by three
    versions: "42,863 flagged of 47,559"). It counts the champion's, and says what earlier versions scored."""
    from lesion_tasks.review import trends

    settings, engine, previous, _ = promoted
    scored = nightly.score(settings, limit=12, run_id="night-after-promotion")["scored"]
    with engine.connect() as conn:
        [night] = trends.nightly(conn, nights=7, model_version=NEW)["nights"]
        everything = trends.nightly(conn, nights=7)["nights"][0]
    assert scored == 12 and night["scored"] == 12 and sum(night["p_mel"]) == 12
    assert night["other_versions"] == {previous: N_IMAGES}  # said, not added in
    assert everything["scored"] == N_IMAGES + 12  # without a version: every prediction, as before
    page = _client(settings).get("/nights", headers={"Authorization": "Bearer ok"}).text
    assert f"The champion's predictions (<code>{NEW}</code>) only." in page
    assert f"<code>{previous}</code> {N_IMAGES:,}" in page  # the earlier version's scoring of the night, named


def _client(settings):
    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    async def authenticate(request):
        return Reviewer("dr-local", True, True) if request.headers.get("authorization") == "Bearer ok" else None
    return TestClient(create_app(lambda: settings, authenticate, lambda nxt: f"/auth/login?next={nxt}"))


def test_a_queue_still_filling_says_so_with_progress(promoted):
    """While the new champion scores, the queue said "0 unlabelled cases need review" as if there were nothing: it says
    how far the champion has scored the images, and that the rest is coming."""
    settings, engine, _, _ = promoted
    with engine.connect() as conn:
        scored = conn.scalar(sa.select(sa.func.count()).select_from(predictions).where(predictions.c.model_version == NEW))
        listed = review.queue(conn, review.QueueFilter())
    assert (listed["scored"], listed["images"]) == (scored, N_IMAGES) and scored < N_IMAGES
    page = _client(settings).get("/", headers={"Authorization": "Bearer ok"}).text
    assert (f"Model <code>{NEW}</code> has scored {scored:,} of {N_IMAGES:,} images ({N_IMAGES - scored:,} to go)"
            in page), page[:3000]
