"""The review UI in a real browser (Debian's headless Chromium, driven by Playwright) against the
real `airflow standalone`: log in through Airflow's own login page, open the queue (unlabelled images
by default), open a case, record a verdict and find it in the database; the Label check lists the
labelled images the model contradicts, its split filter narrows it; with no champion the pages say
why and link to Model versions; a viewer may look but not record; anonymous and cross-site requests
get no data; a prediction flagged out_of_scope shows its badge and p(other).
Screenshots go to LESION_SCREENSHOT_DIR (default build/screenshots).
The queue with >= 500 cases must load in under a second (Navigation Timing, measured here).
"""

from __future__ import annotations

import json
import statistics
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa

from lesion_tasks import cli, pipeline
from lesion_tasks.assessment import gate
from lesion_tasks.versions import registry
from lesion_tasks.review import cases as review
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.core.schema import images, model_versions, predictions, reviews, splits
from lesion_tasks.ops.synthetic import make_drop
from tests import reliability
from tests.helpers import champion_row, tiny_config
from tests.helpers import priority_key
from tests.live.browser import SHOTS, chromium
from tests.live.browser import login as _login
from tests.live.browser import shot as _shot
from tests.live.browser import until as _until

QUEUE_TARGET_S = 1.0
TINY = tiny_config(epochs=150, views=2, bootstrap=100, mc_samples=30, target_sensitivity=0.97)


def _engine(live):
    return sa.create_engine(live.settings.db_url)


@pytest.fixture(scope="module")
def queue_ready(live):
    """A champion (trained here unless an earlier test made one) whose default queue (unlabelled images)
    holds >= 500 open cases: an unlabelled 1,800-image night drop is ingested and scored on top of the
    labelled drop."""
    engine = _engine(live)
    with engine.connect() as conn:
        champion = champion_row(conn)
    if champion is None:
        trained = pipeline.run(live.settings, TINY, run_id="review-ui")
        assert trained["promoted"], trained["gate"]
    night = make_drop(live.tmp / "night", n_images=1800, seed=12, size=128)
    (night / "metadata.csv").unlink()  # clinic images: no ISIC label
    ingest(str(night), live.settings, drop_id="night-1")
    scoring.score(live.settings, run_id="review-ui-night")
    with engine.connect() as conn:
        result = review.queue(conn, review.QueueFilter(status="open", limit=5, labelled=review.DEFAULT_LABELLED))
    engine.dispose()
    assert result["total"] >= 500, f"only {result['total']} open unlabelled cases: the queue test needs 500"
    return result


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def test_anonymous_and_forged_requests_get_no_data(live, queue_ready):
    base = f"{live.base}/lesion-review"
    some_case = queue_ready["cases"][0]
    page = requests.get(f"{base}/", headers={"Accept": "text/html"}, allow_redirects=False, timeout=10)
    assert page.status_code == 302 and "/auth/login" in page.headers["location"]
    for path in ("/", f"/case/{some_case['image_id']}", f"/image/{some_case['image_id']}",
                 f"/overlay/{some_case['model_version']}/{some_case['image_id']}", "/models", "/nights"):
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Cookie": "_token=forged.jwt.value"}):
            response = requests.get(base + path, headers=headers, allow_redirects=False, timeout=10)
            assert response.status_code == 401, (path, headers, response.status_code)
            assert some_case["image_id"] not in response.text
    vote = requests.post(f"{base}/case/{some_case['image_id']}/review", timeout=10, allow_redirects=False,
                         data={"model_version": some_case["model_version"], "verdict": "agree", "submission_id": "anon-00000001"})
    assert vote.status_code == 401
    reliability.record("Review UI without a login", "6 pages and image routes requested anonymously, with a forged "
                       "bearer token and a forged session cookie; an anonymous verdict post",
                       "no data: redirect to Airflow's login (browsers) or 401", "302 to /auth/login; 401 on all 19 others",
                       0, 0)


def test_queue_case_verdict_in_a_real_browser(live, queue_ready, browser):
    context, page = _login(browser, live, "admin")
    try:
        # the queue with >= 500 cases: loaded 3 times after a warm-up, median of the navigation timings
        timings = []
        for _ in range(4):
            page.goto(f"{live.base}/lesion-review/", wait_until="load")
            nav = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
            timings.append(json.loads(nav))
        load_s = statistics.median(t["loadEventEnd"] - t["startTime"] for t in timings[1:]) / 1000
        dom_s = statistics.median(t["domContentLoadedEventEnd"] - t["startTime"] for t in timings[1:]) / 1000
        rows = page.locator("#queue tbody tr").count()
        total = queue_ready["total"]
        print(f"\nreview queue: {rows} rows of {total} open cases, load {load_s:.3f} s, DOMContentLoaded {dom_s:.3f} s "
              f"(median of 3, target < {QUEUE_TARGET_S} s: {'met' if load_s < QUEUE_TARGET_S else 'MISSED'})")
        (SHOTS.mkdir(parents=True, exist_ok=True), (SHOTS / "queue_timing.json").write_text(json.dumps(
            {"rows": rows, "open_cases": total, "load_s": load_s, "dom_content_loaded_s": dom_s})))
        assert rows == min(total, 500)
        # the default queue: unlabelled images only (a verdict can become their training label), the count shown
        assert set(page.locator("#queue tbody tr td:nth-child(10)").all_inner_texts()) == {"–"}
        assert page.locator("select[name=labelled] option:checked").inner_text() == f"unlabelled ({total})"
        # the timing is a figure (build/screenshots/queue_timing.json, the README), not a pass/fail: tests assert behaviour
        # the default order (cases.priority_order): likely melanomas, then unsure decisions, then the rest
        engine = _engine(live)
        with engine.connect() as conn:
            ranked = review.queue(conn, review.QueueFilter(status="open", limit=500, labelled=review.DEFAULT_LABELLED))
        engine.dispose()
        shown_ids = page.locator("#queue tbody tr").evaluate_all("rows => rows.map(r => r.dataset.imageId)")
        assert shown_ids == [c["image_id"] for c in ranked["cases"]]
        keys = [priority_key(c) for c in ranked["cases"]]
        assert keys == sorted(keys)
        _until(page, "() => [...document.querySelectorAll('#queue img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)")
        _shot(page, "01-queue")

        # a filter: only predicted melanomas
        page.select_option("select[name=label]", "MEL")
        page.click("form.filters button[type=submit]")
        page.wait_for_selector("#queue-count")
        labels = set(page.locator("#queue tbody tr td:nth-child(4) .tag").all_inner_texts())
        assert labels <= {"MEL"}

        # open the first open case
        page.goto(f"{live.base}/lesion-review/")
        first = page.locator("#queue tbody tr").first
        image_id = first.get_attribute("data-image-id")
        first.locator("a.case-link").click()
        page.wait_for_selector("#verdict")
        _until(page, "() => ['case-image', 'case-overlay'].every(id => { const i = document.getElementById(id); "
                     "return i.complete && i.naturalWidth > 0; })")
        assert page.locator("svg.chart rect").count() >= 20  # the MC distribution
        numbers = page.locator("#case-numbers").inner_text()
        assert "p(MEL)" in numbers and "mutual information" in numbers and "threshold" in numbers
        _shot(page, "02-case")

        # record a verdict: set label MEL with a note; the app moves on to the next open case
        page.check("input[name=verdict][value=set_label]")
        page.select_option("select[name=label]", "MEL")
        page.fill("textarea[name=note]", "irregular network, refer")
        page.click("#verdict button[type=submit]")
        page.wait_for_selector("#saved")
        assert image_id in page.locator("#saved").inner_text()
        assert f"/case/{image_id}" not in page.url  # the next case
        _shot(page, "03-after-verdict")

        engine = _engine(live)
        with engine.connect() as conn:
            stored = conn.execute(sa.select(reviews).where(reviews.c.image_id == image_id)).mappings().all()
            version = registry.version(conn, None).model_version
            p_mel = conn.execute(sa.select(predictions.c.p_mel).where(predictions.c.image_id == image_id)
                                 .where(predictions.c.model_version == version)).scalar()
            still_open = review.queue(conn, review.QueueFilter(status="open", limit=1000))["cases"]
            in_view = conn.execute(sa.text("SELECT review_verdict, review_label, reviewer FROM v_review_queue "
                                           "WHERE image_id = :i"), {"i": image_id}).one()
        engine.dispose()
        assert len(stored) == 1
        row = stored[0]
        assert (row["verdict"], row["label"], row["reviewer"], row["note"]) == ("set_label", "MEL", "admin", "irregular network, refer")
        assert row["model_version"] == version and row["p_mel"] == p_mel
        assert tuple(in_view) == ("set_label", "MEL", "admin")
        assert image_id not in {c["image_id"] for c in still_open}

        # the other pages
        page.goto(f"{live.base}/lesion-review/models")
        champion_row = page.locator(f"#models tr[data-version='{version}']")
        assert "champion" in champion_row.inner_text() and "passed" in champion_row.inner_text()
        with context.expect_page() as report_page:
            champion_row.locator("a", has_text="report").click()
        report_page.value.wait_for_load_state()
        assert "AUC" in report_page.value.content()
        _shot(page, "04-models")
        page.goto(f"{live.base}/lesion-review/nights")
        assert page.locator("svg.chart").count() == 3
        assert "1 reviewed" in page.locator("svg.chart").first.inner_html()
        _shot(page, "05-nights")

        # the entry in Airflow's own navigation (Browse -> Lesion review) opens the app inside Airflow's UI
        plugins = requests.get(f"{live.base}/api/v2/plugins", headers={"Authorization": f"Bearer {live.token()}"}, timeout=10).json()
        views = [v for p in plugins["plugins"] for v in p["external_views"]]
        assert {"name": "Lesion review", "url_route": "lesion-review"}.items() <= views[0].items()
        page.goto(f"{live.base}/")
        page.get_by_text("Browse", exact=True).first.click()
        page.get_by_text("Lesion review", exact=True).first.click()
        page.wait_for_url("**/plugin/lesion-review", timeout=30000)
        page.frame_locator("iframe").locator("#queue-count").wait_for(timeout=30000)
        _shot(page, "06-inside-airflow")
    finally:
        context.close()


def test_viewer_may_look_but_not_record(live, queue_ready, browser):
    context, page = _login(browser, live, "viewer")
    try:
        case = queue_ready["cases"][0]
        page.goto(f"{live.base}/lesion-review/case/{case['image_id']}")
        assert page.locator("#verdict").count() == 0 and "Read-only" in page.content()
    finally:
        context.close()
    token = live.token("viewer")
    refused = requests.post(f"{live.base}/lesion-review/case/{case['image_id']}/review", timeout=10,
                            headers={"Authorization": f"Bearer {token}"},
                            data={"model_version": case["model_version"], "verdict": "agree", "submission_id": "viewer-0000001"})
    assert refused.status_code == 403 and "not record verdicts" in refused.text


def test_cross_site_form_post_is_refused(live, queue_ready):
    case = queue_ready["cases"][1]
    refused = requests.post(f"{live.base}/lesion-review/case/{case['image_id']}/review", timeout=10, allow_redirects=False,
                            cookies={"_token": live.token()}, headers={"Origin": "http://evil.example"},
                            data={"model_version": case["model_version"], "verdict": "agree", "submission_id": "csrf-00000001"})
    assert refused.status_code == 403 and "cross-site" in refused.text
    engine = _engine(live)
    with engine.connect() as conn:
        written = conn.execute(sa.select(sa.func.count()).select_from(reviews)
                               .where(reviews.c.submission_id == "csrf-00000001")).scalar()
    engine.dispose()
    assert written == 0
    reliability.record("Cross-site verdict post", "form post with a valid session cookie and Origin: http://evil.example",
                       "refused; nothing written", "403 'cross-site form post refused'; 0 rows", 0, 0)


def test_out_of_scope_flag_in_a_real_browser(live, queue_ready, browser):
    """A prediction flagged out_of_scope shows, in the queue filtered by that flag and on its case page,
    the readable badge (with what it means as its tooltip) and its p(other). The row is made here on the
    live server's own throwaway database (scoring writes such rows once the model has the head) and put
    back afterwards; an unflagged prediction, so the flag alone brings it into the queue."""
    engine = _engine(live)
    with engine.connect() as conn:
        version = registry.version(conn, None).model_version
        target = conn.execute(sa.select(predictions.c.image_id, predictions.c.p_other, predictions.c.review_reasons,
                                        predictions.c.needs_review)
                              .where(predictions.c.model_version == version)
                              .order_by(predictions.c.needs_review, predictions.c.image_id)).first()
    where = sa.and_(predictions.c.image_id == target.image_id, predictions.c.model_version == version)
    with engine.begin() as conn:
        conn.execute(predictions.update().where(where).values(p_other=0.91, review_reasons="out_of_scope,uncertain",
                                                              needs_review=True))
    context, page = _login(browser, live, "admin")
    try:
        page.select_option("select[name=flag]", "out_of_scope")
        page.select_option("select[name=status]", "all")
        page.select_option("select[name=labelled]", "all")  # the target may be an ISIC-labelled image
        page.click("form.filters button[type=submit]")
        page.wait_for_selector("#queue-count")
        assert "flag=out_of_scope" in page.url
        shown = page.locator("#queue tbody tr")
        assert shown.count() >= 1 and shown.count() == page.locator("#queue tbody tr .tag.out_of_scope").count()
        row = page.locator(f"#queue tbody tr[data-image-id='{target.image_id}']")
        badge = row.locator(".tag.out_of_scope")
        assert badge.is_visible() and badge.inner_text() == "out of scope (not MEL/NV)"
        assert "neither melanoma nor nevus" in badge.get_attribute("title")
        assert row.locator(".tag.uncertain").inner_text() == "uncertain"
        assert row.locator("td.p-other").inner_text() == "0.910"
        _shot(page, "07-out-of-scope-queue")

        row.locator("a.case-link").click()
        page.wait_for_selector("#case-numbers")
        assert page.locator("#p-other").inner_text() == "0.910"
        flags = page.locator("#case-numbers td.flags")
        assert flags.locator(".tag.out_of_scope").inner_text() == "out of scope (not MEL/NV)"
        assert "neither melanoma nor nevus" in flags.locator(".flag-meaning").inner_text()
        _shot(page, "08-out-of-scope-case")
    finally:
        context.close()
        with engine.begin() as conn:
            conn.execute(predictions.update().where(where).values(
                p_other=target.p_other, review_reasons=target.review_reasons, needs_review=target.needs_review))
        engine.dispose()


def test_label_check_filters_and_no_champion_in_a_real_browser(live, queue_ready, browser):
    """The Label check (one contradiction planted: an ISIC nevus predicted MEL) lists what
    review.label_check says, labelled images only; its split filter narrows it to what the database
    holds for that split; the queue's labelled filter shows labelled cases. Then, with the champion
    demoted and a newer version refused by the gate, the queue says so and links to Model versions.
    Everything changed here is put back."""
    engine = _engine(live)
    with engine.connect() as conn:
        champion = champion_row(conn)
        version = champion["model_version"]
        nevus = conn.execute(sa.select(predictions.c.image_id, predictions.c.predicted_label, predictions.c.needs_review,
                                       predictions.c.review_reasons)
                             .join(images, images.c.image_id == predictions.c.image_id)
                             .join(splits, splits.c.image_id == images.c.image_id)
                             .where(predictions.c.model_version == version, images.c.label == "NV",
                                    splits.c.split != "train",  # the label check shows what the model was not fit on
                                    predictions.c.predicted_label == "NV").order_by(predictions.c.image_id)).first()
    where = sa.and_(predictions.c.image_id == nevus.image_id, predictions.c.model_version == version)
    refused = {**champion, "model_version": "refused-live", "run_id": "refused-live", "is_champion": False,
               "status": "rejected", "created_at": champion["created_at"] + timedelta(hours=1),
               "gate": gate.Decision((gate.Check("pass", "floor", "test auc 0.9000 >= floor 0.70", "test"),
                                      gate.Check("fail", "floor", "test mel_sensitivity 0.6500 < floor 0.80", "test"))).to_json()}
    with engine.begin() as conn:
        conn.execute(predictions.update().where(where).values(predicted_label="MEL", needs_review=True,
                                                              review_reasons="predicted_mel"))
    context, page = _login(browser, live, "admin")
    try:
        with engine.connect() as conn:
            expected = review.label_check(conn, review.QueueFilter(limit=1000))
            in_test = review.label_check(conn, review.QueueFilter(limit=1000, split="test"))
            labelled = review.queue(conn, review.QueueFilter(limit=1000, labelled="labelled"))
        assert nevus.image_id in {c["image_id"] for c in expected["cases"]}
        page.get_by_role("link", name="Label check", exact=True).click()
        page.wait_for_selector("#label-check-intro")
        assert page.url.endswith("/lesion-review/label-check")
        shown = set(page.locator("#queue tbody tr").evaluate_all("rows => rows.map(r => r.dataset.imageId)"))
        assert shown == {c["image_id"] for c in expected["cases"][:500]}
        assert "–" not in page.locator("#queue tbody tr td:nth-child(10)").all_inner_texts()  # every one ISIC-labelled
        assert page.locator(f"#queue tbody tr[data-image-id='{nevus.image_id}'] td:nth-child(10)").inner_text() == "NV"
        assert f"ISIC NV predicted MEL: {expected['counts']['isic_label']['NV']}" in page.locator("#label-check-kinds").inner_text()
        _shot(page, "09-label-check")

        # a filter: the test split only
        page.select_option("select[name=split]", "test")
        page.click("form.filters button[type=submit]")
        page.wait_for_selector("#queue-count")
        assert "label-check?" in page.url and "split=test" in page.url
        ids = set(page.locator("#queue tbody tr").evaluate_all("rows => rows.map(r => r.dataset.imageId)"))
        assert ids == {c["image_id"] for c in in_test["cases"]}
        if not ids:  # nothing contradicts ISIC in test: the page says so and what other splits hold
            assert "0 labelled images in split test" in page.locator("#empty").inner_text()

        # the queue's labelled filter: the flagged ISIC-labelled images
        page.goto(f"{live.base}/lesion-review/?labelled=labelled")
        page.wait_for_selector("#queue-count")
        assert page.locator("#queue tbody tr").count() == min(labelled["total"], 500) > 0
        assert "–" not in page.locator("#queue tbody tr td:nth-child(10)").all_inner_texts()

        # no champion: the last version was refused by the gate; the page says why and links to Model versions
        with engine.begin() as conn:
            conn.execute(model_versions.update().where(model_versions.c.model_version == version)
                         .values(is_champion=False, status="retired"))
            conn.execute(model_versions.insert().values(refused))
        page.goto(f"{live.base}/lesion-review/")
        message = page.locator("#no-champion")
        assert "none promoted: the last one, refused-live, was refused by the gate: test mel_sensitivity 0.6500 < floor 0.80" \
            in message.inner_text()
        assert page.locator("#queue").count() == 0
        _shot(page, "10-no-champion")
        message.get_by_role("link", name="Model versions").click()
        page.wait_for_selector("#models")
        assert page.url.endswith("/lesion-review/models")
        assert "failed" in page.locator("#models tr[data-version='refused-live']").inner_text()
    finally:
        context.close()
        with engine.begin() as conn:
            conn.execute(model_versions.delete().where(model_versions.c.model_version == "refused-live"))
            conn.execute(model_versions.update().where(model_versions.c.model_version == version)
                         .values(is_champion=True, status="champion"))
            conn.execute(predictions.update().where(where).values(
                predicted_label=nevus.predicted_label, needs_review=nevus.needs_review, review_reasons=nevus.review_reasons))
        engine.dispose()


def test_sites_page_and_validation_queue_in_a_real_browser(live, queue_ready, browser, tmp_path):
    """The Sites page lists what `lesion sites` says (the unlabelled night's clinic `unvalidated`); the
    clinic's validation queue shows its sample in drawn order with progress once labels are imported
    ("5 of 20 labelled, 3 melanomas"); a case and the queue show the site and its status. The sample and
    the labels made here are removed afterwards."""
    from lesion_tasks.core.schema import label_imports, site_samples
    from lesion_tasks.ingest.label_import import import_labels
    from lesion_tasks.sites import status as sites

    engine = _engine(live)
    drawn = cli.sample_site(live.settings, "night-1", 20)
    picked = [r["image_id"] for r in drawn["images"][:5]]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image_id,diagnosis\n" + "".join(f"{i},{'MEL' if k < 3 else 'NV'}\n" for k, i in enumerate(picked)))
    assert import_labels(csv_path, live.settings)["imported"] == 5
    context, page = _login(browser, live, "admin")
    try:
        listed = sites.overview(live.settings)["sites"]
        page.get_by_role("link", name="Sites", exact=True).click()
        page.wait_for_selector("#sites")
        rows = page.locator("#sites tbody tr")
        assert rows.count() == len(listed)
        night = page.locator("#sites tbody tr[data-site='night-1']")
        status = next(s["status"] for s in listed if s["site"] == "night-1")
        assert night.locator(".site-status").inner_text() == status == "provisional"  # labels, no retrain yet
        assert "retrain" in night.locator("td.needed").inner_text()
        # its operating point: the threshold its cases are decided at and how it was chosen (`lesion sites --json`)
        op = next(s["operating_point"] for s in listed if s["site"] == "night-1")
        cell = night.locator("td.operating-point").inner_text()
        assert op["method"] in cell and f"{op['threshold']:.3f}" in cell and f"{op['images']} images" in cell, cell
        _shot(page, "10-sites")

        night.locator("td a").first.click()
        page.wait_for_selector("#validation-queue")
        assert page.locator("#sample-progress").inner_text().strip().endswith("5 of 20 labelled, 3 melanomas.")
        order = page.locator("#validation-queue tbody tr").evaluate_all("rows => rows.map(r => r.dataset.imageId)")
        assert order == [r["image_id"] for r in drawn["images"]]
        assert page.locator("#validation-queue tbody tr.labelled").count() == 5
        _shot(page, "11-validation-queue")

        page.locator("#validation-queue tbody tr.open a.case-link").first.click()
        page.wait_for_selector("#case-site")
        site_cell = page.locator("#case-site").inner_text()
        # labels, no evaluation yet: decided at its operating point, which says how it was chosen
        words = {"unlabelled": f"its operating point, estimated from {op['images']} unlabelled images",
                 "pooled": "the pooled threshold", "labelled": "its own"}[op["method"]]
        assert "night-1" in site_cell and "provisional" in site_cell and words in site_cell, site_cell

        page.goto(f"{live.base}/lesion-review/")
        page.wait_for_selector("#queue-count")
        first = page.locator("#queue tbody tr").first
        assert first.locator(".site-status").inner_text() in ("unvalidated", "provisional", "validated", "failing")
    finally:
        context.close()
        with engine.begin() as conn:
            conn.execute(images.update().where(images.c.image_id.in_(picked)).values(label=None, diagnosis=None,
                                                                                       label_source=None))
            conn.execute(label_imports.delete())
            conn.execute(site_samples.delete().where(site_samples.c.site == "night-1"))
        engine.dispose()
