"""Recognising changes made by this process's own Django connections.

A service that both writes and listens may not want to hear about its own
writes. A notification carries the backend PID of the writing session, so the
listener compares it with the PIDs of the connections Django opened in this
process, in any thread. PostgreSQL reuses PIDs, so a PID counts as ours only
while the connection that had it is open, and briefly after.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created

_lock = threading.Lock()
_pids: dict[int, weakref.ref[Any]] = {}
_closed: dict[int, float] = {}  # PID -> when its connection was first seen closed

#: Seconds a PID still counts as ours after its connection was seen closed.
CLOSED_GRACE = 10.0


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
    if connection.vendor != "postgresql":
        return
    pid = _backend_pid(connection)
    if pid:
        with _lock:
            _pids[pid] = weakref.ref(connection)


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
    is closed right after its commit).
    """
    ref = _pids.get(pid)
    if ref is None:
        closed = _closed.get(pid)
        return closed is not None and time.monotonic() - closed < CLOSED_GRACE
    wrapper = ref()
    if wrapper is not None and _backend_pid(wrapper) == pid:
        return True
    now = time.monotonic()
    with _lock:  # closed, or the wrapper reconnected: soon the PID may be anyone's
        if _pids.get(pid) is ref:
            del _pids[pid]
        for old in [p for p, at in _closed.items() if now - at >= CLOSED_GRACE]:
            del _closed[old]
        _closed[pid] = now
    return True
