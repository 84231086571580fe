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
