"""The listener's own connection, built from a Django database alias.

LISTEN is session state: it needs one dedicated, long-lived connection in
autocommit mode (a listener only receives between its transactions), never
Django's ORM connection or a pooled one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import psycopg
from django.db import connections

# Keys Django adds for its own cursors, not libpq connection parameters.
_DJANGO_ONLY = ("cursor_factory", "context", "prepare_threshold")

#: psycopg's own options (not libpq parameters) for each of the listener's connections.
#: No server-side prepared statements: psycopg prepares a statement once run 5 times,
#: and a prepared statement is session state that a transaction-pooling PgBouncer does
#: not keep ("prepared statement "_pg3_0" already exists"), which the durable connection
#: may go through. The listening connection runs a few statements now and then and
#: gains nothing from them. Django's own connections prepare none either by default.
PSYCOPG_OPTIONS: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}

T = TypeVar("T")


class NotPostgreSQL(Exception):
    """The alias points at a database django-pgnotify cannot work with."""


class Stopped(Exception):
    """The stop event was set before the work awaited finished."""


def connection_params(using: str) -> dict[str, Any]:
    """libpq connection parameters of the Django database ``using``."""
    wrapper = connections[using]
    if wrapper.vendor != "postgresql":
        raise NotPostgreSQL(
            f"database {using!r} uses {wrapper.settings_dict['ENGINE']}; "
            "django-pgnotify needs PostgreSQL (django.db.backends.postgresql)."
        )
    params = wrapper.get_connection_params()
    for key in _DJANGO_ONLY:
        params.pop(key, None)
    return params


def describe(params: dict[str, Any]) -> str:
    """Where a connection goes, for messages (never the password)."""
    host = params.get("host") or "local socket"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{params.get('user') or 'default user'}@{host}{port}/{params.get('dbname', '')}"


# libpq TCP keepalives, so that a silently dropped network path is noticed by the
# kernel too; OPTIONS in DATABASES win over these.
TCP_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def listen_alias(using: str) -> str:
    """The alias whose settings the listener connects with to serve ``using``.

    ``PGNOTIFY["LISTEN_DATABASES"]`` may map an alias to another one, e.g. a
    direct connection that bypasses a transaction-pooling PgBouncer.
    """
    from .conf import get_setting

    return get_setting("LISTEN_DATABASES").get(using, using)


def listen_params(using: str, application_name: str) -> dict[str, Any]:
    """Connection parameters of the listener that serves ``using``."""
    params = {**TCP_KEEPALIVES, **connection_params(listen_alias(using))}
    # The listener's own name wins over one set in OPTIONS, so it can be told apart.
    params["application_name"] = application_name
    # It reads notifications as bytes, which the server sends in the client encoding.
    params["client_encoding"] = "UTF8"
    return params


def connect(using: str, application_name: str) -> psycopg.Connection:
    """Open a dedicated autocommit connection for LISTEN."""
    return psycopg.connect(**listen_params(using, application_name), **PSYCOPG_OPTIONS)


def connect_timeout(timeout: float) -> int:
    """libpq's ``connect_timeout`` for giving up after about ``timeout`` seconds:
    whole seconds, at least 2 (libpq reads 0 as no limit at all, and 1 as 2)."""
    return max(2, int(timeout))


async def connect_async(
    using: str, application_name: str, timeout: float | None = None
) -> psycopg.AsyncConnection:
    """Open a dedicated autocommit asyncio connection for LISTEN."""
    params = listen_params(using, application_name)
    if timeout is not None:
        params.setdefault("connect_timeout", connect_timeout(timeout))
    return await psycopg.AsyncConnection.connect(**params, **PSYCOPG_OPTIONS)


async def within(conn: psycopg.AsyncConnection, work: Awaitable[T], timeout: float) -> T:
    """The result of ``work``, queries on ``conn``, or the connection given up.

    No answer within ``timeout`` seconds is taken for a dead connection: TCP
    keepalives take a minute to tell, and a listener cannot stop while it waits.
    The connection is closed before ``work`` is cancelled: cancelling a running
    psycopg query first sends a cancel request and waits seconds for an answer
    that a dead connection never gives.

    Raises:
        TimeoutError: No answer in time; ``conn`` is closed.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            conn.pgconn.finish()  # every later call on it raises, whoever makes it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not done:
        raise TimeoutError(f"no answer to a query within {timeout:g}s")
    return task.result()


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again while it runs on.

    Before Python 3.12, ``asyncio.wait_for()`` drops a cancellation that arrives
    as the work it waits for ends (it returns or raises that work's outcome
    instead), and a task in a retry loop would then go on for good.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_AGAIN)
    await asyncio.gather(task, return_exceptions=True)  # its error, if any, is seen


_CANCEL_AGAIN = 0.05


async def until_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T:
    """The result of ``work``, or ``work`` cancelled as soon as ``stop`` is set.

    For waits with no answer in sight, such as a connect to a server that accepts
    and stays silent until ``connect_timeout``: a stop must not wait that out.

    Raises:
        Stopped: ``stop`` was set first; ``work`` is cancelled.
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            await cancel_and_wait(task)
    if task.cancelled():
        raise Stopped
    return task.result()
