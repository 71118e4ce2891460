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
import threading
import time
import uuid
from contextlib import contextmanager

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


#: Holds the page's WebSocket sends (its subscription) until ``window.releaseSends()``, and
#: keeps its sockets in ``window.sockets``.
HOLD_SENDS = """
window.sockets = [];
window.heldSends = [];
window.holdSends = true;
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) { super(...args); window.sockets.push(this); }
  send(data) {
    if (window.holdSends) window.heldSends.push(() => super.send(data));
    else super.send(data);
  }
};
window.releaseSends = () => {
  window.holdSends = false;
  for (const send of window.heldSends.splice(0)) send();
};
"""


@contextmanager
def browser_page(chromium: str):
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {chromium} does not start: {exc}")
        try:
            context = browser.new_context()
            context.set_default_timeout(TIMEOUT_MS)
            yield context.new_page()
        finally:
            browser.close()


def log_in(page, url: str) -> None:
    page.goto(url)
    page.fill("input[name=username]", "demo")
    page.fill("input[name=password]", "demo")
    page.click("button[type=submit]")


def insert_order(conn: psycopg.Connection, customer: str) -> int:
    row = conn.execute(
        "INSERT INTO shop_order (customer, status, total, note) "
        "VALUES (%s, 'new', 12.5, '') RETURNING id",
        [customer],
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_committed_change_shows_on_the_dashboard_without_reload(chromium, demo):
    url, database_url = demo
    customer = f"Browser-{uuid.uuid4().hex[:8]}"

    with browser_page(chromium) as page:
        log_in(page, url)
        page.wait_for_selector("#connection[data-state=connected]")
        page.evaluate("window.notReloaded = true")

        with psycopg.connect(database_url, autocommit=True) as conn:
            pk = insert_order(conn, customer)
            page.wait_for_selector(f"#order-{pk} .customer:text-is('{customer}')")
            conn.execute("UPDATE shop_order SET status = 'on-the-page' WHERE id = %s", [pk])
            page.wait_for_selector(f"#order-{pk} .status:text-is('on-the-page')")
        assert page.evaluate("window.notReloaded") is True


def test_a_change_committed_before_the_page_subscribed_shows(chromium, demo):
    """The page is rendered before its subscription is in place: the gap is reloaded."""
    url, database_url = demo
    customer = f"Early-{uuid.uuid4().hex[:8]}"

    with browser_page(chromium) as page:
        page.add_init_script(HOLD_SENDS)
        log_in(page, url)
        page.wait_for_function("window.heldSends.length > 0")  # the subscription, held
        # A second page, subscribed, shows when the change has been pushed to subscribers.
        watcher = page.context.new_page()
        watcher.goto(url)
        watcher.wait_for_selector("#connection[data-state=connected]")
        with psycopg.connect(database_url, autocommit=True) as conn:
            pk = insert_order(conn, customer)
        watcher.wait_for_selector(f"#order-{pk} .customer:text-is('{customer}')")
        page.evaluate("window.releaseSends()")
        page.wait_for_selector("#connection[data-state=connected]")
        page.wait_for_selector(f"#order-{pk} .customer:text-is('{customer}')")


def test_a_change_that_arrives_while_the_page_reloads_is_kept(chromium, demo):
    """A change pushed while the list reloads is applied over the (older) list."""
    url, database_url = demo
    customer = f"During-{uuid.uuid4().hex[:8]}"
    marker = 2**40  # a pk no order of the demo reaches: shows that the reload was applied
    held_reloads: list = []
    hold = threading.Event()
    frames: list[str] = []

    def on_orders_json(route) -> None:
        if hold.is_set():
            held_reloads.append(route)
        else:
            route.continue_()

    def on_websocket(socket) -> None:
        socket.on("framereceived", lambda payload: frames.append(str(payload)))

    with browser_page(chromium) as page:
        page.add_init_script(HOLD_SENDS)
        page.route("**/orders.json", on_orders_json)
        page.on("websocket", on_websocket)
        log_in(page, url)
        page.wait_for_function("window.heldSends.length > 0")
        page.evaluate("window.releaseSends()")
        page.wait_for_selector("#connection[data-state=connected]")

        # Drop the socket: the page reconnects, subscribes again and reloads its list.
        hold.set()
        page.evaluate("window.sockets[0].close()")
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not held_reloads:
            assert time.monotonic() < deadline, "the page did not reload after reconnecting"
            page.wait_for_timeout(50)  # lets Playwright dispatch the route handler
        route = held_reloads[0]
        older = route.fetch()  # the list as it is before the change below
        orders = older.json()["orders"]

        with psycopg.connect(database_url, autocommit=True) as conn:
            pk = insert_order(conn, customer)
        while not any(customer in frame for frame in frames):
            assert time.monotonic() < deadline, "the change did not reach the page"
            page.wait_for_timeout(50)

        marked = {"pk": marker, "customer": "Marker", "status": "new", "total": "1.00"}
        route.fulfill(response=older, json={"orders": [marked, *orders]})
        page.wait_for_selector(f"#order-{marker}")
        assert page.locator(f"#order-{pk} .customer").all_text_contents() == [customer]


def test_the_log_out_button_logs_out(chromium, demo):
    url, _ = demo
    with browser_page(chromium) as page:
        log_in(page, url)
        page.wait_for_selector("#connection[data-state=connected]")
        with page.expect_navigation():
            page.click("#logout")
        page.wait_for_selector("input[name=username]")
        page.goto(url)  # logged out: the dashboard sends to the login page
        page.wait_for_selector("input[name=username]")
