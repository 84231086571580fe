"""What the review UI shows and hides (issue 13, "the UI tells the truth"), on the embedded defaults:

- the queue defaults to unlabelled images (a verdict becomes a training label only where ISIC gave
  none); labelled / unlabelled / all and split filters, with the count behind every value;
- the Label check lists exactly the ISIC-labelled images the model contradicts;
- empty pages say why: no model version yet, versions but none promoted (the gate's first failed
  check), or which filter hides the cases;
- the Model versions page shows the bootstrap CIs of sensitivity and specificity ("—" without them).

On copies of the session's trained home (tests/conftest.py): a labelled drop, the unlabelled "night"
drop and the ISIC OTHER drop, scored by one champion with an out-of-scope head."""

from __future__ import annotations

import dataclasses

import html
import json
import re
from datetime import timedelta
from urllib.parse import quote, urlencode

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from lesion_tasks.assessment import gate
from lesion_tasks.core import db
from lesion_tasks.review import cases as review, hints, verdicts
from lesion_tasks.review.web import Reviewer, create_app
from lesion_tasks.core.schema import images, model_versions, predictions
from lesion_tasks.core.schema import splits as splits_table
from lesion_tasks.core.settings import Settings
from tests.helpers import LABELLED_DROP, NIGHT_DROP, copy_home
from tests.helpers import priority_key

ALL = {"status": "all", "limit": 1000}


@pytest.fixture(scope="module")
def home(trained_home, tmp_path_factory):
    """This module's read-only copy (tests that write take `home_copy`)."""
    settings = copy_home(trained_home.settings, tmp_path_factory.mktemp("review-filters") / "home")
    engine = db.make_engine(settings.db_url)
    yield settings, engine, trained_home.version
    engine.dispose()


def _client(settings: Settings) -> TestClient:
    async def authenticate(_request):
        return Reviewer("dr-filter", True, True)

    return TestClient(create_app(lambda: settings, authenticate, lambda nxt: f"/login?next={nxt}"))


def _rows(page: str) -> list[str]:
    return re.findall(r'<tr data-image-id="([^"]+)">', page)


def _flagged(conn, version: str, drop_id: str | None = None) -> dict[str, tuple]:
    """image_id -> (ISIC label, split) of every flagged prediction of `version` (in `drop_id`), from the tables."""
    rows = conn.execute(sa.select(predictions.c.image_id, images.c.label, splits_table.c.split)
                        .join(images, images.c.image_id == predictions.c.image_id)
                        .outerjoin(splits_table, splits_table.c.image_id == predictions.c.image_id)
                        .where(predictions.c.model_version == version, predictions.c.needs_review)
                        .where(predictions.c.drop_id == drop_id if drop_id else sa.true())).all()
    return {r.image_id: (r.label, r.split or "none") for r in rows}


def _ids(conn, **kwargs) -> set[str]:
    return {c["image_id"] for c in review.queue(conn, review.QueueFilter(**{**ALL, **kwargs}))["cases"]}


def test_default_queue_is_unlabelled_with_labelled_and_split_filters_and_their_counts(home):
    settings, engine, version = home
    with engine.connect() as conn:
        flagged = _flagged(conn, version)
        unlabelled = {i for i, (label, _) in flagged.items() if label is None}
        labelled = set(flagged) - unlabelled
        assert unlabelled and labelled  # both kinds are flagged in the trained home
        assert _ids(conn, labelled="unlabelled") == unlabelled
        assert _ids(conn, labelled="labelled") == labelled
        assert _ids(conn, labelled="all") == set(flagged)
        result = review.queue(conn, review.QueueFilter(**ALL, labelled="unlabelled"))
        assert result["counts"]["labelled"] == {"unlabelled": len(unlabelled), "labelled": len(labelled), "all": len(flagged)}
        split_sizes = {s: sum(1 for _, split in flagged.values() if split == s) for s in review.SPLIT_FILTERS}
        assert split_sizes["none"] and split_sizes["train"] and split_sizes["test"]
        for split in review.SPLIT_FILTERS:
            part = review.queue(conn, review.QueueFilter(**ALL, labelled="all", split=split))
            assert {c["image_id"] for c in part["cases"]} == {i for i, (_, s) in flagged.items() if s == split}
            assert part["total"] == split_sizes[split] and all(c["split"] == (None if split == "none" else split)
                                                                for c in part["cases"])
            # the split counts keep the labelled filter: unlabelled images have no split
            assert part["counts"]["split"] == {**split_sizes, "all": len(flagged)}
            assert part["counts"]["labelled"]["all"] == split_sizes[split]
        unlabelled_in_train = review.queue(conn, review.QueueFilter(**ALL, labelled="unlabelled", split="train"))
        assert unlabelled_in_train["total"] == 0 and unlabelled_in_train["counts"]["split"]["none"] == len(unlabelled)
        # the existing filters still narrow, in the default (priority) order
        night = review.queue(conn, review.QueueFilter(**ALL, labelled="unlabelled", drop_id=NIGHT_DROP))["cases"]
        assert {c["drop_id"] for c in night} == {NIGHT_DROP}
        keys = [priority_key(c) for c in night]
        assert keys == sorted(keys)
        sites = {c["site"] for c in night}
        for site in sites:  # the site filter: that site's cases, in the same order
            assert [c for c in night if c["site"] == site] == review.queue(
                conn, review.QueueFilter(**ALL, labelled="unlabelled", drop_id=NIGHT_DROP, site=site))["cases"]

    client = _client(settings)
    page = client.get("/")
    assert page.status_code == 200
    assert set(_rows(page.text)) == unlabelled  # the page's default: unlabelled images only
    assert f'<option value="unlabelled" selected>unlabelled ({len(unlabelled)})</option>' in page.text
    assert f'<option value="labelled" >labelled ({len(labelled)})</option>' in page.text
    assert f'<option value="none" >none ({split_sizes["none"]})</option>' in page.text
    test_page = client.get("/", params={"labelled": "all", "split": "test", "status": "all"}).text
    assert set(_rows(test_page)) == {i for i, (_, s) in flagged.items() if s == "test"}
    # old links (no labelled parameter) still work, and unknown values are refused, naming what is allowed
    old = client.get("/", params={"version": version, "drop": NIGHT_DROP, "status": "all", "sort": "mutual_info"})
    assert old.status_code == 200 and set(_rows(old.text)) == {i for i in unlabelled if i in night_ids(engine, version)}
    assert client.get("/?labelled=yes").text == "labelled='yes': expected one of unlabelled, labelled, all"
    assert client.get("/?split=holdout").text == "split='holdout': expected one of train, val, test, none"
    assert client.get("/label-check?split=holdout").status_code == 400


def night_ids(engine, version: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(predictions.c.image_id).where(predictions.c.model_version == version,
                                                                         predictions.c.drop_id == NIGHT_DROP)))


def _contradicts(label, predicted, p_other, reasons) -> bool:
    flags = (reasons or "").split(",")
    return ((label, predicted) in (("NV", "MEL"), ("MEL", "NV"))
            or (label == "OTHER" and p_other is not None and predicted == "NV" and "out_of_scope" not in flags))


def test_label_check_lists_exactly_the_labelled_images_the_model_contradicts(home_copy, trained_home):
    """Planted on a copy: an ISIC nevus predicted MEL, an ISIC melanoma predicted NV (unflagged), an ISIC
    OTHER predicted NV and not flagged; and non-contradictions: an OTHER flagged out_of_scope, an OTHER
    from a version without p_other, an unlabelled image predicted MEL. The page lists what the rule says
    over every prediction, flagged or not, and nothing else."""
    engine, version = db.make_engine(home_copy.db_url), trained_home.version
    with engine.connect() as conn:
        def held_out(label: str, split: str = "test") -> list[str]:
            return conn.scalars(sa.select(images.c.image_id).join(splits_table, splits_table.c.image_id == images.c.image_id)
                                .where(images.c.label == label, splits_table.c.split == split)
                                .order_by(images.c.image_id).limit(3)).all()

        by_label = {label: held_out(label) for label in ("MEL", "NV", "OTHER")}
        trained_on = held_out("NV", "train")[0]  # a nevus the model was fit on
        unlabelled = conn.scalars(sa.select(images.c.image_id).where(images.c.label.is_(None)).order_by(images.c.image_id)).first()
    planted = {trained_on: dict(predicted_label="MEL", needs_review=True, review_reasons="predicted_mel", p_mel=0.99),
               by_label["NV"][0]: dict(predicted_label="MEL", needs_review=True, review_reasons="predicted_mel"),
               by_label["MEL"][0]: dict(predicted_label="NV", needs_review=False, review_reasons=None),
               by_label["OTHER"][0]: dict(predicted_label="NV", needs_review=False, review_reasons=None, p_other=0.2),
               by_label["OTHER"][1]: dict(predicted_label="NV", needs_review=True, review_reasons="out_of_scope", p_other=0.9),
               by_label["OTHER"][2]: dict(predicted_label="NV", needs_review=False, review_reasons=None, p_other=None),
               unlabelled: dict(predicted_label="MEL", needs_review=True, review_reasons="predicted_mel")}
    with engine.begin() as conn:
        for image_id, values in planted.items():
            conn.execute(predictions.update().where(predictions.c.image_id == image_id,
                                                    predictions.c.model_version == version).values(**values))
    with engine.connect() as conn:
        everything = conn.execute(sa.select(predictions.c.image_id, images.c.label, predictions.c.predicted_label,
                                            predictions.c.p_other, predictions.c.review_reasons, predictions.c.p_mel,
                                            splits_table.c.split)
                                  .join(images, images.c.image_id == predictions.c.image_id)
                                  .outerjoin(splits_table, splits_table.c.image_id == images.c.image_id)
                                  .where(predictions.c.model_version == version)).all()
        # every split was given before the version was trained: "not fit on" = outside the training split
        expected = {r.image_id for r in everything if _contradicts(r.label, r.predicted_label, r.p_other, r.review_reasons)
                    and r.split != "train"}
        confidence = {r.image_id: r.p_mel if r.label == "NV" else 1 - r.p_mel if r.label == "MEL" else 1 - (r.p_other or 0)
                      for r in everything}
        result = review.label_check(conn, review.QueueFilter(**ALL))
        kinds = {label: sum(1 for r in everything if r.image_id in expected and r.label == label) for label in ("MEL", "NV", "OTHER")}
    assert {by_label["NV"][0], by_label["MEL"][0], by_label["OTHER"][0]} <= expected
    assert not {by_label["OTHER"][1], by_label["OTHER"][2], unlabelled, trained_on} & expected
    assert {c["image_id"] for c in result["cases"]} == expected and result["total"] == len(expected)
    shown = [confidence[c["image_id"]] for c in result["cases"]]
    assert shown == sorted(shown, reverse=True)  # the most confident disagreement first
    assert result["counts"]["isic_label"] == kinds
    assert all(c["known_label"] is not None for c in result["cases"])

    client = _client(home_copy)
    page = client.get("/label-check").text
    assert set(_rows(page)) == expected  # nothing reviewed yet: open = all
    assert "Where the model disagrees with ISIC" in page and "Most of them are the model's errors" in page
    assert "report ISIC label errors" not in page and 'name="sort"' not in page
    assert f"ISIC NV predicted MEL: {kinds['NV']} · ISIC MEL predicted NV: {kinds['MEL']} · ISIC OTHER not flagged: {kinds['OTHER']}" in page
    assert 'name="labelled"' not in page and '<a href="./label-check">Label check</a>' in page
    # a case opened from the label check moves on to the next contradiction, not to the queue
    first, second = _rows(page)[:2]
    assert f'href="./case/{first}?version={quote(version)}&amp;check=1"' in page
    case = client.get(f"/case/{first}", params={"version": version, "check": 1}).text
    assert '<input type="hidden" name="check" value="1">' in case
    assert f'<input type="hidden" name="next_case" value="{second}">' in case
    assert "It is training data only (<code>LESION_VERDICTS_VALIDATE=0</code>" in case  # what a verdict will do
    validating = _client(dataclasses.replace(home_copy, verdicts_validate=True))
    case = validating.get(f"/case/{first}", params={"version": version, "check": 1}).text
    assert "also validates and tests on verdicts" in case and "training data only" not in case
    posted = client.post(f"/case/{first}/review", follow_redirects=False, headers={"Authorization": "Bearer x"},
                         data={"model_version": version, "verdict": "disagree", "submission_id": "label-check-1",
                               "next_case": second, "check": "1"})
    assert posted.status_code == 303
    assert posted.headers["location"] == f"../{second}?{urlencode({'version': version, 'saved': first, 'check': 1})}"
    engine.dispose()


def _empty_state(page: str) -> str:
    found = re.search(r'<div id="empty">(.*?)</div>', page, re.S)
    assert found, page[-2000:]
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1).replace("</li>", "\n")))


def test_an_empty_queue_under_a_champion_says_which_filter_hides_what(home_copy, trained_home):
    engine, version = db.make_engine(home_copy.db_url), trained_home.version
    with engine.connect() as conn:
        flagged = _flagged(conn, version)
        in_labelled_drop = _flagged(conn, version, LABELLED_DROP)
    unlabelled = sorted(i for i, (label, _) in flagged.items() if label is None)
    labelled = len(flagged) - len(unlabelled)
    for k, image_id in enumerate(unlabelled):  # every unlabelled case reviewed: the default queue is empty
        verdicts.record(engine, image_id, version, "agree", "dr-empty", submission_id=f"empty-{k:06d}")
    engine.dispose()
    client = _client(home_copy)
    page = client.get("/").text
    assert _rows(page) == [] and '<table id="queue">' not in page
    text = _empty_state(page)
    assert text.startswith("0 unlabelled cases need review.")
    assert (f"{labelled} labelled images are flagged (ISIC labelled them: a verdict cannot make them training labels): "
            "see Label check · show them") in text
    assert f"{len(unlabelled)} cases are already reviewed: show reviewed" in text
    assert 'href="./label-check?status=open&amp;sort=priority"' in page
    assert 'href="./?status=reviewed&amp;sort=priority&amp;labelled=unlabelled"' in page
    # a split and a drop that hold nothing: each filter named with what it hides
    narrowed = _empty_state(client.get("/", params={"labelled": "all", "split": "val", "drop": NIGHT_DROP}).text)
    assert narrowed.startswith("0 cases in split val need review.")
    assert "the filters drop night may hide more: clear them" in narrowed
    unlabelled_train = _empty_state(client.get("/", params={"split": "train", "status": "all"}).text)
    assert unlabelled_train.startswith("0 flagged unlabelled cases in split train.")
    assert f"{len(unlabelled)} cases are in other splits: show every split" in unlabelled_train
    # the labelled drop holds no unlabelled image: the drop filter is named, the labelled cases counted
    in_drop = _empty_state(client.get("/", params={"drop": LABELLED_DROP}).text)
    assert in_drop.startswith("0 unlabelled cases need review.") and "the filters drop labelled may hide more" in in_drop
    assert in_labelled_drop and all(label for label, _ in in_labelled_drop.values())
    assert f"\n{len(in_labelled_drop)} labelled images are flagged" in in_drop


def test_no_champion_pages_say_what_happened(home_copy, trained_home, tmp_path):
    """No version at all: how to train one (no link). Versions but none promoted: how many, the last one
    and the gate's first failed check, with a link to Model versions; the nights page says the same."""
    empty = Settings.from_env({"LESION_HOME": str(tmp_path / "empty")})
    db.upgrade(empty)
    fresh = _client(empty)
    for path in ("/", "/label-check", "/nights"):
        found = re.search(r'<p id="no-champion">(.*?)</p>', fresh.get(path).text, re.S)
        assert found, path
        assert found.group(1).startswith("No model version trained yet: trigger the lesion_retrain DAG")
        assert "`lesion train`" in found.group(1) and "models" not in found.group(1)
    assert "No model version trained yet" in fresh.get("/models").text

    engine, version = db.make_engine(home_copy.db_url), trained_home.version
    refused = gate.Decision((gate.Check("pass", "floor", "test auc 0.9100 >= floor 0.70", "test"),
                             gate.Check("fail", "floor", "test mel_sensitivity 0.7000 < floor 0.80", "test"),
                             gate.Check("fail", "floor", "test balanced_accuracy 0.5500 < floor 0.60", "test"))).to_json()
    with engine.begin() as conn:
        row = dict(conn.execute(sa.select(model_versions).where(model_versions.c.model_version == version)).mappings().one())
        conn.execute(model_versions.update().where(model_versions.c.model_version == version)
                     .values(is_champion=False, status="retired"))
        conn.execute(model_versions.insert(), [
            {**row, "model_version": "refused-1", "run_id": "refused", "created_at": row["created_at"] + timedelta(hours=1),
             "status": "rejected", "is_champion": False, "gate": refused},
            {**row, "model_version": "claim-1", "run_id": "claim", "created_at": row["created_at"] + timedelta(hours=2),
             "status": "training", "is_champion": False, "gate": None, "metrics": None}])
    engine.dispose()
    client = _client(home_copy)
    expected = ("2 model versions trained (1 training now), none promoted: the last one, refused-1, was refused by the "
                "gate: test mel_sensitivity 0.7000 &lt; floor 0.80 (and 1 more). <a href=\"./models\">Model versions</a>")
    for path in ("/", "/label-check", "/nights"):
        page = client.get(path).text
        assert f'<p id="no-champion">{expected}</p>' in page, path
        assert "No champion model yet" not in page
    assert 'id="queue"' not in client.get("/").text


def test_model_versions_page_shows_the_cis_of_sensitivity_and_specificity(home_copy, trained_home):
    engine, version = db.make_engine(home_copy.db_url), trained_home.version
    with engine.begin() as conn:
        row = dict(conn.execute(sa.select(model_versions).where(model_versions.c.model_version == version)).mappings().one())
        ci = row["metrics"]["test"]["ci95"]
        old_test = {k: v for k, v in row["metrics"]["test"].items() if k != "ci95"}  # as versions before the CIs
        conn.execute(model_versions.insert(), [
            {**row, "model_version": "old-no-ci", "run_id": "old", "is_champion": False, "status": "retired",
             "metrics": {**row["metrics"], "test": old_test}},
            {**row, "model_version": "half-ci", "run_id": "half", "is_champion": False, "status": "retired",
             "metrics": {**row["metrics"], "test": {**old_test, "ci95": {**ci, "mel_specificity": [None, 0.9]}}}}])
    engine.dispose()
    assert all(len(ci[k]) == 2 and None not in ci[k] for k in ("auc", "mel_sensitivity", "mel_specificity"))
    page = _client(home_copy).get("/models").text
    cells = {v: dict(re.findall(r'<td class="num ([a-z-]+)">(.*?)</td>', body, re.S))
             for v, body in re.findall(r'<tr data-version="([^"]+)">(.*?)</tr>', page, re.S)}
    test = row["metrics"]["test"]
    champion = cells[version]
    assert champion["sensitivity"] == (f'{100 * test["mel_sensitivity"]:.1f}% <small class="ci">'
                                       f'({100 * ci["mel_sensitivity"][0]:.1f}–{100 * ci["mel_sensitivity"][1]:.1f}%)</small>')
    assert champion["specificity"] == (f'{100 * test["mel_specificity"]:.1f}% <small class="ci">'
                                       f'({100 * ci["mel_specificity"][0]:.1f}–{100 * ci["mel_specificity"][1]:.1f}%)</small>')
    assert champion["auc"] == f'{test["auc"]:.3f} <small class="ci">({ci["auc"][0]:.3f}–{ci["auc"][1]:.3f})</small>'
    for cell in ("auc", "sensitivity", "specificity", "balanced-accuracy"):
        assert cells["old-no-ci"][cell].endswith('<small class="ci">—</small>'), cell
    assert cells["half-ci"]["specificity"].endswith('<small class="ci">—</small>')
    assert "(95% CI)</th><th>specificity (95% CI)" in page


def test_an_empty_queue_of_a_champion_that_scored_nothing_says_so(home_copy, trained_home):
    """A champion with no prediction yet (promoted, the night not run): the empty queue says it has scored
    nothing, not that it "flagged nothing for review"."""
    engine, version = db.make_engine(home_copy.db_url), trained_home.version
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM prediction_samples"))
        conn.execute(predictions.delete())
    with engine.connect() as conn:
        result = review.queue(conn, review.QueueFilter(status="all", labelled="all"))
    engine.dispose()
    assert result["total"] == 0 and result["scored"] == 0
    texts = [h["text"] for h in hints.empty_hints(review.QueueFilter(status="all", labelled="all"), result)["hints"]]
    assert texts == [f"model {version} has not scored any image yet: lesion_nightly_score scores every unscored image "
                     "(or `lesion score`)"]
    page = _client(home_copy).get("/").text
    assert "has not scored any image yet" in page and "flagged nothing for review" not in page


def test_the_case_caption_words_the_spread_it_shows(home_copy, trained_home):
    """The MC caption follows its value: narrow, moderate or wide by the samples' sd (it always said "wide")."""
    from lesion_tasks.review.web import spread_words

    assert [spread_words(sd) for sd in (0.0, 0.049, 0.05, 0.149, 0.15, 0.4)] == [
        "narrow: the dropout samples agree"] * 2 + ["moderate: the samples differ somewhat"] * 2 + [
        "wide: the model disagrees with itself"] * 2
    engine, version = db.make_engine(home_copy.db_url), trained_home.version
    with engine.connect() as conn:
        ids = [c["image_id"] for c in review.queue(conn, review.QueueFilter(status="all", labelled="all", limit=5))["cases"]]
    engine.dispose()
    client = _client(home_copy)
    for image_id in ids:
        page = client.get(f"/case/{image_id}", params={"version": version}).text
        found = re.search(r'Their spread is <span class="spread">([^<]+)</span> \(sd ([0-9.]+)\)', page)
        assert found, page
        assert html.unescape(found.group(1)) == spread_words(float(found.group(2))), found.group(0)


def test_the_queue_ranks_by_how_uncertain_the_decision_is(home):
    """The order "most uncertain decision first" (the default before issue 37; now `priority`'s unsure tier): the
    share of MC samples across the case's threshold (the decision could go either way), ties nearest the threshold
    first; stored at scoring as exactly that share of the case's samples."""
    settings, engine, version = home
    with engine.connect() as conn:
        cases = review.queue(conn, review.QueueFilter(**{**ALL, "limit": 1000, "sort": "decision"}))["cases"]
        samples = dict(conn.execute(sa.text("SELECT image_id, p_mel_samples FROM prediction_samples WHERE model_version = :v"),
                                    {"v": version}).all())
    assert review.QueueFilter().sort == "priority" and len(cases) > 5
    keys = [(-c["decision_uncertainty"], abs(c["p_mel"] - c["threshold"])) for c in cases]
    assert keys == sorted(keys)
    for c in cases:
        s = samples[c["image_id"]]
        s = s if isinstance(s, list) else json.loads(s)
        other = sum((v < c["threshold"]) if c["predicted_label"] == "MEL" else (v >= c["threshold"]) for v in s)
        assert c["decision_uncertainty"] == pytest.approx(other / len(s), abs=1.5 / len(s))  # samples stored rounded
