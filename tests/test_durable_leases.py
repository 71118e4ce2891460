"""Leases: a listener settles only the event rows still leased to it.

Two ``DurableWorker`` objects in this process stand for two listeners on a real
database; a lease is made to expire by moving ``lease_until`` into the past, as
time would once a listener stopped renewing it (its connection lost, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from django.db import connection, connections, transaction
from psycopg.rows import dict_row

from django_pgnotify import durable, row_changed
from django_pgnotify.declarations import get_declarations
from django_pgnotify.decoding import Decoder
from django_pgnotify.dispatch import Dispatcher, close_thread_connections
from django_pgnotify.durable import DurableWorker
from django_pgnotify.listener import Listener
from django_pgnotify.models import DurableEvent
from tests.durableapp.models import Job


class Receiver:
    """A ``row_changed`` receiver for Job: records what each listener handled.

    Jobs whose pk is in ``failing`` raise. The first call in ``held_thread`` waits
    for ``release`` (a listener whose receivers run past its lease).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.failing: set[int] = set()
        #: What a failing job raises with, if not the default message.
        self.error: str | None = None
        self.held_thread = ""
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, sender, event, **kwargs) -> None:
        thread = threading.current_thread().name
        self.calls.append((thread, event.pk))
        if thread.startswith(self.held_thread + "_") and not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(10), "never released"
        if event.pk in self.failing:
            raise RuntimeError(self.error or f"job {event.pk} fails on purpose")


@pytest.fixture
def receiver(transactional_db, settings) -> Iterator[Receiver]:
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_RETRY_DELAY_MIN": 0.0}  # retry at once
    handler = Receiver()
    row_changed.connect(handler, sender=Job, weak=False, dispatch_uid="test_durable_leases")
    yield handler
    row_changed.disconnect(sender=Job, dispatch_uid="test_durable_leases")


def listener(stopping: threading.Event | None = None) -> DurableWorker:
    """The durable worker of a listener serving Job (max_attempts=3)."""
    declarations = [d for d in get_declarations() if d.model is Job]
    return DurableWorker(
        declarations, "default", Decoder([Job]), Dispatcher(), stopping or threading.Event()
    )


def three_jobs(conn: psycopg.Connection) -> list[int]:
    """One statement: one event row of three changes. Returns the jobs' pks in order."""
    conn.execute(
        "INSERT INTO durableapp_job (name, body, n) "
        "SELECT 'job', '', g FROM generate_series(1, 3) g"
    )
    return [pk for (pk,) in conn.execute("SELECT id FROM durableapp_job ORDER BY id")]


def event_row(conn: psycopg.Connection) -> dict | None:
    """The one event row's settlement columns, or None once it is deleted."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute("SELECT status, attempts, handled, lease_owner FROM pgnotify_event")
        .fetchone()
    )


def expire_leases(conn: psycopg.Connection) -> None:
    """What DURABLE_LEASE seconds do to the claims held now."""
    conn.execute("UPDATE pgnotify_event SET lease_until = now() - interval '1 second'")


@contextlib.asynccontextmanager
async def a_holding_its_batch(
    a: DurableWorker, b: DurableWorker, receiver: Receiver
) -> AsyncIterator[tuple[asyncio.Future, psycopg.AsyncConnection, ThreadPoolExecutor]]:
    """Connect A and B; start a batch of A's, whose receiver holds (``held_thread``
    ``"a"``) until ``receiver.release``; yield that batch, B's connection and B's
    thread."""
    async with await a._connect() as a_conn, await b._connect() as b_conn:
        with ThreadPoolExecutor(1, "a") as a_thread, ThreadPoolExecutor(1, "b") as b_thread:
            a_batch = asyncio.ensure_future(a.process_batch(a_conn, a_thread))
            assert await asyncio.to_thread(receiver.holding.wait, 10)
            yield a_batch, b_conn, b_thread


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario, 60))


def batches(worker: DurableWorker, count: int = 1) -> list[int]:
    """What ``count`` ``process_batch`` calls in a row of ``worker`` return (the changes
    each dispatched), on one connection of its own."""

    async def scenario() -> list[int]:
        async with await worker._connect() as conn:
            with ThreadPoolExecutor(1, "b") as thread:
                return [await worker.process_batch(conn, thread) for _ in range(count)]

    return asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_stale_failure_neither_stores_handled_positions_twice_nor_makes_the_row_loop(
    receiver, other_connection, caplog
):
    pks = three_jobs(other_connection)
    receiver.failing = {pks[1]}
    receiver.held_thread = "a"
    a, b = listener(), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            expire_leases(other_connection)
            assert await b.process_batch(b_conn, b_thread) == 1  # all 3 again, the 2nd fails
            after_b = event_row(other_connection)
            receiver.release.set()
            assert await a_batch == 1  # A's receivers end: its settlement is stale

            assert event_row(other_connection) == after_b  # left to B's settlement
            assert after_b["handled"] == [0, 2] and after_b["attempts"] == 2
            receiver.failing.clear()
            assert await b.process_batch(b_conn, b_thread) == 1
            assert await b.process_batch(b_conn, b_thread) == 0  # done: nothing to claim

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run(scenario())

    assert event_row(other_connection) is None
    assert [pk for thread, pk in receiver.calls if thread.startswith("b")] == [*pks, pks[1]]
    assert (a.stats["retries"], a.stats["dead_letters"]) == (0, 0)  # B counts its own
    assert (b.stats["durable_claimed"], b.stats["retries"]) == (4, 1)
    assert durable.backlog().pending == 0
    (stale,) = [r.getMessage() for r in caplog.records if "no longer leased" in r.getMessage()]
    assert "durableapp.Job:default" in stale


@pytest.mark.parametrize("a_stops", [False, True], ids=["a-handles-all", "a-stops-mid-row"])
def test_a_stale_listener_keeps_its_hands_off_a_row_another_listener_holds(
    receiver, other_connection, a_stops
):
    pks = three_jobs(other_connection)
    receiver.held_thread = "a"
    a_stopping = threading.Event()
    a, b = listener(a_stopping), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            if a_stops:
                a_stopping.set()  # A would release the two changes it did not reach
            expire_leases(other_connection)
            assert len(await b._claim(b_conn)) == 1  # B holds the row now
            receiver.release.set()
            await a_batch  # A would delete the row, or release it

            held = event_row(other_connection)
            assert held == {
                "status": "pending",
                "attempts": 2,
                "handled": None,
                "lease_owner": b.owner,
            }
            expire_leases(other_connection)  # B gives up too; the row is still there
            assert await b.process_batch(b_conn, b_thread) == 1
            assert event_row(other_connection) is None

    run(scenario())

    handled_by_a = [pk for thread, pk in receiver.calls if thread.startswith("a")]
    assert handled_by_a == (pks[:1] if a_stops else pks)
    assert [pk for thread, pk in receiver.calls if thread.startswith("b")] == pks


@pytest.mark.parametrize(
    ("message", "stored"),
    [("nul \x00 byte", "nul \\x00 byte"), ("/data/\udcff.csv", "/data/\\udcff.csv")],
    ids=["nul", "lone-surrogate"],
)
def test_a_receiver_error_no_text_column_takes_is_stored_escaped_and_the_batch_settles(
    receiver, other_connection, message, stored
):
    for n in range(3):  # three statements: three event rows, one batch
        other_connection.execute(
            "INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', %s)", [n]
        )
    pks = [pk for (pk,) in other_connection.execute("SELECT id FROM durableapp_job ORDER BY id")]
    receiver.failing, receiver.error = {pks[1]}, message
    worker = listener()
    assert batches(worker) == [3]

    # The two handled are settled, not left leased to be dispatched again.
    assert other_connection.execute("SELECT count(*) FROM pgnotify_event").fetchone()[0] == 1
    assert event_row(other_connection) == {
        "status": "pending",
        "attempts": 1,
        "handled": [],
        "lease_owner": "",
    }
    (error,) = other_connection.execute("SELECT last_error FROM pgnotify_event").fetchone()
    assert error.endswith(f"RuntimeError: {stored}")
    assert worker.stats["retries"] == 1


def retry_all() -> int:
    """``retry_events`` of every row, from a passing thread: its session ends with it."""
    try:
        return durable.retry_events(DurableEvent.objects.all())
    finally:
        close_thread_connections()


def test_retrying_a_row_a_listener_holds_leaves_it_to_that_listener(receiver, other_connection):
    pks = three_jobs(other_connection)
    receiver.held_thread = "a"
    a, b = listener(), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            # Retry in the admin while A's receivers run: no second listener gets it.
            assert await asyncio.to_thread(retry_all) == 0
            assert event_row(other_connection)["lease_owner"] == a.owner
            assert await b.process_batch(b_conn, b_thread) == 0
            receiver.release.set()
            assert await a_batch == 1

    run(scenario())

    assert event_row(other_connection) is None  # A's settlement counted
    assert [pk for _, pk in receiver.calls] == pks  # each change once, by A
    assert a.stats["durable_lost_leases"] == 0


@pytest.fixture
def row_with_a_position_stored_twice(other_connection) -> list[int]:
    """As a stale settlement of an earlier release left rows: size 3, "4 handled"."""
    pks = three_jobs(other_connection)
    other_connection.execute("UPDATE pgnotify_event SET handled = '{0,2,0,2}'")
    return pks


def test_a_row_that_stored_a_handled_position_twice_is_done_once_all_are_handled(
    receiver, other_connection, row_with_a_position_stored_twice
):
    pks = row_with_a_position_stored_twice
    worker = listener()
    assert batches(worker, 2) == [1, 0]  # not claimed again

    assert event_row(other_connection) is None
    assert [pk for _, pk in receiver.calls] == [pks[1]]
    assert worker.stats["durable_claimed"] == 1


def test_a_row_that_stored_a_handled_position_twice_is_mended_when_settled_again(
    receiver, other_connection, row_with_a_position_stored_twice
):
    receiver.failing = {row_with_a_position_stored_twice[1]}
    worker = listener()
    assert batches(worker) == [1]

    assert event_row(other_connection)["handled"] == [0, 2]  # each position once
    assert durable.backlog().pending == 1
    assert worker.stats["retries"] == 1


def test_changes_of_a_row_whose_lease_was_lost_are_counted_as_lost_leases(
    receiver, other_connection
):
    pks = three_jobs(other_connection)
    receiver.held_thread = "a"
    served = Listener([d for d in get_declarations() if d.model is Job], "default")
    a, b = served.durable, listener()
    assert a is not None

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            expire_leases(other_connection)
            assert await b.process_batch(b_conn, b_thread) == 1  # B handles all 3
            receiver.release.set()
            assert await a_batch == 1  # A's settlement finds the row gone

    run(scenario())

    assert event_row(other_connection) is None
    assert [pk for thread, pk in receiver.calls if thread.startswith("b")] == pks
    # The row's three changes, once, by the listener that lost them.
    assert (a.stats["durable_lost_leases"], b.stats["durable_lost_leases"]) == (3, 0)
    assert "durable_lost_leases" in served.counters  # in its log lines and metrics
    pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed")
    from django_pgnotify.metrics import ListenerCollector

    families = {family.name: family for family in ListenerCollector(served).collect()}
    (sample,) = families["pgnotify_durable_lost_leases"].samples
    assert (sample.name, sample.labels, sample.value) == (
        "pgnotify_durable_lost_leases_total",
        {"database": "default"},
        3,
    )


# Rows a listener died holding: claimed alone, and given up once their attempts are spent


def abandon(conn: psycopg.Connection, where: str = "true", attempts: int | None = None) -> None:
    """What a listener killed while its receivers ran leaves: the lease ran out, its
    owner is still recorded (a settlement or a release clears it)."""
    conn.execute(
        "UPDATE pgnotify_event SET lease_owner = 'host:4242:gone',"
        " lease_until = now() - interval '1 second', attempts = coalesce(%s, attempts)"
        f" WHERE {where}",
        [attempts],
    )


def test_rows_a_dead_listener_left_unsettled_are_claimed_one_at_a_time(receiver, other_connection):
    for n in range(4):  # four statements: four event rows
        other_connection.execute(
            "INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', %s)", [n]
        )
    ids = [row_id for (row_id,) in other_connection.execute("SELECT id FROM pgnotify_event")]
    ids.sort()
    abandon(other_connection, f"id IN ({ids[1]}, {ids[2]})")
    worker = listener()

    async def claims() -> list[list[int]]:
        async with await worker._connect() as conn:
            return [[row.id for row in await worker._claim(conn)] for _ in range(5)]

    # A claim stops before the first abandoned row; each of those is claimed alone,
    # so a change that kills its listener costs no other row an attempt.
    assert asyncio.run(asyncio.wait_for(claims(), 30)) == [
        [ids[0]],
        [ids[1]],
        [ids[2]],
        [ids[3]],
        [],
    ]


def test_a_row_claimed_past_its_attempts_and_never_settled_is_a_dead_letter_not_dispatched(
    receiver, other_connection, caplog
):
    three_jobs(other_connection)
    # Its third attempt (Job allows 3) handled the first change, then its listener died.
    other_connection.execute("UPDATE pgnotify_event SET handled = '{0}'")
    abandon(other_connection, attempts=3)
    worker = listener()
    with caplog.at_level(logging.ERROR, logger="django_pgnotify.durable"):
        assert batches(worker, 2) == [1, 0]

    assert receiver.calls == []
    assert event_row(other_connection) == {
        "status": "dead",
        "attempts": 3,  # the claim that gave up was no attempt: nothing was dispatched
        "handled": [0],
        "lease_owner": "",
    }
    (error,) = other_connection.execute("SELECT last_error FROM pgnotify_event").fetchone()
    assert error == durable.NEVER_SETTLED
    assert (worker.stats["dead_letters"], worker.stats["durable_claimed"]) == (2, 0)
    (logged,) = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
    assert "after 3 attempt(s) (2 of its 3 changes): never settled" in logged
    assert durable.backlog().dead == 2


def serializable_default(monkeypatch) -> None:
    """Sessions of the default alias start serializable, as a role's or database's
    ``default_transaction_isolation`` may make them."""
    database = connections["default"].settings_dict
    serializable = "-c default_transaction_isolation=serializable"
    monkeypatch.setitem(database, "OPTIONS", {**database["OPTIONS"], "options": serializable})


def test_listeners_racing_for_rows_under_a_serializable_default_neither_fail_nor_repeat(
    receiver, other_connection, settings, monkeypatch, caplog
):
    # A role or database may default to serializable: claims racing for the same rows
    # then failed, and so did settlements, whose rows were dispatched again later.
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_BATCH_SIZE": 5}
    serializable_default(monkeypatch)
    other_connection.execute(  # 600 statements: 600 event rows
        "DO $$ BEGIN FOR n IN 1..600 LOOP"
        " INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', n); END LOOP; END $$"
    )
    workers = [listener() for _ in range(3)]

    async def scenario() -> None:
        stop = asyncio.Event()
        with ThreadPoolExecutor(1, "b") as thread:
            running = [asyncio.ensure_future(w.run(stop, thread)) for w in workers]
            while not any(task.done() for task in running) and other_connection.execute(
                "SELECT count(*) FROM pgnotify_event"
            ).fetchone() != (0,):
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*running)

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run(scenario())

    assert [r.getMessage() for r in caplog.records] == []
    assert durable.backlog().pending == 0
    handled = Counter(pk for _, pk in receiver.calls)
    assert len(handled) == 600 and set(handled.values()) == {1}
    assert sum(w.stats["durable_claimed"] for w in workers) == 600  # no claim twice


# Renewal: a batch in hand keeps its lease however long its receivers take


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a quick query) from the event loop until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.02)


def lease_until(conn: psycopg.Connection, row_id: int | None = None):
    """The lease expiry of the one event row (or of ``row_id``)."""
    where = "true" if row_id is None else f"id = {int(row_id)}"
    return conn.execute(f"SELECT lease_until FROM pgnotify_event WHERE {where}").fetchone()[0]


def server_past(conn: psycopg.Connection, moment, seconds: float = 0.0) -> bool:
    """Whether the server's clock is ``seconds`` past ``moment``."""
    query = "SELECT clock_timestamp() > %s + make_interval(secs => %s)"
    return conn.execute(query, [moment, seconds]).fetchone()[0]


@pytest.mark.parametrize("held", ["in-its-receivers", "waiting-for-the-dispatch-thread"])
def test_a_batch_held_past_its_lease_keeps_it_and_each_change_is_handled_once(
    receiver, other_connection, settings, held
):
    # A row of three changes whose receivers (or the live receivers ahead of it in the
    # shared dispatch thread) take longer than DURABLE_LEASE. Another listener claimed
    # it once the lease ran out and dispatched it again while the first still did,
    # every claim an attempt: a dead letter once both had handled it several times.
    lease = 1.5  # renewed every 0.5 s
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": lease, "DURABLE_KEEP_DONE": True}
    pks = three_jobs(other_connection)
    a, b = listener(), listener()

    async def scenario() -> None:
        async with await a._connect() as a_conn, await b._connect() as b_conn:
            with ThreadPoolExecutor(1, "a") as a_thread, ThreadPoolExecutor(1, "b") as b_thread:
                if held == "in-its-receivers":
                    receiver.held_thread = "a"
                else:  # a slow live receiver has the dispatch thread
                    a_thread.submit(receiver.release.wait, 10)
                a_batch = asyncio.ensure_future(a.process_batch(a_conn, a_thread))
                await until(lambda: event_row(other_connection)["lease_owner"], "the claim")
                claimed_until = lease_until(other_connection)
                # B looks for work until a whole lease past the claim's own expiry.
                while not server_past(other_connection, claimed_until, lease):
                    assert await b.process_batch(b_conn, b_thread) == 0
                    await asyncio.sleep(0.05)
                    assert not a_batch.done()
                assert not server_past(other_connection, lease_until(other_connection))
                assert event_row(other_connection)["attempts"] == 1
                # Retry in the admin still sees the row in hand.
                assert await asyncio.to_thread(retry_all) == 0
                if held == "in-its-receivers":  # renewed, and still not healthy
                    assert not a.healthy(time.monotonic(), lease / 2)
                receiver.release.set()
                assert await a_batch == 1
                assert await b.process_batch(b_conn, b_thread) == 0

    run(scenario())

    assert event_row(other_connection) == {
        "status": "done",
        "attempts": 1,
        "handled": None,
        "lease_owner": "",
    }
    assert receiver.calls == [("a_0", pk) for pk in pks]  # each once, by A
    assert (a.stats["durable_claimed"], b.stats["durable_claimed"]) == (3, 0)
    assert a.stats["durable_lost_leases"] == a.stats["dead_letters"] == 0


async def a_renewal(conn: psycopg.Connection, row_id: int) -> None:
    """Wait until the lease of the row ``row_id`` is extended (well within the 10 s that
    a receiver holds)."""
    before = lease_until(conn, row_id)
    await until(lambda: lease_until(conn, row_id) > before, "a renewal", 4)


def two_rows(conn: psycopg.Connection) -> list[int]:
    """Two statements: two event rows of one change each. Returns their ids in order."""
    for n in range(2):
        conn.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', %s)", [n])
    return [row_id for (row_id,) in conn.execute("SELECT id FROM pgnotify_event ORDER BY id")]


def take_away(row_id: int, how: str) -> int:
    """Retry or discard one event row as the admin does, from a passing thread.

    A row is retried once its lease has run out (Retry leaves a row in hand alone):
    here in the same transaction, which a renewal on the way waits for.
    """
    try:
        rows = DurableEvent.objects.filter(pk=row_id)
        if how == "discarded":
            return rows.delete()[0]
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE pgnotify_event SET lease_until = now() - interval '1 second'"
                    " WHERE id = %s",
                    [row_id],
                )
            return durable.retry_events(rows)
    finally:
        close_thread_connections()


def event_row_by_id(conn: psycopg.Connection, row_id: int) -> dict | None:
    """As ``event_row``, with its lease expiry, for the row ``row_id``."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(
            "SELECT status, attempts, handled, lease_owner, lease_until FROM pgnotify_event"
            " WHERE id = %s",
            [row_id],
        )
        .fetchone()
    )


@pytest.mark.parametrize("how", ["retried", "discarded"])
def test_a_row_taken_away_from_the_batch_in_hand_is_renewed_no_more(
    receiver, other_connection, settings, how
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": 1.0}
    taken, kept = two_rows(other_connection)
    receiver.held_thread = "a"
    a, b = listener(), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            assert await asyncio.to_thread(take_away, taken, how) == 1
            await a_renewal(other_connection, kept)  # the one that finds the row taken
            await a_renewal(other_connection, kept)  # and the next: the rest is still held
            if how == "retried":  # left unleased, for any listener to claim
                assert event_row_by_id(other_connection, taken) == {
                    "status": "pending",
                    "attempts": 0,
                    "handled": None,
                    "lease_owner": "",
                    "lease_until": None,
                }
                assert await b.process_batch(b_conn, b_thread) == 1
            receiver.release.set()
            assert await a_batch == 2

    run(scenario())

    assert other_connection.execute("SELECT count(*) FROM pgnotify_event").fetchone() == (0,)
    assert a.stats["durable_lost_leases"] == 1  # the row taken away, settled by no one else
    handled_by_b = [thread for thread, _ in receiver.calls if thread.startswith("b")]
    assert len(handled_by_b) == (1 if how == "retried" else 0)


def test_a_renewal_without_an_answer_gives_the_connection_up_and_the_receivers_go_on(
    receiver, other_connection, settings, caplog
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": 1.5, "PROBE_TIMEOUT": 1.0}
    pks = three_jobs(other_connection)
    receiver.held_thread = "a"
    a, b = listener(), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            with other_connection.transaction():  # the renewal waits for this lock
                other_connection.execute("SELECT id FROM pgnotify_event FOR UPDATE")

                def given_up() -> bool:
                    return "could not be renewed" in caplog.text

                await until(given_up, "the renewal given up", 5)  # within the hold (10 s)
            assert not a_batch.done()
            receiver.release.set()
            with pytest.raises(psycopg.OperationalError):  # the settlement, on no connection
                await a_batch
            # As after any connection lost mid-batch: claimable once the lease has run out
            # (that of the renewal given up, should it have been made once the lock was
            # released: its session lives on until it finds its client gone).
            deadline = time.monotonic() + 10
            while not await b.process_batch(b_conn, b_thread):
                assert time.monotonic() < deadline, "never claimed again"
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run(scenario())

    assert [pk for thread, pk in receiver.calls if thread.startswith("a")] == pks  # all of them
    assert [pk for thread, pk in receiver.calls if thread.startswith("b")] == pks
    assert event_row(other_connection) is None
    (renewal,) = [r.getMessage() for r in caplog.records if "renewed" in r.getMessage()]
    assert "(no answer to a query within 1s): its receivers go on" in renewal


def waiting_for_a_row_lock(conn: psycopg.Connection) -> list[int]:
    """The backends waiting for a row lock (pg_locks is read live, not per transaction)."""
    query = "SELECT pid FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
    return [pid for (pid,) in conn.execute(query)]


def test_a_renewal_under_a_serializable_default_goes_past_a_row_discarded_under_it(
    receiver, other_connection, settings, monkeypatch, caplog
):
    # The renewal ran as an autocommit statement, under the role's or database's
    # default isolation: serializable, a row deleted while the renewal waited for it
    # failed the renewal (could not serialize access due to concurrent delete), and
    # the rows still in hand were renewed no more.
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": 1.5}
    serializable_default(monkeypatch)
    taken, kept = two_rows(other_connection)
    receiver.held_thread = "a"
    a, b = listener(), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, _, _):
            with other_connection.transaction():  # discarded while a renewal waits for it
                other_connection.execute("DELETE FROM pgnotify_event WHERE id = %s", [taken])
                await until(lambda: waiting_for_a_row_lock(other_connection), "a renewal", 5)
            await a_renewal(other_connection, kept)
            receiver.release.set()
            assert await a_batch == 2

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run(scenario())

    assert "could not be renewed" not in caplog.text
    assert event_row(other_connection) is None
    assert a.stats["durable_lost_leases"] == 1  # the row discarded


def test_a_renewal_that_fails_on_a_working_connection_is_made_again_at_the_next_turn(
    receiver, other_connection, settings, caplog
):
    # A renewal cancelled (as a lock_timeout, a statement_timeout or a deadlock would
    # end it) ended the renewals, the connection working on: the lease ran out under
    # the receivers, for another listener to dispatch the batch again.
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": 1.5}
    pks = three_jobs(other_connection)
    receiver.held_thread = "a"
    a, b = listener(), listener()

    async def scenario() -> None:
        async with a_holding_its_batch(a, b, receiver) as (a_batch, b_conn, b_thread):
            with other_connection.transaction():
                other_connection.execute("SELECT id FROM pgnotify_event FOR UPDATE")
                await until(lambda: waiting_for_a_row_lock(other_connection), "a renewal", 5)
                (renewal,) = waiting_for_a_row_lock(other_connection)
                other_connection.execute("SELECT pg_cancel_backend(%s)", [renewal])
                await until(lambda: "could not be renewed" in caplog.text, "the failure", 5)
            (row_id,) = other_connection.execute("SELECT id FROM pgnotify_event").fetchone()
            await a_renewal(other_connection, row_id)
            assert await b.process_batch(b_conn, b_thread) == 0
            receiver.release.set()
            assert await a_batch == 1

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run(scenario())

    assert receiver.calls == [("a_0", pk) for pk in pks]
    assert event_row(other_connection) is None
    (renewal,) = [r.getMessage() for r in caplog.records if "renewed" in r.getMessage()]
    assert "canceling statement due to user request" in renewal
    assert "it is tried again in 0.5s" in renewal


def test_retries_scheduled_while_claims_go_on_back_to_back_are_not_all_kept(
    receiver, other_connection, settings
):
    # When each retry falls due was kept until the worker next waited: a worker with a
    # backlog that never ran dry kept one entry per failing batch, for as long as the
    # backlog lasted, although each next claim had already looked for the rows.
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_BATCH_SIZE": 1}
    for n in range(10):  # 10 statements: 10 rows of one change
        other_connection.execute(
            "INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', %s)", [n]
        )
    receiver.failing = {pk for (pk,) in other_connection.execute("SELECT id FROM durableapp_job")}
    worker = listener()

    assert batches(worker, 30) == [1] * 30  # 10 rows, 3 attempts each: every claim fails

    assert len(worker._retries_due) <= 1  # the last batch's, not yet looked for
    assert worker.stats["dead_letters"] == 10
