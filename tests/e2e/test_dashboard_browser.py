"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright; no
browser is downloaded) against a real `lcmq api` process and a real tiny-model worker.

The batch is submitted before any worker runs, so the page opens on a batch at 0% and
everything after that arrives through the page's live updates (the events stream and the
refetched gallery), not a reload. The screenshot goes to the test's artifacts folder, and to
$LCMQ_TEST_ARTIFACTS when set (CI keeps it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.support.api_server import start_api

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PROMPTS = 12
# Read at import: the env fixtures clear every LCMQ_* variable while a test runs.
KEEP_ARTIFACTS_IN = os.environ.get("LCMQ_TEST_ARTIFACTS")
# Predicates as functions: a string expression would be eval'ed in the page, which its CSP forbids.
LOADED_IMAGES = "[...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0).length"


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if IN_CI:
        pytest.fail(reason + " (CI=true: a missing browser is a failure)")
    pytest.skip(reason)


def keep_artifact(source: Path) -> None:
    if KEEP_ARTIFACTS_IN:
        Path(KEEP_ARTIFACTS_IN).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, Path(KEEP_ARTIFACTS_IN) / source.name)


def submit(cli, env: dict[str, str], tmp_path: Path) -> str:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"a lighthouse on a cliff at dusk, view {i}", "seed": 100 + i} for i in range(PROMPTS)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    submitted = cli(
        env, "submit", str(prompts), "--model", "tiny", "--chunk-size", "2", "--name", "lighthouses", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    return json.loads(submitted.stdout.strip().splitlines()[-1])["batch_id"]


def test_a_running_batch_reaches_100_percent_with_every_image_in_the_gallery(services_env, procs, cli, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    server = start_api(procs, services_env)
    batch_id = submit(cli, services_env, tmp_path)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{server.url}/?token={server.signin_token()}")
            assert page.url == f"{server.url}/"  # the token is gone from the address bar
            (cookie,) = [c for c in page.context.cookies() if c["name"] == "lcmq_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
            assert page.get_by_role("link", name="lighthouses").count() == 1
            page.screenshot(path=str(artifacts / "batches.png"), full_page=True)
            keep_artifact(artifacts / "batches.png")

            page.get_by_role("link", name="lighthouses").click()
            page.wait_for_url(f"{server.url}/batches/{batch_id}")
            assert page.text_content("#percent") == "0%"  # no worker yet: the batch is waiting
            assert page.locator("#gallery img").count() == 0

            procs(services_env, "worker", "--model", "tiny", "--batch-size", "4").wait_ready()
            page.wait_for_function("() => document.getElementById('percent').textContent === '100%'", timeout=180_000)
            page.wait_for_function(f"() => {LOADED_IMAGES} === {PROMPTS}", timeout=30_000)
            assert page.locator("#batch").get_attribute("data-done") == "true"
            assert page.text_content("[data-count=succeeded]") == str(PROMPTS)
            screenshot = artifacts / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            keep_artifact(screenshot)

            page.locator("#gallery figure[data-index='3'] button").click()
            dialog = page.locator("dialog#details")
            dialog.wait_for(state="visible")
            assert "a lighthouse on a cliff at dusk, view 3" in dialog.inner_text()
            assert "103" in dialog.inner_text()  # its seed
        finally:
            browser.close()
