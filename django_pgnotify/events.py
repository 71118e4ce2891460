"""``RowChange``: one committed change of one row, with Python-typed values."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, models


@dataclass(frozen=True)
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
        old: On update, the declared fields' previous values; else ``None``
            (also for a declaration with ``old=False``).
        changed: On update, the attnames of the watched fields (``fields``
            and ``when_changed``) whose values changed; else empty (also
            with ``old=False``).
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
        event_id: For a durable change, its event row's id plus its position
            in the row: unique, and the same on every redelivery, so receivers
            deduplicate by it; else ``None``.
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


#: The fields, in declaration order. The decoder builds one ``RowChange`` per
#: row without ``__init__``: the generated ``__init__`` of a frozen dataclass
#: costs microseconds (defaults, one guarded ``__setattr__`` per field), which at
#: a hundred thousand rows a second is much of the budget. It creates the
#: instance with ``object.__new__`` and stores every field, in this order, into
#: its ``__dict__``: the same, as immutable, instance in a fraction of the time.
#: (The order ``__init__`` stores them in: every instance shares one key table.)
FIELD_ORDER: tuple[str, ...] = tuple(f.name for f in fields(RowChange))
