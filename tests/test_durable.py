"""Durable delivery: events kept in the database until a listener has handled them.

Listeners run as real processes (``tests.settings_durable``: short leases, polls
and retry delays), with a receiver (tests/durableapp/apps.py) that prints a
line per event handled, which the tests read.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.models.functions import Now
from django.test import Client, override_settings
from psycopg import sql

from django_pgnotify import Notify, context, durable, paused, wire
from django_pgnotify import connection as pgnotify_connection
from django_pgnotify.declarations import get_declarations
from django_pgnotify.decoding import Decoder
from django_pgnotify.dispatch import Dispatcher
from django_pgnotify.durable import retry_delay
from django_pgnotify.installation import install_triggers
from django_pgnotify.models import DurableEvent
from django_pgnotify.testing import capture_row_changes
from django_pgnotify.triggers import build_trigger_sql
from tests.conftest import ManagedProcess, install_redeclared
from tests.conftest import test_database_url as database_url
from tests.conftest import wait_until as shared_wait_until
from tests.durableapp.models import Job
from tests.settings_durable import PGNOTIFY as DURABLE_SETTINGS
from tests.test_delivery import decimal_arrays, stored_arrays
from tests.testapp.models import Measurement

DURABLE = "tests.settings_durable"
LATEST_MIGRATION = "0005_durableevent_pending_by_declaration"


# Listener processes work through backlogs here: a longer default wait.
wait_until = functools.partial(shared_wait_until, timeout=30.0)


def count(conn: psycopg.Connection, where: str = "true") -> int:
    """Changes of the event table not handled yet (an event row holds a run of them)."""
    return conn.execute(
        "SELECT coalesce(sum(size - coalesce(cardinality(handled), 0)), 0) FROM pgnotify_event"
        f" WHERE {where}"
    ).fetchone()[0]


def event_rows(conn: psycopg.Connection) -> list[tuple[int, int, str]]:
    """``(id, size, payload)`` of every event row, in id order."""
    return conn.execute("SELECT id, size, payload FROM pgnotify_event ORDER BY id").fetchall()


def insert_jobs(conn: psycopg.Connection, n: int, name: str = "job", body: str = "") -> None:
    """One INSERT statement, one transaction: ``n`` durable events."""
    conn.execute(
        "INSERT INTO durableapp_job (name, body, n) "
        "SELECT %s || '-' || g, %s, g FROM generate_series(1, %s) g",
        [name, body, n],
    )


class Handled:
    """The ``handled`` lines of listener processes: event id, process, start, end, pk.

    Read from each process's ``seen`` lines, the queued ones added first: a ``wait_for``
    moves every line it reads there, and the ``handled`` line of a change dispatched at
    once can arrive before the ``listening on`` line that the start waited for.
    """

    def __init__(self, *processes: ManagedProcess) -> None:
        self.processes = processes
        self.rows: list[tuple[int, int, float, float, int, int]] = []
        self.failing: list[tuple[int, float]] = []
        self._parsed = [0] * len(processes)  # lines of each process's ``seen`` read

    def read(self) -> Handled:
        for index, process in enumerate(self.processes):
            while not process.lines.empty():
                process.seen.append(process.lines.get_nowait())
            new = process.seen[self._parsed[index] :]
            self._parsed[index] = len(process.seen)
            for name, line in new:
                parts = line.split()
                if name == "out" and parts[:1] == ["handled"]:
                    event_id, pid, start, end, pk, size = parts[1:]
                    self.rows.append(
                        (int(event_id), int(pid), float(start), float(end), int(pk), int(size))
                    )
                elif name == "out" and parts[:1] == ["failing"]:
                    self.failing.append((int(parts[1]), float(parts[3])))
        return self

    @property
    def pks(self) -> set[int]:
        return {row[4] for row in self.read().rows}

    def await_failing(self, lines: int) -> None:
        """Wait for ``lines`` ``failing`` lines in all. A row is dead once its last attempt
        is settled, and the lines its receivers printed before may still be on their way
        from the process (read by a thread of this one)."""
        wait_until(lambda: len(self.read().failing) >= lines, what=f"{lines} failing lines")


@pytest.fixture
def durable_listener(listener_process):
    def start(*args: str, **env: str) -> ManagedProcess:
        return listener_process(
            "durableapp",
            *args,
            DJANGO_SETTINGS_MODULE=DURABLE,
            PGNOTIFY_TEST_DURABLE_RECEIVER="1",
            **env,
        )

    return start


def job_pks(conn: psycopg.Connection) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM durableapp_job")}


def test_durable_trigger_inserts_the_event_and_sends_one_constant_wakeup():
    (declaration,) = [d for d in get_declarations() if d.model is Job]
    body = build_trigger_sql(declaration).body

    assert 'INSERT INTO "pgnotify_event"' in body
    assert f"pg_notify('{wire.DURABLE_CHANNEL}', '')" in body
    assert body.count("pg_notify(") == 1  # the rows go to the table, with no 8000-byte limit
    with override_settings(PGNOTIFY={"DURABLE_WAKEUP": False}):
        assert "pg_notify" not in build_trigger_sql(declaration).body


def test_backlog_committed_while_no_listener_runs_is_delivered_at_start(
    durable_listener, other_connection
):
    insert_jobs(other_connection, 1000)
    assert count(other_connection, "status = 'pending'") == 1000

    handled = Handled(durable_listener())

    wait_until(lambda: len(handled.pks) == 1000, what="1000 jobs handled")
    assert handled.pks == job_pks(other_connection)
    assert len({row[0] for row in handled.rows}) == 1000  # distinct event ids
    wait_until(lambda: count(other_connection) == 0, what="handled events deleted")


def test_events_stored_as_version_1_objects_before_the_layout_column_are_still_delivered(
    durable_listener, other_connection
):
    # What the triggers of an earlier release wrote: a row object and no layout.
    other_connection.execute(
        "INSERT INTO pgnotify_event (declaration, model, action, payload) "
        "SELECT 'durableapp.Job:default', 'durableapp.job', 'insert', "
        "jsonb_build_object('pk', -g, 'fields', jsonb_build_object('name', 'old', 'n', g)) "
        "FROM generate_series(1, 3) g"
    )
    insert_jobs(other_connection, 3)
    assert count(other_connection, "layout = ''") == 3

    handled = Handled(durable_listener())

    wait_until(lambda: len(handled.pks) == 6, what="6 events handled")
    assert handled.pks == job_pks(other_connection) | {-1, -2, -3}
    wait_until(lambda: count(other_connection) == 0, what="handled events deleted")


def test_migrating_to_a_text_payload_keeps_the_events_stored_as_jsonb(transactional_db):
    def migrate(target: str) -> None:
        MigrationExecutor(connection).migrate([("django_pgnotify", target)])

    def payload_type() -> str:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'pgnotify_event' AND column_name = 'payload'"
            )
            return cursor.fetchone()[0]

    migrate("0002_durableevent_layout")
    try:
        assert payload_type() == "jsonb"
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO pgnotify_event (declaration, model, action, payload) VALUES "
                "('durableapp.Job:default', 'durableapp.job', 'insert', "
                """'{"pk": 1, "fields": {"name": "old", "n": 1}}'::jsonb)"""
            )
    finally:
        migrate(LATEST_MIGRATION)

    assert payload_type() == "text"
    (payload,) = DurableEvent.objects.values_list("payload", flat=True)
    assert json.loads(payload) == {"pk": 1, "fields": {"name": "old", "n": 1}}
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE relname = 'pgnotify_event'")
        assert cursor.fetchone()[0] == ["fillfactor=50"]


def test_the_trigger_stores_the_row_array_as_json_text(other_connection):
    insert_jobs(other_connection, 1, name="a", body='say "hi"')

    ((payload, layout),) = other_connection.execute("SELECT payload, layout FROM pgnotify_event")
    (pk,) = job_pks(other_connection)
    assert isinstance(payload, str)  # the text column, read as the trigger wrote it
    assert json.loads(payload) == [pk, "a-1", 'say "hi"', 1]
    assert layout == '"fields":["name","body","n"]'


def test_a_bulk_write_is_stored_in_runs_of_at_most_1024_changes_whose_ids_follow_the_rows(
    other_connection,
):
    insert_jobs(other_connection, 3000)

    rows = event_rows(other_connection)
    assert [size for _, size, _ in rows] == [1023, 1024, 953]  # 64 bytes a change, at least
    assert [b[0] - a[0] for a, b in itertools.pairwise(rows)] == [wire.DURABLE_ID_STEP] * 2
    arrays = [json.loads(f"[{payload}]") for _, _, payload in rows]
    assert [len(a) for a in arrays] == [size for _, size, _ in rows]
    assert sorted(row[0] for array in arrays for row in array) == sorted(job_pks(other_connection))


def test_large_changes_make_runs_of_about_64_kb_and_none_is_cut(other_connection):
    insert_jobs(other_connection, 12, body="x" * 40_000)

    rows = event_rows(other_connection)
    assert sum(size for _, size, _ in rows) == 12
    assert max(size for _, size, _ in rows) == 2
    assert all(len(payload) < 65_536 + 40_100 for _, _, payload in rows)
    bodies = [row[2] for _, _, payload in rows for row in json.loads(f"[{payload}]")]
    assert bodies == ["x" * 40_000] * 12


def failing_and_ok_jobs(conn: psycopg.Connection) -> dict[str, int]:
    """One statement, one event row: two jobs that fail and three that do not."""
    names = ["ok-a", "fail-b", "ok-c", "fail-d", "ok-e"]
    conn.execute(
        "INSERT INTO durableapp_job (name, body, n) "
        "SELECT name, '', 0 FROM unnest(%s::text[]) name",
        [names],
    )
    return dict(conn.execute("SELECT name, id FROM durableapp_job").fetchall())


def test_the_handled_changes_of_a_row_with_failing_ones_are_not_delivered_again(
    durable_listener, other_connection
):
    pks = failing_and_ok_jobs(other_connection)
    handled = Handled(durable_listener())

    wait_until(lambda: count(other_connection, "status = 'dead'") == 2, what="2 dead letters")
    (dead,) = DurableEvent.objects.filter(status="dead")
    assert (dead.size, sorted(dead.handled), dead.attempts) == (5, [0, 2, 4], 3)
    ok = [pk for _, _, _, _, pk, _ in handled.read().rows]
    assert sorted(ok) == sorted(pks[name] for name in ("ok-a", "ok-c", "ok-e"))  # once each
    expected = {dead.id + 1: 3, dead.id + 3: 3}
    handled.await_failing(sum(expected.values()))
    failing = Counter(event_id for event_id, _ in handled.failing)
    assert failing == expected
    assert {row[0] - dead.id for row in handled.rows} == {0, 2, 4}
    assert durable.backlog().dead == 2

    assert durable.retry_events(DurableEvent.objects.filter(id=dead.id)) == 1
    wait_until(
        lambda: Counter(event_id for event_id, _ in handled.read().failing)[dead.id + 1] == 6,
        what="the failing changes retried",
    )
    wait_until(lambda: count(other_connection, "status = 'dead'") == 2, what="dead again")
    assert len(handled.read().rows) == 3  # the handled changes were not delivered again


def test_a_listener_stopped_mid_row_gives_the_rest_back_and_keeps_what_it_handled(
    durable_listener, other_connection
):
    insert_jobs(other_connection, 1000)
    first = durable_listener(PGNOTIFY_TEST_RECEIVER_DELAY="0.005")
    handled = Handled(first)
    wait_until(lambda: len(handled.pks) >= 20, what="some changes handled")
    assert first.stop() == 0
    before = len(handled.read().rows)
    assert 20 <= before < 1000

    ((size, done, lease_owner),) = other_connection.execute(
        "SELECT size, handled, lease_owner FROM pgnotify_event"
    ).fetchall()
    assert (size, len(done), lease_owner) == (1000, before, "")

    second = Handled(durable_listener())
    wait_until(lambda: count(other_connection) == 0, what="the rest handled")
    pks = [row[4] for row in handled.rows + second.read().rows]
    assert sorted(pks) == sorted(job_pks(other_connection))  # each exactly once


def test_an_undecodable_row_becomes_a_dead_letter_at_once(durable_listener, other_connection):
    other_connection.execute(
        "INSERT INTO pgnotify_event (declaration, model, action, layout, payload, size) VALUES "
        """('durableapp.Job:default', 'durableapp.job', 'insert', '"fields":["n"]', '[1,1]', 2), """
        """('durableapp.Job:default', 'durableapp.job', 'insert', '"fields":["n"]', '[2,', 1)"""
    )
    insert_jobs(other_connection, 1)
    process = durable_listener()
    handled = Handled(process)

    wait_until(lambda: len(handled.pks) == 1, what="the good event handled")
    wait_until(lambda: count(other_connection, "status = 'dead'") == 3, what="3 dead changes")
    errors = [e.last_error for e in DurableEvent.objects.filter(status="dead").order_by("id")]
    assert errors[0] == "undecodable: 2 changes decoded as 1"
    assert errors[1].startswith("undecodable: ")
    assert all(e.attempts == 1 for e in DurableEvent.objects.filter(status="dead"))
    wait_until(lambda: durable.backlog().dead == 3, what="the dead letters settled")
    assert process.stop() == 0
    (stopped,) = [line for line in process.output("err") if "listener stopped" in line]
    # Payloads that cannot be read, as live notifications are counted; their changes
    # are counted as dead letters.
    assert "undecodable=2" in stopped and "dead_letters=3" in stopped


def test_a_claim_reads_the_pending_index_in_id_order_before_the_table_is_analyzed(
    other_connection,
):
    # Fresh from a bulk write, the table has no statistics: left to itself the
    # planner reads and sorts every pending row for each claim.
    other_connection.execute("TRUNCATE pgnotify_event")
    # As 20,000 single-row writes leave them: a row each.
    other_connection.execute(
        "INSERT INTO pgnotify_event (declaration, model, action, layout, payload) "
        """SELECT 'durableapp.Job:default', 'durableapp.job', 'insert', '"fields":["n"]', """
        "'[' || g || ',' || g || ']' FROM generate_series(1, 20000) g"
    )
    params = {
        "uris": ["durableapp.Job:default"],
        "limit": 500,
        "bytes": durable.CLAIM_BYTES,
        "owner": "test",
        "lease": 30.0,
    }

    with other_connection.transaction():
        other_connection.execute(durable._CLAIM_SETTINGS)
        plan = "\n".join(
            row[0]
            for row in other_connection.execute(
                sql.SQL("EXPLAIN (COSTS OFF) {}").format(durable._CLAIM), params
            )
        )

    assert "Index Scan using pgnotify_event_pending" in plan, plan
    # Sorted: only the rows each declaration's index read gave (merged in id order).
    assert "Sort Key: pgnotify_event.declaration" not in plan, plan
    assert "Seq Scan" not in plan and "Bitmap" not in plan, plan


def test_a_claim_of_wide_changes_stops_at_claim_bytes_and_a_wider_one_is_claimed_alone(
    other_connection,
):
    # A claim's answer must arrive within PROBE_TIMEOUT: 500 changes of 100 kB took 50 MB,
    # which a slow link did not carry in time, so the claim rolled back, again and again.
    for n in range(30):  # 30 statements: 30 rows of one 100 kB change
        insert_jobs(other_connection, 1, name=f"wide-{n}", body="x" * 100_000)
        if n == 14:
            insert_jobs(other_connection, 1, name="wider", body="y" * durable.CLAIM_BYTES)
    worker = job_worker()

    async def claims() -> list[list[durable.Claimed]]:
        async with await worker._connect() as conn:
            return [await worker._claim(conn) for _ in range(7)]

    taken = asyncio.run(asyncio.wait_for(claims(), 30))

    assert [len(claimed) for claimed in taken] == [11, 4, 1, 11, 4, 0, 0]
    (wider,) = taken[2]  # alone, its payload read once claimed
    assert json.loads(f"[{wider.payload}]")[0][1:3] == ["wider-1", "y" * durable.CLAIM_BYTES]
    for claimed in taken:
        assert sum(len(row.payload) for row in claimed[:-1]) < durable.CLAIM_BYTES


def test_event_fields_say_durable_and_carry_a_payload_far_above_8000_bytes(row_changes):
    job = Job.objects.create(name="big", body="x" * 50_000)

    (event,) = row_changes.wait(1, timeout=15)
    assert event.durable is True and event.event_id is not None
    assert event.pk == job.pk and not event.truncated
    assert event.fields["body"] == "x" * 50_000


def test_a_durable_declaration_with_old_false_stores_and_delivers_new_values_alone(
    restore_triggers,
):
    (declaration,) = [d for d in get_declarations() if d.model is Job]
    install_redeclared(declaration, old=False)
    job = Job.objects.create(name="first", n=1)
    Job.objects.filter(pk=job.pk).update(name="second")
    job.save()  # writes the row as it is: announced all the same
    # Read before a listener runs: a delivered row is deleted.
    layouts = DurableEvent.objects.filter(action="update").values_list("layout", flat=True)
    assert set(layouts) == {'"fields":["name","body","n"],"old":false'}

    with capture_row_changes("durableapp.Job") as changes:
        _, renamed, saved = changes.wait(3, timeout=15)

    assert (renamed.action, renamed.fields["name"], renamed.old) == ("update", "second", None)
    assert (saved.action, saved.fields["name"], saved.changed) == ("update", "first", frozenset())


def test_decimals_in_arrays_are_stored_and_delivered_with_every_digit(restore_triggers, settings):
    durably = Notify(fields=["readings", "grid", "label"], durable=True)
    settings.PGNOTIFY = {**settings.PGNOTIFY, "MODELS": {"testapp.Measurement": durably}}
    install_triggers(["testapp.Measurement"])
    pk = Measurement.objects.create(**decimal_arrays(0)).pk
    before = stored_arrays(pk)[pk]
    Measurement.objects.filter(pk=pk).update(readings=decimal_arrays(1)["readings"])
    after = stored_arrays(pk)[pk]

    with capture_row_changes("testapp.Measurement") as changes:
        created, updated = changes.wait(2, timeout=15)

    assert (created.durable, updated.durable) == (True, True)
    assert repr(created.fields) == repr(updated.old) == repr(before)
    assert repr(updated.fields) == repr(after)
    assert updated.changed == frozenset({"readings"})


def test_durable_events_carry_the_writers_context_and_a_malformed_one_fails_nothing(row_changes):
    with context(actor="user:42", reason="refund"):
        Job.objects.create(name="with context")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('pgnotify.context', '{not json', true)")
        Job.objects.create(name="malformed context")
    Job.objects.create(name="none")

    first, second, third = row_changes.wait(3, timeout=15)
    assert first.context == {"actor": "user:42", "reason": "refund"}
    assert second.context is None and third.context is None
    assert first.xid != second.xid


def test_paused_writes_store_no_durable_event(other_connection):
    with paused():
        Job.objects.create(name="paused")
    Job.objects.create(name="heard")

    assert count(other_connection) == 1


def test_killed_listener_leaves_no_event_behind_after_lease_expiry(
    durable_listener, other_connection
):
    insert_jobs(other_connection, 3000)
    first = durable_listener(
        PGNOTIFY_TEST_LEASE="2", PGNOTIFY_TEST_BATCH="200", PGNOTIFY_TEST_RECEIVER_DELAY="0.001"
    )
    first.wait_for(r"^handled ", stream="out")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(5)
    assert count(other_connection) > 0  # killed mid-backlog

    second = durable_listener(PGNOTIFY_TEST_LEASE="2", PGNOTIFY_TEST_BATCH="200")
    handled = Handled(first, second)

    wait_until(lambda: count(other_connection) == 0, what="no event left pending")
    assert handled.pks == job_pks(other_connection)  # every event dispatched at least once


def test_receivers_running_past_the_lease_keep_it_and_each_change_is_handled_once(
    durable_listener, other_connection
):
    # One event row of 6 changes taking 0.4 s each: 2.4 s of receivers, a 1 s lease.
    # The other listener claimed the row each time the lease ran out and dispatched it
    # again meanwhile, every claim an attempt: a dead letter, each change handled 3 times.
    slow = {"PGNOTIFY_TEST_LEASE": "1", "PGNOTIFY_TEST_RECEIVER_DELAY": "0.4"}
    processes = [durable_listener(**slow) for _ in range(2)]
    insert_jobs(other_connection, 6)

    wait_until(lambda: count(other_connection, "status = 'pending'") == 0, what="the row settled")
    for process in processes:
        assert process.stop() == 0
    assert count(other_connection) == 0  # deleted, not a dead letter

    handled = [
        line.split()[5]
        for p in processes
        for line in p.output("out")
        if line.startswith("handled ")
    ]
    assert Counter(map(int, handled)) == dict.fromkeys(job_pks(other_connection), 1)
    stopped = [line for p in processes for line in p.output("err") if "listener stopped" in line]
    assert len(stopped) == 2
    assert all("dead_letters=0, durable_lost_leases=0)" in line for line in stopped)
    claimed = [re.search(r"durable_claimed=(\d+)", line) for line in stopped]
    assert sorted(int(m[1]) for m in claimed if m) == [0, 6]


def test_a_long_transaction_with_a_lower_id_committing_later_is_not_skipped(
    durable_listener, other_connection
):
    handled = Handled(durable_listener())
    with psycopg.connect(database_url()) as long:
        long.execute(
            "INSERT INTO durableapp_job (name, body, n) VALUES ('long', '', 0)"
        )  # the lower event id
        insert_jobs(other_connection, 1, name="short")
        wait_until(lambda: len(handled.pks) == 1, what="the short transaction's job")
        long.commit()
    wait_until(lambda: len(handled.pks) == 2, what="the long transaction's job")
    assert handled.pks == job_pks(other_connection)
    ids = sorted(row[0] for row in handled.rows)
    assert [row[0] for row in handled.rows] == ids[::-1]  # the lower id arrived second


def wakeups_before_marker(listening: psycopg.Connection, marker_conn) -> list[str]:
    """Wake-up notifications received before a marker committed afterwards."""
    marker_conn.execute(
        "SELECT pg_notify(%s, 'marker')",
        [wire.DURABLE_CHANNEL],
    )
    received = []
    for notify in listening.notifies(timeout=30):
        if notify.payload == "marker":
            return received
        received.append(notify.payload)
    raise AssertionError("marker notification never arrived")


def test_a_bulk_update_of_10000_rows_sends_exactly_one_wakeup(other_connection):
    insert_jobs(other_connection, 10_000)
    with psycopg.connect(database_url(), autocommit=True) as listening:
        listening.execute(f"LISTEN {wire.DURABLE_CHANNEL}")
        other_connection.execute("UPDATE durableapp_job SET n = n + 1")

        assert wakeups_before_marker(listening, other_connection) == [""]
    assert count(other_connection, "action = 'update'") == 10_000


def test_poll_only_sends_no_wakeup_and_still_delivers_within_the_poll_interval(
    durable_listener, other_connection, restore_triggers, settings
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "DURABLE_WAKEUP": False}
    install_triggers(["durableapp"])
    insert_jobs(other_connection, 10_000)
    handled = Handled(durable_listener(PGNOTIFY_TEST_POLL="2"))
    wait_until(lambda: len(handled.pks) == 10_000, what="the backlog handled")

    with psycopg.connect(database_url(), autocommit=True) as listening:
        listening.execute(f"LISTEN {wire.DURABLE_CHANNEL}")
        other_connection.execute("UPDATE durableapp_job SET n = n + 1")
        updated = time.monotonic()
        assert wakeups_before_marker(listening, other_connection) == []

    wait_until(lambda: len(handled.read().rows) == 20_000, timeout=30, what="updates handled")
    assert time.monotonic() - updated < 2 + 10  # the poll interval, plus the work itself


@pytest.mark.parametrize("listeners", [2, 4])
def test_several_listeners_share_a_backlog_without_handling_an_event_twice_at_once(
    durable_listener, other_connection, listeners
):
    processes = [
        durable_listener(PGNOTIFY_TEST_BATCH="20", PGNOTIFY_TEST_RECEIVER_DELAY="0.001")
        for _ in range(listeners)
    ]
    handled = Handled(*processes)
    for _ in range(100):  # 100 event rows of 20 changes: one per claim of 20
        insert_jobs(other_connection, 20)

    wait_until(lambda: len(handled.pks) == 2000, what="2000 jobs handled")
    wait_until(lambda: count(other_connection) == 0, what="handled events deleted")
    by_event = defaultdict(list)
    for event_id, _pid, start, end, _, _ in handled.read().rows:
        by_event[event_id].append((start, end))
    for spans in by_event.values():  # at least once; never twice at the same time
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    per_process = Counter(row[1] for row in handled.rows)
    assert len(per_process) == listeners
    assert min(per_process.values()) >= 2000 / listeners / 4  # the work is spread


def test_failing_events_are_retried_with_backoff_then_dead_lettered_and_retried_from_admin(
    durable_listener, other_connection
):
    process = durable_listener()
    handled = Handled(process)
    insert_jobs(other_connection, 2, name="fail")
    insert_jobs(other_connection, 20, name="ok")

    wait_until(lambda: count(other_connection, "status = 'dead'") == 2, what="2 dead letters")
    handled.await_failing(6)  # three attempts of each
    assert len(handled.pks) == 20  # the others were not held up
    (dead,) = DurableEvent.objects.filter(status="dead")  # the statement's two changes
    assert (dead.size, dead.attempts) == (2, 3)  # max_attempts of the Job declaration
    assert f"event {dead.id}: " in dead.last_error and "fails on purpose" in dead.last_error
    for event_id in (dead.id, dead.id + 1):
        times = [t for failing_id, t in handled.read().failing if failing_id == event_id]
        assert len(times) == 3
        with override_settings(PGNOTIFY=DURABLE_SETTINGS):  # the listener's delays
            assert times[1] - times[0] >= retry_delay(1) > 0
            assert times[2] - times[1] >= retry_delay(2) > retry_delay(1)
    assert count(other_connection, "status = 'pending'") == 0

    User.objects.create_superuser("admin", "admin@example.com", "secret")
    client = Client()
    client.login(username="admin", password="secret")
    response = client.post(
        "/admin/django_pgnotify/durableevent/",
        {"action": "retry", "_selected_action": [dead.id]},
    )
    assert response.status_code == 302
    wait_until(
        lambda: len([1 for event_id, _ in handled.read().failing if event_id == dead.id]) == 4,
        what="the retried event dispatched again",
    )
    listing = client.get("/admin/django_pgnotify/durableevent/?status__exact=dead")
    assert listing.status_code == 200


def test_a_retry_is_made_when_it_falls_due_not_at_the_next_poll(durable_listener, other_connection):
    # Nothing wakes a listener for a retry: with retry delays of 0.3 s and 0.6 s and a
    # poll interval of 10 s, the listener looks again when each retry falls due.
    process = durable_listener(PGNOTIFY_TEST_POLL="10")
    handled = Handled(process)
    insert_jobs(other_connection, 1, name="fail")

    # Before the two polls 10 s apart that the retries waited for.
    wait_until(lambda: count(other_connection, "status = 'dead'") == 1, timeout=15, what="dead")
    handled.await_failing(3)
    times = [t for _, t in handled.read().failing]
    assert len(times) == 3  # max_attempts of the Job declaration
    with override_settings(PGNOTIFY=DURABLE_SETTINGS):  # the listener's delays
        delays = [retry_delay(1), retry_delay(2)]
    for (first, then), delay in zip(itertools.pairwise(times), delays, strict=True):
        assert delay <= then - first < 5


def test_retries_and_dead_letters_are_counted_in_metrics_and_logs(
    durable_listener, other_connection
):
    from tests.test_listener_resilience import free_port, scrape

    port = free_port()
    process = durable_listener("--metrics-port", str(port), "--metrics-address", "127.0.0.1")
    insert_jobs(other_connection, 1, name="fail")
    insert_jobs(other_connection, 1, name="ok")

    wait_until(lambda: count(other_connection, "status = 'dead'") == 1, what="a dead letter")
    # Counted after the settlement commits, so a moment after the row is dead.
    dead = 'pgnotify_dead_letters_total{database="default"} 1.0'
    wait_until(lambda: dead in scrape(port), what="the dead letter counted in /metrics")
    body = scrape(port)
    # max_attempts=3: two failures retried, the third a dead letter; the ok job once.
    assert 'pgnotify_retries_total{database="default"} 2.0' in body
    assert 'pgnotify_durable_claimed_total{database="default"} 4.0' in body
    assert 'pgnotify_receiver_errors_total{database="default"} 3.0' in body
    assert process.stop() == 0
    (stopped,) = [line for line in process.output("err") if "listener stopped" in line]
    assert "durable_claimed=4, retries=2, dead_letters=1" in stopped


def test_pruning_deletes_only_old_done_events_and_dead_letters_when_asked(transactional_db):
    payload = '{"pk": 1}'
    old = Now() - timedelta(days=8)

    def make(status, done_at):
        return DurableEvent.objects.create(
            declaration="durableapp.Job:default",
            model="durableapp.job",
            action="insert",
            payload=payload,
            status=status,
            done_at=done_at,
        ).id

    ids = {
        "old done": make("done", old),
        "new done": make("done", Now()),
        "old dead": make("dead", old),
        "pending": make("pending", None),
    }
    DurableEvent.objects.filter(id=ids["pending"]).update(created_at=old)

    call_command("pgnotify_prune", "--older-than", "7d", "--batch-size", "1", verbosity=0)
    assert set(DurableEvent.objects.values_list("id", flat=True)) == {
        ids["new done"],
        ids["old dead"],
        ids["pending"],
    }
    call_command("pgnotify_prune", "--older-than", "7d", "--dead", verbosity=0)
    assert set(DurableEvent.objects.values_list("id", flat=True)) == {
        ids["new done"],
        ids["pending"],
    }


def test_pruning_leaves_a_dead_letter_made_pending_while_it_waited_on_the_row(other_connection):
    """A Retry (dead -> pending) that commits while prune waits on the row's lock:
    PostgreSQL checks the DELETE's own condition again on the new row, not the
    subquery's, so that condition must say what may be deleted. The batch that
    deleted nothing is no end: the dead letter after it is pruned too (pruning
    stopped at the first batch that deleted less than it picked)."""

    def dead_letter() -> int:
        return DurableEvent.objects.create(
            declaration="durableapp.Job:default",
            model="durableapp.job",
            action="insert",
            payload='{"pk": 1}',
            status="dead",
            done_at=Now() - timedelta(days=8),
        ).id

    dead, after = dead_letter(), dead_letter()
    other_connection.execute("BEGIN")
    other_connection.execute("UPDATE pgnotify_event SET status = 'pending' WHERE id = %s", [dead])
    pruned: list[int] = []

    def prune() -> None:
        try:
            pruned.append(durable.prune_events(timedelta(days=7), dead=True, batch_size=1))
        finally:
            connections.close_all()

    def prune_waits() -> bool:
        with connection.cursor() as cursor:  # not other_connection's: its snapshot stays
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
                " AND query LIKE '%%DELETE FROM %%pgnotify_event%%'"
            )
            return cursor.fetchone()[0] == 1

    thread = threading.Thread(target=prune)
    thread.start()
    try:
        wait_until(prune_waits, what="prune waiting on the row")
    finally:
        other_connection.execute("COMMIT")
        thread.join(10)

    assert pruned == [1]
    assert DurableEvent.objects.get(id=dead).status == "pending"
    assert not DurableEvent.objects.filter(id=after).exists()


def test_status_reports_backlog_oldest_pending_age_and_dead_letters(other_connection):
    from django_pgnotify.status import database_status

    for name in ("a", "b", "c"):  # three transactions: three event rows
        insert_jobs(other_connection, 1, name=name)
    other_connection.execute(
        "UPDATE pgnotify_event SET status = 'dead' WHERE id = (SELECT min(id) FROM pgnotify_event)"
    )

    status = database_status("default", ["durableapp"])
    assert status.durable["pending"] == 2 and status.durable["dead"] == 1
    assert status.durable["oldest_pending_age"] >= 0
    assert any("dead letters" in p for p in status.problems)


def test_server_restart_mid_stream_loses_nothing(own_server):
    from tests.test_listener_resilience import start_server, stop_server

    url, server = own_server["url"], own_server["server"]
    env = {
        **own_server["env"],
        "DJANGO_SETTINGS_MODULE": DURABLE,
        "PGNOTIFY_TEST_DURABLE_RECEIVER": "1",
        "PGNOTIFY_TEST_LEASE": "2",
        "PGNOTIFY_TEST_BATCH": "100",
        "PGNOTIFY_TEST_RECEIVER_DELAY": "0.002",
    }
    with psycopg.connect(url, autocommit=True) as conn:
        insert_jobs(conn, 2000)
    listener = ManagedProcess([sys.executable, "-m", "django", "pgnotify_listen", "-v", "2"], env)
    try:
        handled = Handled(listener)
        listener.wait_for(r"^handled ", stream="out")
        stop_server(server)
        start_server(server)
        with psycopg.connect(url, autocommit=True) as conn:
            insert_jobs(conn, 500, name="after")
            wait_until(lambda: count(conn) == 0, timeout=60, what="no event left pending")
            pks = handled.pks
            assert pks == job_pks(conn)
            assert len(pks) == 2500
            conn.execute("TRUNCATE durableapp_job")
        assert listener.stop() == 0
    finally:
        listener.kill()
        start_server(server)


def test_retry_delays_double_up_to_their_cap(settings):
    settings.PGNOTIFY = {"DURABLE_RETRY_DELAY_MIN": 1.0, "DURABLE_RETRY_DELAY_MAX": 5.0}

    assert [retry_delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_retry_delays_stay_at_their_cap_past_1024_attempts(settings):
    settings.PGNOTIFY = {"DURABLE_RETRY_DELAY_MIN": 1.0, "DURABLE_RETRY_DELAY_MAX": 300.0}

    assert [retry_delay(n) for n in (1025, 1026, 10**6)] == [300.0] * 3


def job_worker(using: str = "default", **options: Any) -> durable.DurableWorker:
    """The durable worker of a listener in this process serving Job."""
    declarations = [d for d in get_declarations() if d.model is Job]
    return durable.DurableWorker(
        declarations, using, Decoder([Job]), Dispatcher(), threading.Event(), **options
    )


def one_batch(worker: durable.DurableWorker) -> int:
    """Claim and dispatch one batch, on a connection of the worker's own: changes handled."""

    async def run() -> int:
        async with await worker._connect() as conn:
            with ThreadPoolExecutor(1) as executor:
                return await worker.process_batch(conn, executor)

    return asyncio.run(asyncio.wait_for(run(), 30))


def test_neither_listener_connection_prepares_statements_which_pgbouncer_would_break(
    transactional_db,
):
    # psycopg prepares a statement once run 5 times, unless told not to; a
    # transaction-pooling PgBouncer then fails with "prepared statement already exists".
    worker = job_worker()

    async def claims() -> list[tuple[str]]:
        async with await worker._connect() as conn:
            with ThreadPoolExecutor(1) as executor:
                for _ in range(8):
                    assert await worker.process_batch(conn, executor) == 0
            cursor = await conn.execute("SELECT name FROM pg_prepared_statements")
            return await cursor.fetchall()

    assert asyncio.run(asyncio.wait_for(claims(), 30)) == []
    with pgnotify_connection.connect("default", "pgnotify test") as listening:
        for _ in range(8):
            listening.execute("SELECT pg_notify(%s, '')", ["pgnotify_test_probe"])
        assert listening.execute("SELECT name FROM pg_prepared_statements").fetchall() == []


@pytest.fixture
def silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A TCP server that accepts connections and never answers: its port, and "accepted"."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        with suppress(OSError):  # closed at teardown
            while True:
                held.append(server.accept()[0])
                accepted.set()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for conn in held:
        conn.close()


def test_a_stop_while_the_durable_connection_waits_on_a_silent_server_ends_at_once(
    silent_server, monkeypatch
):
    port, accepted = silent_server
    settings_dict = connections["other"].settings_dict
    monkeypatch.setitem(settings_dict, "HOST", "127.0.0.1")
    monkeypatch.setitem(settings_dict, "PORT", port)
    monkeypatch.setitem(
        settings_dict, "OPTIONS", {**settings_dict["OPTIONS"], "connect_timeout": 20}
    )
    worker = job_worker("other")

    async def stop_while_connecting() -> None:
        stop = asyncio.Event()
        with ThreadPoolExecutor(1) as executor:
            running = asyncio.ensure_future(worker.run(stop, executor))
            assert await asyncio.to_thread(accepted.wait, 10), "the worker never connected"
            stop.set()
            await asyncio.wait_for(running, 10)  # not the 20 s connect_timeout

    asyncio.run(stop_while_connecting())


def test_a_stop_that_cuts_a_last_attempt_short_counts_every_change_left_as_a_dead_letter(
    durable_listener, other_connection
):
    # One event row of three failing changes on its last attempt (max_attempts=3).
    insert_jobs(other_connection, 3, name="fail")
    other_connection.execute("UPDATE pgnotify_event SET attempts = 2")
    process = durable_listener(PGNOTIFY_TEST_SAY_HANDLING="1", PGNOTIFY_TEST_RECEIVER_DELAY="0.5")
    process.wait_for(r"^handling ", stream="out")

    assert process.stop() == 0  # the change in hand fails; the other two are not reached
    assert count(other_connection, "status = 'dead'") == 3 == durable.backlog().dead
    (stopped,) = [line for line in process.output("err") if "listener stopped" in line]
    assert "retries=0, dead_letters=3" in stopped


def test_prune_refuses_an_age_without_a_unit():
    with pytest.raises(CommandError, match="--older-than '7': give a number and a unit"):
        call_command("pgnotify_prune", "--older-than", "7")


# A listener that dies, hangs or fails


def test_an_event_whose_listener_dies_on_every_attempt_becomes_a_dead_letter_alone(
    durable_listener, other_connection
):
    # Three transactions, three event rows. The middle one's receiver never returns, as
    # one the kernel kills for its memory; a supervisor kills its listener each time.
    for name in ("ok-before", "hang", "ok-after"):
        insert_jobs(other_connection, 1, name=name)
    hanging = event_rows(other_connection)[1][0]
    for _ in range(3):  # max_attempts of the Job declaration
        process = durable_listener(PGNOTIFY_TEST_LEASE="1")
        process.wait_for(rf"^hanging {hanging}$", stream="out", timeout=20)
        process.kill()

    last = durable_listener(PGNOTIFY_TEST_LEASE="1")
    line = last.wait_for(rf"durable event {hanging} .* is a dead letter", stream="err", timeout=20)
    wait_until(lambda: count(other_connection, "status = 'pending'") == 0, what="the rest handled")
    assert last.stop() == 0

    assert "after 3 attempt(s): never settled" in line
    # Claimed alone whenever its lease had run out, it took no other row with it.
    assert other_connection.execute(
        "SELECT id, status, attempts, last_error FROM pgnotify_event"
    ).fetchall() == [(hanging, "dead", 3, durable.NEVER_SETTLED)]
    assert not any(line.startswith("hanging") for line in last.output("out"))


def test_a_durable_receiver_that_hangs_lets_the_health_file_age_and_says_why(
    durable_listener, other_connection, tmp_path
):
    health = tmp_path / "healthy"
    # A 1 s lease, renewed all along: that hides the hanging receiver from no one.
    process = durable_listener("--health-file", str(health), PGNOTIFY_TEST_LEASE="1")
    wait_until(health.exists, what="the health file")
    insert_jobs(other_connection, 1, name="hang")
    process.wait_for(r"^hanging ", stream="out")

    # PROBE_INTERVAL is 0.5 s in tests.settings_listener: no change handled for that long.
    wait_until(
        lambda: time.time() - health.stat().st_mtime > 2, timeout=10, what="the file left to age"
    )
    line = process.wait_for(r"durable receivers of 'default' have handled no change", stream="err")
    assert "(0 of a batch of 1 handled): the listener is not healthy" in line
    assert other_connection.execute(  # still its own, not handed to another listener
        "SELECT lease_until > clock_timestamp() FROM pgnotify_event"
    ).fetchone() == (True,)


def test_slow_durable_receivers_that_keep_handling_changes_keep_the_listener_healthy(
    durable_listener, other_connection, tmp_path
):
    health = tmp_path / "healthy"
    # A batch of 12 changes taking 0.4 s each: 4.8 s, far past PROBE_INTERVAL (0.5 s),
    # but a change handled well within it every time. Judged by the batch, the file
    # would be left from 0.5 s into it: over 4 s old at its end.
    process = durable_listener("--health-file", str(health), PGNOTIFY_TEST_RECEIVER_DELAY="0.4")
    insert_jobs(other_connection, 12)

    ages = []
    for _ in range(12):
        process.wait_for(r"^handled ", stream="out")
        ages.append(time.time() - health.stat().st_mtime)
    assert process.stop() == 0

    assert max(ages) < 2.5, ages
    assert not any("have handled no change" in line for line in process.output("err"))


def test_a_listener_whose_durable_claims_fail_is_not_healthy_until_they_work_again(
    durable_listener, other_connection, tmp_path
):
    health = tmp_path / "healthy"
    process = durable_listener("--health-file", str(health))
    wait_until(health.exists, what="the health file")
    other_connection.execute("ALTER TABLE pgnotify_event RENAME TO pgnotify_event_away")
    try:
        process.wait_for(r"table pgnotify_event does not exist", stream="err")
        wait_until(
            lambda: time.time() - health.stat().st_mtime > 2,
            timeout=10,
            what="the health file left to age",
        )
    finally:
        other_connection.execute("ALTER TABLE pgnotify_event_away RENAME TO pgnotify_event")

    wait_until(lambda: time.time() - health.stat().st_mtime < 1, what="the health file touched")
    insert_jobs(other_connection, 1)
    process.wait_for(r"^handled ", stream="out")


def run_worker(worker: durable.DurableWorker, until, timeout: float = 20.0) -> None:
    """Run ``worker`` until ``until()`` is true (or it ends, raising its error), then stop it."""

    async def scenario() -> None:
        stop = asyncio.Event()
        with ThreadPoolExecutor(1) as executor:
            running = asyncio.ensure_future(worker.run(stop, executor))
            deadline = time.monotonic() + timeout
            while not until() and not running.done():
                assert time.monotonic() < deadline, f"not done within {timeout}s"
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(running, 10)

    asyncio.run(scenario())


def test_an_unexpected_error_in_a_batch_is_logged_and_durable_processing_goes_on(
    other_connection, job_names, settings, caplog
):
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "DURABLE_LEASE": 1.0,
        "DURABLE_POLL_INTERVAL": 0.2,
        "RECONNECT_DELAY_MIN": 0.05,
    }
    worker = job_worker()
    decode_and_send = worker._decode_and_send
    calls: list[int] = []

    def failing_once(*args):  # a bug in the worker, say
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        return decode_and_send(*args)

    worker._decode_and_send = failing_once  # type: ignore[method-assign]
    insert_jobs(other_connection, 1)

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run_worker(worker, lambda: count(other_connection) == 0)

    assert job_names == ["job-1"]  # once its lease had run out
    (record,) = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info[0] is KeyError
    assert "unexpected error: 'a bug'; retrying in" in record.getMessage()


class SlowLink:
    """A TCP proxy to the test server whose answers arrive at ``rate`` bytes a second."""

    def __init__(self, rate: float) -> None:
        params = pgnotify_connection.connection_params("default")
        host, port = params.get("host") or "/tmp", int(params.get("port") or 5432)
        self.target = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
            if host.startswith("/")
            else (socket.AF_INET, (host, port))
        )
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with suppress(OSError):  # closed at teardown
            while True:
                client = self.server.accept()[0]
                server = socket.socket(self.target[0])
                server.connect(self.target[1])
                self.sockets += [client, server]
                for source, sink, rate in ((client, server, 0.0), (server, client, self.rate)):
                    threading.Thread(
                        target=self._relay, args=(source, sink, rate), daemon=True
                    ).start()

    def _relay(self, source: socket.socket, sink: socket.socket, rate: float) -> None:
        with suppress(OSError):
            while data := source.recv(16_384):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        for each in (source, sink):  # either side gone: the connection is
            with suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()
        for each in self.sockets:
            each.close()


@pytest.fixture
def slow_link(monkeypatch) -> Iterator[SlowLink]:
    """Durable workers connect through a link carrying 500 kB a second."""
    link = SlowLink(500_000)
    params = pgnotify_connection.connection_params

    def through_link(using: str) -> dict[str, Any]:
        return {**params(using), "host": "127.0.0.1", "port": link.port}

    monkeypatch.setattr(pgnotify_connection, "connection_params", through_link)
    yield link
    link.close()


def test_a_change_too_wide_to_arrive_in_probe_timeout_holds_up_no_other_and_ends_dead(
    other_connection, job_names, settings, slow_link, caplog
):
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "PROBE_TIMEOUT": 1.0,
        "DURABLE_LEASE": 1.0,
        "DURABLE_POLL_INTERVAL": 0.2,
        "RECONNECT_DELAY_MIN": 0.05,
        "RECONNECT_DELAY_MAX": 0.2,
    }
    insert_jobs(other_connection, 1, name="wide", body="x" * 2_000_000)  # 4 s on the link
    insert_jobs(other_connection, 1, name="behind")
    worker = job_worker()

    # It was claimed, cut off by the timeout and rolled back, for ever, the change
    # behind it never delivered.
    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run_worker(worker, lambda: count(other_connection, "status = 'pending'") == 0, 30)

    assert job_names == ["behind-1"]
    ((attempts, error),) = other_connection.execute(
        "SELECT attempts, last_error FROM pgnotify_event WHERE status = 'dead'"
    )
    assert (attempts, error) == (3, durable.NEVER_SETTLED)  # max_attempts of Job
    assert worker.stats["dead_letters"] == 1
    assert "no answer to a query within 1s" in caplog.text


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise AttributeError("no message")


def test_a_durable_receiver_error_that_cannot_be_printed_is_retried_like_any_other(
    other_connection, job_names
):
    from django_pgnotify import row_changed

    def receiver(sender, event, **kwargs) -> None:
        if event.fields["name"].startswith("bad"):
            raise UnprintableError

    insert_jobs(other_connection, 1, name="bad")
    insert_jobs(other_connection, 1, name="good")
    worker = job_worker()

    async def one_batch() -> int:
        async with await worker._connect() as conn:
            with ThreadPoolExecutor(1) as executor:
                return await worker.process_batch(conn, executor)

    row_changed.connect(receiver, sender=Job, weak=False, dispatch_uid="test_unprintable")
    try:
        assert asyncio.run(asyncio.wait_for(one_batch(), 30)) == 2
    finally:
        row_changed.disconnect(sender=Job, dispatch_uid="test_unprintable")

    assert job_names == ["bad-1", "good-1"]
    ((status, attempts, error),) = other_connection.execute(
        "SELECT status, attempts, last_error FROM pgnotify_event"
    ).fetchall()
    assert (status, attempts) == ("pending", 1)  # retried, the good one deleted
    assert error.endswith(".receiver: UnprintableError: (its message could not be rendered)")


def test_claims_failing_on_a_working_connection_are_retried_ever_later(
    other_connection, settings, caplog
):
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "RECONNECT_DELAY_MIN": 0.1,
        "RECONNECT_DELAY_MAX": 5.0,
    }
    worker = job_worker()

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]

    # Connecting works, every claim fails: the table was dropped or renamed.
    other_connection.execute("ALTER TABLE pgnotify_event RENAME TO pgnotify_event_away")
    try:
        with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
            run_worker(worker, lambda: len(failures()) >= 5)
    finally:
        other_connection.execute("ALTER TABLE pgnotify_event_away RENAME TO pgnotify_event")

    assert "run manage.py migrate" in failures()[0]
    delays = [float(re.search(r"retrying in ([\d.]+)s", m).group(1)) for m in failures()]
    # Doubling from 0.1 s, each drawn between half and all of its ceiling (0.8 s the 5th).
    assert delays[4] >= 0.8, delays


def test_a_durable_connect_to_a_silent_server_gives_up_after_probe_timeout(
    silent_server, monkeypatch, settings, caplog
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "PROBE_TIMEOUT": 2.0}
    port, accepted = silent_server
    settings_dict = connections["other"].settings_dict
    monkeypatch.setitem(settings_dict, "HOST", "127.0.0.1")
    monkeypatch.setitem(settings_dict, "PORT", port)
    monkeypatch.setitem(
        settings_dict,
        "OPTIONS",
        {k: v for k, v in settings_dict["OPTIONS"].items() if k != "connect_timeout"},
    )
    worker = job_worker("other")

    def given_up() -> bool:
        return any("cannot connect" in r.getMessage() for r in caplog.records)

    asked: list[Any] = []
    connect = psycopg.AsyncConnection.connect

    async def recording_connect(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("connect_timeout"))
        return await connect(*args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", recording_connect)
    with caplog.at_level(logging.WARNING, logger="django_pgnotify.durable"):
        run_worker(worker, given_up, timeout=15)

    assert accepted.is_set()
    # libpq's connect_timeout, from PROBE_TIMEOUT as for the listening connection (it
    # was 5 s whatever the setting), so the connect above gave up by itself.
    assert asked and set(asked) == {2}


def test_ignore_own_changes_skips_the_durable_events_this_process_wrote_only(
    other_connection, job_names
):
    from django_pgnotify import own_changes

    insert_jobs(other_connection, 1, name="theirs")
    own_changes.track_own_connections()
    mine = connections.create_connection("default")
    try:
        mine.ensure_connection()
        pid = mine.connection.info.backend_pid
        # PID reuse, as PostgreSQL does it: the event was written an hour ago by a
        # session whose PID this process's new connection has now.
        other_connection.execute(
            "UPDATE pgnotify_event SET pid = %s, created_at = now() - interval '1 hour'", [pid]
        )
        with mine.cursor() as cursor:
            cursor.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('mine', '', 0)")
        worker = job_worker(ignore_own_changes=True)
        assert one_batch(worker) == 2
    finally:
        mine.close()

    assert job_names == ["theirs-1"]
    assert worker.stats["own_changes"] == 1
    assert count(other_connection) == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_durable_health_check_follows_the_receivers_change_by_change(other_connection, kind):
    from django_pgnotify import row_changed

    stuck_at: list[float] = []
    release = threading.Event()

    def sync_receiver(sender, event, **kwargs) -> None:
        if event.fields["name"].startswith("stuck"):
            stuck_at.append(time.monotonic())
            assert release.wait(10)
        else:
            time.sleep(0.1)

    async def async_receiver(sender, event, **kwargs) -> None:
        if event.fields["name"].startswith("stuck"):
            stuck_at.append(time.monotonic())
            assert await asyncio.to_thread(release.wait, 10)
        else:
            await asyncio.sleep(0.1)

    # 3 s of receivers, 0.1 s a change: far past the patience, but within it each change
    # even on a machine busy enough to stretch a change tenfold.
    insert_jobs(other_connection, 30, name="slow")
    insert_jobs(other_connection, 1, name="stuck")
    worker = job_worker()
    patience = 1.0
    samples: list[tuple[float, bool]] = []

    async def scenario() -> None:
        async with await worker._connect() as conn:
            with ThreadPoolExecutor(1) as executor:
                batch = asyncio.ensure_future(worker.process_batch(conn, executor))
                deadline = time.monotonic() + 15
                while not (stuck_at and samples and not samples[-1][1]):
                    assert time.monotonic() < deadline, "never found unhealthy"
                    await asyncio.sleep(0.05)
                    now = time.monotonic()
                    samples.append((now, worker.healthy(now, patience)))
                release.set()
                assert await batch == 2
        assert worker.healthy(time.monotonic(), patience)  # nothing in hand

    receiver = sync_receiver if kind == "sync" else async_receiver
    row_changed.connect(receiver, sender=Job, weak=False, dispatch_uid="test_health_check")
    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        release.set()
        row_changed.disconnect(sender=Job, dispatch_uid="test_health_check")

    (stuck,) = stuck_at
    before = [healthy for at, healthy in samples if at < stuck]
    assert len(before) > 10 and all(before)  # the batch ran past `patience`, changing
    assert samples[-1][0] - stuck >= patience  # unhealthy once stuck for longer than it


def test_an_update_that_changes_the_pk_is_stored_and_delivered_as_live_triggers_announce_it(
    other_connection,
):
    """Paired by primary key, the new row finds no old one: stored under its new pk with
    its old values null, as a live declaration sends it, rather than left out."""
    jobs = [Job.objects.create(name=f"moved-{i}", body="b", n=i) for i in range(3)]
    other_connection.execute("UPDATE durableapp_job SET id = id + 1000")

    with capture_row_changes("durableapp.Job") as changes:
        events = changes.wait(6, timeout=15)

    moved = sorted((e for e in events if e.action == "update"), key=lambda e: e.pk)
    assert [e.pk for e in moved] == [job.pk + 1000 for job in jobs]
    for event, job in zip(moved, jobs, strict=True):
        assert event.durable and not event.truncated
        assert event.fields == {"name": job.name, "body": "b", "n": job.n}
        assert event.old == {"name": None, "body": None, "n": None}  # no old row had the pk
        assert event.changed == frozenset({"name", "body", "n"})
