"""Recognising changes made by this process's own Django connections.

A service that both writes and listens may not want to hear about its own
writes. A notification carries the backend PID of the writing session, so the
listener compares it with the PIDs of the connections Django opened in this
process, in any thread, since :func:`track_own_connections` was first called
(and those the calling thread had open then). PostgreSQL reuses PIDs, so a PID
counts as ours only while the connection that had it is open, and briefly after
it closed.

PIDs are unique only within one server, and a process may also be connected to
others (a read replica, another database server, one in a container whose PIDs
overlap): a PID is ours only on the server our connection has it on. Each new
connection asks its server who it is (:data:`SERVER_QUERY`, one round trip), and
so does the listener; a connection whose server does not answer, or whose PID
is not its server's (a pooler's), is not recorded: its changes are delivered.

Django sends a signal when it opens a connection but none when it closes one,
so the first time a connection is opened its wrapper's ``close`` is wrapped to
retire the PID then. A wrapper that is garbage-collected without being closed
(its thread ended) retires its PID as it goes, as its session ends with it.

A durable event may wait in its table for hours, long enough for its writer's
PID to be given to one of this process's connections since: it counts as ours
only if it was written after the PID became ours (:func:`is_own_write`). The
two moments are compared on this process's clock, the event's by its age on the
server's clock, so the clocks need not agree, only tick at the same rate.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from django.db import connections
from django.db.backends.signals import connection_created

logger = logging.getLogger("django_pgnotify.own_changes")

#: A server, as :data:`SERVER_QUERY` tells it apart: when it started (in microseconds
#: since the epoch), its address the session came in at (``None`` over a Unix socket) and
#: its port.
Server = tuple[Any, ...]
#: A PID on the server it belongs to.
Key = tuple[Server, int]

#: The session's PID, then the server's identity (:func:`server_of`): a replica has its
#: own start time (not its own ``system_identifier``), servers started in the same
#: microsecond have their own addresses. Needs no privilege.
SERVER_QUERY = (
    "SELECT pg_backend_pid(),"
    " (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint,"
    " host(inet_server_addr()), current_setting('port')"
)

_lock = threading.Lock()
#: (server, PID) -> the wrapper whose open connection has it.
_pids: dict[Key, weakref.ref[Any]] = {}
#: (server, PID) -> when its connection closed (``time.monotonic()``).
_closed: dict[Key, float] = {}
#: (server, PID) -> when it became ours (``time.monotonic()``), while open or closed lately.
_opened: dict[Key, float] = {}
#: psycopg connection -> its key, or ``None`` if not ours to record: asked once per
#: session, not again each time a pool hands it to a wrapper.
_keys: weakref.WeakKeyDictionary[Any, Key | None] = weakref.WeakKeyDictionary()

#: Seconds a PID still counts as ours after its connection closed.
CLOSED_GRACE = 10.0
#: Seconds before its PID became ours that a change may have been written and still
#: count as ours: room for a round trip's difference between the two clocks' readings
#: (a session's first write follows its connect within one). No other session can
#: have had the PID so shortly before: the system hands PIDs out in turn, and one
#: comes round again only once all the others (32,768 at least) have been.
OPENED_MARGIN = 1.0


def _backend_pid(wrapper: Any) -> int | None:
    raw = getattr(wrapper, "connection", None)
    info = getattr(raw, "info", None)  # psycopg 3
    try:
        if info is not None:
            return info.backend_pid
        get_pid = getattr(raw, "get_backend_pid", None)  # psycopg2
        return get_pid() if get_pid is not None else None
    except Exception:  # a closed or broken connection has no PID we can trust
        return None


def server_of(row: Sequence[Any]) -> Server:
    """The server identity in a row of :data:`SERVER_QUERY`."""
    return tuple(row[1:])


async def read_server(conn: psycopg.AsyncConnection) -> Server | None:
    """The identity of the server ``conn`` is connected to; ``None`` (and a warning) if
    the server refuses to tell (``EXECUTE`` on one of its functions revoked): every
    change is then delivered, rather than none for want of telling own ones apart.

    Raises:
        psycopg.OperationalError: The connection failed.
    """
    try:
        cursor = await conn.execute(SERVER_QUERY)
        row = await cursor.fetchone()
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        unknown_server(exc)
        return None
    assert row is not None
    return server_of(row)


def unknown_server(exc: BaseException) -> None:
    """A listening connection's :data:`SERVER_QUERY` failed with ``exc`` (not the
    connection): warned once; no change counts as its own."""
    _warn_once(
        "pgnotify: cannot tell which server the listener is on (%s): the changes of this "
        "process are not recognised as its own",
        exc,
    )


def _key(wrapper: Any) -> Key | None:
    """The key of ``wrapper``'s session: its PID on its server; ``None`` if unknown.

    The query runs on the raw connection, outside Django's query log and
    instrumentation, and leaves no transaction behind that was not open before.
    """
    raw = wrapper.connection
    try:
        with _lock:
            return _keys[raw]
    except (KeyError, TypeError):
        pass
    pid = _backend_pid(wrapper)
    key: Key | None = None
    if pid:
        try:
            row = _ask(raw)
        except Exception as exc:  # the changes of a session we cannot place are delivered
            _warn_once(
                "pgnotify: cannot tell which server a connection of this process is on (%s): "
                "the changes it makes are not recognised as its own",
                exc,
            )
            return None
        # Through a pooler the PID the client was given is not its server session's,
        # which other clients share: none of it is ours.
        if row is not None and row[0] == pid:
            key = (server_of(row), pid)
    with _lock, contextlib.suppress(TypeError):  # a connection that takes no weak reference
        _keys[raw] = key
    return key


def _ask(raw: Any) -> Any:
    """The row of :data:`SERVER_QUERY` on the raw connection ``raw``, leaving its
    transaction state as it was: outside a transaction without autocommit, the
    query would begin one (rolled back); inside one, it runs in a savepoint, so
    that its failure does not abort the transaction."""
    status = raw.info.transaction_status
    begins = not raw.autocommit and status == psycopg.pq.TransactionStatus.IDLE
    inside = status == psycopg.pq.TransactionStatus.INTRANS
    try:
        with raw.cursor() as cursor:
            if inside:
                cursor.execute("SAVEPOINT pgnotify_server")
            try:
                cursor.execute(SERVER_QUERY)
                row = cursor.fetchone()
            except Exception:
                if inside:
                    cursor.execute("ROLLBACK TO SAVEPOINT pgnotify_server")
                raise
            if inside:
                cursor.execute("RELEASE SAVEPOINT pgnotify_server")
            return row
    finally:
        if begins:
            raw.rollback()


_warned: set[tuple[str, str]] = set()


def _warn_once(message: str, exc: BaseException) -> None:
    """Log ``message`` once per kind of error, not for every connection."""
    kind = type(exc).__name__
    if (message, kind) not in _warned:
        _warned.add((message, kind))
        logger.warning(message, " ".join(str(exc).split()) or kind)


def _remember(sender: Any, connection: Any, **kwargs: Any) -> None:
    """A wrapper opened a session: its PID is ours, its earlier one (if any) no longer."""
    if connection.vendor != "postgresql":
        return
    _watch_close(connection)
    with _lock:
        asked = _asked(connection.connection)
    key = _key(connection)
    with _lock:
        _retire(connection, keep=key)
        _sweep()
        if key is not None:
            # Its callback may run in any thread, even one holding this lock.
            _pids[key] = weakref.ref(connection, functools.partial(_collected, key))
            _closed.pop(key, None)
            # A session recorded again (by another Listener made, or handed out by a pool
            # again) has been ours since it was first: its older durable events are ours.
            if not asked or key not in _opened:
                _opened[key] = time.monotonic()


def _asked(raw: Any) -> bool:
    """Whether the session of ``raw`` was asked who it is already (its key is known, or
    known not to be ours). Holds ``_lock``."""
    try:
        return raw in _keys
    except TypeError:  # a connection that takes no weak reference
        return False


def _collected(key: Key, ref: weakref.ref[Any]) -> None:
    """A wrapper was garbage-collected open, ending its session: one store, no lock."""
    _closed[key] = time.monotonic()


def _watch_close(wrapper: Any) -> None:
    """Have ``wrapper.close()`` retire the PID of the session it ends."""
    if "close" in vars(wrapper):  # watched already, or replaced by someone else
        return
    close = type(wrapper).close
    this = weakref.ref(wrapper)  # not the wrapper itself: no cycle to delay its collection

    @functools.wraps(close)
    def close_and_retire() -> None:
        wrapper = this()
        if wrapper is None:
            return
        try:
            close(wrapper)
        finally:
            if wrapper.connection is None:  # closed, even if close() then raised
                with _lock:
                    _retire(wrapper)

    wrapper.close = close_and_retire


def _retire(wrapper: Any, keep: Key | None = None) -> None:
    """Move the PIDs of ``wrapper`` but ``keep`` from open to closed. Holds ``_lock``."""
    for key, ref in list(_pids.items()):
        if ref() is wrapper and key != keep:
            del _pids[key]
            _closed[key] = time.monotonic()


def _sweep() -> None:
    """Forget collected wrappers and PIDs past their grace. Holds ``_lock``."""
    for key, ref in list(_pids.items()):
        if ref() is None:  # its callback has filed the PID as closed
            del _pids[key]
    expired = time.monotonic() - CLOSED_GRACE
    for key, at in list(_closed.items()):
        if at <= expired:
            _closed.pop(key, None)
    for key in list(_opened):
        if key not in _pids and key not in _closed:
            _opened.pop(key, None)


def track_own_connections() -> None:
    """Start recording the backend PIDs of Django connections opened from now on, in
    any thread, for the rest of the process.

    Connections already open in the calling thread are recorded too, as ours since
    they were first recorded. Those open in other threads are not, until they
    connect again: Django keeps each thread's connections where only that thread
    finds them, and placing a session takes a query on it, which only its thread
    may make. Recording goes on after the listeners stop, so that a listener made
    again later knows the connections opened meanwhile.
    """
    connection_created.connect(_remember, dispatch_uid="django_pgnotify.own_changes")
    for wrapper in connections.all(initialized_only=True):
        if wrapper.connection is not None:
            _remember(None, wrapper)


def is_own_pid(pid: int, server: Server | None) -> bool:
    """Whether ``pid`` on ``server`` is the backend of a Django connection of this process.

    A connection closed less than ``CLOSED_GRACE`` seconds ago still counts:
    its last notifications may still be on their way (a request's connection
    is closed right after its commit). Two dictionary lookups: it runs for
    every notification.

    Args:
        pid: The writing session's backend PID.
        server: The server it wrote on (:func:`read_server`); ``None`` (not
            known) matches nothing.
    """
    if server is None:
        return False
    key = (server, pid)
    ref = _pids.get(key)
    if ref is not None and ref() is not None:
        return True
    closed = _closed.get(key)
    return closed is not None and time.monotonic() - closed < CLOSED_GRACE


def is_own_write(pid: int, written_at: float, server: Server | None) -> bool:
    """Whether a change by backend ``pid`` written at ``written_at`` came from this process.

    As :func:`is_own_pid`, for a change that may be old (a durable event):
    the PID must also have been ours already when the change was written,
    give or take ``OPENED_MARGIN``, since PostgreSQL may have given it to
    another session before.

    Args:
        pid: The writing session's backend PID.
        written_at: When the change was written, as a ``time.monotonic()`` reading
            (an estimate no later than the truth: an error that way only lets an
            own change through).
        server: The server it wrote on, as for :func:`is_own_pid`.
    """
    if server is None or not is_own_pid(pid, server):
        return False
    opened = _opened.get((server, pid))
    return opened is not None and written_at >= opened - OPENED_MARGIN
