"""The `lesion_retrain` trigger form in Airflow's own UI, in a real browser: the DAG page's Trigger button
opens the Params form, which shows the demo profile's values (no empty field, no literal `null`) and
offers every backbone but the test-only `tiny`; the DAG's docs say where the labelled images are counted.
A screenshot (11-trigger-form.png) goes to LESION_SCREENSHOT_DIR. Nothing is triggered."""

from __future__ import annotations

import re

import pytest

from lesion_tasks.model.backbones import BACKBONES
from lesion_tasks.model.config import PARAM_KEYS, PROFILES
from tests.live.browser import SHOTS, chromium
from tests.live.browser import login as _login

VALUE = """name => {
  const el = document.querySelector(`input[name="element_${name}"]`) || document.querySelector(`#element_${name} input`);
  return el ? el.value : null;
}"""


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def test_retrain_form_shows_the_demo_profiles_values(live, browser):
    session = live.session()
    live.wait(lambda: session.get(f"{live.base}/api/v2/dags/lesion_retrain", timeout=10).ok, 180, "lesion_retrain to be parsed")
    demo = PROFILES["demo"]
    context, page = _login(browser, live, "admin", ready="#queue-count, #no-champion")
    try:
        page.goto(f"{live.base}/dags/lesion_retrain")
        page.locator("[data-testid=trigger-dag-button]").first.click(timeout=60000)
        dialog = page.get_by_role("dialog")
        dialog.locator("#element_backbone").wait_for(timeout=30000)
        values = {name: page.evaluate(VALUE, name) for name in PARAM_KEYS}
        assert values["profile"] == "demo" and values["backbone"] == demo.backbone == "mobilenet025_multiscale", values
        assert values["weights"] == demo.weights
        for name in ("epochs", "image_size", "seed", "mc_samples"):
            assert values[name] and int(values[name]) == getattr(demo, name), (name, values)
        assert values["target_sensitivity"] and float(values["target_sensitivity"]) == demo.target_sensitivity, values
        assert "null" not in values.values() and "" not in values.values(), values
        text = dialog.inner_text()
        assert not re.search(r"\bnull\b", text), text
        for title in ("Profile", "Backbone", "Epochs", "Image size", "Weights", "MC-dropout samples"):
            assert title in text
        # the backbone is free text with suggestions: every backbone but the test-only one
        offered = dialog.locator("#list_backbone option").evaluate_all("options => options.map(o => o.value)")
        assert "tiny" not in offered
        assert sorted(offered) == sorted(set(BACKBONES) - {"tiny"})
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "11-trigger-form.png"))

        # the DAG's docs: where the labelled MEL / NV images are counted
        page.keyboard.press("Escape")
        dialog.wait_for(state="detached", timeout=10000)
        page.get_by_role("button", name="Dag Docs").click()
        docs = page.get_by_role("dialog")
        docs.get_by_text("SELECT label, count(*) FROM images GROUP BY label").wait_for(timeout=10000)
        assert "prepare_split" in docs.inner_text()
    finally:
        context.close()
