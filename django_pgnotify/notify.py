"""The ``Notify`` declaration: what one model announces, and how."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: The row events a declaration can announce, in the order they are documented.
EVENTS: tuple[str, ...] = ("insert", "update", "delete")

#: ``fields="__all__"`` sends every concrete column of the model's table.
ALL_FIELDS = "__all__"

#: Trigger levels (``Notify(level=...)``): one trigger call per statement, or per row.
STATEMENT, ROW = "statement", "row"
LEVELS: tuple[str, ...] = (STATEMENT, ROW)


class Notify:
    """Declare that a model's row changes are announced with ``NOTIFY``.

    Used as ``class Meta: pgnotify = Notify(...)`` (or a list of them), or in
    ``settings.PGNOTIFY["MODELS"]`` for models you cannot edit. The values are
    kept as given and validated by the system checks, so that a mistake is
    reported with the model it belongs to instead of crashing the import.

    Args:
        events: Any of ``"insert"``, ``"update"``, ``"delete"``; all three by default.
        fields: Model field names whose values travel in the payload besides
            the primary key, or ``"__all__"``; none by default.
        when_changed: An update is announced only when one of these fields
            changed (``IS DISTINCT FROM``). Without it, an update is announced
            when any column changed; an update that changes nothing never is
            (but with ``old=False``, see below).
        channel: The ``NOTIFY`` channel (a PostgreSQL identifier of at most 63
            bytes). Defaults to ``pgnotify_<app_label>_<model_name>``.
        durable: Store each change in the event table in the writing
            transaction, for at-least-once delivery to one listener (see
            docs/durable.md), instead of a plain notification.
        max_attempts: For a durable declaration, how many times an event is
            dispatched to receivers that raise before it becomes a dead letter;
            ``PGNOTIFY["DURABLE_MAX_ATTEMPTS"]`` by default.
        name: Names the declaration in trigger names and in the URI
            ``app_label.Model:name``; needed only when a model has several.
        level: ``"statement"`` (the default): one trigger call per statement,
            which reads the statement's rows from its transition tables, so a
            bulk write costs little more than one row. ``"row"``: one trigger
            call and one notification per row, with no transition tables and
            no query, which halves what the trigger adds to a single-row write
            but makes a bulk write two to three times as slow as without a
            trigger (see docs/performance.md). Live declarations only; the
            events received are the same but for the cases in
            docs/declaring.md.
        old: ``False`` sends an update's new values alone: its old values and
            changed fields are left out, and the update trigger reads no old
            rows, so a bulk update costs about as little as a bulk insert.
            Every row an ``UPDATE`` writes is then announced, even one it left
            as it was, and ``when_changed`` cannot be used.
    """

    __slots__ = (
        "channel",
        "durable",
        "events",
        "fields",
        "level",
        "max_attempts",
        "name",
        "old",
        "when_changed",
    )

    def __init__(
        self,
        *,
        events: Iterable[str] = EVENTS,
        fields: Iterable[str] | str = (),
        when_changed: Iterable[str] = (),
        channel: str | None = None,
        durable: bool = False,
        max_attempts: int | None = None,
        name: str | None = None,
        level: str = STATEMENT,
        old: bool = True,
    ) -> None:
        self.events = _as_tuple(events)
        self.fields = fields if fields == ALL_FIELDS else _as_tuple(fields)
        self.when_changed = _as_tuple(when_changed)
        self.channel = channel
        self.durable = durable
        self.max_attempts = max_attempts
        self.name = name
        self.level = level
        self.old = old

    def __repr__(self) -> str:
        parts = [f"{slot}={getattr(self, slot)!r}" for slot in self.__slots__]
        return f"Notify({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Notify):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, s)) for s in self.__slots__))

    def deconstruct(self) -> tuple[str, tuple[()], dict[str, Any]]:
        """Let migrations and ``repr`` serialise the declaration."""
        return ("django_pgnotify.Notify", (), {s: getattr(self, s) for s in self.__slots__})


def _as_tuple(value: Any) -> Any:
    # A bare string would otherwise be read as a sequence of one-letter names;
    # keep it as given so the checks can name the mistake.
    if isinstance(value, str) or not isinstance(value, Iterable):
        return value
    return tuple(value)
