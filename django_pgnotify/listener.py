"""The listener: one dedicated connection, LISTEN, and a small asyncio loop.

Three tasks share one event loop. The reader reads notifications as soon as
they arrive into a bounded local queue (waiting, and so leaving them on the
server, when the queue is full). The dispatcher takes them in batches, decodes
each batch and calls the sync receivers in one worker thread, then awaits the
async receivers, all in commit order. Between reading rounds the reader sends
the self-probe, a NOTIFY to itself that proves delivery works and doubles as
keepalive. A lost connection is reopened with capped exponential backoff.

``stop()`` may be called from a signal handler or another thread; the event
in hand is finished first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

import psycopg
from django.db import DEFAULT_DB_ALIAS, OperationalError, close_old_connections, connections
from django.dispatch import Signal
from psycopg import sql

from . import connection, own_changes, wire
from .backoff import Backoff
from .conf import get_setting
from .declarations import Declaration
from .decoding import DecodeError, Decoder, ModelNotServed
from .dispatch import Dispatcher
from .durable import DurableWorker
from .events import RowChange
from .health import COUNTERS, HealthFile, ListenerHealth, format_record
from .signals import listener_reconnected, listener_started, listener_stopped

logger = logging.getLogger("django_pgnotify.listener")

T = TypeVar("T")

#: Notifications decoded and dispatched per thread hop, at most.
BATCH_SIZE = 1000
#: Payload characters per batch, at most (or one notification, if larger): a
#: batch's events are all held at once, and a full payload may carry a hundred
#: rows, so this, not BATCH_SIZE, bounds the memory of bulk statements' batches.
BATCH_PAYLOAD = 128_000

# Errors that mean "the connection is gone or unusable": reconnect.
_CONNECTION_ERRORS = (psycopg.Error, OSError, asyncio.TimeoutError)


class ListenerError(Exception):
    """A problem reconnecting cannot fix: the listener refuses to start."""


class ConnectionLost(Exception):
    """The listening connection stopped working (probe lost, query timed out)."""


class _Stopped(Exception):
    """``stop()`` was called while waiting."""


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
        ready: Set once the listener is listening and its probe came back.
        stats: Counters (see ``django_pgnotify.health.COUNTERS``).
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
        self.decoder = Decoder({d.model for d in declarations}, using)
        self.ready = threading.Event()
        self.health = ListenerHealth(local_queue_size=int(get_setting("QUEUE_SIZE")))
        if ignore_own_changes is None:
            ignore_own_changes = bool(get_setting("IGNORE_OWN_CHANGES"))
        self.ignore_own_changes = ignore_own_changes
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
            )
            if durable
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # Lifecycle

    def stop(self) -> None:
        """Ask the listener to return after the event in hand (thread- and signal-safe)."""
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(wake.set)

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
        self._started = asyncio.Event()  # no dispatch before listener_started was sent
        if self._stopping.is_set():
            self._wake.set()
        self._read_timeout = float(self.poll_interval or get_setting("POLL_INTERVAL"))
        self._probe_interval = float(get_setting("PROBE_INTERVAL"))
        self._probe_timeout = float(get_setting("PROBE_TIMEOUT"))
        self._stats_interval = float(get_setting("STATS_INTERVAL"))
        self._next_stats = time.monotonic() + self._stats_interval
        queue: asyncio.Queue[psycopg.Notify] = asyncio.Queue(self.health.local_queue_size)
        executor = ThreadPoolExecutor(1, thread_name_prefix="pgnotify-dispatch")
        dispatching = asyncio.ensure_future(self._dispatch_loop(queue, executor))
        durable = asyncio.ensure_future(self._durable_loop(executor))
        try:
            await self._connect_loop(queue, dispatching)
        finally:
            self._stopping.set()
            self._wake.set()
            self._started.set()
            await asyncio.gather(dispatching, durable, return_exceptions=True)
            executor.shutdown(wait=True)
            self.health.connected = False
            if queue.qsize():
                logger.info(
                    "pgnotify: %d notification(s) read but not dispatched at stop",
                    queue.qsize(),
                )
            if self.health_file:
                self.health_file.remove()
            await self._send(listener_stopped, stats=Counter(self.stats))
            logger.info("pgnotify: listener stopped (%s)", _summary(self.stats))
        failure = dispatching.exception() if not dispatching.cancelled() else None
        if failure is not None:  # a bug, not a receiver (those are caught): make it loud
            raise failure

    # Connecting

    async def _connect_loop(self, queue: asyncio.Queue[psycopg.Notify], dispatching: Any) -> None:
        backoff = Backoff.from_settings()
        where = connection.describe(
            connection.connection_params(connection.listen_alias(self.using))
        )
        lost_at: float | None = None
        while not self._stopping.is_set():
            try:
                conn = await self._until_stopped(self._open(queue))
            except _Stopped:
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
                await self._send(listener_started, backend_pid=pid)
                self.ready.set()
                self._started.set()
            else:
                downtime = time.monotonic() - (lost_at or time.monotonic())
                self.stats["reconnects"] += 1
                logger.warning(
                    "pgnotify: reconnected to %s after %.1fs (backend pid %s); changes "
                    "committed meanwhile were not delivered",
                    where,
                    downtime,
                    pid,
                )
                await self._send(listener_reconnected, backend_pid=pid, downtime=downtime)
            try:
                await self._until_stopped(self._listen(conn, queue, dispatching))
            except _Stopped:
                return
            except (*_CONNECTION_ERRORS, ConnectionLost) as exc:
                lost_at = time.monotonic()
                self.health.connected = False
                logger.warning(
                    "pgnotify: lost the listening connection to %s: %s; reconnecting",
                    where,
                    _one_line(exc),
                )
            finally:
                self.health.connected, self.health.backend_pid = False, None
                await _close(conn)
            if dispatching.done():  # the dispatcher failed: serve() raises its error
                return

    async def _open(self, queue: asyncio.Queue[psycopg.Notify]) -> psycopg.AsyncConnection:
        """Connect, refuse a standby, LISTEN, and prove delivery with a probe."""
        conn = await asyncio.wait_for(
            connection.connect_async(
                self.using, get_setting("APPLICATION_NAME"), self._probe_timeout
            ),
            self._probe_timeout * 2,
        )
        try:
            cursor = await self._query(conn, "SELECT pg_is_in_recovery()")
            row = await cursor.fetchone()
            if row and row[0]:
                raise ListenerError(
                    f"database {self.using!r} ({connection.describe(conn.info.get_parameters())})"
                    " is a read-only standby (pg_is_in_recovery() is true): changes are not made"
                    " and NOTIFY cannot be sent there. Point the listener at the primary."
                )
            for channel in [*self.channels, self.probe_channel]:
                await self._query(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            await self._send_probe(conn)
            deadline = time.monotonic() + self._probe_timeout
            while self._probe_sent is not None and time.monotonic() < deadline:
                # Never leave notifies() mid-way: the rest of a packet would be lost.
                remaining = deadline - time.monotonic()
                async for notify in conn.notifies(timeout=remaining, stop_after=1):
                    await self._accept(notify, queue)
            if self._probe_sent is not None:
                raise ListenerError(self._probe_lost_message())
            return conn
        except BaseException:
            await _close(conn)
            raise

    def _probe_lost_message(self) -> str:
        return (
            f"the self-probe (a NOTIFY on {self.probe_channel}) did not come back within "
            f"{self._probe_timeout:g}s although LISTEN succeeded, so notifications are not "
            "delivered to this connection. Usually a transaction-pooling proxy (PgBouncer "
            "with pool_mode = transaction) sits between the listener and PostgreSQL: give the "
            'listener a direct connection (PGNOTIFY["LISTEN_DATABASES"] or --database)'
        )

    # Reading

    async def _listen(
        self, conn: psycopg.AsyncConnection, queue: asyncio.Queue[psycopg.Notify], dispatching: Any
    ) -> None:
        """Read until the connection is lost (raises) or the dispatcher ends (returns)."""
        reader = asyncio.ensure_future(self._read(conn, queue))
        try:
            await asyncio.wait({reader, dispatching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if reader.done() and not reader.cancelled():
            reader.result()

    async def _read(
        self, conn: psycopg.AsyncConnection, queue: asyncio.Queue[psycopg.Notify]
    ) -> None:
        while True:
            # psycopg ends the round after the timeout even in a steady stream, and
            # only between packets: breaking out earlier would lose the packet's rest.
            async for notify in conn.notifies(timeout=self._read_timeout):
                if not self._take(notify, queue):
                    await self._put_when_room(notify, queue)
            self.health.local_queue = queue.qsize()
            await self._tick(conn, queue)

    async def _accept(self, notify: psycopg.Notify, queue: asyncio.Queue[psycopg.Notify]) -> None:
        """Take one notification off the connection: a probe, or one for the queue."""
        if not self._take(notify, queue):
            await self._put_when_room(notify, queue)
        self.health.local_queue = queue.qsize()

    def _take(self, notify: psycopg.Notify, queue: asyncio.Queue[psycopg.Notify]) -> bool:
        """Handle ``notify`` without waiting; ``False`` if it is for a full queue.

        Not a coroutine: it runs once per notification, and most need no wait.
        """
        channel = notify.channel
        if channel == self.probe_channel:
            if notify.payload == self._probe_token:
                self._probe_sent = None
                self.health.last_probe_ok = time.monotonic()
                self.stats["probes"] += 1
            return True
        if channel == wire.DURABLE_CHANNEL:
            if self.durable is not None:
                self.durable.wake.set()
            return True
        self.stats["received"] += 1
        if self.ignore_own_changes and own_changes.is_own_pid(notify.pid):
            self.stats["own_changes"] += 1
            return True
        if queue.full():
            return False
        queue.put_nowait(notify)
        return True

    async def _put_when_room(
        self, notify: psycopg.Notify, queue: asyncio.Queue[psycopg.Notify]
    ) -> None:
        """Backpressure: stop reading, so the backlog waits in PostgreSQL's queue
        (which pg_notification_queue_usage() shows), not in memory."""
        if not self._queue_full:
            self._queue_full = True
            self.stats["queue_full"] += 1
            # One line per minute at most: a burst may fill it many times.
            if time.monotonic() - self._queue_full_warned > 60:
                self._queue_full_warned = time.monotonic()
                logger.warning(
                    "pgnotify: local queue full (%d notifications, %d time(s) so far): "
                    "receivers are slower than changes arrive; reading paused until they "
                    "catch up",
                    queue.maxsize,
                    self.stats["queue_full"],
                )
        self.health.local_queue = queue.qsize()
        waited = time.monotonic()
        await queue.put(notify)
        if self._probe_sent is not None:  # the probe could not be read meanwhile
            self._probe_sent += time.monotonic() - waited

    # Timers: probe, keepalive, statistics, health file

    _probe_token: str = ""
    _probe_sent: float | None = None
    _next_probe: float = 0.0
    _received_at_probe: int = -1
    _queue_full: bool = False
    _queue_full_warned: float = -1e9
    _usage_high: bool = False
    _last_progress: float = 0.0

    async def _tick(self, conn: psycopg.AsyncConnection, queue: asyncio.Queue[Any]) -> None:
        now = time.monotonic()
        if self._probe_sent is not None:
            if now - self._probe_sent > self._probe_timeout:
                self.stats["probe_failures"] += 1
                raise ConnectionLost(self._probe_lost_message())
        elif now >= self._next_probe:
            received = self.stats["received"]
            if received != self._received_at_probe or queue.qsize():
                # Changes are arriving, so the connection is alive. A query now would
                # make the server send the whole backlog ahead of its answer, all of
                # it into memory at once: probe once the stream is quiet.
                self._received_at_probe = received
                self._next_probe = now + self._probe_interval
            else:
                await self._send_probe(conn)
        if self._queue_full and queue.qsize() <= queue.maxsize // 2:
            self._queue_full = False
        if self._stats_interval > 0 and now >= self._next_stats:
            self._next_stats = now + self._stats_interval
            data = self.health.as_dict(self.stats)
            logger.info("pgnotify: stats %s", format_record(data), extra={"pgnotify": data})
        if self._is_healthy(now, queue):
            self._touch()

    async def _send_probe(self, conn: psycopg.AsyncConnection) -> None:
        """NOTIFY ourselves and sample the server's notification queue in one round trip."""
        self._probe_token = uuid.uuid4().hex
        self._probe_sent = time.monotonic()
        self._next_probe = self._probe_sent + self._probe_interval
        cursor = await self._query(
            conn,
            "SELECT pg_notify(%s, %s), pg_notification_queue_usage()",
            [self.probe_channel, self._probe_token],
        )
        row = await cursor.fetchone()
        usage = float(row[1]) if row else 0.0
        self.health.queue_usage = usage
        threshold = float(get_setting("QUEUE_USAGE_WARNING"))
        if usage > threshold and not self._usage_high:
            logger.warning(
                "pgnotify: PostgreSQL's notification queue is %.1f%% full (warning above "
                "%.1f%%); a listening session is not reading (a slow listener, or a session "
                "that ran LISTEN and stays in a transaction). When it is full, every commit "
                "that notifies fails",
                usage * 100,
                threshold * 100,
            )
        self._usage_high = usage > threshold

    async def _query(self, conn: psycopg.AsyncConnection, query: Any, params: Any = None) -> Any:
        """Run a query; no answer within ``PROBE_TIMEOUT`` means a dead connection.

        The connection is given up before the query is cancelled: cancelling a
        running psycopg query first sends a cancel request and waits seconds
        for an answer that a dead connection never gives.
        """
        task = asyncio.ensure_future(conn.execute(query, params))
        try:
            done, _ = await asyncio.wait({task}, timeout=self._probe_timeout)
        finally:
            if not task.done():
                conn.pgconn.finish()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not done:
            raise ConnectionLost(f"no answer to a query within {self._probe_timeout:g}s")
        return task.result()

    def _is_healthy(self, now: float, queue: asyncio.Queue[Any]) -> bool:
        if not self.health.connected:
            return False
        if self._probe_sent is not None and now - self._probe_sent > self._probe_timeout:
            return False
        stalled = queue.qsize() and now - self._last_progress > self._probe_interval
        return not stalled

    def _touch(self) -> None:
        if self.health_file:
            self.health_file.touch()

    # Dispatching

    async def _dispatch_loop(
        self, queue: asyncio.Queue[psycopg.Notify], executor: ThreadPoolExecutor
    ) -> None:
        loop = asyncio.get_running_loop()
        await self._started.wait()
        self._last_progress = time.monotonic()
        while not self._stopping.is_set():
            batch = await self._next_batch(queue)
            if not batch:
                continue
            events = await loop.run_in_executor(executor, self._decode_and_send, batch)
            if events and self.dispatcher.has_async_receivers(events):
                await self.dispatcher.send_async(events)
            self._last_progress = time.monotonic()
            self.health.local_queue = queue.qsize()
            self.health.last_event_lag = self.dispatcher.last_event_lag

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

    async def _next_batch(self, queue: asyncio.Queue[psycopg.Notify]) -> list[psycopg.Notify]:
        assert self._wake is not None
        if queue.empty():
            getter = asyncio.ensure_future(queue.get())
            waker = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({getter, waker}, return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            if not getter.done():
                getter.cancel()
                return []
            batch = [getter.result()]
        else:
            batch = [queue.get_nowait()]
        size = len(batch[0].payload)
        while len(batch) < BATCH_SIZE and size < BATCH_PAYLOAD and not queue.empty():
            notify = queue.get_nowait()
            batch.append(notify)
            size += len(notify.payload)
        return batch

    def _decode_and_send(self, batch: list[psycopg.Notify]) -> list[RowChange]:
        """In the worker thread: decode a batch and call the sync receivers."""
        events: list[RowChange] = []
        decode = self.decode
        for notify in batch:
            events += decode(notify)
        errors = self.stats["receiver_errors"]
        done = self.dispatcher.send_sync(events, self._stopping)
        if self.stats["receiver_errors"] != errors:
            # A receiver may have failed on a broken ORM connection (the
            # database restarted): let Django replace it, as after a request.
            close_old_connections()
        return done

    def decode(self, notify: psycopg.Notify) -> list[RowChange]:
        """Decode one notification; log, count and skip what cannot be decoded."""
        try:
            return self.decoder.decode(notify.payload, notify.channel, notify.pid)
        except ModelNotServed as exc:
            # A shared channel carries models this listener was not started
            # for: say so once per model, then count them quietly.
            self.stats["ignored"] += 1
            level = logging.DEBUG if exc.model in self._ignored_models else logging.WARNING
            self._ignored_models.add(exc.model)
            logger.log(
                level,
                "pgnotify: ignoring changes of %s on %s: this listener does not serve it",
                exc.model,
                notify.channel,
            )
        except Exception as exc:
            # Anyone may NOTIFY on our channels: no payload may stop the loop.
            self.stats["undecodable"] += 1
            logger.warning(
                "pgnotify: skipped undecodable payload on %s from pid %s (%s): %.200r",
                notify.channel,
                notify.pid,
                exc,
                notify.payload,
                exc_info=not isinstance(exc, DecodeError),
            )
        return []

    def handle(self, notify: psycopg.Notify) -> None:
        """Decode one notification and dispatch its changes (synchronously)."""
        self.stats["received"] += 1
        for event in self.decode(notify):
            self.dispatcher.dispatch(event)

    # Helpers

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``, cancelling it when ``stop()`` is called."""
        assert self._wake is not None
        task = asyncio.ensure_future(awaitable)
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({task, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise _Stopped
        return task.result()

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _send(self, signal: Signal, **kwargs: Any) -> None:
        """Send a lifecycle signal; a receiver that raises is logged, never fatal."""
        for receiver, result in await signal.asend_robust(sender=self, using=self.using, **kwargs):
            if isinstance(result, Exception):
                logger.error(
                    "pgnotify: receiver %s of a listener signal failed",
                    getattr(receiver, "__qualname__", receiver),
                    exc_info=result,
                )


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


async def _close(conn: psycopg.AsyncConnection) -> None:
    with suppress(Exception):  # closing a dead connection may fail; it is gone either way
        await asyncio.wait_for(conn.close(), 2)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def _summary(stats: Counter[str]) -> str:
    return ", ".join(f"{key}={stats[key]}" for key in COUNTERS)
