"""A promotion from `lesion_retrain`'s trigger form keeps the review queue and its verdicts, in a real browser
against the real `airflow standalone`: a verdict is recorded on the queue's first case, a different model is
trained and promoted from the form (Airflow's own Trigger dialog, Params filled in), and the queue page loaded the
moment the run succeeds is not empty, comes from the new champion (the previous champion's predictions, tagged,
where it has not scored an image yet) and still counts the case as reviewed; the case page names the version the
verdict was given under. The promotion's champion Asset starts `lesion_nightly_score`; once it has scored every
image the case is still reviewed (or open again only as `disagrees with verdict`, the new model's call against it).
Runs after test_review_ui (file order), whose night of unlabelled images it reuses where there is one."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from lesion_tasks.core.schema import images, predictions
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.ops.synthetic import make_drop
from lesion_tasks.review import cases as review
from lesion_tasks.scoring import nightly as scoring
from lesion_tasks.versions import registry
from tests.live.browser import chromium, shot
from tests.live.browser import login as _login
from tests.live.test_airflow_rest import TINY

# what the form is given: the live tests' tiny model with another seed and epoch count, so the retrain is a
# different model (a retrain whose head and config equal the champion's is a no-op by design)
FORM = {"backbone": "tiny", "image_size": "64", "weights": "none", "epochs": "120", "seed": "7", "mc_samples": "20",
        "target_sensitivity": "0.97"}
FIELD = """([name, value]) => {
  const el = document.querySelector(`input[name="element_${name}"]`) || document.querySelector(`#element_${name} input`);
  return el ? el.value : null;
}"""


def _champion(live) -> str | None:
    engine = sa.create_engine(live.settings.db_url)
    with engine.connect() as conn:
        v = registry.version(conn, None, required=False)
    engine.dispose()
    return v.model_version if v else None


def _open_queue(live) -> dict:
    engine = sa.create_engine(live.settings.db_url)
    with engine.connect() as conn:
        out = review.queue(conn, review.QueueFilter(status="open", limit=5, labelled=review.DEFAULT_LABELLED))
    engine.dispose()
    return out


@pytest.fixture(scope="module")
def open_cases(live):
    """A champion with open unlabelled cases: test_review_ui's, or (this file run alone) one trained through the
    REST API and a small unlabelled night scored."""
    session = live.session()
    if _champion(live) is None:
        live.trigger_and_wait(session, "lesion_retrain", TINY)
    if _open_queue(live)["total"] == 0:
        night = make_drop(live.tmp / "promotion-night", n_images=200, seed=14, size=96)
        (night / "metadata.csv").unlink()
        ingest(str(night), live.settings, drop_id="promotion-night")
        scoring.score(live.settings, run_id="promotion-night")
    queue = _open_queue(live)
    assert queue["total"] > 0, "no open unlabelled case to review"
    return queue


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _runs(session, live, dag_id: str) -> dict[str, dict]:
    response = session.get(f"{live.base}/api/v2/dags/{dag_id}/dagRuns?limit=100", timeout=10)
    assert response.ok, response.text
    return {r["dag_run_id"]: r for r in response.json()["dag_runs"]}


def test_a_promotion_from_the_form_keeps_the_queue_and_the_verdicts(live, open_cases, browser):
    session = live.session()
    before = _champion(live)
    context, page = _login(browser, live, "admin")
    try:
        # a verdict on the queue's first case (the likeliest melanoma): agree with the champion's call
        page.goto(f"{live.base}/lesion-review/")
        first = page.locator("#queue tbody tr").first
        image_id = first.get_attribute("data-image-id")
        first.locator("a.case-link").click()
        page.wait_for_selector("#verdict")
        page.check("input[name=verdict][value=agree]")
        page.click("#verdict button[type=submit]")
        page.wait_for_selector("#saved")
        assert image_id in page.locator("#saved").inner_text()

        # retrain from Airflow's own trigger form, another seed and epoch count
        seen = set(_runs(session, live, "lesion_retrain"))
        nightly_before = set(_runs(session, live, "lesion_nightly_score"))
        page.goto(f"{live.base}/dags/lesion_retrain")
        page.locator("[data-testid=trigger-dag-button]").first.click(timeout=60000)
        dialog = page.get_by_role("dialog")
        dialog.locator("#element_backbone").wait_for(timeout=30000)
        for name, value in FORM.items():
            field = dialog.locator(f'input[name="element_{name}"], #element_{name} input').first
            field.fill(value)
            field.press("Tab")
        assert {name: page.evaluate(FIELD, [name, value]) for name, value in FORM.items()} == FORM
        dialog.get_by_role("button", name="Trigger").last.click()
        new_runs = live.wait(lambda: [r for run_id, r in _runs(session, live, "lesion_retrain").items() if run_id not in seen],
                             60, "the run the form triggered")
        assert len(new_runs) == 1 and new_runs[0]["conf"]["seed"] == 7 and new_runs[0]["conf"]["epochs"] == 120, new_runs
        run_id = new_runs[0]["dag_run_id"]
        url = f"{live.base}/api/v2/dags/lesion_retrain/dagRuns/{run_id}"
        state = live.wait(lambda: (s := session.get(url, timeout=10).json()["state"]) in ("success", "failed") and s,
                          900, f"lesion_retrain run {run_id}")
        assert state == "success", session.get(f"{url}/taskInstances", timeout=10).json()
        after = _champion(live)
        assert after is not None and after != before, f"the form's model was not promoted (champion {after})"

        # the queue, the moment the promotion is done: not empty, the new champion's, the verdict still counted
        page.goto(f"{live.base}/lesion-review/")
        page.wait_for_selector("#queue-count")
        assert page.locator("#queue tbody tr").count() > 0, page.locator("#queue-count").inner_text()
        assert after in page.locator("#queue-count").inner_text()
        ids = page.locator("#queue tbody tr").evaluate_all("rows => rows.map(r => r.dataset.imageId)")
        tags = page.locator("#queue tbody tr td.flags").all_inner_texts()
        shown = dict(zip(ids, tags))
        assert image_id not in shown or "disagrees with verdict" in shown[image_id], shown.get(image_id)
        shot(page, "12-queue-after-promotion")
        page.goto(f"{live.base}/lesion-review/?status=reviewed")
        page.wait_for_selector("#queue-count")
        reviewed = page.locator("#queue tbody tr").evaluate_all("rows => rows.map(r => r.dataset.imageId)")
        assert image_id in reviewed or "disagrees with verdict" in shown.get(image_id, ""), (reviewed[:5], shown.get(image_id))
        page.goto(f"{live.base}/lesion-review/case/{image_id}")
        verdicts = page.locator("#reviews").inner_text()
        assert before in verdicts and "agree" in verdicts, verdicts

        # the champion Asset started lesion_nightly_score: once it has scored every image, still reviewed
        def scored_all():
            engine = sa.create_engine(live.settings.db_url)
            with engine.connect() as conn:
                n = conn.scalar(sa.select(sa.func.count()).select_from(images))
                done = conn.scalar(sa.select(sa.func.count()).select_from(predictions)
                                   .where(predictions.c.model_version == after))
            engine.dispose()
            return done == n

        live.wait(scored_all, 900, f"the new champion {after} to score every image")
        def asset_runs_done():
            runs = [r for run_id, r in _runs(session, live, "lesion_nightly_score").items()
                    if r["run_type"] == "asset_triggered" and run_id not in nightly_before]
            return runs if runs and all(r["state"] in ("success", "failed") for r in runs) else None

        triggered = live.wait(asset_runs_done, 600, "the lesion_nightly_score run the champion Asset started")
        assert {r["state"] for r in triggered} == {"success"}, triggered
        engine = sa.create_engine(live.settings.db_url)
        with engine.connect() as conn:  # v_review_queue: queue_rank is set for open cases only (the UI's order)
            case = conn.execute(sa.text("SELECT model_version, queue_rank, review_verdict, review_reasons "
                                        "FROM v_review_queue WHERE image_id = :i"), {"i": image_id}).one()
        engine.dispose()
        assert case.model_version == after and case.review_verdict == "agree", case
        assert case.queue_rank is None or "disagrees_with_verdict" in case.review_reasons, case
    finally:
        context.close()
