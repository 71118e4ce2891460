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
from .declarations import element_type
from .events import RowChange

logger = logging.getLogger("django_pgnotify.decoding")

Converter = Callable[[Any], Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_UTC = timezone.utc
_fromtimestamp = datetime.fromtimestamp
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
    # Always hex with its \x (see triggers._value): anything else is refused, not
    # guessed at (escape-format text can look like hex).
    if not value.startswith("\\x"):
        raise ValueError("binary value without the \\x of hex format")
    return bytes.fromhex(value[2:])


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
    except _OUT_OF_RANGE:
        return None


# What a timestamp no datetime can hold raises.
_OUT_OF_RANGE = (ArithmeticError, ValueError, OSError)


def _decimal(value: Any) -> Decimal:
    # Triggers send numeric as a string; a float only comes from a payload made
    # elsewhere, and its shortest repr is the number that was written.
    if isinstance(value, Decimal):
        return value
    return Decimal(repr(value) if isinstance(value, float) else value)


def _decimals(value: Any) -> Any:
    # An array of numeric, nested to any depth, NULL elements kept. Triggers send
    # its elements as strings; those of earlier versions sent JSON numbers, still
    # read until the triggers are reinstalled (a float holds about 17 digits of them).
    if type(value) is list:
        return [None if item is None else _decimals(item) for item in value]
    return _decimal(value)


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
    if element_type(field) == "DecimalField":
        # ArrayField.to_python returns a list as it is: Decimals are made here.
        return _decimals
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
    """How the rows of one version 2 message shape are read: names, converters, masks.

    ``rows`` is a reader made once per layout that turns the message's rows
    straight into ``RowChange`` objects.
    """

    def __init__(
        self,
        codec: _ModelCodec,
        fields: tuple[str, ...],
        watched: tuple[str, ...],
        action: str,
        old: bool = True,
    ):
        self.model = codec.model
        self.action = action
        self.count = len(fields)
        self.full = wire.row_length(action, self.count, old)
        # An update of a declaration with old=False is laid out as an insert.
        self.is_update = action == "update" and old
        read = [(column, *codec.columns.get(column, (column, _same))) for column in fields]
        self.watched = [codec.columns.get(c, (c,))[0] for c in watched]
        self._changed: dict[int, frozenset[str]] = {}
        # (attname, index) of each value, and (attname, index, column, converter) of
        # those whose JSON value is not already the Python value: the others are
        # taken as sent.
        self.values = _pairs(read, 1)
        self.old = _pairs(read, 1 + self.count) if self.is_update else ()
        self.converted = _converted(read, 1)
        self.old_converted = _converted(read, 1 + self.count) if self.is_update else ()
        self.rows = self._rows_reader(codec)

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

    def _rows_reader(self, codec: _ModelCodec) -> Callable[..., list[RowChange]]:
        """The hot path, made once per layout: a message's rows to ``RowChange`` objects.

        Everything that does not depend on the row is bound here, so a row costs
        little more than its values. Values are read by a comprehension over
        (attname, index) pairs, which beats dict(zip()) of a slice at every
        width; wire.read_shape checked each row's length, so a full row is
        indexed without looking again. Instances are filled as events.py
        explains, one store per field in field order.
        """
        model, action, full, is_update, changed = (
            self.model,
            self.action,
            self.full,
            self.is_update,
            self.changed,
        )
        pairs, old_pairs = self.values, self.old
        converted, old_converted = self.converted, self.old_converted
        convert_pk, value = codec.pk, codec.value

        def rows_to_changes(
            rows: list[list[Any]],
            channel: str,
            pid: int,
            xid: int | None,
            timestamp: datetime | None,
            using: str,
            context: dict[str, Any] | None,
            event_id: int | None,
        ) -> list[RowChange]:
            changes = []
            durable = event_id is not None
            for row in rows:
                pk = row[0]
                if type(pk) is not int:
                    pk = value(convert_pk, "pk", pk)
                old, names = None, _NOTHING_CHANGED
                if len(row) < full or pk is None:
                    values: dict[str, Any] = {}
                    truncated = True
                else:
                    values = {name: row[index] for name, index in pairs}
                    for name, index, column, converter in converted:
                        if (item := row[index]) is not None:
                            values[name] = value(converter, column, item)
                    truncated = False
                    if is_update:
                        old = {name: row[index] for name, index in old_pairs}
                        for name, index, column, converter in old_converted:
                            if (item := row[index]) is not None:
                                old[name] = value(converter, column, item)
                        names = changed(row[-1])
                # In field order, as the instances' shared keys have them (see events.py).
                change = _new(RowChange)
                items = change.__dict__
                items["model"] = model
                items["action"] = action
                items["pk"] = pk
                items["fields"] = values
                items["old"] = old
                items["changed"] = names
                items["channel"] = channel
                items["pid"] = pid
                items["truncated"] = truncated
                items["xid"] = xid
                items["timestamp"] = timestamp
                items["using"] = using
                items["context"] = context
                items["durable"] = durable
                items["event_id"] = event_id
                changes.append(change)
            return changes

        return rows_to_changes


def _pairs(read: list[tuple[str, str, Converter]], start: int) -> tuple[tuple[str, int], ...]:
    return tuple((name, start + i) for i, (_, name, _) in enumerate(read))


def _converted(
    read: list[tuple[str, str, Converter]], start: int
) -> tuple[tuple[str, int, str, Converter], ...]:
    return tuple(
        (name, start + i, column, converter)
        for i, (column, name, converter) in enumerate(read)
        if converter not in _AS_SENT
    )


_new = object.__new__


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
        self._layouts: dict[tuple[tuple[str, ...], tuple[str, ...], str, bool], _Layout] = {}

    def layout(
        self, fields: tuple[str, ...], watched: tuple[str, ...], action: str, old: bool = True
    ) -> _Layout:
        key = (fields, watched, action, old)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _Layout(self, fields, watched, action, old)
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

    def names(self, columns: Iterable[str]) -> frozenset[str]:
        return frozenset(self.columns.get(c, (c,))[0] for c in columns)


class Decoder:
    """Turns payloads into ``RowChange`` objects for a set of models."""

    def __init__(
        self, models_: Iterable[type[models.Model]], using: str = DEFAULT_DB_ALIAS
    ) -> None:
        self.using = using
        self._codecs = {m._meta.label_lower: _ModelCodec(m) for m in models_}
        # By wire.Shape, which is the same object for every message of a shape.
        self._layouts: dict[wire.Shape, _Layout] = {}

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
            shape, rows, xid, seconds, context = wire.read_shape(payload)
        except wire.WireError as exc:
            raise DecodeError(str(exc)) from None
        layout = self._layouts.get(shape)
        if layout is None:
            codec = self._codecs.get(shape.model)
            if codec is None:
                raise ModelNotServed(shape.model)
            if shape.version == wire.OBJECT_ROWS_VERSION:
                return self._object_rows(
                    codec, shape.action, rows, channel, pid, xid, seconds, context, event_id
                )
            assert shape.fields is not None and shape.watched is not None
            layout = codec.layout(shape.fields, shape.watched, shape.action, shape.old)
            if len(self._layouts) < 1024:  # shapes repeat; a bound keeps memory flat
                self._layouts[shape] = layout
        if type(seconds) is float:  # as triggers send it: _timestamp inlined
            try:
                timestamp = _fromtimestamp(seconds, _UTC)
            except _OUT_OF_RANGE:
                timestamp = None
        else:
            timestamp = _timestamp(seconds)
        return layout.rows(rows, channel, pid, xid, timestamp, self.using, context, event_id)

    def _object_rows(
        self,
        codec: _ModelCodec,
        action: str,
        rows: list[dict[str, Any]],
        channel: str,
        pid: int,
        xid: int | None,
        seconds: float | int | Decimal | None,
        context: dict[str, Any] | None,
        event_id: int | None,
    ) -> list[RowChange]:
        """Version 1: rows as objects keyed by column name."""
        common = {
            "channel": channel,
            "pid": pid,
            "xid": xid,
            "timestamp": _timestamp(seconds),
            "using": self.using,
            "context": context,
            "durable": event_id is not None,
            "event_id": event_id,
        }
        return [self._object_row(codec, action, row, common) for row in rows]

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
