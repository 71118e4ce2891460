"""How django-pgnotify stands in a database: triggers, queue, listeners.

Plain functions behind ``manage.py pgnotify_status``, for deploy checks and
monitoring scripts. Nothing here changes the database.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from decimal import Context, Decimal
from typing import Any, TypeVar

import psycopg
from django.db import DatabaseError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg import sql

from . import durable, installation, wire
from .conf import get_setting
from .connection import connect_timeout, connection_params, describe

#: What to do about pending durable events that no declaration claims, for messages.
UNCLAIMED_ADVICE = (
    "give a renamed declaration's events its new URI (one UPDATE), declare the old one "
    "again (each new change is then stored twice), or discard them in the admin; see "
    "docs/durable.md#pending-events-no-declaration-claims"
)
#: What to do with them when the declaration was made live: its URI is the same.
MADE_LIVE_ADVICE = (
    "set durable=True again (then pgnotify_install) until a listener has handled them, or "
    "discard them in the admin; see docs/durable.md#pending-events-no-declaration-claims"
)


def _percent(fraction: float, decimals: int) -> str:
    """``fraction`` in percent, from its exact value: ``fraction * 100`` in floats rounds
    two neighbours (0.7 and the next float up) to one, which no decimal tells apart."""
    if not math.isfinite(fraction):
        return f"{fraction * 100:.{decimals}f}"
    return f"{Decimal(fraction).scaleb(2, _EXACT):.{decimals}f}"


# Precision for every digit of a float's exact decimal value (767 at most).
_EXACT = Context(prec=800)


def _decimals(fraction: float, decimals: int) -> int:
    """At least ``decimals``, and enough for two significant digits of a small one."""
    if fraction <= 0 or not math.isfinite(fraction):
        return decimals
    return max(decimals, 1 - math.floor(math.log10(fraction * 100)))


def queue_usage_percents(usage: float, threshold: float, decimals: int = 1) -> tuple[str, str]:
    """``usage`` and ``threshold`` as percentages (``"0.000095%"``, ``"0.0%"``), for messages.

    Small usages get two significant digits, and a usage above the threshold as many
    decimals as it takes to print above it: rounded alike, 9.5e-07 over 0.0 would read
    "0.0% full (warning above 0.0%)".
    """
    places = _decimals(usage, decimals)
    # Two different floats differ within their exact decimal expansions: this ends.
    while usage > threshold and _percent(usage, places) == _percent(threshold, places):
        places += 1
    shown = _percent(threshold, places)
    if "." in shown:  # no more decimals than the usage needed, and no fewer than asked
        whole, fraction = shown.split(".")
        fraction = fraction.rstrip("0").ljust(decimals, "0")
        shown = f"{whole}.{fraction}" if fraction else whole
    return f"{_percent(usage, places)}%", f"{shown}%"


def unclaimed_warning(uri: str, changes: int, live: bool = False) -> str:
    """The warning for ``changes`` pending durable changes of ``uri`` no durable
    declaration has; ``live`` when ``uri`` is a live declaration's now (made live)."""
    if live:
        return (
            f"{uri}, made live, leaves {changes} pending durable change(s) that no listener "
            f"claims: {MADE_LIVE_ADVICE}"
        )
    return (
        f"{uri} leaves {changes} pending durable change(s) that no listener claims: "
        + UNCLAIMED_ADVICE
    )


@dataclass
class DatabaseStatus:
    """What ``pgnotify_status`` reports for one database alias.

    Attributes:
        alias: The Django database alias.
        where: ``user@host:port/dbname`` (never the password).
        declarations: One dict per declaration or unknown trigger: ``uri``,
            ``model``, ``channel`` (``None`` for a durable declaration, which sends
            on none, and for an unknown trigger), ``durable`` (``None`` for an
            unknown trigger), ``table``, ``status``, ``detail``.
        queue_usage: ``pg_notification_queue_usage()`` (0 to 1), or ``None``
            when the database could not be reached or the query failed.
        listeners: Sessions named ``PGNOTIFY["APPLICATION_NAME"]`` on this
            database, from ``pg_stat_activity``: ``pid``, ``since``, ``client``,
            ``state``. ``since`` and ``state`` are ``None`` (and ``client`` says
            so) for a session of another role when this one lacks
            ``pg_read_all_stats``.
        durable: For durable declarations: ``pending`` (backlog size),
            ``oldest_pending_age`` (seconds), ``dead`` (dead letters) and
            ``done`` (kept for retention); ``None`` when none is declared, or
            the backlog could not be counted (no event table, say).
        undeclared_events: Pending changes in the event table per declaration URI
            that no durable declaration routed to this database has (a model
            removed, a declaration renamed or no longer durable): no listener
            claims them. Empty when there are none, no event table, or the
            role may not read it.
        problems: What needs action; empty when all is well.
    """

    alias: str
    where: str
    declarations: list[dict[str, Any]] = field(default_factory=list)
    queue_usage: float | None = None
    listeners: list[dict[str, Any]] = field(default_factory=list)
    durable: dict[str, Any] | None = None
    undeclared_events: dict[str, int] = field(default_factory=dict)
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


def connect_within(wrapper: BaseDatabaseWrapper, timeout: float) -> None:
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


def exhausted_bound(using: str, exc: DatabaseError, timeout: float | None) -> str | None:
    """The bound that ran out, if ``exc`` is one of ours giving up, for messages."""
    if timeout is not None and isinstance(exc.__cause__, psycopg.errors.ConnectionTimeout):
        return _connect_timeout(connections[using], timeout)[1]
    if timeout is not None and isinstance(exc.__cause__, psycopg.errors.QueryCanceled):
        return f'{timeout:g}s (PGNOTIFY["PROBE_TIMEOUT"])'
    return None


def _connected(wrapper: BaseDatabaseWrapper) -> bool:
    """Whether ``wrapper`` still has a working connection (after an error, say)."""
    conn = wrapper.connection
    return conn is not None and not conn.closed and not conn.broken


def _ends_report(using: str, exc: DatabaseError, timeout: float | None) -> bool:
    """Whether nothing more can be asked: the connection is lost, or the server did not
    answer within the bound (asking on would wait as long again)."""
    return not _connected(connections[using]) or exhausted_bound(using, exc, timeout) is not None


def _problem(using: str, exc: DatabaseError, timeout: float | None, what: str = "") -> str:
    """The problem a database error makes, in one line: the bound that ran out, a
    database that cannot be reached, or else the error itself and ``what`` it failed."""
    text = " ".join(str(exc).split())
    bound = exhausted_bound(using, exc, timeout)
    if bound is not None:
        return f"database {using!r} did not answer within {bound}: {text}"
    if not _connected(connections[using]):
        return f"cannot reach database {using!r}: {text}"
    return f"{what or 'a query'} in database {using!r} failed: {text}"


_T = TypeVar("_T")


def _read(
    what: str, using: str, timeout: float | None, problems: list[str], read: Callable[[], _T]
) -> _T | None:
    """``read()`` in a savepoint, so that an error of its own (a missing relation, a
    permission) is a problem naming ``what`` and the rest of the report still comes.

    Returns ``None`` after such an error; re-raises one that ends the report.
    """
    try:
        with transaction.atomic(using=using):
            return read()
    except DatabaseError as exc:
        if _ends_report(using, exc, timeout):
            raise
        problems.append(_problem(using, exc, timeout, what))
        return None


# A role that is not the listener's, without pg_read_all_stats, sees another role's
# session with its pid, database and application_name, and NULL for the rest.
_LISTENERS = """
SELECT pid, backend_start, host(client_addr), client_port, state
FROM pg_stat_activity
WHERE application_name = %s AND datname = current_database()
ORDER BY backend_start NULLS LAST, pid
"""

#: ``client`` of a listener whose session's details the role may not see.
HIDDEN = "details hidden from this role (it needs pg_read_all_stats to see them)"


def _activity(wrapper: BaseDatabaseWrapper) -> tuple[float, list[dict[str, Any]]]:
    """The notification queue's usage, and the listeners connected to the database."""
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_notification_queue_usage()")
        usage = float(cursor.fetchone()[0])
        cursor.execute(_LISTENERS, [get_setting("APPLICATION_NAME")])
        listeners = [
            {
                "pid": pid,
                "since": started.isoformat() if started is not None else None,
                "client": client
                or ("local socket" if port == -1 else HIDDEN if started is None else "unknown"),
                "state": state,
            }
            for pid, started, client, port, state in cursor.fetchall()
        ]
    return usage, listeners


# Pending changes by declaration, of the declarations not in %s: listeners claim only
# those of their own declarations (durable._CLAIMABLE).
_UNDECLARED = sql.SQL(
    "SELECT declaration, sum(size - coalesce(cardinality(handled), 0))::bigint FROM {}"
    " WHERE status = 'pending' AND declaration <> ALL(%s::text[])"
    " GROUP BY declaration ORDER BY declaration"
).format(sql.Identifier(wire.EVENT_TABLE))


def _undeclared_events(wrapper: BaseDatabaseWrapper, uris: list[str]) -> dict[str, int]:
    """Pending changes per declaration URI not in ``uris``.

    None without an event table on the search path, the right to read it, or the
    columns of the latest migrations: the durable declarations' state and backlog say
    so, if there are any; a project without them, or a monitoring role that may not
    read the table, is not at fault.
    """
    if not _event_table_readable(wrapper):
        return {}
    with wrapper.cursor() as cursor:
        if installation.missing_event_columns(cursor):
            return {}
        cursor.execute(_UNDECLARED.as_string(None), [uris])
        return {uri: int(count) for uri, count in cursor.fetchall()}


def _event_table_readable(wrapper: BaseDatabaseWrapper) -> bool | None:
    """Whether this role may read the event table; ``None`` when the search path finds
    none, as the triggers and claims name it."""
    with wrapper.cursor() as cursor:
        cursor.execute(
            "SELECT has_table_privilege(t, 'SELECT') FROM to_regclass(%s) AS t WHERE t IS NOT NULL",
            [sql.Identifier(wire.EVENT_TABLE).as_string(None)],
        )
        found = cursor.fetchone()
    return None if found is None else bool(found[0])


def _per_uri(changes: dict[str, int]) -> str:
    return ", ".join(f"{uri} ({count})" for uri, count in changes.items())


def unclaimed_events(using: str, uris: Iterable[str]) -> dict[str, int]:
    """Pending durable changes per URI of ``uris`` that no durable declaration routed to
    ``using`` has: no listener claims them (the triggers of a renamed or removed durable
    declaration just dropped, say). Empty without an event table or the right to read it.
    """
    served = installation.declared_uris(using, durable=True)
    wanted = sorted(set(uris) - set(served))
    if not wanted:
        return {}
    wrapper = connections[using]
    with transaction.atomic(using=using):  # a caller's transaction survives an error
        everything = _undeclared_events(wrapper, served)
    return {uri: count for uri, count in everything.items() if uri in wanted}


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
    states: list[installation.TriggerState] = []
    activity: tuple[float, list[dict[str, Any]]] | None = None
    try:
        if timeout is not None and wrapper.connection is None:
            connect_within(wrapper, timeout)
        # One transaction, with the statement timeout set for it alone: a session setting
        # would outlive it on a server connection a transaction-pooling PgBouncer shares.
        with transaction.atomic(using=using):
            if timeout is not None:
                with wrapper.cursor() as cursor:
                    cursor.execute(
                        "SELECT set_config('statement_timeout', %s, true)",
                        [f"{max(1, round(timeout * 1000))}ms"],
                    )
            inspected = _read(
                "inspecting the triggers",
                using,
                timeout,
                status.problems,
                lambda: installation.inspect_triggers(selectors, using),
            )
            states = inspected or []
            activity = _read(
                "reading the notification queue and listeners",
                using,
                timeout,
                status.problems,
                lambda: _activity(wrapper),
            )
            durables = [s for s in states if s.sql and s.sql.declaration.notify.durable]
            # Without its event table, a durable declaration's state says so already (or,
            # when its own table is missing too, that it needs migrate).
            if durables and all(s.status != installation.NO_EVENT_TABLE for s in durables):
                backlog = _read(
                    "counting the durable backlog",
                    using,
                    timeout,
                    status.problems,
                    lambda: (
                        None if _event_table_readable(wrapper) is None else durable.backlog(using)
                    ),
                )
                if backlog is not None:
                    status.durable = asdict(backlog)
            # Of the whole table, as the backlog: whatever the selectors, these wait for ever.
            served = installation.declared_uris(using, durable=True)
            undeclared = _read(
                "looking for durable events no declaration claims",
                using,
                timeout,
                status.problems,
                lambda: _undeclared_events(wrapper, served),
            )
            status.undeclared_events = undeclared or {}
    except DatabaseError as exc:
        status.problems.append(_problem(using, exc, timeout))
    finally:
        if own:
            wrapper.close()
    if activity is not None:
        status.queue_usage, status.listeners = activity
    for state in states:
        declaration = state.sql.declaration if state.sql is not None else None
        status.declarations.append(
            {
                "uri": state.uri,
                "model": declaration.model._meta.label if declaration else None,
                # A durable declaration stores its changes in the event table and
                # sends on no channel of its own.
                "channel": declaration.channel
                if declaration and not declaration.notify.durable
                else None,
                "durable": declaration.notify.durable if declaration else None,
                "table": state.table,
                "status": state.status,
                "detail": state.detail,
            }
        )
        if state.status != installation.INSTALLED:
            status.problems.append(f"{state}")
    threshold = float(get_setting("QUEUE_USAGE_WARNING"))
    if status.queue_usage is not None and status.queue_usage > threshold:
        usage, above = queue_usage_percents(status.queue_usage, threshold)
        status.problems.append(
            f"the notification queue is {usage} full (warning above {above}): a listening "
            "session is not reading"
        )
    if status.durable and status.durable["dead"]:
        status.problems.append(
            f"{status.durable['dead']} durable event(s) are dead letters: retry or discard "
            "them in the admin (Durable events, status: dead letter)"
        )
    live = (
        set(installation.declared_uris(using, durable=False)) if status.undeclared_events else set()
    )
    removed = {u: n for u, n in status.undeclared_events.items() if u not in live}
    made_live = {u: n for u, n in status.undeclared_events.items() if u in live}
    if removed:
        status.problems.append(
            f"{sum(removed.values())} pending durable change(s) of declarations that database "
            f"{using!r} no longer has (a model removed, a declaration renamed or moved), "
            f"which no listener claims: {_per_uri(removed)}; {UNCLAIMED_ADVICE}"
        )
    if made_live:
        status.problems.append(
            f"{sum(made_live.values())} pending durable change(s) of declarations made live "
            f"(durable=False), which no listener claims: {_per_uri(made_live)}; "
            f"{MADE_LIVE_ADVICE}"
        )
    if (
        activity is not None
        and any(d["model"] for d in status.declarations)
        and not status.listeners
    ):
        status.problems.append(
            f"no listener is connected (no session named {get_setting('APPLICATION_NAME')!r}):"
            " changes are not being delivered"
        )
    return status
