"""Browser helpers of the live tests: Debian's headless Chromium through Playwright (no browser download),
a login through Airflow's own page, polling that the app's CSP allows, and screenshots."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import IN_CI
from tests.live.conftest import USERS

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("LESION_SCREENSHOT_DIR", REPO / "build" / "screenshots"))
CHROMIUM = os.environ.get("LESION_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@contextmanager
def chromium():
    """Debian's headless Chromium through Playwright (the other browser tests of this package use it too)."""
    if not Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set LESION_CHROMIUM)"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing browser is a failure)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


def login(browser, live, user: str, viewport: dict | None = None, ready: str = "#queue-count"):
    """Log in through Airflow's own login page, reached from the review app; `ready`: what the app's
    first page must show (the queue; "#queue-count, #no-champion" where there may be no champion yet)."""
    context = browser.new_context(viewport=viewport or {"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{live.base}/lesion-review/")
    page.wait_for_selector("input[name=username]", timeout=30000)  # Airflow's own login page
    assert "/auth/login" in page.url
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", USERS[user][1])
    page.press("input[name=password]", "Enter")
    page.wait_for_url(f"{live.base}/lesion-review/**", timeout=30000)
    page.wait_for_selector(ready, timeout=30000)
    return context, page


def until(page, predicate: str, timeout: float = 30) -> None:
    """Poll a JavaScript predicate (a function) from here, in a page or a frame. Not page.wait_for_function: its
    in-page polling evals the predicate's text, which the app's CSP (no 'unsafe-eval') refuses once it has to poll."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(0.1)


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path
