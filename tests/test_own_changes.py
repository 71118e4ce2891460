"""Which backend PIDs count as this process's own, as Django connections open and close."""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
import types
import warnings
from collections.abc import Iterator

import psycopg
import pytest
from django.db import connections, transaction
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.signals import connection_created

from django_pgnotify import own_changes
from django_pgnotify.embedded import EmbeddedPostgres, database_settings
from django_pgnotify.own_changes import (
    CLOSED_GRACE,
    OPENED_MARGIN,
    SERVER_QUERY,
    Server,
    is_own_pid,
    is_own_write,
    server_of,
)
from django_pgnotify.testing import capture_row_changes
from tests.conftest import wait_until
from tests.durableapp.models import Job
from tests.test_durable import job_worker, one_batch
from tests.testapp.models import Tag


@pytest.fixture
def clock(monkeypatch):
    """The registry's clock, moved by hand: seconds pass without waiting for them."""
    now = types.SimpleNamespace(value=1000.0)
    monkeypatch.setattr(own_changes, "time", types.SimpleNamespace(monotonic=lambda: now.value))
    own_changes.track_own_connections()
    return now


@pytest.fixture
def wrapper(transactional_db):
    """A Django connection of its own, so the test's connection is left alone."""
    wrapper = connections.create_connection("default")
    yield wrapper
    wrapper.close()


@pytest.fixture(scope="module")
def another_server() -> Iterator[dict]:
    """The ``DATABASES`` entry of a PostgreSQL server other than the tests' own."""
    postgres = EmbeddedPostgres()
    try:
        yield database_settings(postgres.url)
    finally:
        postgres.close()


@pytest.fixture
def elsewhere(transactional_db, another_server) -> Iterator[object]:
    """A Django connection of this process to another server (a read replica, say).

    Under the alias Django's own connections without a database have: one the
    test case lets connect, and django.contrib.postgres leaves alone.
    """
    databases = {"default": {}, NO_DB_ALIAS: dict(another_server)}  # it wants a default
    settings = connections.configure_settings(databases)[NO_DB_ALIAS]
    wrapper = type(connections["default"])(settings, NO_DB_ALIAS)
    yield wrapper
    wrapper.close()


def open_pid(wrapper) -> int:
    wrapper.ensure_connection()
    return wrapper.connection.info.backend_pid


def server(conn: psycopg.Connection) -> Server:
    return server_of(conn.execute(SERVER_QUERY).fetchone())


@pytest.fixture
def here(other_connection) -> Server:
    """The tests' server, as the listener's connection (not Django's) tells it."""
    return server(other_connection)


def test_a_closed_connection_counts_as_own_for_the_grace_after_it_closed(clock, wrapper, here):
    pid = open_pid(wrapper)
    assert is_own_pid(pid, here)

    wrapper.close()
    clock.value += CLOSED_GRACE / 2
    assert is_own_pid(pid, here)  # its last notifications may still be on their way

    clock.value += CLOSED_GRACE / 2
    assert not is_own_pid(pid, here)  # the PID may be another client's by now


def test_a_connection_closed_long_ago_is_not_own_when_first_asked_about(clock, wrapper, here):
    pid = open_pid(wrapper)
    wrapper.close()

    clock.value += 3600

    assert not is_own_pid(pid, here)


def test_a_connection_collected_without_closing_counts_as_closed_then(clock, wrapper, here):
    unclosed = connections.create_connection("default")
    pid = open_pid(unclosed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # psycopg: deleted while open
        del unclosed
        gc.collect()
    clock.value += CLOSED_GRACE / 2
    assert is_own_pid(pid, here)

    clock.value += CLOSED_GRACE / 2
    assert not is_own_pid(pid, here)


def test_the_registry_holds_open_connections_and_recent_closes_only(clock, wrapper, here):
    pids = []
    for _ in range(50):  # a request each, with CONN_MAX_AGE = 0
        pids.append(open_pid(wrapper))
        wrapper.close()
        clock.value += 1

    recent = set(pids[-int(CLOSED_GRACE) :])
    assert not {pid for _, pid in own_changes._pids} & set(pids)
    assert {pid for _, pid in own_changes._closed} & set(pids) <= recent
    assert {pid for _, pid in own_changes._opened} & set(pids) <= recent
    assert not any(is_own_pid(pid, here) for pid in set(pids) - recent)


def test_an_old_change_counts_as_own_only_if_written_once_its_pid_was_ours(clock, wrapper, here):
    """A durable event may wait for hours: its writer's PID may be ours since."""
    opened = clock.value
    pid = open_pid(wrapper)
    clock.value += 60

    assert is_own_write(pid, opened + 30, here)
    assert is_own_write(pid, opened - OPENED_MARGIN / 2, here)  # within a round trip's doubt
    assert not is_own_write(pid, opened - 3600, here)  # by the session that had the PID before

    wrapper.close()
    clock.value += CLOSED_GRACE
    assert not is_own_write(pid, opened + 30, here)  # the PID may be another client's by now


def test_a_connection_recorded_again_counts_as_own_all_along(clock, here, monkeypatch):
    """Each Listener made in the process records the open connections again. The
    listener thread asks without the registry's lock: the PID must never be seen
    gone meanwhile, or an own change would be delivered."""
    pid = open_pid(connections["default"])  # this thread's, which are recorded again
    assert is_own_pid(pid, here)
    seen, asking = [], False

    def monotonic() -> float:
        # Where the registry reads its clock, another thread may ask about the PID.
        nonlocal asking
        if not asking:
            asking = True
            seen.append(is_own_pid(pid, here))
            asking = False
        return clock.value

    monkeypatch.setattr(own_changes, "time", types.SimpleNamespace(monotonic=monotonic))
    own_changes.track_own_connections()  # as a second Listener made here does

    assert seen and all(seen)
    assert is_own_pid(pid, here)


def test_a_connection_recorded_again_keeps_the_moment_it_became_own(clock, here):
    """A second Listener made in the process records the open connections again: a
    durable event its connection wrote before must still count as its own."""
    connections["default"].close()  # a session of this test's, recorded now
    opened = clock.value
    pid = open_pid(connections["default"])
    clock.value += 60
    own_changes.track_own_connections()  # as a second Listener made here does

    assert is_own_write(pid, opened + 30, here)
    assert not is_own_write(pid, opened - 3600, here)


def test_an_own_durable_change_stays_own_when_another_listener_is_made_later(
    job_names, monkeypatch
):
    # The registry's clock moves on an hour before the second Listener is made; the
    # event's age, as the claim reads it, does not.
    later = types.SimpleNamespace(value=0.0)
    monkeypatch.setattr(
        own_changes,
        "time",
        types.SimpleNamespace(monotonic=lambda: time.monotonic() + later.value),
    )
    connections["default"].close()
    own_changes.track_own_connections()
    Job.objects.create(name="mine")
    later.value = 3600
    own_changes.track_own_connections()
    worker = job_worker(ignore_own_changes=True)

    assert one_batch(worker) == 1
    assert job_names == []
    assert worker.stats["own_changes"] == 1


# Other threads


@pytest.fixture
def untracked() -> Iterator[None]:
    """No recording yet in this process, as before its first Listener is made."""
    uid = "django_pgnotify.own_changes"
    was_on = connection_created.disconnect(dispatch_uid=uid)
    yield
    connection_created.disconnect(dispatch_uid=uid)
    if was_on:
        connection_created.connect(own_changes._remember, dispatch_uid=uid)


@contextlib.contextmanager
def thread_connection() -> Iterator[types.SimpleNamespace]:
    """``connections["default"]`` of another thread: ``pid`` after ``connect()``, open
    until the block ends, reconnected by ``reconnect()``."""
    asks: queue.Queue = queue.Queue()
    answers: queue.Queue = queue.Queue()

    def serve() -> None:
        try:
            while (ask := asks.get(timeout=30)) is not None:
                if ask == "reconnect":
                    connections["default"].close()
                try:
                    answers.put(open_pid(connections["default"]))
                except Exception as exc:  # raised again in the test's thread
                    answers.put(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=serve, name="another thread")
    thread.start()
    handle = types.SimpleNamespace(pid=None)

    def ask(what: str) -> int:
        asks.put(what)
        answer = answers.get(timeout=30)
        if isinstance(answer, Exception):
            raise answer
        handle.pid = answer
        return answer

    handle.connect = lambda: ask("connect")
    handle.reconnect = lambda: ask("reconnect")
    try:
        yield handle
    finally:
        asks.put(None)
        thread.join(30)


def test_a_connection_another_thread_opens_once_tracking_started_counts_as_own(
    untracked, transactional_db, here
):
    """Django announces a connection in the thread that opens it: a listener made in
    one thread recognises the writes of the others (a web server's request threads)."""
    own_changes.track_own_connections()
    with thread_connection() as other:
        other.connect()
        assert is_own_pid(other.pid, here)
    assert is_own_pid(other.pid, here)  # closed just now: within its grace


def test_a_connection_another_thread_had_open_already_counts_once_it_connects_again(
    untracked, transactional_db, here
):
    """Only its own thread finds it, and only its own thread may ask its server who
    it is: its changes are delivered until it connects again."""
    with thread_connection() as other:
        before = other.connect()
        own_changes.track_own_connections()
        assert not is_own_pid(before, here)

        after = other.reconnect()
        assert is_own_pid(after, here)


def test_connections_opened_after_the_listener_stopped_are_still_recorded(transactional_db, here):
    """So that a listener made again later in the process (a restart) knows them."""
    with capture_row_changes("testapp.Tag", ignore_own_changes=True):
        pass
    with thread_connection() as other:
        other.connect()
        assert is_own_pid(other.pid, here)


# Other servers: PIDs are unique within one server only


def test_a_pid_counts_as_own_only_on_the_server_of_its_connection(clock, elsewhere, here):
    pid = open_pid(elsewhere)
    there = server(elsewhere.connection)

    assert there != here
    assert is_own_pid(pid, there)
    # A writer with this PID on the listener's server is another process (PID
    # namespaces overlap: containers, other hosts).
    assert not is_own_pid(pid, here)
    assert not is_own_write(pid, clock.value, here)


def test_a_durable_change_by_the_pid_of_a_connection_to_another_server_is_delivered(
    other_connection, elsewhere, job_names
):
    """Not settled unseen (deleted) as this process's own."""
    own_changes.track_own_connections()
    pid = open_pid(elsewhere)
    other_connection.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('theirs', '', 1)")
    # Its writer had, on this server, the PID this process's connection has on the other.
    other_connection.execute("UPDATE pgnotify_event SET pid = %s", [pid])
    worker = job_worker(ignore_own_changes=True)

    assert one_batch(worker) == 1
    assert job_names == ["theirs"]
    assert worker.stats["own_changes"] == 0


def test_a_connection_whose_pid_is_not_its_server_sessions_is_not_recorded(
    clock, wrapper, here, monkeypatch
):
    """A pooler hands its clients PIDs of its own, and shares the server's sessions."""
    monkeypatch.setattr(own_changes, "_backend_pid", lambda w: w.connection.info.backend_pid + 1)
    pid = open_pid(wrapper)

    assert not is_own_pid(pid, here)
    assert not is_own_pid(pid + 1, here)


def test_asking_the_server_leaves_no_transaction_open(clock, transactional_db, here):
    settings = {**connections["default"].settings_dict, "AUTOCOMMIT": False}
    wrapper = type(connections["default"])(settings, "default")
    try:
        pid = open_pid(wrapper)
        assert wrapper.connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert is_own_pid(pid, here)
    finally:
        wrapper.close()


@pytest.fixture
def refused(monkeypatch):
    """The server refuses to say who it is (EXECUTE revoked on one of the functions)."""
    monkeypatch.setattr(own_changes, "SERVER_QUERY", "SELECT 1 / 0")
    monkeypatch.setattr(own_changes, "_warned", set(), raising=False)


def test_a_server_that_will_not_say_who_it_is_leaves_every_change_delivered(
    refused, transactional_db, caplog
):
    """Rather than none: the listener starts, and no connection is recorded as its own."""
    Job.objects.exists()  # a Django connection open first, its refusal warned first
    with capture_row_changes("durableapp.Job", ignore_own_changes=True) as changes:
        Job.objects.create(name="mine")
        (change,) = changes.wait(1)

    assert change.fields["name"] == "mine"
    assert changes.listener.stats["own_changes"] == 0
    assert "cannot tell which server a connection of this process is on" in caplog.text
    assert "cannot tell which server the listener is on" in caplog.text


def test_asking_the_server_inside_a_transaction_leaves_it_usable_when_refused(
    refused, transactional_db, caplog
):
    with transaction.atomic():
        Job.objects.create(name="before")
        own_changes.track_own_connections()  # as a Listener made here does
        Job.objects.create(name="after")  # the transaction was not aborted

    assert sorted(Job.objects.values_list("name", flat=True)) == ["after", "before"]
    assert "cannot tell which server a connection of this process is on" in caplog.text


def test_a_listener_reconnected_to_a_server_that_will_not_say_who_it_is_delivers_every_change(
    transactional_db, other_connection, monkeypatch, caplog
):
    """It forgets the server it was on (a failover, a grant revoked meanwhile): this
    process's connections to that one are no reason to skip a change now."""
    Tag.objects.create(name="opens the connection first")
    with capture_row_changes("testapp.Tag", ignore_own_changes=True) as changes:
        Tag.objects.create(name="mine")
        other_connection.execute("INSERT INTO testapp_tag (name, colour) VALUES ('theirs', 'red')")
        changes.wait_for(lambda e: e.pk == "theirs")
        assert changes.stats["own_changes"] == 1

        monkeypatch.setattr(own_changes, "SERVER_QUERY", "SELECT 1 / 0")
        monkeypatch.setattr(own_changes, "_warned", set())
        pid = changes.listener.health.backend_pid
        other_connection.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_until(lambda: changes.stats["reconnects"] == 1, what="a reconnect")
        Tag.objects.create(name="mine again")
        changes.wait_for(lambda e: e.pk == "mine again")

    assert [e.pk for e in changes] == ["theirs", "mine again"]
    assert changes.stats["own_changes"] == 1
    assert "cannot tell which server the listener is on" in caplog.text
