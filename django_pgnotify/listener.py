"""The listener: one dedicated connection, LISTEN, and a small asyncio loop.

While the worker thread is idle, the event loop reads notifications as soon
as the socket has data, in a reader callback that takes them straight from
libpq into a bounded local queue (and stops reading, so leaving them on the
server, when it is full). A dispatcher task hands them in batches to one
worker thread, which decodes them and calls the sync receivers; then it
awaits the async receivers, all in commit order. While changes keep coming
the worker reads them off the connection itself, and the event loop reads
again once the worker is done or a receiver is slow: two threads reading in
turn would fight over the GIL. A timer sends the self-probe, a NOTIFY to
itself that proves delivery works and doubles as keepalive; at each connect
the first probe comes from a second, short-lived connection, which proves
that other sessions' notifications arrive too. A probe that PostgreSQL refuses
because its notification queue is full is no lost connection: listening goes
on (reading is what drains it). A lost connection is reopened with capped
exponential backoff.

``stop()`` may be called from a signal handler or another thread; the event
in hand is finished first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import select
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

import psycopg
from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.dispatch import Signal
from psycopg import pq, sql
from psycopg.pq import PGnotify

from . import connection, own_changes, wire
from .backoff import Backoff
from .conf import get_setting
from .declarations import Declaration
from .decoding import DecodeError, Decoder, ModelNotServed
from .dispatch import Dispatcher, close_thread_connections
from .durable import DurableWorker
from .events import RowChange
from .health import COUNTERS, DURABLE_COUNTERS, HealthFile, ListenerHealth, format_record
from .signals import listener_reconnected, listener_started, listener_stopped
from .status import queue_usage_percents

logger = logging.getLogger("django_pgnotify.listener")

T = TypeVar("T")

#: Notifications decoded and dispatched per thread hop, at most.
BATCH_SIZE = 1000
#: Payload characters per batch, at most (or one notification, if larger): a
#: batch's events are all held at once, and a full payload may carry a hundred
#: rows, so this, not BATCH_SIZE, bounds the memory of bulk statements' batches.
BATCH_PAYLOAD = 128_000
#: Seconds a receiver may run before the event loop reads ahead for it (see
#: ``_dispatch_loop``).
READ_AHEAD_AFTER = 0.05
#: While it holds no events for async receivers, a thread hop ends once it has
#: taken this many notifications or run this many seconds (checked after each
#: batch, so it may take up to a batch more), and waits up to ``LINGER`` for the
#: next one (see ``_decode_and_send``).
HOP_SIZE = 10_000
HOP_SECONDS = 0.1
LINGER = 0.01

# Errors that mean "the connection is gone or unusable": reconnect.
_CONNECTION_ERRORS = (psycopg.Error, OSError, asyncio.TimeoutError)

# The probe: a NOTIFY to the listener's private channel, and a sample of the server's
# notification queue in the same round trip.
_PROBE = "SELECT pg_notify(%s, %s), pg_notification_queue_usage()"
# Samples sent from another session while the listener is busy whose marker (a probe's
# NOTIFY with a token of its own) has not been read yet, at most: the oldest is dropped.
_MARKERS = 100


class ListenerError(Exception):
    """A problem reconnecting cannot fix: the listener refuses to start."""


class ConnectionLost(Exception):
    """The listening connection stopped working (probe lost, query timed out)."""


class Listener:
    """LISTENs on the channels of ``declarations`` and dispatches their changes.

    Args:
        declarations: What to listen for (see ``get_declarations``).
        using: The Django database alias served; the connection uses its
            settings, or those of ``PGNOTIFY["LISTEN_DATABASES"][using]``.
        dispatcher: Where decoded events go; a new ``Dispatcher`` by default.
        poll_interval: Seconds between looks at the probe and health timers
            while idle; ``PGNOTIFY["POLL_INTERVAL"]`` by default.
        ignore_own_changes: Skip changes made by this process's own Django
            connections; ``PGNOTIFY["IGNORE_OWN_CHANGES"]`` by default.
        health_file: A file to touch while healthy (for liveness probes).

    Attributes:
        ready: Set once the listener is listening and its start-up probe came
            back, or could not be sent because PostgreSQL's notification queue
            was full (it is sent again until it comes back, see ``_open``).
        stats: Counters; those reported are named in ``counters``.
        counters: ``django_pgnotify.health.COUNTERS``, then ``DURABLE_COUNTERS``
            if it serves durable declarations and its dispatcher's own (the
            Channels bridge's ``FORWARD_COUNTERS``).
        health: Gauges (a ``ListenerHealth``).
    """

    def __init__(
        self,
        declarations: Iterable[Declaration],
        using: str = DEFAULT_DB_ALIAS,
        dispatcher: Dispatcher | None = None,
        poll_interval: float | None = None,
        *,
        ignore_own_changes: bool | None = None,
        health_file: str | None = None,
    ) -> None:
        declarations = list(declarations)
        durable = [d for d in declarations if d.notify.durable]
        self.using = using
        # Durable declarations do not send their changes on their channel: only
        # a wake-up on one shared channel (see durable.py).
        self.channels = sorted(
            {d.channel for d in declarations if not d.notify.durable}
            | ({wire.DURABLE_CHANNEL} if durable else set())
        )
        self.dispatcher = dispatcher or Dispatcher()
        self.poll_interval = poll_interval
        self.stats: Counter[str] = self.dispatcher.stats
        self.decoder = Decoder({d.model for d in declarations}, using, self.stats)
        self._models = sorted({d.model for d in declarations}, key=lambda m: m._meta.label)
        self.ready = threading.Event()
        self.health = ListenerHealth(local_queue_size=int(get_setting("QUEUE_SIZE")))
        if ignore_own_changes is None:
            ignore_own_changes = bool(get_setting("IGNORE_OWN_CHANGES"))
        self.ignore_own_changes = ignore_own_changes
        #: The server listened to, whose PIDs the notifications' are (``None``: not known).
        self._server: own_changes.Server | None = None
        if ignore_own_changes:  # here, to find the creating thread's open connections
            own_changes.track_own_connections()
        self.health_file = HealthFile(health_file) if health_file else None
        # Private to this listener: other listeners' probes do not disturb it.
        self.probe_channel = f"pgnotify_probe_{uuid.uuid4().hex[:16]}"
        self._ignored_models: set[str] = set()
        self._stopping = threading.Event()
        #: Claims and dispatches the durable declarations' events, if any.
        self.durable = (
            DurableWorker(
                durable,
                using,
                self.decoder,
                self.dispatcher,
                self._stopping,
                ignore_own_changes=ignore_own_changes,
                health=self.health,
            )
            if durable
            else None
        )
        self.counters: tuple[str, ...] = (
            COUNTERS + (DURABLE_COUNTERS if durable else ()) + self.dispatcher.counters
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # Read but not yet dispatched (the local queue), as libpq gives them.
        self._pending: deque[PGnotify] = deque()
        self._queue_size = self.health.local_queue_size
        # What the worker reads at a time: a batch, and never more than the queue holds.
        self._read_on_size = min(BATCH_SIZE, self._queue_size)
        self._workers: tuple[asyncio.Future[None], ...] = ()
        # Channel names as they arrive (bytes, in the connection's UTF-8) and as str.
        self._channel_names = {c.encode(): c for c in self.channels}
        self._durable_channel = wire.DURABLE_CHANNEL.encode()
        self._probe_name = self.probe_channel.encode()
        self._conn: psycopg.AsyncConnection | None = None
        self._lost: asyncio.Future[None] | None = None
        self._reading = False
        self._querying = False
        # The start-up probe from another session was refused (the notification queue
        # was full): it is sent again in its place until it comes back (see _open).
        self._delivery_unproven = False
        # That probe could not be sent again, its second connection not opened: said
        # once until it is sent (see _send_probe).
        self._proof_unsent = False
        # pg_backend_pid() on the listening connection: a pooler's pid is not its server
        # session's (see _not_delivered).
        self._server_pid: int | None = None
        # Since when changes may be missing should the connection be lost (see
        # _missing_since): the last moment everything committed before it is known to
        # have been read (monotonic), and whether reading paused on a full local queue
        # since. Only proofs move it on, never a read: one proves nothing about what
        # still waits on the server, or on the way.
        self._caught_up_at = 0.0
        self._fell_behind = False
        # The task sampling the notification queue from another session while busy, if
        # any; its markers not read yet, oldest first: (token, when it was sent).
        self._sampling: asyncio.Future[None] | None = None
        self._markers: deque[tuple[bytes, float]] = deque(maxlen=_MARKERS)
        self._sample_failed = False
        # Held, briefly, by whichever thread reads the connection or the local
        # queue; never across an await (see _dispatch_loop).
        self._read_lock = threading.Lock()
        self._worker_reads = False  # the worker reads on; the event loop does not
        self._in_hop = False  # a batch is in the worker thread

    # Lifecycle

    def stop(self) -> None:
        """Ask the listener to return after the event in hand (thread- and signal-safe)."""
        self._stopping.set()
        loop = self._loop
        if loop is not None:
            with suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        if self._wake is not None:
            self._wake.set()
        self._arrived.set()

    def run(self) -> None:
        """Connect, LISTEN and dispatch until ``stop()`` is called (blocking).

        Raises:
            ListenerError: The listener cannot work with this database (a
                standby, a probe that never comes back on the first connection).
        """
        asyncio.run(self.serve())

    async def serve(self) -> None:
        """The listener as a coroutine, for running inside an existing event loop.

        Reconnects whenever the connection is lost; returns after ``stop()``.

        Raises:
            ListenerError: As for :meth:`run`.
        """
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._arrived = asyncio.Event()  # the local queue is not empty (or stopping)
        self._started = asyncio.Event()  # no dispatch before listener_started was sent
        self._probe_back = asyncio.Event()
        if self._stopping.is_set():
            self._wake.set()
        self._read_timeout = float(self.poll_interval or get_setting("POLL_INTERVAL"))
        self._probe_interval = float(get_setting("PROBE_INTERVAL"))
        self._probe_timeout = float(get_setting("PROBE_TIMEOUT"))
        self._stats_interval = float(get_setting("STATS_INTERVAL"))
        self._next_stats = time.monotonic() + self._stats_interval
        executor = ThreadPoolExecutor(1, thread_name_prefix="pgnotify-dispatch")
        # The sync receivers of the listener signals run in a thread of the listener's
        # own, not in asgiref's sync_to_async thread: in an ASGI server that thread is
        # shared with other code (Channels consumers, the async ORM), whose connections
        # the listener must not close when it closes its receivers' (see _connect_loop).
        self._signals_thread = ThreadPoolExecutor(1, thread_name_prefix="pgnotify-signals")
        dispatching = asyncio.ensure_future(self._dispatch_loop(executor))
        durable = asyncio.ensure_future(self._durable_loop(executor))
        # Either ending before a stop is a bug: the listener ends with its error, at
        # once (not after a reconnect delay it may be waiting out).
        self._workers = (dispatching, durable) if self.durable is not None else (dispatching,)
        for worker in self._workers:
            worker.add_done_callback(lambda _: self._wake_all())
        try:
            await self._connect_loop()
        finally:
            self._stopping.set()
            self._wake_all()
            self._started.set()
            await asyncio.gather(dispatching, durable, return_exceptions=True)
            _end_thread(executor)
            self.health.connected = False
            if self._pending or self._undispatched:
                logger.info(
                    "pgnotify: %d notification(s) read and %d change(s) decoded but not "
                    "dispatched at stop",
                    len(self._pending),
                    self._undispatched,
                )
            if self.health_file:
                self.health_file.remove()
            try:
                await self._send(listener_stopped, stats=Counter(self.stats))
            finally:
                _end_thread(self._signals_thread)
            logger.info("pgnotify: listener stopped (%s)", _summary(self.stats, self.counters))
        if dispatching.cancelled():
            # Nothing here cancels it: an async receiver raised CancelledError of its
            # own, which Python 3.10 cannot tell from a cancellation (see dispatch.py).
            raise RuntimeError("pgnotify: dispatching ended: a receiver raised CancelledError")
        for task in (dispatching, durable):
            failure = None if task.cancelled() else task.exception()
            if failure is not None:  # a bug, not a receiver (those are caught): make it loud
                raise failure

    # Connecting

    def _worker_ended(self) -> bool:
        """Whether dispatching or durable processing ended (before a stop: a bug)."""
        return any(task.done() for task in self._workers)

    async def _connect_loop(self) -> None:
        backoff = Backoff.from_settings()
        where = connection.describe(
            connection.connection_params(connection.listen_alias(self.using))
        )
        lost_at: float | None = None  # when the loss was noticed
        missing_since, fell_behind = 0.0, False  # see _missing_since
        while not self._stopping.is_set() and not self._worker_ended():
            try:
                conn = await self._until_stopped(self._open())
            except connection.Stopped:
                return
            except ListenerError as exc:
                if not self.ready.is_set():
                    raise
                delay = backoff.next()
                logger.error("pgnotify: %s; retrying in %.1fs", exc, delay)
                await self._sleep(delay)
                continue
            except (*_CONNECTION_ERRORS, ConnectionLost) as exc:
                delay = backoff.next()
                logger.warning(
                    "pgnotify: cannot connect to %s (attempt %d): %s; retrying in %.1fs",
                    where,
                    backoff.attempts,
                    _one_line(exc),
                    delay,
                )
                await self._sleep(delay)
                continue
            # From here on the connection is this loop's to close, whatever ends it (a
            # cancellation while listener_started's receivers run, say).
            try:
                backoff.reset()
                if self.durable is not None:  # wake-ups sent while away were missed: look now
                    self.durable.wake.set()
                pid = conn.info.backend_pid
                self.health.connected, self.health.backend_pid = True, pid
                self.health.connected_since = time.time()
                self._touch()
                if not self.ready.is_set():
                    logger.info(
                        "pgnotify: listening on %s (backend pid %s)", ", ".join(self.channels), pid
                    )
                    # After listener_started: its receivers may connect those of row_changed.
                    await self._send(listener_started, backend_pid=pid)
                    self._warn_unheard()
                    self.ready.set()
                    self._started.set()
                else:
                    now = time.monotonic()
                    self.stats["reconnects"] += 1
                    logger.warning(
                        "pgnotify: reconnected to %s after %.1fs (backend pid %s); changes "
                        "committed since it was last seen caught up, %.1fs ago, may not have "
                        "been delivered%s",
                        where,
                        now - (lost_at or now),
                        pid,
                        now - missing_since,
                        " (it had fallen behind since: those waiting on the server for the lost "
                        "connection were lost with it)"
                        if fell_behind
                        else "",
                    )
                    # The database may have restarted: receivers get fresh ORM connections,
                    # listener_reconnected's sync receivers (a cache resync) first of all.
                    self.dispatcher.connections_lost()
                    await asyncio.get_running_loop().run_in_executor(
                        self._signals_thread, close_thread_connections
                    )
                    # As of now, for receivers that resync from now back.
                    downtime = time.monotonic() - missing_since
                    await self._send(listener_reconnected, backend_pid=pid, downtime=downtime)
                await self._until_stopped(self._listen(conn))
            except connection.Stopped:
                return
            except (*_CONNECTION_ERRORS, ConnectionLost) as exc:
                lost_at = time.monotonic()
                missing_since, fell_behind = self._missing_since()
                self.dispatcher.connections_lost()
                logger.warning(
                    "pgnotify: lost the listening connection to %s: %s; reconnecting",
                    where,
                    _one_line(exc),
                )
            finally:
                self.health.connected, self.health.backend_pid = False, None
                self._detach()
                sampling, self._sampling = self._sampling, None
                if sampling is not None:
                    sampling.cancel()
                    await asyncio.gather(sampling, return_exceptions=True)
                await _close(conn)

    def _missing_since(self) -> tuple[float, bool]:
        """Since when changes may be missing, the connection lost now; whether it had
        fallen behind (its local queue full) since.

        Notifications arrive in commit order, so everything committed before a query
        was sent, or before a marker that the listener read was sent, has been read
        (see ``_query`` and ``_sample_from_another_session``): changes committed since
        the last such proof may be missing. A read proves nothing of the kind: a
        backlog may wait on the server, or in a connection that died silently, while
        the listener reads what came before it. Changes it read are dispatched all
        the same.
        """
        return self._caught_up_at, self._fell_behind

    async def _open(self) -> psycopg.AsyncConnection:
        """Connect, refuse a standby, LISTEN, and prove delivery with a probe sent
        from another session (see ``_send_probe_from_another_session``)."""
        conn = await asyncio.wait_for(
            connection.connect_async(
                self.using, get_setting("APPLICATION_NAME"), self._probe_timeout
            ),
            self._probe_timeout * 2,
        )
        try:
            self._attach(conn)
            cursor = await self._query(conn, "SELECT pg_is_in_recovery(), pg_backend_pid()")
            row = await cursor.fetchone()
            self._server_pid = row[1] if row else None  # see _not_delivered
            if row and row[0]:
                raise ListenerError(
                    f"database {self.using!r} ({connection.describe(conn.info.get_parameters())})"
                    " is a read-only standby (pg_is_in_recovery() is true): changes are not made"
                    " and NOTIFY cannot be sent there. Point the listener at the primary."
                )
            if self.ignore_own_changes:  # PIDs are a server's: our connections' count on it only
                try:
                    cursor = await self._query(conn, own_changes.SERVER_QUERY)
                    self._server = own_changes.server_of(await cursor.fetchone())
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:  # refused: deliver all rather than nothing
                    own_changes.unknown_server(exc)
                    self._server = None
            for channel in [*self.channels, self.probe_channel]:
                await self._query(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            try:
                sent = await self._send_probe_from_another_session()
            except _CONNECTION_ERRORS as exc:  # the connect is retried: no listening unproved
                raise ConnectionLost(
                    "cannot send the start-up self-probe from a second connection, which "
                    "proves that other sessions' notifications reach the listener: "
                    f"{_one_line(exc)}"
                ) from exc
            if not sent:
                # Refused: the notification queue is full. This connection answered the
                # LISTENs, so it works; refusing to run or reconnecting would not empty
                # the queue, and reading is what drains this listener's part of it. The
                # proof waits: the probe goes from another session again, in place of
                # the next ones, until it comes back (see _send_probe and _tick).
                self._delivery_unproven = True
                logger.warning(
                    "pgnotify: the start-up self-probe could not be sent: PostgreSQL's "
                    "notification queue is full; listening all the same, and sending it "
                    "again every PROBE_INTERVAL until it comes back"
                )
                return conn
            assert self._lost is not None
            probe: asyncio.Future[Any] = asyncio.ensure_future(self._probe_back.wait())
            try:
                await asyncio.wait(
                    {probe, self._lost},
                    timeout=self._probe_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                probe.cancel()
            if self._lost.done():
                self._lost.result()  # raises why
            if self._probe_sent is not None:
                raise ListenerError(await self._not_delivered(conn))
            return conn
        except BaseException:
            self._detach()
            await _close(conn)
            raise

    async def _leave_pooled_session(self, conn: psycopg.AsyncConnection) -> None:
        """Undo, as far as a pooler lets us, what LISTEN left on the server session it lent.

        A transaction pooler keeps that session for other clients: it would go on
        listening (to be handed notifications of ours), named as the listener
        (``pgnotify_status`` would count it as one). One query, so one session: the
        one that ran the last of ours, usually, which the pooler lends first.
        """
        with suppress(*_CONNECTION_ERRORS, ConnectionLost):
            await self._query(conn, "UNLISTEN *; RESET application_name")

    def _probe_lost_message(self) -> str:
        return (
            f"the self-probe (a NOTIFY on {self.probe_channel}) did not come back within "
            f"{self._probe_timeout:g}s, so notifications are no longer delivered to this "
            "connection"
        )

    async def _not_delivered(self, conn: psycopg.AsyncConnection) -> str:
        """The start-up probe from another session did not come back: leave the server
        session a pooler lent, if one did, and say why, naming the likely cause."""
        pid, server_pid = conn.info.backend_pid, self._server_pid
        if server_pid is not None and server_pid != pid:
            await self._leave_pooled_session(conn)
        return self._not_delivered_message(pid, server_pid, resent=self._delivery_unproven)

    def _not_delivered_message(self, pid: int, server_pid: int | None, resent: bool) -> str:
        """Why the start-up probe was lost, and the likely cause.

        ``resent``: it was sent again, the listener having connected while the
        notification queue was full (see ``_open``). Unless a pooler is seen, one is
        not the likely cause then: the listening session reads the queue in order,
        other channels' notifications included, so the probe comes after all that
        filled it; and no probe went on the listening connection meanwhile to prove
        it alive.
        """
        pooled = server_pid is not None and server_pid != pid
        text = (
            f"the start-up self-probe (a NOTIFY on {self.probe_channel} sent from another session)"
        )
        if resent:
            text += ", sent again once PostgreSQL's notification queue had room for it,"
        text += f" did not come back within {self._probe_timeout:g}s although LISTEN succeeded"
        if resent and not pooled:
            return (
                f"{text}. No connection pooler was seen (the connection's backend pid {pid} is "
                "its server session's). The queue was full when the listener connected, and "
                "its server session reads the queue in order: it may still be reading past the "
                "notifications that filled it; or the connection died silently (no probe goes "
                "on it while that proof is owed)"
            )
        text += (
            ", so other sessions' notifications, and the changes they carry, are not "
            "delivered to this connection. "
        )
        if pooled:
            text += (
                "A connection pooler sits between the listener and PostgreSQL (the "
                f"connection's backend pid {pid} is not its server session's, {server_pid}): "
                "a transaction-pooling proxy (PgBouncer with pool_mode = transaction) does "
                "not keep the session that ran LISTEN"
            )
        else:
            text += (
                "Usually a transaction-pooling proxy (PgBouncer with pool_mode = transaction) "
                "sits between the listener and PostgreSQL"
            )
        return (
            f"{text}: give the listener a direct connection, or a session-pooling one "
            '(PGNOTIFY["LISTEN_DATABASES"] or --database)'
        )

    # Reading: straight from libpq, in a callback of the event loop or in the
    # worker thread (see _dispatch_loop). Per notification, psycopg's
    # notifies() builds two Notify objects and resumes a generator: at a
    # hundred thousand a second that was most of the cost.

    def _attach(self, conn: psycopg.AsyncConnection) -> None:
        """Make ``conn`` the connection read from (reading starts after its first query)."""
        assert self._loop is not None
        with self._read_lock:
            self._conn, self._fd = conn, conn.fileno()
        self._lost = self._loop.create_future()
        self._reading = self._querying = self._delivery_unproven = self._proof_unsent = False
        self._server_pid = None
        self._caught_up_at, self._fell_behind = time.monotonic(), False
        self._markers.clear()  # those of the connection before cannot come
        self._probe_back.clear()
        # Notifications that arrive while psycopg runs one of our queries reach us here.
        conn.add_notify_handler(self._on_notify)

    def _detach(self) -> None:
        self._stop_reading()
        with self._read_lock:  # the worker may be reading it: wait for that to end
            self._conn = None
        lost = self._lost
        if lost is not None:
            if not lost.done():
                lost.cancel()
            elif not lost.cancelled():
                lost.exception()  # seen, whoever raised it: asyncio need not warn

    def _start_reading(self) -> None:
        """Read whenever the socket has data, unless paused (full queue, a query
        running) or the worker is reading (see ``_dispatch_loop``)."""
        conn = self._conn
        if self._reading or self._querying or self._worker_reads or conn is None:
            return
        if self._lost is None or self._lost.done():
            return
        if len(self._pending) >= self._queue_size:  # after a query, or a reconnect
            self._fell_behind = True
            return
        if conn.pgconn.status != pq.ConnStatus.OK:  # the worker found it closed: its fd is gone
            self._lose(conn, psycopg.OperationalError("the server closed the connection"))
            return
        # What libpq parsed already first: the socket will not say it is there.
        if self._read_ahead(conn.pgconn, consume=False):
            assert self._loop is not None
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            assert self._loop is not None
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        conn = self._conn
        assert conn is not None
        if not self._read_ahead(conn.pgconn, consume=True):
            self._stop_reading()

    def _read_ahead(self, pgconn: pq.abc.PGconn, consume: bool) -> bool:
        """In the event loop: read into the local queue; ``False`` if it filled or
        the connection failed (reading must stop)."""
        try:
            with self._read_lock:
                if consume:
                    _consume(pgconn)
                received = self._drain(pgconn, self._queue_size, self._control)
        except Exception as exc:
            self._lose(self._conn, exc)
            return False
        if received:
            self._arrived.set()
        if len(self._pending) < self._queue_size:
            return True
        self._queue_filled()
        return False

    def _read_on(self, wait: float = 0.0) -> list[PGnotify]:
        """In the worker thread: the next batch, read from the connection once
        the local queue is empty; an empty list if nothing arrives within ``wait``
        seconds.

        The event loop stops reading meanwhile (unless a receiver is slow), so
        the two threads do not take turns at the GIL for every few
        notifications: that halved throughput.
        """
        with self._read_lock:
            batch = self._read_on_locked()
            fd = self._fd if self._conn is not None else -1
        if batch or wait <= 0 or fd < 0:
            return batch
        if not _wait_readable(fd, wait):  # without the lock: a query may need it meanwhile
            return []
        with self._read_lock:
            return self._read_on_locked()

    def _read_on_locked(self) -> list[PGnotify]:
        conn, loop, limit = self._conn, self._loop, self._read_on_size
        if not self._pending and conn is not None and loop is not None and not self._querying:
            try:
                if not self._drain(conn.pgconn, limit, self._control_threadsafe):
                    _consume(conn.pgconn)
                    self._drain(conn.pgconn, limit, self._control_threadsafe)
            except Exception as exc:
                loop.call_soon_threadsafe(self._lose, conn, exc)
        return self._next_batch() if self._pending else []

    def _drain(self, pgconn: pq.abc.PGconn, limit: int, control: Callable[[PGnotify], Any]) -> int:
        """Move what libpq holds into the local queue, until it holds ``limit``;
        the changes read. The caller holds ``_read_lock``; probe answers and
        durable wake-ups go to ``control``."""
        pending, append = self._pending, self._pending.append
        control_channels = (self._probe_name, self._durable_channel)
        own = own_changes.is_own_pid if self.ignore_own_changes else None
        server = self._server
        received = skipped = 0
        while len(pending) < limit:
            notify = pgconn.notifies()
            if notify is None:
                break
            if notify.relname in control_channels:
                control(notify)
                continue
            received += 1
            if own is not None and own(notify.be_pid, server):
                skipped += _changes_in(notify.extra)
            else:
                append(notify)
        if received:
            self.stats["received"] += received
        if skipped:
            self.stats["own_changes"] += skipped
        return received

    def _lose(self, conn: psycopg.AsyncConnection | None, exc: BaseException) -> None:
        """The connection ``conn`` failed: end ``_listen`` with ``exc`` (in the event loop)."""
        if conn is not None and conn is self._conn:
            self._stop_reading()
            if self._lost is not None and not self._lost.done():
                self._lost.set_exception(exc)

    def _on_notify(self, notify: psycopg.Notify) -> None:
        """One that arrived during a query: into the queue, full or not (a query's
        answer comes after everything sent before it, so it cannot wait)."""
        raw = PGnotify(notify.channel.encode(), notify.pid, notify.payload.encode())
        if raw.relname in (self._probe_name, self._durable_channel):
            self._control(raw)
            return
        with self._read_lock:  # the worker may be taking a batch from the queue
            self.stats["received"] += 1
            if self.ignore_own_changes and own_changes.is_own_pid(raw.be_pid, self._server):
                self.stats["own_changes"] += _changes_in(raw.extra)
                return
            self._pending.append(raw)
        self._arrived.set()

    def _control_threadsafe(self, notify: PGnotify) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._control, notify)

    def _warn_unheard(self) -> None:
        """Say which models' changes no receiver hears: the listener would only count
        them as dispatched. A module of receivers that nothing imports at start-up
        is the usual cause."""
        unheard = self.dispatcher.unheard(self._models)
        if unheard:
            logger.warning(
                "pgnotify: no row_changed receiver is connected for %s: the listener "
                "dispatches their changes to no one. Connect receivers in a module that "
                "your AppConfig.ready() imports",
                ", ".join(m._meta.label for m in unheard),
            )

    def _control(self, notify: PGnotify) -> None:
        """A probe answer or a durable wake-up (in the event loop)."""
        if notify.relname == self._probe_name:
            if notify.extra == self._probe_token.encode():
                self._probe_sent = None
                self.health.last_probe_ok = time.monotonic()
                self.stats["probes"] += 1
                self._probe_back.set()
                # Only one from another session proves what the start-up probe does: one
                # sent on the listening connection comes back through a pooler too.
                if self._delivery_unproven and self._probe_elsewhere:
                    self._delivery_unproven = False
                    logger.info(
                        "pgnotify: the start-up self-probe came back: other sessions' "
                        "notifications reach the listener"
                    )
            else:
                self._marker_read(notify.extra)
        elif self.durable is not None:
            self.durable.wake.set()

    def _marker_read(self, token: bytes) -> None:
        """A sample's marker arrived: everything committed before it was sent has been
        read (notifications come in commit order); older markers will not come."""
        markers = self._markers
        if not any(marker == token for marker, _ in markers):
            return
        while markers:
            marker, sent = markers.popleft()
            if marker == token:
                break
        self._caught_up_at = max(self._caught_up_at, sent)
        if len(self._pending) < self._queue_size:  # else it fell behind after the marker
            self._fell_behind = False

    def _queue_filled(self) -> None:
        """Backpressure: stop reading, so the backlog waits in PostgreSQL's queue
        (which pg_notification_queue_usage() shows), not in memory."""
        self._fell_behind = True
        self.health.local_queue = len(self._pending)
        if self._queue_full:
            return
        self._queue_full = True
        self.stats["queue_full"] += 1
        # One line per minute at most: a burst may fill it many times.
        if time.monotonic() - self._queue_full_warned > 60:
            self._queue_full_warned = time.monotonic()
            logger.warning(
                "pgnotify: local queue full (%d notifications, %d time(s) so far): "
                "receivers are slower than changes arrive; reading paused until they "
                "catch up",
                self._queue_size,
                self.stats["queue_full"],
            )

    async def _listen(self, conn: psycopg.AsyncConnection) -> None:
        """Read until the connection is lost (raises), or dispatching or durable
        processing ends (returns: ``serve()`` raises its error)."""
        assert self._lost is not None
        self._start_reading()
        while True:
            await asyncio.wait(
                {self._lost, *self._workers},
                timeout=self._read_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._lost.done():
                self._lost.result()  # raises why
            if self._worker_ended():
                return
            self.health.local_queue = len(self._pending)
            await self._tick(conn)

    # Timers: probe, keepalive, statistics, health file

    _probe_token: str = ""
    _probe_sent: float | None = None
    _probe_elsewhere: bool = False  # the probe was sent from another session
    _next_probe: float = 0.0
    _received_at_probe: int = -1
    _queue_full: bool = False
    _queue_full_warned: float = -1e9
    _usage_high: bool = False
    _last_progress: float = 0.0
    _undispatched: int = 0

    async def _tick(self, conn: psycopg.AsyncConnection) -> None:
        now = time.monotonic()
        if self._probe_sent is not None:
            if self._probe_overdue(now):
                self.stats["probe_failures"] += 1
                if self._delivery_unproven:
                    raise ConnectionLost(await self._not_delivered(conn))
                raise ConnectionLost(self._probe_lost_message())
        elif now >= self._next_probe:
            received = self.stats["received"]
            if received != self._received_at_probe or self._pending:
                # Changes are arriving, so the connection is alive. A query now would
                # make the server send the whole backlog ahead of its answer, all of
                # it into memory at once: probe once the stream is quiet. The queue's
                # usage matters most now (the listener may be behind): ask another session.
                busy = self._pending or received > max(self._received_at_probe, 0)
                self._received_at_probe = received
                self._next_probe = now + self._probe_interval
                if busy and (self._sampling is None or self._sampling.done()):
                    self._sampling = asyncio.ensure_future(self._sample_from_another_session())
            else:
                await self._send_probe(conn)
        if self._queue_full and len(self._pending) <= self._queue_size // 2:
            self._queue_full = False
        if self._stats_interval > 0 and now >= self._next_stats:
            self._next_stats = now + self._stats_interval
            data = self.health.as_dict(self.stats, self.counters)
            logger.info("pgnotify: stats %s", format_record(data), extra={"pgnotify": data})
        if self._is_healthy(now):
            self._touch()

    def _probe_overdue(self, now: float) -> bool:
        """Whether the probe sent has not come back in time.

        One sent on this connection comes back within its own query (a session gets
        its own notifications before the server reports the query done), or never.
        One sent from another session while the start-up proof is owed (see
        ``_send_probe``) is read like any notification, maybe behind what the local
        queue holds: it is overdue only once that is empty.
        """
        if self._probe_sent is None or now - self._probe_sent <= self._probe_timeout:
            return False
        return not (self._delivery_unproven and (self._pending or self._in_hop))

    def _new_probe(self) -> list[str]:
        """Start a probe: its ``_PROBE`` parameters."""
        self._probe_token = uuid.uuid4().hex
        self._probe_sent = time.monotonic()
        self._probe_elsewhere = False  # see _send_probe_from_another_session
        self._next_probe = self._probe_sent + self._probe_interval
        return [self.probe_channel, self._probe_token]

    async def _send_probe(self, conn: psycopg.AsyncConnection) -> None:
        """NOTIFY ourselves and sample the server's notification queue in one round trip.

        Sent on the listening connection, this proves that it is alive and that
        the server delivers to it, cheaply; not that other sessions' notifications
        reach it (``_send_probe_from_another_session`` proves that at each connect).
        While that proof is owed (see ``_open``), that probe is sent instead; when
        it is refused, or its connection cannot be opened (connection slots used up),
        this one goes in its place, and it is tried again next time: the listening
        connection works, and dropping it would prove nothing sooner. A probe refused
        because the notification queue is full still proves the connection alive:
        the server answered.
        """
        if self._delivery_unproven:
            try:
                if await self._send_probe_from_another_session():
                    self._proof_unsent = False
                    return  # its answer is read like any notification (see _tick)
            except _CONNECTION_ERRORS as exc:
                self._probe_sent = None
                logger.log(
                    logging.DEBUG if self._proof_unsent else logging.WARNING,
                    "pgnotify: cannot send the start-up self-probe again from a second "
                    "connection: %s; listening on all the same, and trying again at the next "
                    "probe (said once until it is sent)",
                    _one_line(exc),
                )
                self._proof_unsent = True
        try:
            cursor = await self._query(conn, _PROBE, self._new_probe())
        except psycopg.errors.ProgramLimitExceeded as exc:
            self._probe_sent = None
            self._probe_refused(exc)
            self._start_reading()  # _query does not when its query fails
            return
        row = await cursor.fetchone()
        self._sampled(row[1] if row else None)

    async def _send_probe_from_another_session(self) -> bool:
        """Send the probe from a short-lived connection of its own, with the same parameters;
        ``False`` if PostgreSQL refused it, its notification queue full.

        Sent on the listening connection, the first probe would prove nothing about
        other sessions: through a transaction-pooling PgBouncer its transaction runs
        on the server session that ran LISTEN, which PostgreSQL delivers its own
        notifications to at the end of the transaction, while no other session's
        ever reach the listener. Raises what opening a second connection or the query
        there raised (see the callers).
        """
        params = self._new_probe()
        self._probe_elsewhere = True
        try:
            row = await self._ask_another_session(_PROBE, params)
        except psycopg.errors.ProgramLimitExceeded as exc:
            self._probe_sent = None  # nothing will come back
            self._probe_refused(exc)
            return False
        self._sampled(row[1] if row else None)
        return True

    async def _sample_from_another_session(self) -> None:
        """Sample the notification queue from a short-lived connection (at most every
        ``PROBE_INTERVAL``), with a marker: a NOTIFY on the probe channel.

        For while the listener is busy: a query on its own connection would be
        answered after the backlog, all of it read into memory first. Once the
        listener reads the marker it has read every change committed before the
        sample was sent (see ``_missing_since``); the listening session seen idle
        from here would not tell that much (what it sent may wait in a connection
        that died silently). A failure is logged, once until a sample succeeds
        again, and listening goes on.
        """
        token = uuid.uuid4().hex
        self._markers.append((token.encode(), time.monotonic()))
        try:
            row = await self._ask_another_session(_PROBE, [self.probe_channel, token])
        except psycopg.errors.ProgramLimitExceeded as exc:  # a sample all the same
            self._probe_refused(exc)
            return
        except Exception as exc:  # never fatal: a bug here must not stop listening either
            logger.log(
                logging.DEBUG if self._sample_failed else logging.WARNING,
                "pgnotify: cannot sample PostgreSQL's notification queue from a second "
                "connection while the listener is busy: %s; queue_usage is left as last "
                "sampled (said once until a sample succeeds)",
                _one_line(exc),
                exc_info=not isinstance(exc, _CONNECTION_ERRORS),
            )
            self._sample_failed = True
            return
        if self._sample_failed:
            self._sample_failed = False
            logger.info("pgnotify: sampling the notification queue works again")
        self._sampled(row[1] if row else None)

    async def _ask_another_session(self, query: str, params: list[Any]) -> Any:
        """The row ``query`` returns on a short-lived connection of its own, named
        ``<APPLICATION_NAME> probe``: connecting bounded by ``PROBE_TIMEOUT`` (libpq's
        ``connect_timeout``, then twice that), the query by ``PROBE_TIMEOUT``."""
        name = f"{get_setting('APPLICATION_NAME')} probe"[:63]
        conn = await asyncio.wait_for(
            connection.connect_async(self.using, name, self._probe_timeout),
            self._probe_timeout * 2,
        )
        try:
            cursor = await connection.within(conn, conn.execute(query, params), self._probe_timeout)
            return await cursor.fetchone()
        finally:
            await _close(conn)

    def _probe_refused(self, exc: psycopg.Error) -> None:
        """A probe's NOTIFY refused: PostgreSQL's notification queue is full.

        Its usage is 1.0 then, as far as anyone can tell. No lost connection:
        the server answered, and reading, which drains this listener's part of
        the queue, goes on.
        """
        logger.debug("pgnotify: a probe was refused: %s", _one_line(exc))
        self._sampled(1.0)

    def _sampled(self, usage: Any) -> None:
        """Take the notification queue's usage from a sample; warn when high."""
        usage = float(usage) if usage is not None else 0.0
        self.health.queue_usage = usage
        threshold = float(get_setting("QUEUE_USAGE_WARNING"))
        if usage > threshold and not self._usage_high:
            logger.warning(
                "pgnotify: PostgreSQL's notification queue is %s full (warning above %s); a "
                "listening session is not reading (a slow listener, or a session that ran "
                "LISTEN and stays in a transaction). When it is full, every commit that "
                "notifies fails",
                *queue_usage_percents(usage, threshold),
            )
        self._usage_high = usage > threshold

    async def _query(self, conn: psycopg.AsyncConnection, query: Any, params: Any = None) -> Any:
        """Run a query; no answer within ``PROBE_TIMEOUT`` means a dead connection.

        Reading pauses meanwhile: psycopg waits on the socket itself, and hands
        what arrives before the answer to ``_on_notify``.
        """
        self._stop_reading()
        with self._read_lock:  # a read of the worker's ends first; it starts none until done
            self._querying = True
        sent = time.monotonic()
        try:
            result = await connection.within(conn, conn.execute(query, params), self._probe_timeout)
        except TimeoutError as exc:
            raise ConnectionLost(str(exc)) from None
        finally:
            self._querying = False
        # Whatever was committed before the query was sent came ahead of its answer.
        self._caught_up_at, self._fell_behind = max(self._caught_up_at, sent), False
        self._start_reading()
        return result

    def _is_healthy(self, now: float) -> bool:
        """Connected, the probe not overdue, and receivers making progress: no batch,
        live or durable, has gone ``PROBE_INTERVAL`` without one."""
        if not self.health.connected:
            return False
        if self._probe_overdue(now):
            return False
        busy = self._pending or self._in_hop
        if busy and now - self._last_progress > self._probe_interval:
            return False
        if self._worker_ended():
            return False
        durable = self.durable
        return durable is None or durable.healthy(now, self._probe_interval)

    def _touch(self) -> None:
        if self.health_file:
            self.health_file.touch()

    # Dispatching

    async def _dispatch_loop(self, executor: ThreadPoolExecutor) -> None:
        """Hand batches to the worker thread; their async receivers run here after.

        When a batch empties the local queue, the worker goes on reading the
        connection itself and the event loop stops reading it: one thread reads,
        decodes and dispatches while changes keep arriving. Should a receiver
        take longer than ``READ_AHEAD_AFTER``, the event loop reads ahead again,
        into the local queue, which the worker empties before reading on.
        """
        loop = asyncio.get_running_loop()
        await self._started.wait()
        self._last_progress = time.monotonic()
        pending, arrived = self._pending, self._arrived
        while not self._stopping.is_set():
            if not pending:
                arrived.clear()
                await arrived.wait()  # set by the reader, and by stop()
                continue
            batch = self._next_batch()
            read_on = not pending
            if read_on:
                self._worker_reads = True
                self._stop_reading()
            elif len(pending) <= self._queue_size // 2:
                self._start_reading()  # if it was paused by a full queue
            self._last_progress = time.monotonic()  # not the idle time before this hop
            self._in_hop = True
            hop = loop.run_in_executor(executor, self._decode_and_send, batch, read_on)
            try:
                while not hop.done():
                    await asyncio.wait({hop}, timeout=READ_AHEAD_AFTER)
                    stuck = time.monotonic() - self._last_progress > READ_AHEAD_AFTER
                    if self._worker_reads and stuck:  # a slow receiver: read ahead meanwhile
                        self._worker_reads = False
                        self._start_reading()
                    elif read_on and not self._worker_reads and not stuck:  # going again
                        self._worker_reads = True
                        self._stop_reading()
            finally:
                self._worker_reads = self._in_hop = False
            if len(pending) <= self._queue_size // 2:
                self._start_reading()  # if it was paused by a full queue or the worker read
            events = hop.result()  # those that have async receivers
            if events:
                await self.dispatcher.send_async(events)
                # Their dispatch ends now, not when their sync receivers returned.
                self.dispatcher.measure_lag(events[-1])
            self._last_progress = time.monotonic()
            self.health.local_queue = len(pending)
            self.health.last_event_lag = self.dispatcher.last_event_lag  # async receivers' too

    async def _durable_loop(self, executor: ThreadPoolExecutor) -> None:
        """Run the durable worker once the listener has started, sharing the dispatch thread."""
        if self.durable is None:
            return
        assert self._wake is not None
        await self._started.wait()
        try:
            await self.durable.run(self._wake, executor)
        except Exception:  # a bug, not the database (the worker retries those): make it loud
            logger.exception("pgnotify: durable event processing stopped")
            raise

    def _next_batch(self) -> list[PGnotify]:
        pending = self._pending
        if len(pending) <= BATCH_SIZE and sum(len(n.extra) for n in pending) <= BATCH_PAYLOAD:
            batch = list(pending)  # all of them, the usual case
            pending.clear()
            return batch
        batch = [pending.popleft()]
        size = len(batch[0].extra)
        while pending and len(batch) < BATCH_SIZE and size < BATCH_PAYLOAD:
            notify = pending.popleft()
            batch.append(notify)
            size += len(notify.extra)
        return batch

    def _decode_and_send(self, batch: list[PGnotify], read_on: bool = False) -> list[RowChange]:
        """In the worker thread: decode ``batch`` and call its sync receivers; with
        ``read_on``, go on with what the connection has meanwhile, batch by batch.

        Returns the events that have async receivers, for the event loop to await.
        A hop that keeps some ends once it holds a batch's worth (they are all
        held at once; at most twice the bounds), or when nothing more has
        arrived. One that keeps none waits up to ``LINGER`` for more, and ends
        after ``HOP_SIZE`` notifications or ``HOP_SECONDS``: ending a hop and
        starting the next costs two thread wake-ups (latency) and the work of
        the event loop in between.
        """
        send, has_async = self._send_batch, self.dispatcher.has_async_receivers
        kept: list[RowChange] = []
        count = size = 0
        deadline = time.monotonic() + HOP_SECONDS
        while True:
            events = send(batch)
            count += len(batch)
            if events and has_async(events):
                kept += events
                size += sum(len(n.extra) for n in batch)
            if not read_on or self._stopping.is_set():
                return kept
            if kept and (count >= BATCH_SIZE or size >= BATCH_PAYLOAD):
                return kept
            if count >= HOP_SIZE or time.monotonic() > deadline:
                return kept
            batch = self._read_on(0.0 if kept else LINGER)
            if not batch:
                return kept

    def _send_batch(self, batch: list[PGnotify]) -> list[RowChange]:
        events: list[RowChange] = []
        decode, names = self.decoder.decode, self._channel_names
        for notify in batch:
            try:
                events += decode(notify.extra, names.get(notify.relname, ""), notify.be_pid)
            except Exception as exc:
                self._skip(exc, notify.extra, names.get(notify.relname, ""), notify.be_pid)
        done = self.dispatcher.send_sync(events, self._stopping)
        if len(done) < len(events):
            self._undispatched += len(events) - len(done)
        self._last_progress = time.monotonic()
        # Here, not when the hop ends: a lingering hop may last a while yet.
        self.health.last_event_lag = self.dispatcher.last_event_lag
        return done

    def decode(self, notify: psycopg.Notify) -> list[RowChange]:
        """Decode one notification; log, count and skip what cannot be decoded."""
        try:
            return self.decoder.decode(notify.payload, notify.channel, notify.pid)
        except Exception as exc:
            self._skip(exc, notify.payload, notify.channel, notify.pid)
        return []

    def _skip(self, exc: Exception, payload: str | bytes, channel: str, pid: int) -> None:
        """Log and count a payload that decoding refused."""
        if isinstance(exc, ModelNotServed):
            # A shared channel carries models this listener was not started
            # for: say so once per model, then count them quietly.
            self.stats["ignored"] += 1
            level = logging.DEBUG if exc.model in self._ignored_models else logging.WARNING
            self._ignored_models.add(exc.model)
            logger.log(
                level,
                "pgnotify: ignoring changes of %s on %s: this listener does not serve it",
                exc.model,
                channel,
            )
        else:
            # Anyone may NOTIFY on our channels: no payload may stop the loop.
            self.stats["undecodable"] += 1
            if isinstance(payload, bytes):
                payload = payload.decode(errors="replace")
            logger.warning(
                "pgnotify: skipped undecodable payload on %s from pid %s (%s): %.200r",
                channel,
                pid,
                exc,
                payload,
                exc_info=not isinstance(exc, DecodeError),
            )

    def handle(self, notify: psycopg.Notify) -> None:
        """Decode one notification and dispatch its changes (synchronously)."""
        self.stats["received"] += 1
        for event in self.decode(notify):
            self.dispatcher.dispatch(event)

    # Helpers

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, cancelling it when ``stop()`` is called."""
        assert self._wake is not None
        return await connection.until_stopped(self._wake, awaitable)

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _send(self, signal: Signal, **kwargs: Any) -> None:
        """Send a lifecycle signal; a receiver that raises is logged, never fatal.

        As ``Signal.asend_robust``, but the sync receivers run in the listener's
        signals thread (see :meth:`serve`), then the async ones on the event loop.
        """
        named = {"sender": self, "using": self.using, **kwargs}
        sync_receivers, async_receivers = signal._live_receivers(self)
        results: list[tuple[Any, Any]] = []
        if sync_receivers:

            def send_sync() -> list[tuple[Any, Any]]:
                return [(receiver, _robust(receiver, signal, named)) for receiver in sync_receivers]

            results += await sync_to_async(
                send_sync, thread_sensitive=False, executor=self._signals_thread
            )()
        if async_receivers:

            async def send(receiver: Any) -> Any:
                try:
                    return await receiver(signal=signal, **named)
                except Exception as exc:
                    return exc

            outcomes = await asyncio.gather(*(send(receiver) for receiver in async_receivers))
            results += zip(async_receivers, outcomes, strict=True)
        for receiver, result in results:
            if isinstance(result, Exception):
                logger.error(
                    "pgnotify: receiver %s of a listener signal failed",
                    getattr(receiver, "__qualname__", receiver),
                    exc_info=result,
                )


def _robust(receiver: Any, signal: Signal, named: dict[str, Any]) -> Any:
    """``receiver``'s response, or the exception it raised."""
    try:
        return receiver(signal=signal, **named)
    except Exception as exc:
        return exc


def _end_thread(executor: ThreadPoolExecutor) -> None:
    """Close the Django connections of ``executor``'s thread, then end it.

    Its receivers' ORM sessions end with the listener, not at a garbage collection some
    time after (a test database could not be dropped meanwhile). At interpreter exit
    (a listener stopped by an ``atexit`` handler) ``concurrent.futures`` refuses new
    work: its threads have already ended, their connections with them.
    """
    with suppress(RuntimeError):
        executor.submit(close_thread_connections)
    executor.shutdown(wait=True)


def retry_until_reachable(
    check: Callable[[], T], using: str, stopping: threading.Event
) -> T | None:
    """Run ``check`` (a query through Django's connection ``using``) until it can connect.

    A listener started before its database (a container starting next to
    PostgreSQL, a server restarting) waits, logging each attempt, instead of
    exiting. Returns ``None`` if ``stopping`` is set first.
    """
    backoff = Backoff.from_settings()
    where = connection.describe(connection.connection_params(using))
    while not stopping.is_set():
        try:
            return check()
        except OperationalError as exc:
            delay = backoff.next()
            logger.warning(
                "pgnotify: cannot reach database %r (%s) (attempt %d): %s; retrying in %.1fs",
                using,
                where,
                backoff.attempts,
                _one_line(exc),
                delay,
            )
            stopping.wait(delay)
        finally:
            connections[using].close()  # the listener has its own connection
    return None


def freeze_startup_objects() -> None:
    """Exempt every object alive now from the cyclic garbage collector (``gc.freeze()``).

    For a process that runs a listener, once it has started (``pgnotify_listen``
    calls it): Django, the project's modules and what they hold live as long as
    the process, yet every full collection would walk them all again. At a
    hundred thousand events a second that cost a fifth of the throughput.
    Garbage is collected first, so nothing collectable is kept.
    """
    gc.collect()
    gc.freeze()


async def _close(conn: psycopg.AsyncConnection) -> None:
    with suppress(Exception):  # closing a dead connection may fail; it is gone either way
        await asyncio.wait_for(conn.close(), 2)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def _changes_in(payload: bytes) -> int:
    """How many row changes a payload holds (1 if it cannot be read), for counting
    what is skipped undecoded."""
    try:
        rows = wire.loads(payload).get(wire.ROWS)
    except Exception:
        return 1
    return len(rows) if isinstance(rows, list) and rows else 1


def _summary(stats: Counter[str], counters: Iterable[str]) -> str:
    return ", ".join(f"{key}={stats[key]}" for key in counters)


def _wait_readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has data within ``timeout`` seconds (poll, for any fd number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        return bool(poller.poll(timeout * 1000))
    except OSError:  # closed meanwhile: the event loop finds out why
        return False


def _consume(pgconn: pq.abc.PGconn) -> None:
    """Read what the socket holds into libpq (never blocks); raise if the connection is gone."""
    pgconn.consume_input()
    if pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError("the server closed the connection")
