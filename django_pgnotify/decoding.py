"""The decoder: a notification's payload in, ``RowChange`` objects out.

Values arrive as PostgreSQL renders them in JSON; each model field gets a
converter, chosen once per model, that turns them into the Python type the
field gives (``Decimal``, ``datetime``, ``UUID``, ``date``...), as the ORM would.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, models
from django.utils import timezone as django_timezone
from django.utils.dateparse import parse_datetime, parse_time

from . import wire
from .events import RowChange, build

logger = logging.getLogger("django_pgnotify.decoding")

Converter = Callable[[Any], Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NOTHING_CHANGED: frozenset[str] = frozenset()


class DecodeError(ValueError):
    """A payload that cannot become ``RowChange`` objects."""


class ModelNotServed(DecodeError):
    """A well-formed payload for a model this decoder was not given.

    Expected when models share a channel and a listener serves only some of
    them, so callers may want to skip it quietly rather than warn.
    """

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not one this listener serves")
        self.model = model


def _datetime(value: Any) -> datetime:
    parsed = parse_datetime(value)
    if parsed is None:
        raise ValueError(f"not a datetime: {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # triggers send UTC
    if settings.USE_TZ:
        return parsed.astimezone(timezone.utc)
    return django_timezone.make_naive(parsed, django_timezone.get_default_timezone())


def _time(value: Any) -> Any:
    parsed = parse_time(value)
    if parsed is None:
        raise ValueError(f"not a time: {value!r}")
    return parsed


def _duration(value: Any) -> timedelta:
    return timedelta(microseconds=int(Decimal(value) * 1_000_000))


def _binary(value: str) -> bytes:
    return bytes.fromhex(value[2:] if value.startswith("\\x") else value)


def _timestamp(seconds: float | int | Decimal | None) -> datetime | None:
    # Exact to the microsecond: a float is within a quarter of one of the value
    # PostgreSQL rendered until the year 2200, and rounding takes the nearest.
    # A value no datetime can hold is dropped, not raised.
    if seconds is None:
        return None
    try:
        if isinstance(seconds, Decimal):
            return _EPOCH + timedelta(microseconds=int(seconds.scaleb(6)))
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (ArithmeticError, ValueError, OverflowError, OSError):
        return None


def _decimal(value: Any) -> Decimal:
    # Triggers send numeric as a string; a float only comes from a payload made
    # elsewhere, and its shortest repr is the number that was written.
    if isinstance(value, Decimal):
        return value
    return Decimal(repr(value) if isinstance(value, float) else value)


def _same(value: Any) -> Any:
    return value


_CONVERTERS: dict[str, Converter] = {
    "DecimalField": _decimal,
    "FloatField": float,
    "DateTimeField": _datetime,
    "DateField": date.fromisoformat,
    "TimeField": _time,
    "DurationField": _duration,
    "UUIDField": uuid.UUID,
    "BinaryField": _binary,
    "BooleanField": _same,
    "CharField": _same,
    "TextField": _same,
}


def _integer(value: Any) -> int:
    return value if isinstance(value, int) else int(value)


# Converters whose input, as JSON gives it, is already the Python value.
_AS_SENT = frozenset({_same, _integer})


def converter_for(field: models.Field) -> Converter:
    """The function that turns a payload value into ``field``'s Python value."""
    target = getattr(field, "target_field", None) if field.is_relation else None
    if target is not None:
        return converter_for(target)
    internal = field.get_internal_type()
    if internal == "JSONField":
        return _json_converter(field)
    if internal in _CONVERTERS:
        return _CONVERTERS[internal]
    if internal.endswith(("IntegerField", "AutoField")):
        return _integer
    return field.to_python


def _json_converter(field: models.Field) -> Converter:
    # Triggers send the JSON text as a string: read it as the ORM reads jsonb
    # text, with the field's decoder. (A version 1 payload embeds the value
    # itself; _ModelCodec.values writes it back to text first.)
    decoder = getattr(field, "decoder", None)

    def convert(value: Any) -> Any:
        return json.loads(value, cls=decoder)

    return convert


class _Layout:
    """How the rows of one version 2 message shape are read: names, converters, masks."""

    def __init__(
        self, codec: _ModelCodec, fields: tuple[str, ...], watched: tuple[str, ...], action: str
    ):
        self.count = len(fields)
        self.full = wire.row_length(action, self.count)
        self.is_update = action == "update"
        read = [(column, *codec.columns.get(column, (column, _same))) for column in fields]
        self.names = [name for _, name, _ in read]
        # Only the columns whose JSON value is not already the Python value
        # are converted: dict(zip()) does the rest at C speed.
        self.converted = [
            (name, column, converter)
            for column, name, converter in read
            if converter not in _AS_SENT
        ]
        self.watched = [codec.columns.get(c, (c,))[0] for c in watched]
        self._changed: dict[int, frozenset[str]] = {}

    def changed(self, mask: Any) -> frozenset[str]:
        names = self._changed.get(mask)
        if names is None:
            # Beyond 62 watched columns, triggers send the mask as a string of digits.
            bits = int(mask) if type(mask) is str and mask.isascii() and mask.isdigit() else mask
            if type(bits) is not int:
                raise DecodeError(f"changed mask {mask!r} is not an integer")
            names = frozenset(wire.changed_names(self.watched, bits))
            if len(self._changed) < 1024:  # masks repeat; a bound keeps memory flat
                self._changed[mask] = names
        return names


class _ModelCodec:
    """Column name -> (attname, converter) for one model."""

    def __init__(self, model: type[models.Model]) -> None:
        self.model = model
        self.pk = converter_for(model._meta.pk)
        self.columns = {
            f.column: (f.attname, converter_for(f)) for f in model._meta.concrete_fields if f.column
        }
        # Version 1 embeds JSON values rather than sending their text.
        self._embedded_json = {
            f.column for f in model._meta.concrete_fields if f.get_internal_type() == "JSONField"
        }
        self._warned: set[str] = set()
        self._layouts: dict[tuple[tuple[str, ...], tuple[str, ...], str], _Layout] = {}

    def layout(self, fields: tuple[str, ...], watched: tuple[str, ...], action: str) -> _Layout:
        key = (fields, watched, action)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _Layout(self, fields, watched, action)
        return layout

    def value(self, converter: Converter, column: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return converter(value)
        except (TypeError, ValueError, ArithmeticError, AttributeError, ValidationError) as exc:
            # Keep the raw value rather than lose the event (e.g. 'infinity').
            if column not in self._warned:
                self._warned.add(column)
                logger.warning(
                    "pgnotify: cannot convert %s.%s value %r (%s); passing it on as sent",
                    self.model._meta.label,
                    column,
                    value,
                    exc,
                )
            return value

    def values(self, raw: dict[str, Any] | None) -> dict[str, Any]:
        result = {}
        for column, value in (raw or {}).items():
            name, converter = self.columns.get(column, (column, _same))
            if column in self._embedded_json and value is not None:
                value = wire.dumps(value)
            result[name] = self.value(converter, column, value)
        return result

    def convert(self, layout: _Layout, values: dict[str, Any]) -> None:
        """Convert, in place, the values of a row read by ``layout`` that need it."""
        for name, column, converter in layout.converted:
            value = values[name]
            if value is not None:
                values[name] = self.value(converter, column, value)

    def names(self, columns: Iterable[str]) -> frozenset[str]:
        return frozenset(self.columns.get(c, (c,))[0] for c in columns)


class Decoder:
    """Turns payloads into ``RowChange`` objects for a set of models."""

    def __init__(
        self, models_: Iterable[type[models.Model]], using: str = DEFAULT_DB_ALIAS
    ) -> None:
        self.using = using
        self._codecs = {m._meta.label_lower: _ModelCodec(m) for m in models_}

    def decode(
        self,
        payload: str | bytes,
        channel: str = "",
        pid: int = 0,
        event_id: int | None = None,
    ) -> list[RowChange]:
        """Decode one payload (``str``, or ``bytes`` in UTF-8) into one ``RowChange`` per row.

        ``event_id`` is given for a durable event (a row of the event table).

        Raises:
            DecodeError: Not our wire format (``ModelNotServed``: a model this
                decoder was not given).
        """
        try:
            label, action, rows, xid, seconds, version, context, fields, watched = wire.read(
                payload
            )
        except wire.WireError as exc:
            raise DecodeError(str(exc)) from None
        codec = self._codecs.get(label)
        if codec is None:
            raise ModelNotServed(label)
        # What every row of the message shares (events.VALUE_ORDER[7:]).
        shared = {
            "channel": channel,
            "pid": pid,
            "xid": xid,
            "timestamp": _timestamp(seconds),
            "using": self.using,
            "context": context,
            "durable": event_id is not None,
            "event_id": event_id,
        }
        if version == wire.OBJECT_ROWS_VERSION:
            return [self._object_row(codec, action, row, shared) for row in rows]
        return self._array_rows(codec, action, rows, fields, watched, shared)

    def _array_rows(
        self,
        codec: _ModelCodec,
        action: str,
        rows: list[list[Any]],
        fields: tuple[str, ...],
        watched: tuple[str, ...],
        shared: dict[str, Any],
    ) -> list[RowChange]:
        # The hot path: one RowChange per row, built without the dataclass __init__.
        layout = codec.layout(fields, watched, action)
        model, names, count, full = codec.model, layout.names, layout.count, layout.full
        convert = codec.convert if layout.converted else None
        is_update = layout.is_update
        changes: list[RowChange] = []
        append = changes.append
        for row in rows:
            pk = row[0]
            if type(pk) is not int:
                pk = codec.value(codec.pk, "pk", pk)
            if len(row) < full or pk is None:
                append(build(shared, model, action, pk, {}, None, _NOTHING_CHANGED, True))
                continue
            # A full row has exactly the layout's items (wire.read checked the bound),
            # so the pairs match without zip's strict check.
            if is_update:
                values = dict(zip(names, row[1 : count + 1], strict=False))
                old = dict(zip(names, row[count + 1 : -1], strict=False))
                if convert is not None:
                    convert(layout, values)
                    convert(layout, old)
                changed = layout.changed(row[-1])
            else:
                values = dict(zip(names, row[1:], strict=False))
                old, changed = None, _NOTHING_CHANGED
                if convert is not None:
                    convert(layout, values)
            append(build(shared, model, action, pk, values, old, changed, False))
        return changes

    def _object_row(
        self, codec: _ModelCodec, action: str, row: dict[str, Any], common: dict[str, Any]
    ) -> RowChange:
        truncated = row.get(wire.TRUNCATED) is True
        return RowChange(
            model=codec.model,
            action=action,
            pk=codec.value(codec.pk, "pk", row[wire.PK]),
            fields=codec.values(row.get(wire.FIELDS)),
            old=codec.values(row.get(wire.OLD)) if action == "update" and not truncated else None,
            changed=codec.names(row.get(wire.CHANGED) or ()),
            truncated=truncated,
            **common,
        )
