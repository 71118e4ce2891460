"""``RowChange``: one committed change of one row, with Python-typed values."""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from itertools import repeat
from typing import Any

from django.db import DEFAULT_DB_ALIAS, models


@dataclass(frozen=True, slots=True)
class RowChange:
    """A row that was inserted, updated or deleted, as a receiver sees it.

    Attributes:
        model: The model class whose table changed.
        action: ``"insert"``, ``"update"`` or ``"delete"``.
        pk: The row's primary key, typed as the model's pk field gives it
            (``None`` only when even the pk was too large to send).
        fields: The declared fields' values, keyed by attname (the field
            name, or ``<name>_id`` for a foreign key, whose raw id it holds);
            for a delete, the values the row had. Empty when ``truncated``.
        old: On update, the declared fields' previous values; else ``None``.
        changed: On update, the attnames of the watched fields (``fields``
            and ``when_changed``) whose values changed; else empty.
        channel: The NOTIFY channel it arrived on.
        pid: The PostgreSQL backend PID of the session that made the change.
        truncated: The row was too large for a notification, so only the pk
            was sent; call :meth:`fetch` for the current row.
        xid: The id of the transaction that made the change.
        timestamp: When the trigger ran (UTC).
        using: The database alias the listener listens on.
        context: What the writing transaction said about itself with
            :func:`django_pgnotify.context` (or the ``pgnotify.context``
            setting): e.g. ``{"actor": "user:42", "reason": "refund"}``;
            ``None`` when it said nothing.
        durable: The change comes from a ``durable=True`` declaration: it was
            stored in the event table and is delivered at least once.
        event_id: For a durable change, the id of its event row: the same on
            every redelivery, so receivers deduplicate by it; else ``None``.
    """

    model: type[models.Model]
    action: str
    pk: Any
    fields: dict[str, Any] = field(default_factory=dict)
    old: dict[str, Any] | None = None
    changed: frozenset[str] = frozenset()
    channel: str = ""
    pid: int = 0
    truncated: bool = False
    xid: int | None = None
    timestamp: datetime | None = None
    using: str = DEFAULT_DB_ALIAS
    context: dict[str, Any] | None = None
    durable: bool = False
    event_id: int | None = None

    @property
    def label(self) -> str:
        """The model's ``app_label.model_name``."""
        return self.model._meta.label_lower

    def fetch(self, using: str | None = None) -> models.Model | None:
        """Load the row as it is now, or ``None`` if it no longer exists.

        It reflects the database at call time, which may be later than the change.
        """
        manager = self.model._base_manager.using(using or self.using)
        return manager.filter(pk=self.pk).first()

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> RowChange:
        """An instance from every field's value, in ``VALUE_ORDER``, without ``__init__``.

        The decoder builds one per row: the generated ``__init__`` of a frozen
        dataclass costs microseconds (defaults, one guarded ``__setattr__`` per
        field), which at hundreds of thousands of rows a second is most of the
        budget. The slots' own setters are called instead; the instance is the
        same, and as immutable, as one built by ``__init__``.
        """
        change = object.__new__(cls)
        any(map(_call, _SLOT_SETTERS, repeat(change), values))  # each returns None
        return change


#: The fields in the order ``RowChange._from_values`` takes their values: those
#: that differ from row to row first, then those the rows of one message share.
VALUE_ORDER: tuple[str, ...] = ("model", "action", "pk", "fields", "old", "changed", "truncated")
VALUE_ORDER += ("channel", "pid", "xid", "timestamp", "using", "context", "durable", "event_id")
assert sorted(VALUE_ORDER) == sorted(f.name for f in fields(RowChange))
if sys.version_info >= (3, 11):
    _call = operator.call
else:

    def _call(function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)


# Each field's slot setter (its member descriptor's __set__), in VALUE_ORDER.
_SLOT_SETTERS = tuple(vars(RowChange)[name].__set__ for name in VALUE_ORDER)
