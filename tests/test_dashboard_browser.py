"""The example project's live dashboard in a real headless browser.

The demo command serves the dashboard (Uvicorn, the listener inside it, the in-memory
channel layer) on a fresh database; Chromium, driven by Playwright, logs in as the demo
user; a change committed by a plain psycopg connection must show on the page without a
reload. Skipped, with the reason, when Playwright or Chromium is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import uuid

import psycopg
import pytest

from tests.conftest import ROOT, ManagedProcess, django_env

TIMEOUT_MS = 20_000
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str:
    """Chromium's executable (``PGNOTIFY_CHROMIUM``, else the first on ``PATH``), or skip."""
    candidates = [os.environ.get("PGNOTIFY_CHROMIUM"), "chromium", "chromium-browser"]
    for candidate in filter(None, candidates):
        found = shutil.which(candidate)
        if found:
            return found
    pytest.skip("no Chromium found (apt-get install chromium, or set PGNOTIFY_CHROMIUM)")


@pytest.fixture
def chromium() -> str:
    """Checked before the demo starts, so that a skip costs nothing."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    return find_chromium()


@pytest.fixture
def demo(empty_database_url):
    """``manage.py demo`` serving the dashboard on a fresh database; its URL."""
    env = django_env(
        DJANGO_SETTINGS_MODULE="example_site.settings", DATABASE_URL=empty_database_url
    )
    env.pop("REDIS_URL", None)  # the in-memory layer, with the listener inside the server
    options = ["--rate", "0.5", "--seconds", "300", "--port", "0", "--no-color"]
    manage = str(ROOT / "example_project" / "manage.py")
    process = ManagedProcess([sys.executable, manage, "demo", *options], env)
    try:
        line = process.wait_for(r"Live dashboard: http://", timeout=60, stream="out")
        yield line.split("Live dashboard: ", 1)[1].split()[0], empty_database_url
    finally:
        process.stop(signal.SIGTERM, timeout=20)


def test_a_committed_change_shows_on_the_dashboard_without_reload(chromium, demo):
    from playwright import sync_api

    executable = chromium
    url, database_url = demo
    customer = f"Browser-{uuid.uuid4().hex[:8]}"

    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {executable} does not start: {exc}")
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.fill("input[name=username]", "demo")
            page.fill("input[name=password]", "demo")
            page.click("button[type=submit]")
            page.wait_for_selector("#connection[data-state=connected]")
            page.evaluate("window.notReloaded = true")

            with psycopg.connect(database_url, autocommit=True) as conn:
                row = conn.execute(
                    "INSERT INTO shop_order (customer, status, total, note) "
                    "VALUES (%s, 'new', 12.5, '') RETURNING id",
                    [customer],
                ).fetchone()
                assert row is not None
                page.wait_for_selector(f"#order-{row[0]} .customer:text-is('{customer}')")
                conn.execute("UPDATE shop_order SET status = 'on-the-page' WHERE id = %s", row)
                page.wait_for_selector(f"#order-{row[0]} .status:text-is('on-the-page')")
            assert page.evaluate("window.notReloaded") is True
        finally:
            browser.close()
