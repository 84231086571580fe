"""Review logic (lesion_tasks.review.cases) on the embedded defaults: the queue equals v_review_queue and is
ordered as its queue_rank (likely melanomas, unsure decisions, the rest), verdicts are validated and
idempotent, the stored MC samples are the ones behind p_mel, nightly aggregates add up, and reviewer labels
become training data only where ISIC gave none (recorded in lineage; ISIC labels never overwritten).

On a copy of the session's trained home (tests/conftest.py): these tests record verdicts and retrain."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks.core import db, keys
from lesion_tasks.core.store import open_store
from lesion_tasks.model import mc
from lesion_tasks.training import retrain
from lesion_tasks.data import splits, trainset
from lesion_tasks.review import cases as review
from lesion_tasks.review import verdicts
from lesion_tasks.review import trends
from lesion_tasks.core.schema import images, prediction_samples, predictions, reviews
from lesion_tasks.core.schema import splits as splits_table
from tests import reliability
from tests.helpers import LABELLED_DROP, N_IMAGES, NIGHT_DROP, copy_home, priority_key


@pytest.fixture(scope="module")
def home(trained_home, tmp_path_factory):
    """A labelled drop and a night of clinic images without an ISIC label (drop "night"), trained and
    scored once (run "night-1"); this module's own copy."""
    settings = copy_home(trained_home.settings, tmp_path_factory.mktemp("review") / "home")
    engine = db.make_engine(settings.db_url)
    yield settings, engine, trained_home.version
    engine.dispose()


def test_queue_is_the_view_in_priority_order_with_working_filters(home):
    settings, engine, version = home
    with engine.connect() as conn:
        everything = review.queue(conn, review.QueueFilter(status="all", limit=1000))
        view = {r.image_id for r in conn.execute(sa.text("SELECT image_id FROM v_review_queue"))}
        flagged = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(predictions.c.needs_review)).scalar()
        assert everything["model_version"] == version
        assert {c["image_id"] for c in everything["cases"]} == view and everything["total"] == len(view) == flagged > 0
        # the default order (cases.priority_order): unlabelled first; likely melanomas by p_mel, then the decisions
        # flagged uncertain by the share of MC samples across the threshold, then the rest by p_mel
        keys = [priority_key(c) for c in everything["cases"]]
        assert keys == sorted(keys) and len({k[1] for k in keys}) > 1
        decision = review.queue(conn, review.QueueFilter(sort="decision", status="all", limit=1000))["cases"]
        keys = [(-c["decision_uncertainty"], abs(c["p_mel"] - c["threshold"])) for c in decision]
        assert keys == sorted(keys)
        # SQL sees the queue people see: v_review_queue.queue_rank (1 = first) is the UI's default page, then the
        # ISIC-labelled open cases; NULL once a case is reviewed
        default = review.queue(conn, review.QueueFilter(labelled=review.DEFAULT_LABELLED, limit=1000))
        ranked = conn.execute(sa.text("SELECT image_id, known_label FROM v_review_queue WHERE queue_rank IS NOT NULL "
                                      "ORDER BY queue_rank")).all()
        opened = review.queue(conn, review.QueueFilter(limit=1000))["cases"]
        assert default["cases"] and [r.image_id for r in ranked][:default["total"]] == [c["image_id"] for c in default["cases"]]
        assert [r.image_id for r in ranked] == [c["image_id"] for c in opened]
        assert conn.execute(sa.text("SELECT MIN(queue_rank), MAX(queue_rank), COUNT(queue_rank) FROM v_review_queue")).one() \
            == (1, len(opened), len(opened))
        by_entropy = review.queue(conn, review.QueueFilter(sort="entropy", status="all", limit=1000))["cases"]
        keys = [(c["entropy"], c["mutual_info"]) for c in by_entropy]
        assert keys == sorted(keys, reverse=True)
        page = review.queue(conn, review.QueueFilter(status="all", limit=5, offset=5))
        assert [c["image_id"] for c in page["cases"]] == [c["image_id"] for c in everything["cases"][5:10]]
        night = review.queue(conn, review.QueueFilter(drop_id=NIGHT_DROP, status="all", limit=1000))
        assert night["cases"] and {c["drop_id"] for c in night["cases"]} == {NIGHT_DROP}
        for label in ("MEL", "NV"):
            part = review.queue(conn, review.QueueFilter(label=label, status="all", limit=1000))
            assert {c["predicted_label"] for c in part["cases"]} <= {label}
        for flag in review.FLAGS:
            part = review.queue(conn, review.QueueFilter(flag=flag, status="all", limit=1000))
            assert all(flag in c["review_reasons"].split(",") for c in part["cases"])
            assert part["total"] == sum(flag in c["review_reasons"].split(",") for c in everything["cases"])
        by_mi = review.queue(conn, review.QueueFilter(sort="mutual_info", status="all", limit=1000))["cases"]
        assert [c["mutual_info"] for c in by_mi] == sorted((c["mutual_info"] for c in by_mi), reverse=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"verdict": "maybe"}, "verdict='maybe': expected one of agree, disagree, set_label"),
    ({"verdict": "set_label"}, "label=None: expected one of MEL, NV, OTHER"),
    ({"verdict": "set_label", "label": "BCC"}, "label='BCC': expected one of MEL, NV, OTHER"),
    ({"verdict": "agree", "note": "x" * 2001}, "note of 2001 characters: expected at most 2000"),
    ({"verdict": "agree", "reviewer": " \x07 "}, "reviewer: expected the name"),
    ({"verdict": "agree", "submission_id": "../../x"}, "submission_id='../../x': expected 8-64"),
])
def test_bad_verdicts_are_refused_with_the_value_named(home, kwargs, message):
    _, engine, version = home
    image_id = _open_case(engine)
    args = {"reviewer": "dr-a", **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        verdicts.record(engine, image_id, version, **args)
    with pytest.raises(LookupError, match="has no prediction from model"):
        verdicts.record(engine, "ISIC_0000000", version, "agree", "dr-a")


def _open_case(engine, drop_id=None) -> str:
    with engine.connect() as conn:
        return review.queue(conn, review.QueueFilter(drop_id=drop_id, limit=1))["cases"][0]["image_id"]


def test_verdicts_are_appended_idempotent_per_submission_and_close_the_case(home):
    _, engine, version = home
    image_id = _open_case(engine, drop_id=LABELLED_DROP)  # an ISIC-labelled case: no reviewer label for training
    first = verdicts.record(engine, image_id, version, "agree", "dr-a", note="ok\x00 \x1b[31m", submission_id="sub-000001")
    again = verdicts.record(engine, image_id, version, "agree", "dr-a", note="ok", submission_id="sub-000001")
    assert first == again and first["note"] == "ok [31m"  # control characters stripped
    with engine.connect() as conn:
        prediction = conn.execute(sa.select(predictions).where(predictions.c.image_id == image_id)
                                  .where(predictions.c.model_version == version)).mappings().one()
        assert first["label"] == prediction["predicted_label"] and first["p_mel"] == prediction["p_mel"]
        assert conn.execute(sa.select(sa.func.count()).select_from(reviews).where(reviews.c.image_id == image_id)).scalar() == 1
        assert image_id not in {c["image_id"] for c in review.queue(conn, review.QueueFilter(limit=1000))["cases"]}
        assert image_id in {c["image_id"] for c in review.queue(conn, review.QueueFilter(status="reviewed", limit=1000))["cases"]}
    second = verdicts.record(engine, image_id, version, "disagree", "dr-b", submission_id="sub-000002")
    assert second["label"] == ("NV" if first["label"] == "MEL" else "MEL")
    with engine.connect() as conn:
        shown = review.case(conn, image_id)
        latest = conn.execute(sa.text("SELECT verdict, reviewer FROM v_reviewed_labels WHERE image_id = :i"), {"i": image_id}).one()
    assert [r["reviewer"] for r in shown["reviews"]] == ["dr-b", "dr-a"]  # newest first, history kept
    assert tuple(latest) == ("disagree", "dr-b")


def test_stored_mc_samples_are_the_ones_behind_each_prediction(home):
    settings, engine, version = home
    with engine.connect() as conn:
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.p_mel, predictions.c.entropy,
                                      predictions.c.mutual_info, predictions.c.mc_samples, prediction_samples.c.p_mel_samples)
                            .join(prediction_samples, sa.and_(prediction_samples.c.image_id == predictions.c.image_id,
                                                              prediction_samples.c.model_version == predictions.c.model_version))
                            .where(predictions.c.model_version == version)).all()
        n = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
    assert len(rows) == n == N_IMAGES
    samples = np.array([r.p_mel_samples for r in rows])
    assert samples.shape == (n, rows[0].mc_samples)
    p, h, mi = mc.summarize(samples)
    np.testing.assert_allclose(p, [r.p_mel for r in rows], atol=1e-5)
    np.testing.assert_allclose(h, [r.entropy for r in rows], atol=1e-4)
    np.testing.assert_allclose(mi, [r.mutual_info for r in rows], atol=1e-4)


def test_nightly_aggregates_add_up(home):
    _, engine, version = home
    verdicts.record(engine, _open_case(engine, drop_id=LABELLED_DROP), version, "agree", "dr-n", submission_id="nightly-1")
    with engine.connect() as conn:
        data = trends.nightly(conn, nights=7)
        scored = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
        flagged = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(predictions.c.needs_review)).scalar()
        p_mel = conn.execute(sa.select(predictions.c.p_mel)).scalars().all()
        n_reviews = conn.execute(sa.select(sa.func.count()).select_from(reviews)).scalar()
    assert len(data["nights"]) == 1
    night = data["nights"][0]
    assert (night["scored"], night["flagged"]) == (scored, flagged) and flagged > 0
    assert sum(night["p_mel"]) == sum(night["entropy"]) == scored and len(night["p_mel"]) == data["bins"]
    expected = np.bincount((np.minimum(p_mel, 0.999999) * data["bins"]).astype(int), minlength=data["bins"])
    assert night["p_mel"] == expected.tolist()  # p_mel binned over [0, 1], 1.0 in the last bin
    assert night["reviewed"] == n_reviews >= 1  # every verdict of this module, all given today


def test_reviewer_labels_become_training_data_without_touching_isic_labels(home, trained_home):
    settings, engine, version = home
    trained_config = trained_home.config
    with engine.connect() as conn:
        night_cases = review.queue(conn, review.QueueFilter(drop_id=NIGHT_DROP, status="all", limit=1000,
                                                            sort="entropy"))["cases"]
        isic_case = conn.execute(sa.select(images.c.image_id, images.c.label).where(images.c.label == "NV")
                                 .order_by(images.c.image_id)).first()
        isic_before = dict(conn.execute(sa.select(images.c.image_id, images.c.label)).all())
    assert len(night_cases) >= 7
    chosen = {c["image_id"]: ("MEL" if k % 2 else "NV") for k, c in enumerate(night_cases[:6])}
    for k, (image_id, label) in enumerate(chosen.items()):
        verdicts.record(engine, image_id, version, "set_label", "dr-c", label=label, submission_id=f"train-{k:06d}")
    other = night_cases[6]["image_id"]
    verdicts.record(engine, other, version, "set_label", "dr-c", label="OTHER", submission_id="train-other1")
    # a reviewer contradicting ISIC: counted, never applied
    verdicts.record(engine, isic_case.image_id, version, "set_label", "dr-c", label="MEL", submission_id="train-conflict")

    summary = retrain.prepare_split(settings)
    trained = retrain.train_model(settings, trained_config, run_id="r2")
    with engine.connect() as conn:
        assigned = dict(conn.execute(sa.select(splits_table.c.image_id, splits_table.c.rule)
                                     .where(splits_table.c.image_id.in_(list(chosen)))).all())
        refs = trainset.split_refs(conn)
        lineage = conn.execute(sa.text("SELECT lineage FROM model_versions WHERE model_version = :v"),
                               {"v": trained["model_version"]}).scalar()
        isic_after = dict(conn.execute(sa.select(images.c.image_id, images.c.label)).all())
        other_split = conn.scalar(sa.select(splits_table.c.split).where(splits_table.c.image_id == other))
        scope_refs = trainset.out_of_scope_refs(conn)
    lineage = lineage if isinstance(lineage, dict) else json.loads(lineage)
    assert isic_after == isic_before  # images.label untouched (NULL stays NULL, NV stays NV)
    assert set(assigned) == set(chosen) and set(assigned.values()) <= {"reviewed-train", "group"}
    train_labels = dict(zip([r.image_id for r in refs["train"][0]], refs["train"][1].tolist(), strict=True))
    assert {i: train_labels[i] for i in chosen} == {i: int(label == "MEL") for i, label in chosen.items()}
    assert not set(chosen) & {r.image_id for r in refs["val"][0] + refs["test"][0]}
    # "neither MEL nor NV": not a binary label, a training image of the out-of-scope head (code OTHER)
    assert other_split == "train" and other not in train_labels
    assert dict(zip([r.image_id for r in scope_refs["train"][0]], scope_refs["train"][1]))[other] == "OTHER"
    assert other not in {r.image_id for split in ("val", "test") for r in scope_refs[split][0]}
    assert train_labels.get(isic_case.image_id, 0) == 0  # in training (if at all) with its ISIC label, NV
    reviewed = lineage["reviewed_labels"]
    assert reviewed["train_images"] == sorted([*chosen, other])
    assert reviewed["validation_and_test_images"] == [] and reviewed["verdicts_validate"] is False  # the default
    conflicts = reviewed["conflicts_with_isic_kept_isic"]
    assert isic_case.image_id in conflicts and all(isic_after[i] is not None for i in conflicts)
    counts = Counter(chosen.values())
    assert summary["counts"]["train"]["MEL"] >= counts["MEL"] and "reviewed-train" in " ".join(summary["rules"])
    assert splits.summary(engine) == summary


def test_bidi_controls_in_a_note_are_shown_as_codes_not_obeyed(home):
    """A note with U+202E (right-to-left override) would show 'agree' text reversed; it is stored verbatim
    and displayed as a visible code, on the case page like everywhere the templates print a value."""
    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    settings, engine, version = home
    image_id = _open_case(engine, drop_id=NIGHT_DROP)
    note = "benign \u202egnp.exe\u2066 ok"
    stored = verdicts.record(engine, image_id, version, "agree", "dr-\u202ebidi", note=note, submission_id="sub-bidi01")
    assert stored["note"] == note  # recorded as typed

    async def authenticate(request):
        return Reviewer("dr-local", True, True)

    page = TestClient(create_app(lambda: settings, authenticate, lambda nxt: nxt)).get(f"/case/{image_id}").text
    assert not re.search("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]", page)
    assert "benign [U+202E]gnp.exe[U+2066] ok" in page and "dr-[U+202E]bidi" in page
    reliability.record("Bidi control characters in a note", "a verdict note and reviewer name with U+202E / U+2066",
                       "stored verbatim, shown as visible codes, never obeyed", "no bidi control in the page; "
                       "[U+202E] shown", 0, 0)


def test_app_on_the_embedded_defaults_streams_from_the_local_store(home):
    """`make airflow` runs the app on SQLite + a local directory: every page renders, images and
    overlays stream from the directory (there are no presigned links there), and the login is
    still required. (Airflow's real login is exercised by tests/live/test_review_ui.py.)"""
    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    settings, engine, version = home

    async def authenticate(request):
        return Reviewer("dr-local", True, True) if request.headers.get("authorization") == "Bearer ok" else None

    client = TestClient(create_app(lambda: settings, authenticate, lambda nxt: f"/auth/login?next={nxt}"))
    assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).headers["location"].startswith("/auth/login")
    auth = {"Authorization": "Bearer ok"}
    image_id = _open_case(engine, drop_id=NIGHT_DROP)
    for path, kind in (("/", "text/html"), (f"/case/{image_id}", "text/html"), ("/models", "text/html"),
                       ("/nights", "text/html"), (f"/image/{image_id}?size=thumb", "image/jpeg"),
                       (f"/image/{image_id}?size=large", "image/jpeg"), (f"/overlay/{version}/{image_id}", "image/png"),
                       (f"/overlay/{version}/{image_id}?thumb=true", "image/jpeg"), (f"/models/{version}/report", "text/html")):
        response = client.get(path, headers=auth)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), (path, response.text[:200])
        assert "frame-ancestors 'self'" in response.headers["content-security-policy"]
        assert client.get(path).status_code == 401
    assert client.get("/image/ISIC_0000000", headers=auth).status_code == 404
    # a prediction scored before maps points to its overlay PNG: served as it is
    store = open_store(settings)
    legacy = store.put(keys.gradcam(version, NIGHT_DROP, image_id), b"\x89PNG legacy overlay", "image/png")
    row = (predictions.c.image_id == image_id) & (predictions.c.model_version == version)
    with engine.begin() as conn:
        current = conn.scalar(sa.select(predictions.c.gradcam_uri).where(row))
        conn.execute(predictions.update().where(row).values(gradcam_uri=legacy))
    assert client.get(f"/overlay/{version}/{image_id}", headers=auth).content == b"\x89PNG legacy overlay"
    with engine.begin() as conn:
        conn.execute(predictions.update().where(row).values(gradcam_uri=current))
    store.delete(legacy)
    assert client.get("/?status=bogus", headers=auth).text == "status='bogus': expected one of open, reviewed, all"


def test_out_of_scope_case_in_the_queue_and_on_its_pages(home):
    """A prediction flagged `out_of_scope` with p_other 0.93 (set here: scoring writes them once the model
    has the head) is in the queue with its p_other, the `out_of_scope` filter finds it, and the queue and
    case pages show p(other) as 0.930 and the flag as a readable badge that says what it means; a
    prediction without p_other shows '–'."""
    from fastapi.testclient import TestClient

    from lesion_tasks.review.web import Reviewer, create_app

    settings, engine, version = home
    with engine.connect() as conn:
        # an unflagged prediction if there is one (the out-of-scope flag alone puts it in the queue), and a flagged one
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.needs_review, predictions.c.review_reasons,
                                      predictions.c.p_other)
                            .where(predictions.c.model_version == version)
                            .order_by(predictions.c.needs_review, predictions.c.image_id)).all()
    target = rows[0]
    plain = next(r for r in reversed(rows) if r.needs_review and "out_of_scope" not in (r.review_reasons or ""))
    assert plain.image_id != target.image_id

    def where(row):
        return sa.and_(predictions.c.image_id == row.image_id, predictions.c.model_version == version)

    with engine.begin() as conn:
        conn.execute(predictions.update().where(where(target)).values(p_other=0.93, review_reasons="out_of_scope",
                                                                      needs_review=True))
        conn.execute(predictions.update().where(where(plain)).values(p_other=None))
    try:
        with engine.connect() as conn:
            flagged = review.queue(conn, review.QueueFilter(version, flag="out_of_scope", status="all", limit=1000))
            expected = set(conn.scalars(sa.select(predictions.c.image_id).where(
                predictions.c.model_version == version, predictions.c.needs_review,
                predictions.c.review_reasons.contains("out_of_scope"))))
            everything = review.queue(conn, review.QueueFilter(version, status="all", limit=1000))["cases"]
            in_view = conn.execute(sa.text("SELECT p_other, review_reasons FROM v_review_queue WHERE image_id = :i"),
                                   {"i": target.image_id}).one()
        assert {c["image_id"] for c in flagged["cases"]} == expected and flagged["total"] == len(expected)
        case = next(c for c in flagged["cases"] if c["image_id"] == target.image_id)
        assert (case["p_other"], case["review_reasons"]) == (0.93, "out_of_scope")
        assert tuple(in_view) == (0.93, "out_of_scope")
        assert {c["image_id"]: c["p_other"] for c in everything}[plain.image_id] is None

        async def authenticate(request):
            return Reviewer("dr-scope", True, True)

        client = TestClient(create_app(lambda: settings, authenticate, lambda nxt: f"/auth/login?next={nxt}"))
        page = client.get("/", params={"version": version, "status": "all", "limit": 1000, "labelled": "all"})
        assert page.status_code == 200
        shown = dict(re.findall(r'<tr data-image-id="([^"]+)">(.*?)</tr>', page.text, re.S))
        row = shown[target.image_id]
        assert '<td class="num p-other">0.930</td>' in row
        badge = re.search(r'<span class="tag out_of_scope"[^>]*>([^<]*)</span>', row)
        assert badge and badge.group(1) == "out of scope (not MEL/NV)"
        assert 'title="the model thinks this lesion is neither melanoma nor nevus' in badge.group(0)
        assert '<td class="num p-other">–</td>' in shown[plain.image_id]
        assert "out_of_scope" not in shown[plain.image_id]
        only = client.get("/", params={"version": version, "flag": "out_of_scope", "status": "all", "labelled": "all"}).text
        assert set(re.findall(r'<tr data-image-id="([^"]+)">', only)) == expected
        assert '<option value="out_of_scope" selected>out of scope (not MEL/NV)</option>' in only
        case_page = client.get(f"/case/{target.image_id}", params={"version": version}).text
        assert '<td class="num" id="p-other">0.930</td>' in case_page
        assert "out of scope (not MEL/NV)</span>" in case_page
        # spelled out under the badge, not only in a tooltip
        assert '<small class="flag-meaning">the model thinks this lesion is neither melanoma nor nevus' in case_page
        plain_page = client.get(f"/case/{plain.image_id}", params={"version": version}).text
        assert '<td class="num" id="p-other">– <small>' in plain_page
        # the verdict form says how to record "neither MEL nor NV"; the verdict keeps the p(other) that was shown
        assert 'id="scope-hint"' in case_page and "set label OTHER" in case_page and 'id="scope-hint"' not in plain_page
        posted = client.post(f"/case/{target.image_id}/review", follow_redirects=False, headers={"Origin": "http://testserver"},
                             data={"model_version": version, "verdict": "set_label", "label": "OTHER",
                                   "submission_id": "scope-verdict-1"})
        assert posted.status_code == 303
        with engine.connect() as conn:
            stored = conn.execute(sa.select(reviews.c.label, reviews.c.p_other, reviews.c.p_mel)
                                  .where(reviews.c.submission_id == "scope-verdict-1")).one()
        assert stored.label == "OTHER" and stored.p_other == 0.93 and stored.p_mel is not None
        history = client.get(f"/case/{target.image_id}", params={"version": version}).text
        assert f'<td class="num">{stored.p_mel:.3f} / 0.930</td>' in history
        assert verdicts.record(engine, plain.image_id, version, "agree", "dr-plain")["p_other"] is None
    finally:
        with engine.begin() as conn:
            conn.execute(predictions.update().where(where(target)).values(
                p_other=target.p_other, review_reasons=target.review_reasons, needs_review=target.needs_review))
            conn.execute(predictions.update().where(where(plain)).values(p_other=plain.p_other))
