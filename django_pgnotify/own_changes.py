"""Recognising changes made by this process's own Django connections.

A service that both writes and listens may not want to hear about its own
writes. A notification carries the backend PID of the writing session, so the
listener compares it with the PIDs of the connections Django opened in this
process, in any thread. PostgreSQL reuses PIDs, so a PID counts as ours only
while the connection that had it is open, and briefly after it closed.

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

import functools
import threading
import time
import weakref
from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created

_lock = threading.Lock()
#: PID -> the wrapper whose open connection has it.
_pids: dict[int, weakref.ref[Any]] = {}
#: PID -> when its connection closed (``time.monotonic()``).
_closed: dict[int, float] = {}
#: PID -> when it became ours (``time.monotonic()``), while open or closed lately.
_opened: dict[int, float] = {}

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


def _remember(sender: Any, connection: Any, **kwargs: Any) -> None:
    """A wrapper opened a session: its PID is ours, its earlier one (if any) no longer."""
    if connection.vendor != "postgresql":
        return
    _watch_close(connection)
    pid = _backend_pid(connection)
    with _lock:
        _retire(connection, keep=pid)
        _sweep()
        if pid:
            # Its callback may run in any thread, even one holding this lock.
            _pids[pid] = weakref.ref(connection, functools.partial(_collected, pid))
            _closed.pop(pid, None)
            _opened[pid] = time.monotonic()


def _collected(pid: int, ref: weakref.ref[Any]) -> None:
    """A wrapper was garbage-collected open, ending its session: one store, no lock."""
    _closed[pid] = time.monotonic()


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


def _retire(wrapper: Any, keep: int | None = None) -> None:
    """Move the PIDs of ``wrapper`` but ``keep`` from open to closed. Holds ``_lock``."""
    for pid, ref in list(_pids.items()):
        if ref() is wrapper and pid != keep:
            del _pids[pid]
            _closed[pid] = time.monotonic()


def _sweep() -> None:
    """Forget collected wrappers and PIDs past their grace. Holds ``_lock``."""
    for pid, ref in list(_pids.items()):
        if ref() is None:  # its callback has filed the PID as closed
            del _pids[pid]
    expired = time.monotonic() - CLOSED_GRACE
    for pid, at in list(_closed.items()):
        if at <= expired:
            _closed.pop(pid, None)
    for pid in list(_opened):
        if pid not in _pids and pid not in _closed:
            _opened.pop(pid, None)


def track_own_connections() -> None:
    """Start recording the backend PIDs of Django connections opened from now on.

    Connections already open in the calling thread are recorded too.
    """
    connection_created.connect(_remember, dispatch_uid="django_pgnotify.own_changes")
    for wrapper in connections.all(initialized_only=True):
        if wrapper.connection is not None:
            _remember(None, wrapper)


def is_own_pid(pid: int) -> bool:
    """Whether ``pid`` is the backend of a Django connection of this process.

    A connection closed less than ``CLOSED_GRACE`` seconds ago still counts:
    its last notifications may still be on their way (a request's connection
    is closed right after its commit). Two dictionary lookups: it runs for
    every notification.
    """
    ref = _pids.get(pid)
    if ref is not None and ref() is not None:
        return True
    closed = _closed.get(pid)
    return closed is not None and time.monotonic() - closed < CLOSED_GRACE


def is_own_write(pid: int, written_at: float) -> bool:
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
    """
    if not is_own_pid(pid):
        return False
    opened = _opened.get(pid)
    return opened is not None and written_at >= opened - OPENED_MARGIN
