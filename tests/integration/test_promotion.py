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
from lesion_tasks.review import verdicts
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
    verdicts.record(engine, first, champ["model_version"], "agree", "dr-a", submission_id="sub-promotion-1")
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


def test_right_after_a_promotion_the_queue_keeps_its_cases_and_its_verdicts(promoted):
    """Until the new champion has scored an image, the queue and v_latest_predictions show the previous champion's
    prediction, marked as such: never empty while a champion's predictions exist. A verdict given under the
    previous champion stays with its image: the case stays reviewed, and the case page names the version."""
    settings, engine, previous, reviewed = promoted
    with engine.connect() as conn:
        listed = review.queue(conn, review.QueueFilter(status="all", limit=1000, labelled="all"))
        mine = set(conn.scalars(sa.select(predictions.c.image_id).where(predictions.c.model_version == NEW)))
        view = dict(conn.execute(sa.text("SELECT image_id, prediction_of FROM v_latest_predictions")).all())
        queue_view = {r.image_id: r for r in conn.execute(sa.text(
            "SELECT image_id, review_verdict, review_model_version, queue_rank, prediction_of FROM v_review_queue"))}
    cases = {c["image_id"]: c for c in listed["cases"]}
    assert len(view) == N_IMAGES and {i for i, of in view.items() if of == "champion"} == mine  # every image shown
    assert listed["total"] > 0 and {c["prediction_of"] for c in cases.values()} >= {"previous_champion"}
    assert all((c["model_version"] == NEW) == (c["prediction_of"] == "champion") for c in cases.values())
    kept = cases[reviewed]  # the verdict given under the previous champion: still reviewed
    assert kept["review_verdict"] == "agree" and kept["review_model_version"] == previous
    assert queue_view[reviewed].review_verdict == "agree" and queue_view[reviewed].queue_rank is None
    with engine.connect() as conn:
        open_ids = {c["image_id"] for c in review.queue(conn, review.QueueFilter(limit=1000, labelled="all"))["cases"]}
    assert reviewed not in open_ids and open_ids == {i for i, r in queue_view.items() if r.queue_rank is not None}


def test_a_new_champion_that_disagrees_with_a_verdict_reopens_the_case(promoted):
    """A verdict given under another version that the current prediction contradicts is itself a review reason:
    the case is open again, flagged disagrees_with_verdict, in the UI and in v_review_queue alike."""
    settings, engine, previous, _ = promoted
    with engine.connect() as conn:
        row = conn.execute(sa.select(predictions.c.image_id, predictions.c.predicted_label).where(
            predictions.c.model_version == NEW)).first()  # an image the new champion scored (an earlier test)
    assert row is not None
    said = "NV" if row.predicted_label == "MEL" else "MEL"
    engine_rows = verdicts.record(engine, row.image_id, previous, "set_label", "dr-b", label=said,
                                submission_id="sub-promotion-2")
    assert engine_rows["label"] == said
    with engine.connect() as conn:
        open_cases = {c["image_id"]: c for c in review.queue(conn, review.QueueFilter(limit=1000, labelled="all"))["cases"]}
        rank = conn.scalar(sa.text("SELECT queue_rank FROM v_review_queue WHERE image_id = :i"), {"i": row.image_id})
    assert "disagrees_with_verdict" in open_cases[row.image_id]["review_reasons"]
    assert rank is not None


def test_the_queue_page_marks_the_previous_champions_predictions(promoted):
    settings, _, previous, _ = promoted
    page = _client(settings).get("/?labelled=all&limit=1000", headers={"Authorization": "Bearer ok"}).text
    assert "previous champion's</span>" in page and f"?version={previous}" in page


def test_the_case_page_of_an_image_the_champion_has_not_scored_shows_the_previous_champions(promoted):
    """A case opened without a version (a bookmark, a link from a mail) right after a promotion was a 404 ("no
    prediction from model ...") until the new champion scored the image: it shows the previous champion's
    prediction, marked as such, with the verdicts given under it. A version asked for by name is still that one."""
    settings, engine, previous, reviewed = promoted
    with engine.connect() as conn:
        waiting = conn.scalar(sa.select(predictions.c.image_id).where(
            predictions.c.model_version == previous, predictions.c.image_id == reviewed,
            ~sa.exists().where(sa.and_(predictions.c.model_version == NEW, predictions.c.image_id == reviewed))))
        shown = review.case(conn, reviewed)
        with pytest.raises(LookupError, match=f"no prediction from model {NEW}"):
            review.case(conn, reviewed, NEW)
    assert waiting == reviewed, "the reviewed case must still wait for the new champion here"
    assert shown["prediction_of"] == "previous_champion" and shown["prediction"]["model_version"] == previous
    response = _client(settings).get(f"/case/{reviewed}", headers={"Authorization": "Bearer ok"})
    assert response.status_code == 200, response.text[:500]
    assert 'id="previous-champion"' in response.text and f"<td>{previous}</td><td>agree</td>" in response.text
