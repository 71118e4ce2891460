"""Transaction-local PostgreSQL settings for the writes of a block of code.

``paused()`` and ``context()`` must reach the triggers of every write in
their block, and of no other transaction, without changing how the block's
transactions are made. So they add an execute wrapper to the Django
connection that, before the first statement of each transaction (and again
when the values change within it), runs ``set_config(name, value, true)``:
PostgreSQL forgets such a value when the transaction ends, so it never leaks
into the next transaction on a pooled connection. A statement that can change
rows in autocommit mode runs in a short transaction of its own with the
values set, except a ``CALL`` or ``DO``, which may commit: it runs as it is,
not covered. Raw SQL through Django's cursors carries them too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.core.exceptions import SynchronousOnlyOperation
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, transaction

from . import wire

logger = logging.getLogger("django_pgnotify.transaction_settings")

# Statements that can fire row triggers when run in autocommit mode. Reads are
# left alone there, so that a block that mostly reads pays nothing.
_MAY_WRITE = re.compile(
    r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*(?:INSERT|UPDATE|DELETE|MERGE|COPY|WITH|CALL|DO)\b",
    re.IGNORECASE | re.DOTALL,
)
# Procedures and DO blocks may commit, which PostgreSQL refuses in a transaction block.
_MAY_COMMIT = re.compile(
    r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*(?:CALL|DO)\b", re.IGNORECASE | re.DOTALL
)
_ROLLBACK = re.compile(r"\s*ROLLBACK\b", re.IGNORECASE)

_SET = "SELECT set_config(%s, %s, true), set_config(%s, %s, true)"

#: Kinds of frame: pausing (a set of model labels, empty for all) and context.
PAUSED = "paused"
CONTEXT = "context"


_SURROGATE = re.compile("[\ud800-\udfff]")


def context_text(values: dict[str, Any]) -> str:
    """``values`` as compact JSON text, each lone surrogate replaced by U+FFFD.

    A lone surrogate (``"\\udc80"``, as ``os.fsdecode`` makes from bytes that are
    not UTF-8) is not Unicode text: UTF-8 cannot carry it to PostgreSQL, and the
    escape ``json.dumps`` would write for it reaches clients that cannot read it.

    Raises:
        TypeError: A value JSON cannot represent.
    """
    text = json.dumps(values, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    return text


def encode_context(values: dict[str, Any]) -> str:
    """The JSON text stored in ``pgnotify.context`` for ``values`` (see ``context_text``).

    Raises:
        TypeError: A value JSON cannot represent.
        ValueError: The JSON text is over ``wire.CONTEXT_LIMIT`` bytes.
    """
    text = context_text(values)
    if len(text.encode()) > wire.CONTEXT_LIMIT:
        raise ValueError(
            f"pgnotify context is {len(text.encode())} bytes as JSON; the limit is "
            f"{wire.CONTEXT_LIMIT}. Keep it to a few short identifiers (who, why, request id)."
        )
    return text


class LazyContext:
    """Context values computed on first use, once (e.g. the request's user), and
    again whenever ``key()`` (cheap, called on each use) gives another value.

    A query the computation makes itself runs without the context.
    """

    def __init__(
        self, compute: Callable[[], dict[str, Any]], key: Callable[[], Any] | None = None
    ) -> None:
        self._compute = compute
        self._key = key
        self._keyed: Any = None
        self._value: dict[str, Any] | None = None
        self._computing = False

    def get(self) -> dict[str, Any]:
        if self._key is not None and not self._computing:
            keyed = self._key()
            if keyed != self._keyed:
                self._keyed, self._value = keyed, None
        if self._value is None:
            if self._computing:
                return {}
            self._computing = True
            try:
                self._value = self._compute()
            finally:
                self._computing = False
        return self._value

    def computed(self) -> dict[str, Any]:
        """The values computed so far, without computing them."""
        return self._value or {}


def enclosing_context(using: str) -> dict[str, Any]:
    """The context the blocks open on ``using`` give now, merged as a write would
    carry it; a lazy one counts only once it has been computed."""
    merged: dict[str, Any] = {}
    for wrapper in connections[using].execute_wrappers:
        if isinstance(wrapper, _SettingsWrapper):
            for own in wrapper.contexts(compute=False):
                merged.update(own)
    return merged


class _SettingsWrapper:
    """The execute wrapper of one connection; one per connection at most."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, Any]] = []
        self.applied: tuple[str, str] | None = None  # values set in the open transaction
        # Whether values were set in the open transaction: unlike ``applied``, a
        # savepoint rollback does not clear it, as values set before the savepoint
        # survive it. The block's exit resets them then.
        self.set_in_transaction = False
        self._busy = False
        self._warned = False

    def contexts(self, *, compute: bool = True) -> list[dict[str, Any]]:
        """The values of each ``context()`` frame, outermost first; a lazy one's
        computed now, or with ``compute=False`` as far as it has been (maybe none)."""
        return [
            (value.get() if compute else value.computed())
            if isinstance(value, LazyContext)
            else value
            for kind, value in self.frames
            if kind == CONTEXT
        ]

    def values(self) -> tuple[str, str]:
        """``(pgnotify.paused, pgnotify.context)`` as the frames say now."""
        labels: set[str] = set()
        paused_all = False
        for kind, value in self.frames:
            if kind == PAUSED:
                paused_all = paused_all or not value
                labels.update(value)
        contexts = self.contexts()
        merged: dict[str, Any] = {}
        for own in contexts:
            merged.update(own)
        innermost = context_text(contexts[-1]) if contexts else ""
        paused = wire.PAUSED_ALL if paused_all else ",".join(sorted(labels))
        if not merged:
            return paused, ""
        try:
            return paused, encode_context(merged)
        except ValueError:
            if not self._warned:
                self._warned = True
                logger.warning("pgnotify: nested context too large; sending the innermost only")
            return paused, innermost

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict
    ) -> Any:
        if self._busy or not self.frames:
            return execute(sql, params, many, context)
        connection = context["connection"]
        autocommit = connection.get_autocommit()
        if autocommit and not _MAY_WRITE.match(sql):
            return execute(sql, params, many, context)  # a read: it makes no event
        if autocommit and _MAY_COMMIT.match(sql):
            # It may commit, which PostgreSQL refuses in a transaction block, and a
            # value set for the session would reach other clients through a pooler
            # in transaction mode: it runs as it is, not covered.
            return execute(sql, params, many, context)
        self._busy = True  # computing values may query (a lazy user)
        try:
            values = self.values()
        finally:
            self._busy = False
        if autocommit:
            with transaction.atomic(using=connection.alias):
                _apply(connection, values)
                result = execute(sql, params, many, context)
            self.applied, self.set_in_transaction = None, False
            return result
        if not transaction_open(connection):
            self.applied = None  # this statement starts a new transaction
            self.set_in_transaction = False
        # In a failed transaction nothing runs but a rollback (to a savepoint,
        # which may undo the values: they are applied again after it).
        if values != self.applied and not _transaction_failed(connection):
            _apply(connection, values)
            self.applied = values
            self.set_in_transaction = True
        try:
            return execute(sql, params, many, context)
        finally:
            if _ROLLBACK.match(sql):
                self.applied = None  # a savepoint rollback may have undone them


def _apply(connection: Any, values: tuple[str, str]) -> None:
    # A plain cursor of the driver's connection: no execute wrappers, no recursion,
    # and not the statement's own cursor, which may be a server-side one
    # (``QuerySet.iterator()``): there ``set_config()`` would only be declared as
    # a cursor, never run, and the statement's own declaration would replace it.
    # Its errors are Django's, as the statement's own would be.
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(_SET, [wire.PAUSED_SETTING, values[0], wire.CONTEXT_SETTING, values[1]])


def transaction_open(connection: Any) -> bool:
    """Whether the connection is inside a transaction block, as the server says."""
    raw = connection.connection
    if raw is None:
        return False
    info = getattr(raw, "info", None)  # psycopg 3
    if info is not None:
        return info.transaction_status.name != "IDLE"
    status = getattr(raw, "get_transaction_status", None)  # psycopg2
    return bool(status()) if status is not None else True


def _transaction_failed(connection: Any) -> bool:
    raw = connection.connection
    info = getattr(raw, "info", None)
    return info is not None and info.transaction_status.name == "INERROR"


def _transaction_usable(connection: Any) -> bool:
    raw = connection.connection
    info = getattr(raw, "info", None)
    return info is not None and info.transaction_status.name == "INTRANS"


def _refuse_in_event_loop(kind: str) -> None:
    # Django's connections belong to a thread. In async code the ORM's queries
    # (``acreate()``, ``sync_to_async``) run in another thread, on another
    # connection: a block entered here would cover none of them, silently.
    if os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE"):
        return  # the sync ORM runs in this thread (a notebook, say)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    name = "paused()" if kind == PAUSED else "context()"
    raise SynchronousOnlyOperation(
        f"{name} was entered in async code, where it would cover none of the writes: "
        "the ORM's queries run in another thread, on that thread's connection. Enter it "
        f"in a sync function that makes the writes, and run that with sync_to_async()."
    )


@contextmanager
def setting_frame(using: str, kind: str, value: Any) -> Iterator[None]:
    """Add ``value`` to the settings of every transaction on ``using`` for the block.

    Raises:
        SynchronousOnlyOperation: Entered in a thread that runs an event loop.
    """
    _refuse_in_event_loop(kind)
    connection = connections[using]
    wrapper = next(
        (w for w in connection.execute_wrappers if isinstance(w, _SettingsWrapper)), None
    )
    outermost = wrapper is None
    if wrapper is None:
        wrapper = _SettingsWrapper()
        connection.execute_wrappers.append(wrapper)
    wrapper.frames.append((kind, value))
    try:
        yield
    finally:
        wrapper.frames.pop()
        if outermost:
            connection.execute_wrappers.remove(wrapper)
            # The transaction may go on after the block: it must not keep the
            # values. An aborted one is rolled back, and the values with it.
            if wrapper.set_in_transaction and _transaction_usable(connection):
                _apply(connection, ("", ""))
