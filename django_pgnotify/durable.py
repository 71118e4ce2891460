"""Durable delivery: claiming, dispatching and settling rows of the event table.

A durable declaration's trigger inserts each change into ``pgnotify_event``
in the writing transaction and sends one constant wake-up notification (or
none, in poll-only mode). A listener's :class:`DurableWorker`, on a
connection of its own, claims a batch in one short transaction
(``FOR UPDATE SKIP LOCKED``, recording a lease: owner and expiry), dispatches
it with no row lock held, then settles it in one statement per outcome:
handled events are deleted (or marked done), failed ones are scheduled again
with exponential backoff or become dead letters. A claim whose lease expired
(its listener died) is claimable again, so every event is dispatched at least
once; receivers deduplicate by ``event.event_id``.

The functions below (status, retry, discard, prune) serve the admin and the
management commands.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import psycopg
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections
from psycopg import sql

from . import connection, own_changes, wire
from .backoff import Backoff
from .conf import get_setting
from .declarations import Declaration
from .decoding import DecodeError, Decoder
from .dispatch import Dispatcher
from .events import RowChange

logger = logging.getLogger("django_pgnotify.durable")

PENDING, DONE, DEAD = "pending", "done", "dead"

_TABLE = sql.Identifier(wire.EVENT_TABLE)

_CLAIM = sql.SQL(
    """
WITH claimable AS (
    SELECT id FROM {table}
    WHERE status = 'pending' AND declaration = ANY(%(uris)s) AND available_at <= now()
      AND (lease_until IS NULL OR lease_until < now())
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {table} AS e
SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s),
    attempts = e.attempts + 1
FROM claimable WHERE e.id = claimable.id
RETURNING e.id, e.declaration, e.model, e.action, e.xid, extract(epoch FROM e.changed_at)::text,
    e.context, e.layout, e.payload, e.pid, e.attempts
"""
).format(table=_TABLE)

# Run first in the claim's transaction. The planner settings keep its plan the pending
# index read in id order, stopping after ``limit`` rows: a table just filled by a bulk
# write has no statistics yet, and the planner then takes the claimable rows for a
# handful and reads and sorts every pending row instead (80 ms, not 3 ms, for a claim of
# 500 at a backlog of 75,000). SET LOCAL, not a session setting: it ends with the
# transaction, as PgBouncer's transaction pooling requires.
_CLAIM_SETTINGS = sql.SQL(
    "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true),"
    " set_config('synchronous_commit', 'off', true)"
)

# Claims and settlements commit without waiting for the WAL flush (two per batch). A
# server crash may lose the last ones: lost claims leave events pending, lost deletions
# leave them to be dispatched again, as at-least-once delivery allows.
_SETTLE_SETTINGS = sql.SQL("SELECT set_config('synchronous_commit', 'off', true)")

_DELETE = sql.SQL("DELETE FROM {table} WHERE id = ANY(%(ids)s)").format(table=_TABLE)

_MARK_DONE = sql.SQL(
    "UPDATE {table} SET status = 'done', done_at = now(), lease_owner = '', "
    "lease_until = NULL WHERE id = ANY(%(ids)s)"
).format(table=_TABLE)

_FAIL = sql.SQL(
    """
UPDATE {table} AS e
SET status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
    available_at = now() + make_interval(secs => f.delay),
    last_error = f.error, lease_owner = '', lease_until = NULL,
    done_at = CASE WHEN f.dead THEN now() END
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(dead)s::boolean[], %(delays)s::float8[])
    AS f(id, error, dead, delay)
WHERE e.id = f.id
"""
).format(table=_TABLE)

# Claimed but not dispatched (the listener is stopping): give them back untouched.
_RELEASE = sql.SQL(
    "UPDATE {table} SET lease_owner = '', lease_until = NULL, "
    "attempts = greatest(attempts - 1, 0) WHERE id = ANY(%(ids)s)"
).format(table=_TABLE)


class Claimed(NamedTuple):
    """One claimed row of the event table (ids are unique, so tuples sort by id)."""

    id: int
    declaration: str
    model: str
    action: str
    xid: int | None
    #: Seconds since the epoch as PostgreSQL renders them (a JSON number), or None.
    timestamp: str | None
    context: str
    #: How ``payload`` is laid out (version 2 message keys), or "" (a version 1 object).
    layout: str
    #: The row's wire format row, as JSON text.
    payload: str
    pid: int | None
    attempts: int

    def message_key(self) -> tuple[Any, ...]:
        """What the rows of one message share: all rows of one statement have the same."""
        return (
            self.model,
            self.action,
            self.xid,
            self.timestamp,
            self.context,
            self.pid,
            self.layout,
        )


def build_message(rows: Sequence[Claimed]) -> str:
    """One message carrying ``rows``, which share their ``message_key``.

    Rows of one statement are decoded in one go, as version 2 (arrays, the
    decoder's fast path) unless they were stored as version 1 objects: parsing
    one message per row cost the listener more than claiming and deleting them.
    """
    first = rows[0]
    if first.layout:
        version = f'"{wire.VERSION_KEY}":{wire.VERSION},{first.layout},'
    else:
        version = f'"{wire.VERSION_KEY}":{wire.OBJECT_ROWS_VERSION},'
    return (
        f"{{{version}"
        f'"{wire.MODEL}":{json.dumps(first.model)},"{wire.ACTION}":{json.dumps(first.action)},'
        f'"{wire.XID}":{"null" if first.xid is None else int(first.xid)},'
        f'"{wire.TIMESTAMP}":{first.timestamp or "null"},'
        f'"{wire.ROWS}":[{",".join(row.payload for row in rows)}],'
        f'"{wire.CONTEXT}":{json.dumps(first.context) if first.context else "null"}}}'
    )


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: doubling, capped."""
    minimum = float(get_setting("DURABLE_RETRY_DELAY_MIN"))
    maximum = float(get_setting("DURABLE_RETRY_DELAY_MAX"))
    return min(maximum, minimum * 2 ** max(0, attempts - 1))


def lease_owner() -> str:
    """``host:pid:random``: who holds a claim, readable in the admin."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class DurableWorker:
    """Processes the durable events of ``declarations`` for one listener.

    Args:
        declarations: The durable declarations served (others are ignored).
        using: The Django database alias whose event table is read.
        decoder: Turns stored messages into ``RowChange`` objects.
        dispatcher: Sends ``row_changed``; its ``errors`` tell which events failed.
        stopping: Set when the listener stops; the batch in hand is finished.
        ignore_own_changes: Settle, without dispatching, events whose writer
            was one of this process's connections.
    """

    def __init__(
        self,
        declarations: Iterable[Declaration],
        using: str,
        decoder: Decoder,
        dispatcher: Dispatcher,
        stopping: threading.Event,
        *,
        ignore_own_changes: bool = False,
    ) -> None:
        durable = [d for d in declarations if d.notify.durable]
        default_attempts = int(get_setting("DURABLE_MAX_ATTEMPTS"))
        self.max_attempts = {d.uri: d.notify.max_attempts or default_attempts for d in durable}
        self.using = using
        self.decoder = decoder
        self.dispatcher = dispatcher
        self.stopping = stopping
        self.ignore_own_changes = ignore_own_changes
        self.owner = lease_owner()
        self.batch_size = int(get_setting("DURABLE_BATCH_SIZE"))
        self.lease = float(get_setting("DURABLE_LEASE"))
        self.poll_interval = float(get_setting("DURABLE_POLL_INTERVAL"))
        self.keep_done = bool(get_setting("DURABLE_KEEP_DONE"))
        #: Set to look at the table now (a wake-up notification, a reconnect).
        self.wake = asyncio.Event()
        self.stats = dispatcher.stats

    async def run(self, stop: asyncio.Event, executor: Executor) -> None:
        """Claim and dispatch until ``stop`` is set; reconnect when the connection fails."""
        backoff = Backoff.from_settings()
        while not stop.is_set():
            try:
                conn = await self._connect()
            except (psycopg.Error, OSError) as exc:
                await self._wait(stop, backoff.next(), f"cannot connect: {_one_line(exc)}")
                continue
            try:
                backoff.reset()
                while not stop.is_set():
                    self.wake.clear()
                    while not stop.is_set() and await self.process_batch(conn, executor):
                        pass
                    await self._wait(stop, self.poll_interval)
            except (psycopg.Error, OSError) as exc:
                if isinstance(exc, psycopg.errors.UndefinedTable):
                    message = (
                        f"table {wire.EVENT_TABLE} does not exist in database {self.using!r}:"
                        " run manage.py migrate"
                    )
                else:
                    message = _one_line(exc)
                await self._wait(stop, backoff.next(), message)
            finally:
                with suppress(Exception):  # closing a dead connection may fail; it is gone anyway
                    await asyncio.wait_for(conn.close(), 2)

    async def _connect(self) -> psycopg.AsyncConnection:
        params = {**connection.TCP_KEEPALIVES, **connection.connection_params(self.using)}
        params["application_name"] = f"{get_setting('APPLICATION_NAME')} durable"[:63]
        params.setdefault("connect_timeout", 5)
        return await psycopg.AsyncConnection.connect(**params, autocommit=True)

    async def _wait(self, stop: asyncio.Event, seconds: float, problem: str = "") -> None:
        if problem:
            logger.warning(
                "pgnotify: durable events of %r: %s; retrying in %.1fs",
                self.using,
                problem,
                seconds,
            )
        waiters = {asyncio.ensure_future(stop.wait())}
        if not problem:
            waiters.add(asyncio.ensure_future(self.wake.wait()))
        _, pending = await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
        for task in pending:
            task.cancel()

    async def process_batch(self, conn: psycopg.AsyncConnection, executor: Executor) -> int:
        """Claim, dispatch and settle one batch; returns how many were claimed."""
        # Pipelined: the transaction's four statements cost one round trip.
        async with conn.pipeline(), conn.transaction():
            await conn.execute(_CLAIM_SETTINGS)
            cursor = await conn.execute(
                _CLAIM,
                {
                    "uris": list(self.max_attempts),
                    "limit": self.batch_size,
                    "owner": self.owner,
                    "lease": self.lease,
                },
            )
        claimed = sorted(map(Claimed._make, await cursor.fetchall()))
        if not claimed:
            return 0
        self.stats["durable_claimed"] += len(claimed)
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(executor, self._decode_and_send, claimed)
        if outcome.dispatched and self.dispatcher.has_async_receivers(outcome.dispatched):
            await self.dispatcher.send_async(outcome.dispatched)
        errors = {**outcome.undecodable, **self.dispatcher.take_errors()}
        await self._settle(conn, claimed, outcome, errors)
        return len(claimed)

    def _decode_and_send(self, claimed: Sequence[Claimed]) -> _Outcome:
        """In the dispatch thread: decode the batch and call the sync receivers."""
        outcome = _Outcome()
        events: list[RowChange] = []
        for _, rows in itertools.groupby(claimed, Claimed.message_key):
            group = list(rows)
            pid = group[0].pid
            if self.ignore_own_changes and pid is not None and own_changes.is_own_pid(pid):
                self.stats["own_changes"] += len(group)
                outcome.skipped.extend(row.id for row in group)
                continue
            events.extend(self._decode(group, outcome))
        errors = self.stats["receiver_errors"]
        outcome.dispatched = self.dispatcher.send_sync(events, self.stopping)
        if self.stats["receiver_errors"] != errors:
            close_old_connections()
        return outcome

    def _decode(self, group: list[Claimed], outcome: _Outcome) -> list[RowChange]:
        """Decode rows of one message_key; when that fails, each row alone to find the bad one."""
        try:
            changes = self.decoder.decode(
                build_message(group), "", group[0].pid or 0, event_id=group[0].id
            )
            if len(changes) != len(group):
                raise DecodeError(f"{len(group)} rows decoded as {len(changes)} changes")
        except Exception as exc:
            if len(group) > 1:
                return [change for row in group for change in self._decode([row], outcome)]
            (row,) = group
            # Not something a retry can fix: a dead letter at once, kept for a look.
            self.stats["undecodable"] += 1
            outcome.undecodable[row.id] = f"undecodable: {exc}"
            logger.warning(
                "pgnotify: durable event %s of %s is undecodable: %s",
                row.id,
                row.declaration,
                exc,
            )
            return []
        for change, row in zip(changes, group, strict=True):
            if change.event_id != row.id:
                # Built for this batch and not shared yet: set in place, as
                # dataclasses.replace() would cost more than the decoding.
                object.__setattr__(change, "event_id", row.id)
        return changes

    async def _settle(
        self,
        conn: psycopg.AsyncConnection,
        claimed: Sequence[Claimed],
        outcome: _Outcome,
        errors: dict[int, str],
    ) -> None:
        dispatched = {event.event_id for event in outcome.dispatched}
        handled = [c.id for c in claimed if c.id in dispatched and c.id not in errors]
        handled += outcome.skipped
        failed = [c for c in claimed if c.id in errors]
        released = [
            c.id
            for c in claimed
            if c.id not in dispatched and c.id not in errors and c.id not in outcome.skipped
        ]
        async with conn.pipeline(), conn.transaction():
            await conn.execute(_SETTLE_SETTINGS)
            if handled:
                await conn.execute(_MARK_DONE if self.keep_done else _DELETE, {"ids": handled})
            if failed:
                dead = [
                    c.id in outcome.undecodable or c.attempts >= self.max_attempts[c.declaration]
                    for c in failed
                ]
                await conn.execute(
                    _FAIL,
                    {
                        "ids": [c.id for c in failed],
                        "errors": [errors[c.id][:2000] for c in failed],
                        "dead": dead,
                        "delays": [
                            0.0 if is_dead else retry_delay(c.attempts)
                            for c, is_dead in zip(failed, dead, strict=True)
                        ],
                    },
                )
                for c, is_dead in zip(failed, dead, strict=True):
                    if is_dead:
                        self.stats["dead_letters"] += 1
                        logger.error(
                            "pgnotify: durable event %s of %s is a dead letter after %d "
                            "attempt(s): %s",
                            c.id,
                            c.declaration,
                            c.attempts,
                            errors[c.id],
                        )
                    else:
                        self.stats["retries"] += 1
            if released:
                await conn.execute(_RELEASE, {"ids": released})


@dataclass
class _Outcome:
    dispatched: list[RowChange] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    undecodable: dict[int, str] = field(default_factory=dict)


# Functions for the admin, pgnotify_status and pgnotify_prune


@dataclass(frozen=True)
class Backlog:
    """The state of the event table, for ``pgnotify_status``.

    Attributes:
        pending: Events not yet handled (claimed or not).
        oldest_pending_age: Seconds since the oldest pending event was written.
        dead: Dead letters.
        done: Handled events kept for retention.
    """

    pending: int
    oldest_pending_age: float | None
    dead: int
    done: int


def backlog(using: str = DEFAULT_DB_ALIAS) -> Backlog:
    """Count the event table's rows by status, in one query."""
    query = sql.SQL(
        "SELECT count(*) FILTER (WHERE status = 'pending'), "
        "extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), "
        "count(*) FILTER (WHERE status = 'dead'), count(*) FILTER (WHERE status = 'done') "
        "FROM {}"
    ).format(_TABLE)
    with connections[using].cursor() as cursor:
        cursor.execute(query.as_string(None))
        pending, age, dead, done = cursor.fetchone()
    return Backlog(pending, float(age) if age is not None else None, dead, done)


def retry_events(queryset: Any) -> int:
    """Make events (typically dead letters) pending again, with a fresh attempt count."""
    from django.db.models.functions import Now

    return queryset.exclude(status=DONE).update(
        status=PENDING,
        attempts=0,
        available_at=Now(),
        lease_owner="",
        lease_until=None,
    )


def prune_events(
    older_than: timedelta,
    *,
    dead: bool = False,
    batch_size: int = 10_000,
    using: str = DEFAULT_DB_ALIAS,
) -> int:
    """Delete done events (and dead letters if ``dead``) older than ``older_than``.

    Deletes in batches, each its own short transaction, so that pruning a
    large table neither holds locks for long nor bloats one transaction.
    Pending events are never touched. Returns how many rows were deleted.
    """
    statuses = [DONE, DEAD] if dead else [DONE]
    query = sql.SQL(
        "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE status = ANY(%s) "
        "AND coalesce(done_at, created_at) < now() - %s LIMIT %s)"
    ).format(table=_TABLE)
    total = 0
    with connections[using].cursor() as cursor:
        while True:
            cursor.execute(query.as_string(None), [statuses, older_than, batch_size])
            total += cursor.rowcount
            if cursor.rowcount < batch_size:
                return total


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = [
    "Backlog",
    "DurableWorker",
    "backlog",
    "prune_events",
    "retry_delay",
    "retry_events",
]
