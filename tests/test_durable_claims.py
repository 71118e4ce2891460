"""Claims read only the pending rows of the declarations their listener serves.

Pending rows of other declarations (another listener's backlog, or those of a
declaration since renamed) may be many, and ahead: a claim must not read them.
Measured by what the claim's plan reads, not by time. Also: a row claimed alone
keeps that mark when a stopping listener releases it, and a batch whose settlement
a lost connection cut short is settled on the next connection, or on one of its own
when the listener stops before it could connect again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from psycopg import sql
from psycopg.conninfo import make_conninfo

from django_pgnotify import durable, row_changed
from django_pgnotify.declarations import get_declarations
from django_pgnotify.decoding import Decoder
from django_pgnotify.dispatch import Dispatcher
from tests.conftest import test_database_url as database_url
from tests.durableapp.models import Job

SERVED = "durableapp.Job:default"
OTHER = "durableapp.Job:other"
UNSERVED = "gone.Item:old"
#: Pending rows of a declaration not served, ahead of the served ones.
AHEAD = 20_000


@pytest.fixture
def events(transactional_db) -> Iterator[psycopg.Connection]:
    """A connection to an empty event table with every migration of django_pgnotify
    applied (a test elsewhere may have migrated it back and forth)."""
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes("django_pgnotify")
    if executor.migration_plan(latest):
        executor.migrate(latest)
    with psycopg.connect(database_url(), autocommit=True) as conn:
        conn.execute("TRUNCATE pgnotify_event")
        yield conn


def insert(conn: psycopg.Connection, declaration: str, n: int = 1, size: int = 1) -> list[int]:
    """``n`` pending rows of ``declaration`` holding ``size`` changes each; their ids."""
    payload = ",".join(f"[{p},{p}]" for p in range(1, size + 1))
    return [
        row_id
        for (row_id,) in conn.execute(
            "INSERT INTO pgnotify_event (declaration, model, action, layout, payload, size) "
            """SELECT %s, 'durableapp.job', 'insert', '"fields":["n"]', %s, %s"""
            " FROM generate_series(1, %s) RETURNING id",
            [declaration, payload, size, n],
        )
    ]


def params(uris: list[str], limit: int = 500, owner: str = "test") -> dict[str, Any]:
    return {
        "uris": uris,
        "limit": limit,
        "bytes": durable.CLAIM_BYTES,
        "owner": owner,
        "lease": 30.0,
    }


def claim(conn: psycopg.Connection, uris: list[str], limit: int = 500) -> list[int]:
    """The ids a claim takes (its own transaction), in id order."""
    with conn.transaction():
        conn.execute(durable._CLAIM_SETTINGS)
        return sorted(row[0] for row in conn.execute(durable._CLAIM, params(uris, limit)))


def scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plan nodes under ``node`` (itself included) that read the event table."""
    if node.get("Relation Name") == "pgnotify_event":
        yield node
    for child in node.get("Plans", ()):
        yield from scans(child)


def job_worker(stop: threading.Event | None = None) -> durable.DurableWorker:
    """A durable worker of the test app's jobs, stopping once ``stop`` is set."""
    return durable.DurableWorker(
        [d for d in get_declarations() if d.model is Job],
        "default",
        Decoder([Job]),
        Dispatcher(),
        stop or threading.Event(),
    )


@pytest.mark.parametrize("analyzed", [False, True], ids=["fresh", "analyzed"])
def test_a_claim_reads_none_of_the_pending_rows_of_declarations_it_does_not_serve(events, analyzed):
    insert(events, UNSERVED, AHEAD)
    served = insert(events, SERVED, 3)
    if analyzed:  # statistics say that most pending rows are not served
        events.execute("ANALYZE pgnotify_event")

    with events.transaction(force_rollback=True):
        events.execute(durable._CLAIM_SETTINGS)
        (explained,) = events.execute(
            sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) {}").format(durable._CLAIM),
            params([SERVED, OTHER]),
        ).fetchone()
    plan = explained[0]["Plan"]
    read = [
        (node["Node Type"], node.get("Index Name"), node.get("Rows Removed by Filter", 0))
        for node in scans(plan)
    ]

    assert read and all(removed == 0 for _, _, removed in read), read
    # Each scan read the served rows alone (per declaration, or an id per lookup).
    rows_read = sum(node["Actual Rows"] * node["Actual Loops"] for node in scans(plan))
    assert rows_read <= 5 * len(served), (rows_read, read)
    assert claim(events, [SERVED, OTHER]) == served


def test_a_worker_claims_its_rows_behind_a_backlog_of_another_declaration(events):
    insert(events, UNSERVED, AHEAD)
    served = insert(events, SERVED)
    worker = job_worker()

    async def claimed() -> list[int]:
        async with await worker._connect() as conn:
            return [row.id for row in await worker._claim(conn)]

    assert asyncio.run(asyncio.wait_for(claimed(), 30)) == served
    leased = events.execute(
        "SELECT count(*) FILTER (WHERE lease_owner <> ''), count(*) FILTER (WHERE attempts > 0)"
        " FROM pgnotify_event WHERE declaration = %s",
        [UNSERVED],
    ).fetchone()
    assert leased == (0, 0)


def test_rows_of_several_declarations_are_claimed_in_id_order_holding_the_batch_size(events):
    rows: dict[str, list[int]] = {SERVED: [], OTHER: []}
    # Sizes 2, 1, 3, 1, 1, ... alternating between the two served declarations, with
    # rows of one not served between them.
    for n, size in enumerate([2, 1, 3, 1, 1, 2, 1, 1]):
        uri = (SERVED, OTHER)[n % 2]
        rows[uri] += insert(events, uri, size=size)
        insert(events, UNSERVED, 2)
    ids = sorted(rows[SERVED] + rows[OTHER])

    taken = [claim(events, [SERVED, OTHER], limit=5) for _ in range(4)]

    # Whole rows until they hold 5 changes: 2+1+3, then 1+1+2+1, then 1, then none.
    assert taken == [ids[:3], ids[3:7], ids[7:], []]


def test_a_claim_locks_no_row_of_another_declaration_than_those_it_takes(events):
    """Counted first, locked per declaration: a claim in progress leaves every row it
    does not take to a second listener."""
    for _ in range(3):
        insert(events, SERVED)
        insert(events, OTHER)
    ids = [row_id for (row_id,) in events.execute("SELECT id FROM pgnotify_event ORDER BY id")]

    with psycopg.connect(database_url(), autocommit=True) as second, events.transaction():
        events.execute(durable._CLAIM_SETTINGS)
        first = sorted(row[0] for row in events.execute(durable._CLAIM, params([SERVED, OTHER], 3)))
        unlocked = [
            row_id
            for (row_id,) in second.execute(
                "SELECT id FROM pgnotify_event ORDER BY id FOR UPDATE SKIP LOCKED"
            )
        ]
        # Made while the first claim is in progress: its rows are skipped.
        second_claim = claim(second, [SERVED, OTHER], limit=3)

    assert first == ids[:3]
    assert unlocked == ids[3:]
    # It counted the first claim's rows, two of one declaration and one of the other,
    # and took the next ones of each instead.
    assert second_claim == ids[3:5]


def test_a_claim_whose_counted_rows_another_claim_holds_takes_the_next_free_row(events):
    """Two listeners serving the same declarations, woken by the same write: the first
    claim holds the row at the head (a bulk write's, as many changes as a batch), and
    the second must take the first row behind it, here one of the other declaration."""
    (head,) = insert(events, SERVED, size=600)  # the whole of a batch of 500
    behind = insert(events, OTHER, n=3)

    with psycopg.connect(database_url(), autocommit=True) as first, first.transaction():
        # The first listener's claim in progress: it holds the row it counted.
        first.execute("SELECT id FROM pgnotify_event WHERE id = %s FOR UPDATE", [head])
        second = claim(events, [SERVED, OTHER], limit=500)

    # The first free row, alone: one that takes nothing leaves its listener idle until
    # the next poll while rows wait. Having taken one, its listener claims again at once.
    assert second == behind[:1]


def test_a_claim_across_declarations_stops_before_an_abandoned_row_which_is_claimed_alone(
    events,
):
    before = insert(events, SERVED, 2)
    (abandoned,) = insert(events, OTHER)
    after = insert(events, SERVED, 2)
    # Its lease expired with an owner: its last claim was never settled.
    events.execute(
        "UPDATE pgnotify_event SET lease_owner = 'dead:1:x', attempts = 1,"
        " lease_until = now() - interval '1 second' WHERE id = %s",
        [abandoned],
    )

    taken = [claim(events, [SERVED, OTHER]) for _ in range(3)]

    assert taken == [before, [abandoned], after]


def test_a_listener_processes_a_batch_behind_another_declarations_backlog(events):
    insert(events, UNSERVED, AHEAD)
    events.execute(
        "INSERT INTO durableapp_job (name, body, n)"
        " SELECT 'job-' || g, '', g FROM generate_series(1, 3) g"
    )
    worker = job_worker()

    async def batch() -> int:
        async with await worker._connect() as conn:
            with ThreadPoolExecutor(1) as executor:
                return await worker.process_batch(conn, executor)

    assert asyncio.run(asyncio.wait_for(batch(), 30)) == 1  # one row of 3 changes
    pending = events.execute(
        "SELECT declaration, count(*) FROM pgnotify_event GROUP BY declaration"
    ).fetchall()
    assert pending == [(UNSERVED, AHEAD)]


def test_the_pending_index_is_keyed_by_declaration_then_id(events):
    ((definition,),) = events.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
        " WHERE indexrelid = 'pgnotify_event_pending'::regclass"
    ).fetchall()

    assert "(declaration, id) WHERE (status = 'pending'::text)" in definition


def test_a_row_claimed_alone_and_released_by_a_stopping_listener_is_still_claimed_alone(
    events,
):
    """A stop cut its dispatch short: the changes not reached are as suspect as before,
    and may kill the next listener, which must not cost the rows beside it an attempt."""
    for n in range(2):  # two statements: two event rows
        events.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', %s)", [n])
    suspect, behind = [row_id for (row_id,) in events.execute("SELECT id FROM pgnotify_event")]
    # Its listener was killed while its receivers ran: the lease ran out, its owner kept.
    events.execute(
        "UPDATE pgnotify_event SET lease_owner = 'host:4242:gone', attempts = 1,"
        " lease_until = now() - interval '1 second' WHERE id = %s",
        [suspect],
    )
    stopping = threading.Event()
    stopping.set()  # the listener is stopping: nothing of the batch is dispatched
    stopped = job_worker(stopping)
    worker = job_worker()

    async def scenario() -> tuple[int, list[list[int]]]:
        async with await stopped._connect() as conn:
            with ThreadPoolExecutor(1) as executor:
                released = await stopped.process_batch(conn, executor)
        async with await worker._connect() as conn:
            return released, [[row.id for row in await worker._claim(conn)] for _ in range(3)]

    released, claims = asyncio.run(asyncio.wait_for(scenario(), 30))

    assert released == 1  # the suspect row, alone
    assert claims == [[suspect], [behind], []]
    (attempts,) = events.execute(
        "SELECT attempts FROM pgnotify_event WHERE id = %s", [suspect]
    ).fetchone()
    assert attempts == 2  # the released claim gave its attempt back; the last one counts


# A batch whose settlement its connection's loss cut short


def test_a_batch_handled_when_its_connection_was_lost_is_settled_on_the_next_one(events, settings):
    """The receivers ran, the listener lives on: reconnected, it settles what it knows,
    rather than leave the rows to be dispatched again as rows it died holding."""
    # The lease far longer than the wait below: the rows are not claimed again meanwhile.
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "DURABLE_LEASE": 60.0,
        "RECONNECT_DELAY_MIN": 0.05,
        "RECONNECT_DELAY_MAX": 0.1,
    }
    events.execute(
        "INSERT INTO durableapp_job (name, body, n)"
        " SELECT 'job', '', g FROM generate_series(1, 3) g"
    )
    pks = [pk for (pk,) in events.execute("SELECT id FROM durableapp_job ORDER BY id")]
    handled: list[int] = []

    def cut_off(sender, event, **kwargs) -> None:
        if not handled:  # the durable connection is lost while the receivers run
            with psycopg.connect(database_url(), autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name LIKE '%% durable' AND datname = current_database()"
                )
        handled.append(event.pk)

    row_changed.connect(cut_off, sender=Job, weak=False, dispatch_uid="test_durable_claims")
    worker = job_worker()

    async def scenario() -> None:
        stop = asyncio.Event()
        with ThreadPoolExecutor(1) as executor:
            running = asyncio.ensure_future(worker.run(stop, executor))
            deadline = time.monotonic() + 10
            try:
                while events.execute("SELECT count(*) FROM pgnotify_event").fetchone() != (0,):
                    assert not running.done(), running
                    assert time.monotonic() < deadline, "the batch was never settled"
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await asyncio.wait_for(running, 10)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        row_changed.disconnect(sender=Job, dispatch_uid="test_durable_claims")

    assert handled == pks  # each once
    assert worker.stats["durable_claimed"] == 3


def cut_off_then_stop(
    handled: list[int], total: int, loop: asyncio.AbstractEventLoop, stop: asyncio.Event
) -> Any:
    """A receiver that loses the durable connection at the first change, and stops the
    listener once it handled ``total``: the settlement then fails, and the stop comes
    before the listener could connect again."""

    def receiver(sender, event, **kwargs) -> None:
        if not handled:
            with psycopg.connect(database_url(), autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name LIKE '%% durable' AND datname = current_database()"
                )
        handled.append(event.pk)
        if len(handled) == total:
            loop.call_soon_threadsafe(stop.set)

    return receiver


def run_until_stopped(worker: durable.DurableWorker, receiver_for: Any) -> None:
    """Run ``worker`` with the receiver ``receiver_for(loop, stop)`` until it stops."""

    async def scenario() -> None:
        stop = asyncio.Event()
        receiver = receiver_for(asyncio.get_running_loop(), stop)
        row_changed.connect(receiver, sender=Job, weak=False, dispatch_uid="test_durable_claims")
        with ThreadPoolExecutor(1) as executor:
            await asyncio.wait_for(worker.run(stop, executor), 20)

    try:
        asyncio.run(scenario())
    finally:
        row_changed.disconnect(sender=Job, dispatch_uid="test_durable_claims")


def test_a_batch_cut_short_is_settled_when_the_listener_stops_before_reconnecting(events, settings):
    """A stop while the listener waits to connect again must not drop the settlement it
    owes: the rows would be dispatched again once their lease ran out."""
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": 60.0, "RECONNECT_DELAY_MIN": 5.0}
    events.execute(
        "INSERT INTO durableapp_job (name, body, n)"
        " SELECT 'job', '', g FROM generate_series(1, 3) g"
    )
    pks = [pk for (pk,) in events.execute("SELECT id FROM durableapp_job ORDER BY id")]
    handled: list[int] = []
    worker = job_worker()

    run_until_stopped(worker, lambda loop, stop: cut_off_then_stop(handled, 3, loop, stop))

    assert handled == pks
    assert events.execute("SELECT count(*) FROM pgnotify_event").fetchone() == (0,)


def test_a_batch_that_cannot_be_settled_when_the_listener_stops_is_logged(events, settings, caplog):
    """When the database refuses the last connection, the rows are left leased, and
    the log says which will be dispatched again."""
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_LEASE": 60.0, "RECONNECT_DELAY_MIN": 5.0}
    events.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('job', '', 1)")
    (row_id,) = events.execute("SELECT id FROM pgnotify_event").fetchone()
    handled: list[int] = []
    worker = job_worker()

    def allow_connections(allowed: bool) -> None:
        # Not from a connection to the database itself, which PostgreSQL refuses.
        with psycopg.connect(make_conninfo(database_url(), dbname="postgres")) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(events.info.dbname), sql.Literal(allowed)
                )
            )

    def refusing(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Any:
        receiver = cut_off_then_stop(handled, 1, loop, stop)

        def receive_then_refuse(sender, event, **kwargs) -> None:
            receiver(sender, event, **kwargs)
            allow_connections(False)

        return receive_then_refuse

    try:
        with caplog.at_level("WARNING", logger="django_pgnotify"):
            run_until_stopped(worker, refusing)
    finally:
        allow_connections(True)

    assert len(handled) == 1
    (message,) = [r.getMessage() for r in caplog.records if "could not be made" in r.getMessage()]
    assert f"event(s) {row_id} of {SERVED}" in message
    assert "dispatched again once the 60s lease expires" in message
    assert events.execute("SELECT lease_owner IS NOT NULL FROM pgnotify_event").fetchone() == (
        True,
    )
