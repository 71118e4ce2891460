"""A listener behind its receivers: what a lost connection costs, and the server's queue.

While receivers are slow the listener stops reading once its local queue is full, and the
backlog waits on the server: a lost connection loses it too, and the listener's own
connection cannot be asked how full the server's queue is without reading it all first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from django.db import connection
from psycopg import sql

from django_pgnotify.installation import declarations_for
from django_pgnotify.listener import Listener
from django_pgnotify.signals import listener_reconnected
from django_pgnotify.testing import CapturedChanges, capture_row_changes
from tests.conftest import django_env, wait_until
from tests.conftest import test_database_url as database_url
from tests.test_listener_resilience import (
    Proxy,
    create_orders_one_by_one,
    fast_listener,
    held,
    start_listener,
    terminate,
)
from tests.testapp.models import Order


@contextmanager
def reconnects() -> Iterator[list[float]]:
    """When ``listener_reconnected`` says changes may be missing since (``time.monotonic()``
    when received, less ``downtime``): later than that by the time it takes to receive."""
    sent: list[float] = []

    async def record(sender, downtime, **kwargs):  # on the listener's loop: received at once
        sent.append(time.monotonic() - downtime)

    listener_reconnected.connect(record, weak=False)
    try:
        yield sent
    finally:
        listener_reconnected.disconnect(record)


def wait_event(conn: psycopg.Connection, pid: int) -> str | None:
    row = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row[0] if row else None


def statuses(changes: CapturedChanges) -> list[str]:
    return [e.fields["status"] for e in changes]


# What a lost connection costs


def test_downtime_of_a_listener_that_had_fallen_behind_covers_the_changes_it_lost(
    transactional_db, other_connection
):
    """Its local queue full, the listener reads nothing and notices nothing: the loss is
    noticed once receivers catch up, after the changes committed meanwhile were lost. The
    window counts from when it fell behind (so it covers them); what it had read or had
    been sent before the loss is still dispatched."""
    with (
        held("hold") as hold,
        reconnects() as sent,
        fast_listener(QUEUE_SIZE=2),
        capture_row_changes("testapp.Order") as changes,
    ):
        pid = changes.listener.health.backend_pid
        Order.objects.create(status="hold")
        assert hold["hold"].wait(10), "the held order did not reach its receiver"
        create_orders_one_by_one(5)
        wait_until(lambda: changes.stats["queue_full"] >= 1, what="a full local queue")
        fell_behind = time.monotonic()  # later than it did
        # Its server session has sent all it had: nothing committed so far is lost.
        wait_until(lambda: wait_event(other_connection, pid) == "ClientRead", what="all sent")

        terminate(other_connection, pid)
        Order.objects.create(status="lost")  # nobody listens: read nowhere
        hold["hold released"].set()
        wait_until(lambda: sent, what="listener_reconnected")
        Order.objects.create(status="after")
        changes.wait_for(lambda e: e.fields["status"] == "after")

    (since,) = sent
    assert since <= fell_behind  # unfixed: since the loss was noticed, after the termination
    assert statuses(changes) == ["hold", "n0", "n1", "n2", "n3", "n4", "after"]
    assert changes.stats["reconnects"] == 1


def test_downtime_counts_from_when_the_listener_was_last_seen_caught_up(
    transactional_db, other_connection
):
    """Caught up again while changes still wait for a receiver (so its own probe waits),
    the listener learns it from the marker of a sample sent from another session, once it
    reads it: a later loss does not count from when it fell behind."""
    with (
        held("hold", "again") as hold,
        reconnects() as sent,
        fast_listener(QUEUE_SIZE=2, PROBE_INTERVAL=0.2),
        capture_row_changes("testapp.Order") as changes,
    ):
        listener = changes.listener
        Order.objects.create(status="hold")
        assert hold["hold"].wait(10), "the held order did not reach its receiver"
        create_orders_one_by_one(3)
        Order.objects.create(status="again")
        wait_until(lambda: changes.stats["queue_full"] >= 1, what="a full local queue")
        released = time.monotonic()
        hold["hold released"].set()
        assert hold["again"].wait(10), "the second held order did not reach its receiver"
        Order.objects.create(status="waiting")  # read, and waits: the listener is busy
        wait_until(lambda: listener._caught_up_at > released, what="seen caught up")
        assert not listener._fell_behind

        terminate(other_connection, listener.health.backend_pid)
        wait_until(lambda: sent, what="listener_reconnected")
        hold["again released"].set()
        changes.wait_for(lambda e: e.fields["status"] == "waiting")

    (since,) = sent
    assert since > released  # not since it fell behind: it read on after
    assert statuses(changes) == ["hold", "n0", "n1", "n2", "again", "waiting"]


@pytest.fixture
def cut(transactional_db) -> Iterator[Proxy]:
    proxy = Proxy()
    yield proxy
    proxy.close()


def test_downtime_of_a_connection_that_died_silently_counts_from_its_last_probe(cut):
    """Nothing tells that it died until a probe goes unanswered (PROBE_TIMEOUT, 2 s in
    tests.settings_listener): changes committed meanwhile were lost too."""
    listener = start_listener(django_env(DATABASE_URL=cut.url()))
    try:
        listener.wait_for(r"listening on", stream="err")

        cut.freeze()
        line = listener.wait_for(r"reconnected to", stream="err", timeout=15)
        assert listener.stop() == 0
    finally:
        listener.kill()

    found = re.search(r" after ([0-9.]+)s .*since it was last seen caught up, ([0-9.]+)s ago", line)
    assert found, line
    offline, downtime = float(found[1]), float(found[2])
    assert downtime - offline >= 1.9  # each rounded to 0.1 s


@pytest.fixture
def cut_alias(transactional_db) -> Iterator[Proxy]:
    """A database alias ``cut`` that reaches the test database through a ``Proxy``."""
    from django.db import connections

    proxy = Proxy()
    connections.settings["cut"] = {
        **connections.settings["default"],
        "HOST": "127.0.0.1",
        "PORT": str(proxy.port),
        "OPTIONS": {
            **connections.settings["default"].get("OPTIONS", {}),
            "sslmode": "disable",
            "gssencmode": "disable",
        },
    }
    try:
        yield proxy
    finally:
        proxy.close()
        del connections.settings["cut"]
        if hasattr(connections._connections, "cut"):
            connections["cut"].close()
            del connections["cut"]


def test_downtime_covers_changes_sent_into_a_dead_connection_while_the_listener_was_busy(
    cut_alias,
):
    """A connection cut silently while a receiver is slow: the server's session, having
    handed a change to the network, is idle, yet the listener never reads it. Samples
    taken from another session meanwhile must not count as reading it: the downtime
    covers that change."""
    with (
        held("hold") as hold,
        reconnects() as sent,
        fast_listener(LISTEN_DATABASES={"default": "cut"}, PROBE_INTERVAL=0.2),
        capture_row_changes("testapp.Order") as changes,
    ):
        Order.objects.create(status="hold")
        assert hold["hold"].wait(10), "the held order did not reach its receiver"
        Order.objects.create(status="waiting")  # read, and waits: the listener is busy
        wait_until(lambda: changes.listener.health.local_queue == 1, what="one waiting")

        cut_alias.freeze()
        before_lost = time.monotonic()
        Order.objects.create(status="lost")  # sent into the cut connection, never read
        # Two samples started after it, each from a connection of its own, the first ended.
        opened = len(cut_alias.pairs)
        wait_until(lambda: len(cut_alias.pairs) >= opened + 3, what="two samples")
        hold["hold released"].set()
        wait_until(lambda: sent, what="listener_reconnected", timeout=15)
        Order.objects.create(status="after")
        changes.wait_for(lambda e: e.fields["status"] == "after")

    (since,) = sent
    assert statuses(changes) == ["hold", "waiting", "after"]
    assert since <= before_lost  # unfixed: since the last sample, after the lost change


# The server's notification queue, sampled while the listener is behind


@pytest.fixture
def stuck_listener() -> Iterator[psycopg.Connection]:
    """A session that ran LISTEN and stays in a transaction: the server keeps every
    notification sent after it, whoever else read them."""
    with psycopg.connect(database_url()) as stuck:
        stuck.execute("LISTEN pgnotify_backlog_test")
        stuck.commit()
        stuck.execute("SELECT 1")
        yield stuck
        stuck.rollback()


def queue_usage(conn: psycopg.Connection) -> float:
    return float(conn.execute("SELECT pg_notification_queue_usage()").fetchone()[0])


def test_the_server_queue_is_sampled_and_warned_about_while_the_listener_is_behind(
    transactional_db, other_connection, stuck_listener, caplog
):
    """Changes wait for a receiver, so the probe, which samples the queue, waits too:
    the queue is sampled from another session, and its warning said. (A session that
    stays in a transaction keeps the backlog in the server's queue, however much of it
    the listener's socket buffers would hold.)"""
    caplog.set_level(logging.WARNING, logger="django_pgnotify")
    # About 20 pages of 8 kB above what others hold; the backlog below is several times that.
    threshold = queue_usage(other_connection) + 0.00002
    with (
        held("hold") as hold,
        fast_listener(QUEUE_SIZE=5, PROBE_INTERVAL=0.2, QUEUE_USAGE_WARNING=threshold),
        capture_row_changes("testapp.Order") as changes,
    ):
        Order.objects.create(status="hold")
        assert hold["hold"].wait(10), "the held order did not reach its receiver"
        Order.objects.bulk_create([Order(status="x" * 20) for _ in range(16000)])
        assert queue_usage(other_connection) > threshold

        wait_until(
            lambda: any("notification queue is" in r.getMessage() for r in caplog.records),
            what="a queue usage warning",
        )
        assert changes.listener.health.queue_usage > threshold
        # However close the usage is to the threshold, it reads above it.
        (warning,) = [r.getMessage() for r in caplog.records if "queue is" in r.getMessage()]
        (shown,) = re.findall(r"queue is ([\d.]+)% full \(warning above ([\d.]+)%\)", warning)
        assert float(shown[0]) > float(shown[1]), warning
        assert changes.stats["dispatched"] == 0  # still behind its receiver
        hold["hold released"].set()

    assert changes.stats["reconnects"] == 0


@pytest.fixture
def admin_connection(transactional_db) -> Iterator[psycopg.Connection]:
    """A connection to the server's ``postgres`` database, to alter the test database."""
    with psycopg.connect(database_url(dbname="postgres"), autocommit=True) as conn:
        yield conn


def test_a_sample_that_fails_is_said_once_and_listening_goes_on(admin_connection, caplog):
    """The second connection refused (the database accepts none): said once, in a
    warning, then at debug level; the listener goes on, and says when it works again."""
    caplog.set_level(logging.DEBUG, logger="django_pgnotify.listener")
    name = sql.Identifier(connection.settings_dict["NAME"])

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "cannot sample" in r.getMessage()]

    with (
        held("hold") as hold,
        fast_listener(QUEUE_SIZE=5, PROBE_INTERVAL=0.1),
        capture_row_changes("testapp.Order") as changes,
    ):
        Order.objects.create(status="hold")
        assert hold["hold"].wait(10), "the held order did not reach its receiver"
        Order.objects.create(status="waiting")  # read, and waits: the listener is busy
        admin_connection.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        try:
            wait_until(lambda: len(failures()) >= 3, what="three failed samples")
        finally:
            admin_connection.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name)
            )
        wait_until(
            lambda: any("works again" in r.getMessage() for r in caplog.records),
            what="a sample that works again",
        )
        hold["hold released"].set()
        Order.objects.create(status="after")
        changes.wait_for(lambda e: e.fields["status"] == "after")

    assert [r.levelno for r in failures()][:3] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "not currently accepting connections" in failures()[0].getMessage()
    assert statuses(changes) == ["hold", "waiting", "after"]
    assert changes.stats["reconnects"] == 0


def test_no_sample_from_another_session_while_the_probe_can_run(transactional_db):
    """Quiet, the listener probes on its own connection, which samples the queue: no
    second connection is opened for it."""
    with fast_listener(PROBE_INTERVAL=0.1), capture_row_changes("testapp.Order") as changes:
        listener: Listener = changes.listener
        probes = changes.stats["probes"]
        wait_until(lambda: changes.stats["probes"] >= probes + 3, what="three probes")

        assert listener._sampling is None


def test_a_queue_usage_warning_reads_above_a_zero_threshold(transactional_db, caplog, settings):
    """A held queue's first page (9.5e-07 of it) over a threshold of 0: not "0.0% full
    (warning above 0.0%)"."""
    settings.PGNOTIFY = {**settings.PGNOTIFY, "QUEUE_USAGE_WARNING": 0.0}
    caplog.set_level(logging.WARNING, logger="django_pgnotify.listener")
    listener = Listener(declarations_for(["testapp.Order"]), using="default")

    listener._sampled(9.5e-07)

    (warning,) = [r.getMessage() for r in caplog.records]
    assert "notification queue is 0.000095% full (warning above 0.0%)" in warning
