"""How django-pgnotify stands in a database: triggers, queue, listeners.

Plain functions behind ``manage.py pgnotify_status``, for deploy checks and
monitoring scripts. Nothing here changes the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import DatabaseError, connections

from . import durable, installation
from .conf import get_setting
from .connection import connection_params, describe


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


_LISTENERS = """
SELECT pid, backend_start, host(client_addr), state
FROM pg_stat_activity
WHERE application_name = %s AND datname = current_database()
ORDER BY backend_start
"""


def database_status(using: str, selectors: Iterable[str] = ()) -> DatabaseStatus:
    """Inspect ``using``: declared triggers, the notification queue, listeners."""
    status = DatabaseStatus(alias=using, where=describe(connection_params(using)))
    try:
        states = installation.inspect_triggers(selectors, using)
        with connections[using].cursor() as cursor:
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
        status.problems.append(f"cannot reach the database: {' '.join(str(exc).split())}")
        return status
    finally:
        if not connections[using].in_atomic_block:  # a caller's transaction is theirs
            connections[using].close()
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
