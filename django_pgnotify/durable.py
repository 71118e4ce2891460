"""Durable delivery: claiming, dispatching and settling rows of the event table.

A durable declaration's trigger inserts a statement's changes into
``pgnotify_event`` in the writing transaction, up to ``wire.DURABLE_ID_STEP``
per row, and sends one constant wake-up notification (or none, in poll-only
mode). A listener's :class:`DurableWorker`, on a connection of its own, claims
rows holding about ``DURABLE_BATCH_SIZE`` changes in one short transaction
(``FOR UPDATE SKIP LOCKED``, recording a lease: owner and expiry), dispatches
them with no row lock held, then settles them in one statement per outcome:
rows whose changes were all handled are deleted (or marked done); a row with
failed changes is scheduled again with exponential backoff, or becomes a dead
letter, and records which of its changes were handled so that only the others
are delivered again. The listener renews the lease of the rows in hand while
their receivers run, however long they take; a claim whose lease expired (its
listener died or lost its connection) is claimable again, so every change is
dispatched at least once; receivers deduplicate by ``event.event_id``, the
row's id plus the change's position. A listener settles only the rows still
leased to it: one whose lease expired and that another listener claimed is
that listener's to settle.

A row claimed again after its lease expired unsettled (its listener died, or
lost its connection) is suspect: it may be what killed the listener. It is
claimed in a batch of its own, so that it cannot take other rows' attempts
with it, and once it has used up its attempts that way it becomes a dead
letter without being dispatched again.

The functions below (status, retry, discard, prune) serve the admin and the
management commands.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import json
import logging
import os
import socket
import threading
import time
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
from .dispatch import Dispatcher, error_text
from .events import RowChange
from .health import ListenerHealth

logger = logging.getLogger("django_pgnotify.durable")

PENDING, DONE, DEAD = "pending", "done", "dead"

_TABLE = sql.Identifier(wire.EVENT_TABLE)

# The claimable rows of the declaration ``served.uri``, read from the pending index on
# (declaration, id) in id order (``ORDER BY declaration, id``). The URI is matched as a
# range of one value, not with ``=``: an equality to a value makes the planner take
# ``declaration`` as fixed and ``ORDER BY id`` as the order of the primary key too, and,
# counting the served rows spread evenly, it read that in id order, filtering, through
# every row of the declarations not served ahead (a million took a second per claim).
_CLAIMABLE = """status = 'pending' AND declaration >= served.uri AND declaration <= served.uri
            AND available_at <= now() AND (lease_until IS NULL OR lease_until < now())"""

# A claimable row of ``served.uri`` as the claim locks it, whether it is abandoned too.
_LOCKABLE = (
    """        SELECT id, size - coalesce(cardinality(handled), 0) AS unhandled,
            octet_length(payload) AS bytes, lease_owner <> '' AS abandoned
        FROM {table}
        WHERE """
    + _CLAIMABLE
)

# Whole rows holding ``limit`` changes still to deliver (at least one row), the rows
# before the last holding less than ``bytes`` of payload: the claim's answer must arrive
# within PROBE_TIMEOUT, and 500 wide changes (a payload has no size limit) can take far
# longer; cut off, the claim rolled back, to be made and cut off again, for ever, and no
# row behind was delivered. A row wider than ``bytes`` is claimed alone, and returned
# without its payload, which is read once the claim has committed (see _claim).
# (``octet_length`` reads a stored value's size without decompressing it.) The rows are
# counted first, without locking: locked rows stay hidden from the other listeners until
# the claim commits, so locking ``limit`` rows to claim the first (a bulk write's rows
# hold up to 1,024 changes each) left a second listener nothing to claim.
# A row still carrying a lease owner had its lease expire unsettled: it is "abandoned".
# Such a row is claimed alone, and a claim stops before the first one: should its
# changes kill the listener again, they cost no other row an attempt. Also returned:
# the row's age by the server's clock (for recognising this process's own writes).
# The rows are read per declaration served, and merged in id order: pending rows of
# declarations this listener does not serve (another listener's, or those of a
# declaration since renamed, see docs/durable.md) are never read, however many there
# are. The first ``limit`` rows of each declaration hold the first ``limit`` of all;
# the count says how many rows of each declaration to lock, so that a claim locks no
# row it does not take (a row locked meanwhile by another claim is skipped for the next
# one of its declaration). Should another claim hold every row of the declarations
# counted, the claim takes the first free row of any declaration served (``spare``,
# locking the first free row of each): taking nothing, it would leave its listener
# idle until the next poll while rows of another declaration wait. It then claims
# again at once.
_CLAIM = sql.SQL(
    """
WITH head AS (
    SELECT served.uri, found.* FROM unnest(%(uris)s::text[]) AS served(uri), LATERAL (
        SELECT id, size - coalesce(cardinality(handled), 0) AS unhandled,
            octet_length(payload) AS bytes
        FROM {table}
        WHERE """
    + _CLAIMABLE
    + """
        ORDER BY declaration, id
        LIMIT %(limit)s
    ) AS found
    ORDER BY id
    LIMIT %(limit)s
), wanted AS (
    SELECT uri, count(*) AS rows FROM (
        SELECT uri, sum(unhandled) OVER running - unhandled AS before,
            sum(bytes) OVER running - bytes AS bytes_before
        FROM head
        WINDOW running AS (ORDER BY id ROWS UNBOUNDED PRECEDING)
    ) AS running
    WHERE before < %(limit)s AND bytes_before < %(bytes)s
    GROUP BY uri
), locked AS (
    SELECT found.* FROM wanted AS served, LATERAL (
"""
    + _LOCKABLE
    + """
        ORDER BY declaration, id
        LIMIT served.rows
        FOR UPDATE SKIP LOCKED
    ) AS found
), spare AS (
    SELECT found.* FROM unnest(%(uris)s::text[]) AS served(uri), LATERAL (
"""
    + _LOCKABLE
    + """
            AND EXISTS (SELECT FROM wanted) AND NOT EXISTS (SELECT FROM locked)
        ORDER BY declaration, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) AS found
    ORDER BY id
    LIMIT 1
), claimable AS (
    SELECT id, abandoned FROM (
        SELECT id, abandoned,
            sum(unhandled) OVER running - unhandled AS before,
            sum(bytes) OVER running - bytes AS bytes_before,
            count(*) FILTER (WHERE abandoned OR bytes > %(bytes)s) OVER running AS alone_so_far,
            row_number() OVER running AS nth
        FROM (SELECT * FROM locked UNION ALL SELECT * FROM spare) AS taken
        WINDOW running AS (ORDER BY id ROWS UNBOUNDED PRECEDING)
    ) AS running
    WHERE before < %(limit)s AND bytes_before < %(bytes)s AND (alone_so_far = 0 OR nth = 1)
)
UPDATE {table} AS e
SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s),
    attempts = e.attempts + 1
FROM claimable WHERE e.id = claimable.id
RETURNING e.id, e.declaration, e.model, e.action, e.xid, extract(epoch FROM e.changed_at)::text,
    e.context, e.layout, CASE WHEN octet_length(e.payload) <= %(bytes)s THEN e.payload END,
    e.pid, e.attempts, e.size, e.handled, claimable.abandoned,
    extract(epoch FROM now() - e.created_at)::float8
"""
).format(table=_TABLE)

#: Bytes of payload the rows of a claim hold before its last, at most (see _CLAIM): a
#: second at 8 Mbit/s.
CLAIM_BYTES = 1_048_576

# The payload of a row wider than CLAIM_BYTES, claimed alone without it.
_PAYLOAD = sql.SQL("SELECT payload FROM {table} WHERE id = %(id)s").format(table=_TABLE)

# Run first in the claim's transaction. The planner settings keep its plan the pending
# index read in id order per declaration, stopping after ``limit`` rows: a table just
# filled by a bulk write has no statistics yet, and the planner then takes the claimable
# rows for a handful and reads and sorts every pending row instead (80 ms, not 3 ms, for
# a claim of 500 at a backlog of 75,000). The sorts that merge the declarations' rows
# (a few hundred) are left, each counted at the huge cost PostgreSQL gives a disabled
# plan node before version 18, for which it would compile the claim with JIT: 400 ms a
# claim, so JIT is off. SET LOCAL, not a session setting: it ends with the transaction,
# as PgBouncer's transaction pooling requires.
_CLAIM_SETTINGS = sql.SQL(
    "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true),"
    " set_config('jit', 'off', true), set_config('synchronous_commit', 'off', true)"
)

# Claims and settlements commit without waiting for the WAL flush (two per batch). A
# server crash may lose the last ones: lost claims leave events pending, lost deletions
# leave them to be dispatched again, as at-least-once delivery allows.
_SETTLE_SETTINGS = sql.SQL("SELECT set_config('synchronous_commit', 'off', true)")

# Every settlement touches only the rows still leased to this listener, and returns
# their ids. A row whose lease expired may have been claimed by another listener, which
# dispatches its changes again and settles it: settling it here too would clear that
# listener's lease, or delete the row under it.
# (A row released keeps its owner when claimed as abandoned, see _RELEASE, but no lease:
# a settlement made again, once its connection was lost, finds it settled.)
_STILL_LEASED = "lease_owner = %(owner)s AND lease_until IS NOT NULL"

_DELETE = sql.SQL(
    "DELETE FROM {table} WHERE id = ANY(%(ids)s) AND " + _STILL_LEASED + " RETURNING id"
).format(table=_TABLE)

_MARK_DONE = sql.SQL(
    "UPDATE {table} SET status = 'done', done_at = now(), lease_owner = '', "
    "lease_until = NULL WHERE id = ANY(%(ids)s) AND " + _STILL_LEASED + " RETURNING id"
).format(table=_TABLE)

# ``handled`` gains the positions handled this time, as a set: each position at most
# once, so that ``size - cardinality(handled)`` counts the changes still to deliver.
# (An int[] literal per row: the rows' lists differ in length, which a two-dimensional
# array cannot hold.)
_HANDLED = (
    "ARRAY(SELECT DISTINCT merged.position"
    " FROM unnest(coalesce(e.handled, ARRAY[]::int[]) || f.done::int[]) AS merged(position)"
    " ORDER BY merged.position)"
)

_FAIL = sql.SQL(
    """
UPDATE {table} AS e
SET status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
    available_at = now() + make_interval(secs => f.delay),
    last_error = f.error, lease_owner = '', lease_until = NULL,
    done_at = CASE WHEN f.dead THEN now() END,
    handled = """
    + _HANDLED
    + """
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(dead)s::boolean[], %(delays)s::float8[],
    %(done)s::text[]) AS f(id, error, dead, delay, done)
WHERE e.id = f.id AND e."""
    + _STILL_LEASED
    + """
RETURNING e.id
"""
).format(table=_TABLE)

# Claimed again after every attempt was used up by claims never settled (see _CLAIM):
# a dead letter, not dispatched again. This claim gives its attempt back: ``attempts``
# says how many times the changes were dispatched.
_GIVE_UP = sql.SQL(
    "UPDATE {table} SET status = 'dead', attempts = greatest(attempts - 1, 0), "
    "last_error = %(error)s, done_at = now(), lease_owner = '', lease_until = NULL "
    "WHERE id = ANY(%(ids)s) AND " + _STILL_LEASED + " RETURNING id"
).format(table=_TABLE)

#: ``last_error`` of a row given up by ``_GIVE_UP``.
NEVER_SETTLED = (
    "never settled after its last attempt (its listener was killed, lost its connection"
    " or failed): not dispatched again"
)

# The rows in hand, while their receivers run (see DurableWorker._keep_leased): only
# those still leased to this listener. A row discarded is gone; one retried in the admin
# once its lease had run out has no owner, and one claimed since by another listener
# has that listener's: renewing either would take it back from whoever holds it now.
_RENEW = sql.SQL(
    "UPDATE {table} SET lease_until = now() + make_interval(secs => %(lease)s) "
    "WHERE id = ANY(%(ids)s) AND " + _STILL_LEASED + " RETURNING id"
).format(table=_TABLE)

# Claimed but not all dispatched (the listener is stopping): give them back, keeping
# what was handled. A row claimed as abandoned keeps a lease owner, and so its mark (see
# _CLAIM): the changes the stop kept from being dispatched are as suspect as before.
_RELEASE = sql.SQL(
    "UPDATE {table} AS e SET lease_owner = CASE WHEN f.abandoned THEN e.lease_owner ELSE '' END,"
    " lease_until = NULL, attempts = greatest(e.attempts - 1, 0), handled = "
    + _HANDLED
    + " FROM unnest(%(ids)s::bigint[], %(done)s::text[], %(abandoned)s::boolean[])"
    " AS f(id, done, abandoned)"
    " WHERE e.id = f.id AND e." + _STILL_LEASED + " RETURNING e.id"
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
    #: The changes' wire format rows, as comma-separated JSON text (None, from _CLAIM, for
    #: a row wider than CLAIM_BYTES until read).
    payload: str
    pid: int | None
    attempts: int
    #: How many changes ``payload`` holds.
    size: int
    #: Positions of the changes handled on an earlier claim, or None.
    handled: list[int] | None
    #: Its last claim was never settled: the lease expired with an owner (see _CLAIM).
    abandoned: bool
    #: Seconds from the writing transaction's start to this claim's, by the server's clock.
    age: float

    @property
    def unhandled(self) -> int:
        """Changes of the row still to deliver (as ``DurableEvent.unhandled``)."""
        return self.unhandled_after(())

    def unhandled_after(self, handled_now: Iterable[int]) -> int:
        """Changes of the row still to deliver once the positions ``handled_now`` are handled.

        Counted by position, each once: a row for which an earlier release stored a
        position twice still counts right, and is done when every position is handled.
        """
        if not self.handled and not handled_now:
            return self.size
        handled = {p for p in (*(self.handled or ()), *handled_now) if 0 <= p < self.size}
        return self.size - len(handled)


def build_message(row: Claimed) -> str:
    """The wire format message carrying ``row``'s changes.

    Version 2 (arrays, the decoder's fast path) unless the row was stored as
    a version 1 object by an earlier release.
    """
    if row.layout:
        version = f'"{wire.VERSION_KEY}":{wire.VERSION},{row.layout},'
    else:
        version = f'"{wire.VERSION_KEY}":{wire.OBJECT_ROWS_VERSION},'
    return (
        f"{{{version}"
        f'"{wire.MODEL}":{json.dumps(row.model)},"{wire.ACTION}":{json.dumps(row.action)},'
        f'"{wire.XID}":{"null" if row.xid is None else int(row.xid)},'
        f'"{wire.TIMESTAMP}":{row.timestamp or "null"},'
        f'"{wire.ROWS}":[{row.payload}],'
        f'"{wire.CONTEXT}":{json.dumps(row.context) if row.context else "null"}}}'
    )


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: doubling, capped."""
    minimum = float(get_setting("DURABLE_RETRY_DELAY_MIN"))
    maximum = float(get_setting("DURABLE_RETRY_DELAY_MAX"))
    # 64 doublings take any minimum worth setting past any maximum; ``2 ** attempts``
    # would overflow a float past 1,024 attempts, which max_attempts may allow.
    return min(maximum, minimum * 2.0 ** min(max(0, attempts - 1), 64))


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

    Attributes:
        working: Connected, and its last claim succeeded.
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
        health: ListenerHealth | None = None,
    ) -> None:
        durable = [d for d in declarations if d.notify.durable]
        default_attempts = int(get_setting("DURABLE_MAX_ATTEMPTS"))
        self.max_attempts = {d.uri: d.notify.max_attempts or default_attempts for d in durable}
        self.using = using
        self.decoder = decoder
        self.dispatcher = dispatcher
        self.stopping = stopping
        self.ignore_own_changes = ignore_own_changes
        #: The listener's health, whose ``last_event_lag`` durable changes set too.
        self.health = health
        #: The server of the event table, whose PIDs the events' are (``None``: not known).
        self._server: own_changes.Server | None = None
        self.owner = lease_owner()
        self.batch_size = int(get_setting("DURABLE_BATCH_SIZE"))
        self.lease = float(get_setting("DURABLE_LEASE"))
        self.poll_interval = float(get_setting("DURABLE_POLL_INTERVAL"))
        self.keep_done = bool(get_setting("DURABLE_KEEP_DONE"))
        # As for the listener's own queries: no answer this soon means a dead connection.
        self.timeout = float(get_setting("PROBE_TIMEOUT"))
        #: Set to look at the table now (a wake-up notification, a reconnect).
        self.wake = asyncio.Event()
        self.stats = dispatcher.stats
        self.working = False
        #: When the retries this worker scheduled fall due (``time.monotonic()``), soonest
        #: first: nothing wakes a listener for them, and the next poll may be far later.
        self._retries_due: list[float] = []
        #: When the last claim was made (``time.monotonic()``, before it).
        self._looked_at = 0.0
        # The batch in hand and its receivers' progress, for the health check.
        self._in_hand: _Outcome | None = None
        self._progress = 0
        self._progress_at = 0.0
        self._stall_reported = False
        #: The batch whose settlement the loss of its connection cut short: settled on
        #: the next connection (see _settle).
        self._unsettled: tuple[Sequence[Claimed], _Outcome, dict[int, str]] | None = None

    async def run(self, stop: asyncio.Event, executor: Executor) -> None:
        """Claim and dispatch until ``stop`` is set; reconnect when the connection fails.

        Every failure is retried after a backoff delay that grows until a claim
        succeeds (a connect alone proves nothing: the table may be gone). One
        that is not the database's (a bug) is logged with its traceback; the
        rows of its batch are claimable again once their lease expires.
        """
        backoff = Backoff.from_settings()
        while not stop.is_set():
            try:
                # A server that accepts and stays silent holds a connect for all of
                # connect_timeout: a stop does not wait for it.
                conn = await connection.until_stopped(stop, self._connect())
            except connection.Stopped:
                break
            except (psycopg.Error, OSError) as exc:
                await self._retry(stop, backoff.next(), f"cannot connect: {_one_line(exc)}")
                continue
            try:
                if self._unsettled is not None:
                    unsettled, self._unsettled = self._unsettled, None
                    await self._settle(conn, *unsettled, again=True)
                while not stop.is_set():
                    self.wake.clear()
                    while not stop.is_set():
                        claimed = await self.process_batch(conn, executor)
                        backoff.reset()
                        if not claimed:
                            break
                    await self._wait(stop, self._until_next_look())
            except (psycopg.Error, OSError) as exc:
                if isinstance(exc, psycopg.errors.UndefinedTable):
                    message = (
                        f"table {wire.EVENT_TABLE} does not exist in database {self.using!r}:"
                        " run manage.py migrate"
                    )
                else:
                    message = _one_line(exc)
                await self._retry(stop, backoff.next(), message)
            except Exception as exc:
                await self._retry(stop, backoff.next(), f"unexpected error: {_one_line(exc)}", exc)
            finally:
                with suppress(Exception):  # closing a dead connection may fail; it is gone anyway
                    await asyncio.wait_for(conn.close(), 2)
        if self._unsettled is not None:
            await self._settle_before_stopping(*self._unsettled)

    async def _settle_before_stopping(
        self, claimed: Sequence[Claimed], outcome: _Outcome, errors: dict[int, str]
    ) -> None:
        """Settle, on a connection of its own, the batch whose settlement a lost
        connection cut short, when the listener stops before it could reconnect.

        Left as it is, its rows would be dispatched again once their lease runs out,
        each as a row its listener died holding. The connect and the settlement have
        ``PROBE_TIMEOUT`` each, as a settlement on the way has; what cannot be settled
        is logged.
        """
        self._unsettled = None
        error: BaseException | None = None  # not the database's: logged with its traceback
        try:
            conn = await asyncio.wait_for(self._connect(), self.timeout)
        except (psycopg.Error, OSError, asyncio.TimeoutError) as exc:
            problem = _one_line(exc) if str(exc) else f"no answer within {self.timeout:g}s"
        else:
            try:
                await self._settle(conn, claimed, outcome, errors, again=True)
                return
            except (psycopg.Error, OSError) as exc:
                problem = _one_line(exc)
            except Exception as exc:
                problem, error = f"unexpected error: {_one_line(exc)}", exc
            finally:
                with suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
        logger.log(
            logging.ERROR if error is not None else logging.WARNING,
            "pgnotify: durable events of %r: the settlement of event(s) %s of %s, cut short"
            " by a lost connection, could not be made before the listener stopped (%s):"
            " their changes will be dispatched again once the %gs lease expires",
            self.using,
            *_ids_and_declarations(claimed),
            problem,
            self.lease,
            exc_info=error,
        )

    async def _connect(self) -> psycopg.AsyncConnection:
        params = {**connection.TCP_KEEPALIVES, **connection.connection_params(self.using)}
        params["application_name"] = f"{get_setting('APPLICATION_NAME')} durable"[:63]
        # As the listening connection's: PROBE_TIMEOUT, unless OPTIONS set one.
        params.setdefault("connect_timeout", connection.connect_timeout(self.timeout))
        conn = await psycopg.AsyncConnection.connect(**params, **connection.PSYCOPG_OPTIONS)
        try:
            # Claims and settlements count on read committed, whatever the role or database
            # default: a claim skips the rows others lock and checks the newest version of
            # those it takes. Under serializable, listeners racing for rows failed their
            # claims and settlements (the rows were then dispatched again).
            await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
            if self.ignore_own_changes:  # PIDs are a server's: our connections' count on it
                read = own_changes.read_server(conn)
                self._server = await connection.within(conn, read, self.timeout)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _retry(
        self,
        stop: asyncio.Event,
        seconds: float,
        problem: str,
        error: BaseException | None = None,
    ) -> None:
        """Log ``problem`` (with ``error``'s traceback, if given), then wait ``seconds``."""
        self.working = False
        logger.log(
            logging.ERROR if error is not None else logging.WARNING,
            "pgnotify: durable events of %r: %s%s",
            self.using,
            problem,
            " (stopping)" if stop.is_set() else f"; retrying in {seconds:.1f}s",
            exc_info=error,
        )
        await self._wait(stop, seconds, wake=False)

    async def _wait(self, stop: asyncio.Event, seconds: float, *, wake: bool = True) -> None:
        """Wait ``seconds``, or until ``stop`` (or, with ``wake``, ``self.wake``) is set."""
        waiters = {asyncio.ensure_future(stop.wait())}
        if wake:
            waiters.add(asyncio.ensure_future(self.wake.wait()))
        _, pending = await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
        for task in pending:
            task.cancel()

    def _until_next_look(self) -> float:
        """Seconds to wait for a wake-up: the poll interval, or less if a retry this
        worker scheduled falls due sooner (DURABLE_RETRY_DELAY_MIN is far below the
        poll interval by default)."""
        due = self._retries_due
        self._forget_looked_for()
        if not due:
            return self.poll_interval
        return min(self.poll_interval, max(0.0, due[0] - time.monotonic()))

    def _forget_looked_for(self) -> None:
        """Drop the retries that fell due before the last claim: it looked for them.
        Also while claims go on back to back, which may last as long as a backlog: one
        entry per failing batch would otherwise be kept all that time."""
        due = self._retries_due
        while due and due[0] <= self._looked_at:
            heapq.heappop(due)

    def healthy(self, now: float, patience: float) -> bool:
        """Whether claims succeed and the receivers of the batch in hand, if any,
        handled a change within the last ``patience`` seconds.

        For the listener's health check, in the event loop: ``now`` is
        ``time.monotonic()``. The first time a batch fails it, says so in the log.
        """
        if not self.working:
            return False
        outcome = self._in_hand
        if outcome is None or outcome.started is None:
            return True  # idle, or waiting for the dispatch thread: the live check covers it
        progress = len(outcome.dispatched) + self.dispatcher.durable_awaited
        if progress != self._progress:
            self._progress, self._progress_at = progress, now
        stalled = now - max(self._progress_at, outcome.started)
        if stalled <= patience:
            return True
        if not self._stall_reported:
            self._stall_reported = True
            logger.warning(
                "pgnotify: durable receivers of %r have handled no change for %.1fs "
                "(%d of a batch of %d handled): the listener is not healthy",
                self.using,
                stalled,
                len(outcome.dispatched),
                outcome.size,
            )
        return False

    async def process_batch(self, conn: psycopg.AsyncConnection, executor: Executor) -> int:
        """Claim, dispatch and settle one batch; returns how many were claimed.

        Raises:
            TimeoutError: The claim or the settlement got no answer within
                ``PROBE_TIMEOUT``; the connection is closed. Unsettled claims
                are claimable again when their lease expires.
        """
        claim_started = self._looked_at = time.monotonic()
        claimed = await connection.within(conn, self._claim(conn), self.timeout)
        self.working = True
        if not claimed:
            return 0
        outcome = _Outcome(exhausted={row.id for row in claimed if self._exhausted(row)})
        outcome.size = sum(row.unhandled for row in claimed if row.id not in outcome.exhausted)
        self.stats["durable_claimed"] += outcome.size
        self._progress, self._progress_at = self.dispatcher.durable_awaited, 0.0
        self._in_hand, self._stall_reported = outcome, False
        dispatching = asyncio.ensure_future(
            self._dispatch(claimed, outcome, claim_started, executor)
        )
        try:
            await self._keep_leased(conn, claimed, dispatching)
        finally:
            self._in_hand = None
            if not dispatching.done():  # this batch is being cancelled
                dispatching.cancel()
        dispatching.result()  # a bug of the worker's own: raised as before
        errors = {**outcome.undecodable, **self.dispatcher.take_errors()}
        await self._settle(conn, claimed, outcome, errors)
        return len(claimed)

    async def _dispatch(
        self,
        claimed: Sequence[Claimed],
        outcome: _Outcome,
        claim_started: float,
        executor: Executor,
    ) -> None:
        """The batch's sync receivers in the dispatch thread, then its async ones here."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, self._decode_and_send, claimed, outcome, claim_started)
        if outcome.dispatched and self.dispatcher.has_async_receivers(outcome.dispatched):
            await self.dispatcher.send_async(outcome.dispatched)
            # Their dispatch ends now, not when their sync receivers returned.
            self.dispatcher.measure_lag(outcome.dispatched[-1])
        if self.health is not None and outcome.dispatched:
            self.health.last_event_lag = self.dispatcher.last_event_lag

    @property
    def renew_every(self) -> float:
        """Seconds between two renewals of the lease of the rows in hand: a third of it."""
        return self.lease / 3

    async def _keep_leased(
        self,
        conn: psycopg.AsyncConnection,
        claimed: Sequence[Claimed],
        dispatching: asyncio.Future[None],
    ) -> None:
        """Renew the lease of the rows in hand every third of ``DURABLE_LEASE`` until
        ``dispatching`` ends.

        The lease says that this listener is alive, not how long receivers may take:
        the batch may wait for the dispatch thread behind slow live receivers, and a
        row holds up to 1,024 changes. Another listener claiming it meanwhile would
        dispatch it again while this one still does, each claim an attempt. A
        receiver that makes no progress is the health check's to report, not the
        lease's. Renewals run between the claim and the settlement, never beside
        them, so the connection has one query at a time.
        """
        held = [row.id for row in claimed]
        while True:
            await asyncio.wait({dispatching}, timeout=self.renew_every if held else None)
            if dispatching.done():
                return
            held = await self._renew(conn, held)

    async def _renew(self, conn: psycopg.AsyncConnection, held: list[int]) -> list[int]:
        """Extend the lease of the rows ``held``; returns those still leased to this
        listener (the others were discarded, or retried in the admin after their lease
        ran out: no longer renewed, and left to their settlement to report).

        A renewal that fails on a working connection (cancelled, a lock or statement
        timeout, a deadlock) is made again at the next turn: the lease is still running.
        One that loses the connection (no answer within PROBE_TIMEOUT closes it) ends
        the renewals: the receivers go on, and the settlement meets the connection's
        failure as it would have without them.
        """
        try:
            renewed = await connection.within(conn, self._renewal(conn, held), self.timeout)
        except Exception as exc:
            again = not conn.closed
            logger.warning(
                "pgnotify: durable events of %r: the lease of the batch in hand could not be"
                " renewed (%s): its receivers go on, and %s",
                self.using,
                _one_line(exc),
                f"it is tried again in {self.renew_every:g}s"
                if again
                else "its changes may be delivered again by another listener once the lease"
                " has run out",
                exc_info=not isinstance(exc, psycopg.Error | OSError | TimeoutError),
            )
            return held if again else []
        return [row_id for row_id in held if row_id in renewed]

    async def _renewal(self, conn: psycopg.AsyncConnection, held: list[int]) -> set[int]:
        """The renewal, in a transaction of its own: read committed, as claims and
        settlements are (an autocommit statement runs at the role's or database's default
        isolation; serializable, a row of the batch discarded meanwhile failed it)."""
        params = {"ids": held, "owner": self.owner, "lease": self.lease}
        async with conn.pipeline(), conn.transaction():
            cursor = await conn.execute(_RENEW, params)
        return {row_id for (row_id,) in await cursor.fetchall()}

    def _exhausted(self, row: Claimed) -> bool:
        """Whether ``row`` has used up its attempts on claims that were never settled."""
        return row.abandoned and row.attempts > self.max_attempts[row.declaration]

    async def _claim(self, conn: psycopg.AsyncConnection) -> list[Claimed]:
        # Pipelined: the transaction's four statements cost one round trip.
        async with conn.pipeline(), conn.transaction():
            await conn.execute(_CLAIM_SETTINGS)
            cursor = await conn.execute(
                _CLAIM,
                {
                    "uris": list(self.max_attempts),
                    "limit": self.batch_size,
                    "bytes": CLAIM_BYTES,
                    "owner": self.owner,
                    "lease": self.lease,
                },
            )
        claimed = sorted(map(Claimed._make, await cursor.fetchall()))
        if len(claimed) == 1 and claimed[0].payload is None and not self._exhausted(claimed[0]):
            # A row wider than CLAIM_BYTES, read once its claim has committed: should it
            # not arrive within PROBE_TIMEOUT, the claim has counted an attempt, and the
            # row ends as a dead letter (see _GIVE_UP) instead of holding up those behind.
            cursor = await conn.execute(_PAYLOAD, {"id": claimed[0].id})
            found = await cursor.fetchone()
            claimed = [claimed[0]._replace(payload=found[0])] if found else []  # or discarded
        return claimed

    def _decode_and_send(
        self, claimed: Sequence[Claimed], outcome: _Outcome, claim_started: float
    ) -> None:
        """In the dispatch thread: decode the batch and call the sync receivers.

        ``claim_started`` is the ``time.monotonic()`` reading taken before the
        claim: with a row's age by the server's clock, when it was written, at
        the latest, by this process's clock.
        """
        outcome.started = time.monotonic()
        events: list[RowChange] = []
        for row in claimed:
            if row.id in outcome.exhausted:
                continue
            if (
                self.ignore_own_changes
                and row.pid is not None
                and own_changes.is_own_write(row.pid, claim_started - row.age, self._server)
            ):
                self.stats["own_changes"] += row.unhandled
                outcome.skipped.add(row.id)
                continue
            events.extend(self._decode(row, outcome))
        errors = self.stats["receiver_errors"]
        self.dispatcher.send_sync(events, self.stopping, outcome.dispatched)
        if self.stats["receiver_errors"] != errors:
            close_old_connections()

    def _decode(self, row: Claimed, outcome: _Outcome) -> list[RowChange]:
        """The row's changes not handled yet, each with its ``event_id``: id + position."""
        try:
            changes = self.decoder.decode(build_message(row), "", row.pid or 0, event_id=row.id)
            if len(changes) != row.size:
                raise DecodeError(f"{row.size} changes decoded as {len(changes)}")
        except Exception as exc:
            # Not something a retry can fix: a dead letter at once, kept for a look.
            # Counted as one payload, as a live notification is: its changes cannot be
            # read (they are counted in dead_letters).
            self.stats["undecodable"] += 1
            outcome.undecodable[row.id] = f"undecodable: {error_text(exc)}"
            logger.warning(
                "pgnotify: durable event %s of %s is undecodable: %s",
                row.id,
                row.declaration,
                error_text(exc),
            )
            return []
        # Built for this batch and not shared yet: set in place, as
        # dataclasses.replace() would cost more than the decoding.
        for position in range(1, len(changes)):
            object.__setattr__(changes[position], "event_id", row.id + position)
        if row.handled:
            done = set(row.handled)
            changes = [c for position, c in enumerate(changes) if position not in done]
        return changes

    async def _settle(
        self,
        conn: psycopg.AsyncConnection,
        claimed: Sequence[Claimed],
        outcome: _Outcome,
        errors: dict[int, str],
        *,
        again: bool = False,
    ) -> None:
        """Delete (or mark done) the rows all handled; retry, dead-letter or release the rest.

        A settlement whose connection is lost (or gives no answer) is made ``again`` on
        the next one, once: the receivers ran and this listener lives on, and the rows
        still leased to it then are settled as they would have been, rather than left
        to be dispatched again once their lease has run out, each as a row its listener
        died holding (claimed alone, an attempt more). Should the first one have been
        applied after all, the rows are no longer leased to this listener: it changes
        nothing, and reports them as lost leases.
        """
        ids = [row.id for row in claimed]
        handled_now: dict[int, list[int]] = {row.id: [] for row in claimed}
        failed_now: dict[int, list[int]] = {row.id: [] for row in claimed}
        for event in outcome.dispatched:
            event_id = event.event_id
            assert event_id is not None
            row_id = ids[bisect.bisect_right(ids, event_id) - 1]
            if event_id in errors:
                failed_now[row_id].append(event_id - row_id)
            else:
                handled_now[row_id].append(event_id - row_id)
        done: list[int] = []
        failed: list[tuple[Claimed, str, bool]] = []
        released: list[Claimed] = []
        given_up: list[Claimed] = []
        for row in claimed:
            if row.id in outcome.exhausted:
                given_up.append(row)
            elif row.id in outcome.skipped:
                done.append(row.id)
            elif row.id in outcome.undecodable:
                failed.append((row, outcome.undecodable[row.id], True))
            elif failed_now[row.id]:
                first = row.id + failed_now[row.id][0]
                error = errors[first] if row.size == 1 else f"event {first}: {errors[first]}"
                dead = row.attempts >= self.max_attempts[row.declaration]
                failed.append((row, error, dead))
            elif row.unhandled_after(handled_now[row.id]) == 0:
                done.append(row.id)
            else:
                released.append(row)
        try:
            settled = await connection.within(
                conn,
                self._write(conn, done, failed, released, given_up, handled_now),
                self.timeout,
            )
        except (psycopg.OperationalError, OSError):
            if not again:
                self._unsettled = (claimed, outcome, errors)
            raise
        lost = [row for row in claimed if row.id not in settled]
        if lost:
            # Counted in the changes claimed, as durable_claimed counts them.
            self.stats["durable_lost_leases"] += sum(row.unhandled for row in lost)
            logger.warning(
                "pgnotify: durable event(s) %s of %s were no longer leased to this listener"
                " when it settled them (its %gs lease expired and another listener claimed"
                " them, or they were retried or discarded): left as they are; the changes"
                " handled here may be handled again",
                *_ids_and_declarations(lost),
                self.lease,
            )
        settled_at = time.monotonic()  # after the server's now(), which available_at counts from
        retries_due: set[float] = set()  # a batch's rows that failed alike fall due together
        for row, error, dead in failed:
            if row.id not in settled:
                continue  # its retries and dead letters are counted by whoever settles it
            # The changes left unhandled share the row's fate: the failed ones, and
            # those a stop kept from being dispatched (all of an undecodable row's).
            changes = row.unhandled_after(handled_now[row.id])
            if dead:
                self._dead_letter(row, row.attempts, changes, error)
            else:
                self.stats["retries"] += changes
                retries_due.add(settled_at + retry_delay(row.attempts))
        self._forget_looked_for()
        for due in retries_due:
            heapq.heappush(self._retries_due, due)
        for row in given_up:
            if row.id in settled:
                self._dead_letter(row, row.attempts - 1, row.unhandled, NEVER_SETTLED)

    def _dead_letter(self, row: Claimed, attempts: int, changes: int, error: str) -> None:
        """Count and log ``row``, just settled as a dead letter with ``changes`` unhandled."""
        self.stats["dead_letters"] += changes
        logger.error(
            "pgnotify: durable event %s of %s is a dead letter after %d attempt(s)%s: %s",
            row.id,
            row.declaration,
            attempts,
            f" ({changes} of its {row.size} changes)" if row.size > 1 else "",
            error,
        )

    async def _write(
        self,
        conn: psycopg.AsyncConnection,
        done: list[int],
        failed: list[tuple[Claimed, str, bool]],
        released: list[Claimed],
        given_up: list[Claimed],
        handled_now: dict[int, list[int]],
    ) -> set[int]:
        """The settlement, one transaction in one round trip; returns the ids settled."""
        owner = self.owner
        async with conn.pipeline(), conn.transaction():
            await conn.execute(_SETTLE_SETTINGS)
            cursors = []
            if done:
                cursors.append(
                    await conn.execute(
                        _MARK_DONE if self.keep_done else _DELETE, {"ids": done, "owner": owner}
                    )
                )
            if failed:
                cursors.append(
                    await conn.execute(
                        _FAIL,
                        {
                            "ids": [row.id for row, _, _ in failed],
                            "errors": [_storable(error)[:2000] for _, error, _ in failed],
                            "dead": [dead for _, _, dead in failed],
                            "delays": [
                                0.0 if dead else retry_delay(row.attempts)
                                for row, _, dead in failed
                            ],
                            "done": [_int_array(handled_now[row.id]) for row, _, _ in failed],
                            "owner": owner,
                        },
                    )
                )
            if released:
                cursors.append(
                    await conn.execute(
                        _RELEASE,
                        {
                            "ids": [row.id for row in released],
                            "done": [_int_array(handled_now[row.id]) for row in released],
                            "abandoned": [row.abandoned for row in released],
                            "owner": owner,
                        },
                    )
                )
            if given_up:
                cursors.append(
                    await conn.execute(
                        _GIVE_UP,
                        {
                            "ids": [row.id for row in given_up],
                            "error": NEVER_SETTLED,
                            "owner": owner,
                        },
                    )
                )
        return {row_id for cursor in cursors for (row_id,) in await cursor.fetchall()}


def _storable(text: str) -> str:
    """``text`` as a ``text`` column takes it: receivers raise what they like, but
    PostgreSQL refuses a NUL character and UTF-8 has no encoding for a lone surrogate
    (a file name decoded with ``surrogateescape``, say). Either would fail the whole
    settlement, the changes handled beside it included. Both are written escaped."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _int_array(values: Sequence[int]) -> str:
    """A PostgreSQL int[] literal."""
    return "{" + ",".join(map(str, values)) + "}"


@dataclass
class _Outcome:
    #: The events whose sync receivers have run, appended as they finish.
    dispatched: list[RowChange] = field(default_factory=list)
    #: Ids of rows that used up their attempts on claims never settled: not dispatched.
    exhausted: set[int] = field(default_factory=set)
    #: Changes to dispatch (those of the rows not exhausted).
    size: int = 0
    #: When the dispatch thread took the batch up (``time.monotonic()``), or None.
    started: float | None = None
    #: Ids of rows settled without dispatching (their writer was this process).
    skipped: set[int] = field(default_factory=set)
    #: Row id: error, for rows that could not be decoded.
    undecodable: dict[int, str] = field(default_factory=dict)


# Functions for the admin, pgnotify_status and pgnotify_prune


@dataclass(frozen=True)
class Backlog:
    """The state of the event table, for ``pgnotify_status``.

    Attributes:
        pending: Changes not yet handled (claimed or not).
        oldest_pending_age: Seconds since the oldest pending change was written.
        dead: Changes in dead letters, not handled.
        done: Handled changes kept for retention.
    """

    pending: int
    oldest_pending_age: float | None
    dead: int
    done: int


def backlog(using: str = DEFAULT_DB_ALIAS) -> Backlog:
    """Count the event table's changes by status, in one query (changes, not rows)."""
    query = sql.SQL(
        "SELECT coalesce(sum(unhandled) FILTER (WHERE status = 'pending'), 0), "
        "extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), "
        "coalesce(sum(unhandled) FILTER (WHERE status = 'dead'), 0), "
        "coalesce(sum(size) FILTER (WHERE status = 'done'), 0) "
        "FROM (SELECT status, created_at, size, size - coalesce(cardinality(handled), 0)"
        " AS unhandled FROM {}) AS events"
    ).format(_TABLE)
    with connections[using].cursor() as cursor:
        cursor.execute(query.as_string(None))
        pending, age, dead, done = cursor.fetchone()
    return Backlog(int(pending), float(age) if age is not None else None, int(dead), int(done))


def retry_events(queryset: Any) -> int:
    """Make event rows (typically dead letters) pending again, with a fresh attempt count.

    Changes of a row that were handled stay handled: only the others are delivered
    again. A pending row whose lease runs (a listener is dispatching it) is left
    alone: taking its lease away would hand it to another listener at once, to be
    dispatched twice at the same time. Returns how many rows were made pending.
    """
    return retry_events_counted(queryset)[0]


def retry_events_counted(queryset: Any) -> tuple[int, int]:
    """As :func:`retry_events`; returns how many rows were made pending and how many
    were left to the listener holding them.

    Both are decided at one moment, the rows locked meanwhile: a lease that runs out,
    or a claim made, between a count and the update would make them disagree.
    """
    from django.db import transaction
    from django.db.models.functions import Now

    table = queryset.model._default_manager.db_manager(queryset.db)
    with transaction.atomic(using=queryset.db):
        selected = queryset.exclude(status=DONE).values("pk")  # a subquery: any queryset
        locked = table.filter(pk__in=selected).select_for_update().order_by("pk")
        rows = table.filter(pk__in=list(locked.values_list("pk", flat=True)))
        held = rows.filter(_held_by_a_listener()).count()
        count = rows.exclude(_held_by_a_listener()).update(
            status=PENDING,
            attempts=0,
            available_at=Now(),
            lease_owner="",
            lease_until=None,
        )
    return count, held


def _held_by_a_listener() -> Any:
    """The rows a listener holds at the start of the transaction: pending, with a
    lease that has not run out."""
    from django.contrib.postgres.functions import TransactionNow
    from django.db.models import Q

    return Q(status=PENDING, lease_until__gte=TransactionNow())


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
    # The condition twice: a row the subquery picked may be changed before the DELETE
    # gets its lock (a dead letter retried, now pending), and PostgreSQL then checks
    # the DELETE's own condition again on the new row, not the subquery's. Each batch
    # goes on after the last id the one before picked: read from the start again, it
    # would step over the rows deleted so far, not yet vacuumed, every time.
    condition = sql.SQL("status = ANY(%(statuses)s) AND coalesce(done_at, created_at) < %(before)s")
    query = sql.SQL(
        "WITH picked AS (SELECT id FROM {table} WHERE {condition} AND id > %(after)s"
        " ORDER BY id LIMIT %(limit)s),"
        " deleted AS (DELETE FROM {table} WHERE {condition}"
        " AND id IN (SELECT id FROM picked) RETURNING id)"
        " SELECT (SELECT count(*) FROM deleted), count(*), max(id) FROM picked"
    ).format(table=_TABLE, condition=condition)
    total = 0
    with connections[using].cursor() as cursor:
        # One cut-off for every batch: rows that age past it meanwhile are left alone.
        cursor.execute("SELECT now() - %s", [older_than])
        (before,) = cursor.fetchone()
        params = {"statuses": statuses, "before": before, "after": 0, "limit": batch_size}
        while True:
            cursor.execute(query.as_string(None), params)
            deleted, picked, last = cursor.fetchone()
            total += deleted
            if picked < batch_size:
                return total
            params["after"] = last


def _ids_and_declarations(rows: Sequence[Claimed]) -> tuple[str, str]:
    """The ids (the first ten) and the declarations of ``rows``, for a log line."""
    ids = ", ".join(str(row.id) for row in rows[:10]) + (", ..." if len(rows) > 10 else "")
    return ids, ", ".join(sorted({row.declaration for row in rows}))


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
