"""How django-pgnotify stands in a database: triggers, queue, listeners.

Plain functions behind ``manage.py pgnotify_status``, for deploy checks and
monitoring scripts. Nothing here changes the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from django.db import DatabaseError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from . import durable, installation
from .conf import get_setting
from .connection import connect_timeout, connection_params, describe


@dataclass
class DatabaseStatus:
    """What ``pgnotify_status`` reports for one database alias.

    Attributes:
        alias: The Django database alias.
        where: ``user@host:port/dbname`` (never the password).
        declarations: One dict per declaration or unknown trigger: ``uri``,
            ``model``, ``channel``, ``table``, ``status``, ``detail``.
        queue_usage: ``pg_notification_queue_usage()`` (0 to 1), or ``None``
            when the database could not be reached.
        listeners: Sessions named ``PGNOTIFY["APPLICATION_NAME"]`` on this
            database, from ``pg_stat_activity``.
        durable: For durable declarations: ``pending`` (backlog size),
            ``oldest_pending_age`` (seconds), ``dead`` (dead letters) and
            ``done`` (kept for retention); ``None`` when none is declared.
        problems: What needs action; empty when all is well.
    """

    alias: str
    where: str
    declarations: list[dict[str, Any]] = field(default_factory=list)
    queue_usage: float | None = None
    listeners: list[dict[str, Any]] = field(default_factory=list)
    durable: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _connect_timeout(wrapper: BaseDatabaseWrapper, timeout: float) -> tuple[int | None, str]:
    """The ``connect_timeout`` to connect ``wrapper`` with, and its name for messages.

    ``None`` when the database's ``OPTIONS`` set one, which wins; else, as for the
    listener's connections (``connection.connect_async``), ``PROBE_TIMEOUT`` in
    whole seconds, at least 2.
    """
    options = wrapper.settings_dict.get("OPTIONS") or {}
    if "connect_timeout" in options:
        return None, f'{options["connect_timeout"]}s (OPTIONS["connect_timeout"])'
    seconds = connect_timeout(timeout)
    return seconds, f'{seconds}s (PGNOTIFY["PROBE_TIMEOUT"])'


def _connect_within(wrapper: BaseDatabaseWrapper, timeout: float) -> None:
    """Open ``wrapper``'s connection, giving up after its ``connect_timeout``.

    Django's connection has none by default: a server that accepts and stays
    silent would hold the connect until TCP gives up, hours later.
    """
    configured = wrapper.settings_dict
    seconds, _ = _connect_timeout(wrapper, timeout)
    if seconds is not None:
        # On this thread's wrapper, for this connect only: the settings dict is shared.
        options = {**(configured.get("OPTIONS") or {}), "connect_timeout": seconds}
        wrapper.settings_dict = {**configured, "OPTIONS": options}
    try:
        wrapper.ensure_connection()
    finally:
        wrapper.settings_dict = configured


def _problem(using: str, exc: DatabaseError, timeout: float | None) -> str:
    """The problem a database error makes, in one line, naming the bound that ran out."""
    text = " ".join(str(exc).split())
    bound = None
    if timeout is not None and isinstance(exc.__cause__, psycopg.errors.ConnectionTimeout):
        _, bound = _connect_timeout(connections[using], timeout)
    elif timeout is not None and isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
        bound = f'{timeout:g}s (PGNOTIFY["PROBE_TIMEOUT"])'
    if bound is None:
        return f"cannot reach database {using!r}: {text}"
    return f"database {using!r} did not answer within {bound}: {text}"


_LISTENERS = """
SELECT pid, backend_start, host(client_addr), state
FROM pg_stat_activity
WHERE application_name = %s AND datname = current_database()
ORDER BY backend_start
"""


def database_status(using: str, selectors: Iterable[str] = ()) -> DatabaseStatus:
    """Inspect ``using``: declared triggers, the notification queue, listeners.

    A server that does not answer is a problem in the status, not a wait without
    end: each query is given up after ``PGNOTIFY["PROBE_TIMEOUT"]`` seconds, and
    so is connecting (after at least 2 seconds), unless the database's ``OPTIONS``
    set a ``connect_timeout`` of their own. Called inside a transaction, it
    queries in that transaction as it is, without either bound.
    """
    status = DatabaseStatus(alias=using, where=describe(connection_params(using)))
    wrapper = connections[using]
    own = not wrapper.in_atomic_block  # a caller's transaction is theirs
    timeout = float(get_setting("PROBE_TIMEOUT")) if own else None
    try:
        if timeout is not None and wrapper.connection is None:
            _connect_within(wrapper, timeout)
        # One transaction, with the statement timeout set for it alone: a session setting
        # would outlive it on a server connection a transaction-pooling PgBouncer shares.
        with transaction.atomic(using=using):
            if timeout is not None:
                with wrapper.cursor() as cursor:
                    cursor.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        [f"{max(1, round(timeout * 1000))}ms"],
                    )
            states = installation.inspect_triggers(selectors, using)
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT pg_notification_queue_usage()")
                status.queue_usage = float(cursor.fetchone()[0])
                cursor.execute(_LISTENERS, [get_setting("APPLICATION_NAME")])
                status.listeners = [
                    {
                        "pid": pid,
                        "since": started.isoformat(),
                        "client": client or "local socket",
                        "state": state,
                    }
                    for pid, started, client, state in cursor.fetchall()
                ]
            if any(s.sql is not None and s.sql.declaration.notify.durable for s in states):
                status.durable = asdict(durable.backlog(using))
    except DatabaseError as exc:
        status.problems.append(_problem(using, exc, timeout))
        return status
    finally:
        if own:
            wrapper.close()
    for state in states:
        declaration = state.sql.declaration if state.sql is not None else None
        status.declarations.append(
            {
                "uri": state.uri,
                "model": declaration.model._meta.label if declaration else None,
                "channel": declaration.channel if declaration else None,
                "table": state.table,
                "status": state.status,
                "detail": state.detail,
            }
        )
        if state.status != installation.INSTALLED:
            status.problems.append(f"{state}")
    threshold = float(get_setting("QUEUE_USAGE_WARNING"))
    if status.queue_usage is not None and status.queue_usage > threshold:
        status.problems.append(
            f"the notification queue is {status.queue_usage:.1%} full "
            f"(warning above {threshold:.1%}): a listening session is not reading"
        )
    if status.durable and status.durable["dead"]:
        status.problems.append(
            f"{status.durable['dead']} durable event(s) are dead letters: retry or discard "
            "them in the admin (Durable events, status: dead letter)"
        )
    if any(d["channel"] for d in status.declarations) and not status.listeners:
        status.problems.append(
            f"no listener is connected (no session named {get_setting('APPLICATION_NAME')!r}):"
            " changes are not being delivered"
        )
    return status
