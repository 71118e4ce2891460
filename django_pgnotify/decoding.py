"""The decoder: a notification's payload in, ``RowChange`` objects out.

Values arrive as PostgreSQL renders them in JSON; each model field gets a
converter, chosen once per model, that turns them into the value the ORM
gives for the field: first into the Python type the database adapter gives for
the column (``Decimal``, ``datetime``, ``UUID``, ``date``..., element by element
in an array), then, for a field that defines ``from_db_value``, through the
field's database converters, as the ORM applies them.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, connections, models
from django.utils import timezone as django_timezone
from django.utils.dateparse import parse_datetime, parse_time
from psycopg import DataError
from psycopg.postgres import types as postgres_types
from psycopg.types.datetime import TimetzLoader
from psycopg.types.range import Range

from . import wire
from .declarations import column_type, embeds_json, json_texts_type, plain_json, stored_field
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
    # A column's value comes in UTC without an offset (see triggers._value); an
    # array's elements with the writer's session offset, read as such.
    parsed = (
        parse_datetime(value)
        or _datetime_with_seconds_offset(value)
        or _datetime_past_the_limits(value)
    )
    if parsed is None:
        raise ValueError(f"not a datetime: {value!r}")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # triggers send UTC
    if settings.USE_TZ:
        return parsed.astimezone(timezone.utc)
    return django_timezone.make_naive(parsed, django_timezone.get_default_timezone())


# An offset with seconds (a zone's local mean time, before about 1900), which
# parse_datetime reads after a fraction of a second only on Python 3.11 and later.
_SECONDS_OFFSET = re.compile(r"(.+)([+-])(\d\d):(\d\d):(\d\d)")


def _datetime_with_seconds_offset(value: Any) -> datetime | None:
    match = _SECONDS_OFFSET.fullmatch(value)
    if match is None:
        return None
    parsed = parse_datetime(match[1])
    if parsed is None or parsed.tzinfo is not None:
        return None
    offset = timedelta(hours=int(match[3]), minutes=int(match[4]), seconds=int(match[5]))
    return parsed.replace(tzinfo=timezone(-offset if match[2] == "-" else offset))


# A local time on the day after 9999-12-31 or before 0001-01-01 (1 BC), with its offset:
# a writer ahead of or behind UTC renders so a moment datetime holds in UTC.
_PAST_THE_LIMITS = re.compile(
    r"(10000-01-01|0001-12-31)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"([+-])(\d\d)(?::?(\d\d))?(?::(\d\d))?( BC)?"
)


def _datetime_past_the_limits(value: Any) -> datetime | None:
    match = _PAST_THE_LIMITS.fullmatch(value)
    if match is None or (match[1] == "0001-12-31") != bool(match[10]):
        return None
    day, hours, minutes, seconds, fraction, sign = match.groups()[:6]
    # The same time of day on the last or first day datetime has, then a day on or off.
    local = datetime(9999, 12, 31) if day.startswith("1") else datetime(1, 1, 1)
    local = local.replace(
        hour=int(hours),
        minute=int(minutes),
        second=int(seconds),
        microsecond=int(fraction.ljust(6, "0")) if fraction else 0,
    )
    offset = timedelta(hours=int(match[7]), minutes=int(match[8] or 0), seconds=int(match[9] or 0))
    if sign == "-":
        offset = -offset
    # One step: either part alone is past the limit. OverflowError if the sum is too.
    step = timedelta(days=1 if day.startswith("1") else -1) - offset
    return (local + step).replace(tzinfo=timezone.utc)


def _time(value: Any) -> Any:
    parsed = parse_time(value)
    if parsed is None:
        raise ValueError(f"not a time: {value!r}")
    return parsed


# No Django field has a time with a zone: the ORM gives what psycopg's loader makes
# of the text, which is what to_json renders (offsets in seconds too).
_TIMETZ = TimetzLoader(postgres_types["timetz"].oid)


def _time_with_zone(value: Any) -> Any:
    try:
        return _TIMETZ.load(value.encode())
    except DataError as exc:
        raise ValueError(str(exc)) from exc


def _duration(value: Any) -> timedelta:
    return timedelta(microseconds=int(Decimal(value) * 1_000_000))


def _binary(value: str) -> bytes:
    # Always hex with its \x (see triggers._value): anything else is refused, not
    # guessed at (escape-format text can look like hex).
    if not value.startswith("\\x"):
        raise ValueError("binary value without the \\x of hex format")
    return bytes.fromhex(value[2:])


def _binary_text(value: str) -> bytes:
    # An element of a bytea array, rendered as the writer's bytea_output says: hex,
    # which starts with \x, or escape, which never does (it writes a backslash as
    # \\ and other bytes that are not printable ASCII as \ and three octal digits).
    if value.startswith("\\x"):
        return bytes.fromhex(value[2:])
    if not value.isascii() or not _ESCAPE_FORMAT.fullmatch(value):
        raise ValueError("binary value in neither hex nor escape format")
    return _ESCAPED_BYTE.sub(_unescape_byte, value).encode("latin-1")


_ESCAPE_FORMAT = re.compile(r"(?:[^\\]|\\\\|\\[0-3][0-7][0-7])*")
_ESCAPED_BYTE = re.compile(r"\\(\\|[0-3][0-7][0-7])")


def _unescape_byte(match: re.Match[str]) -> str:
    escaped = match[1]
    return "\\" if escaped == "\\" else chr(int(escaped, 8))


def _interval_text(value: str) -> timedelta:
    """An element of an interval array, rendered in the writer's ``IntervalStyle``.

    Any of the four: every style writes the interval's years, months, days and
    time in full, to the microsecond. The ``timedelta`` is the one psycopg reads
    from the ``postgres`` style, which the ORM reads (a year is 365 days, a
    month 30).
    """
    for parse in _INTERVAL_STYLES:
        parts = parse(value)
        if parts is not None:
            years, months, days, microseconds = parts
            return timedelta(days=365 * years + 30 * months + days, microseconds=microseconds)
    raise ValueError(f"not an interval: {value!r}")


# Years, months, days and microseconds of an interval's text, or None if not of a style.
_IntervalParts = tuple[int, int, int, int] | None

_SECONDS = r"(\d+)(?:\.(\d{1,6}))?"


def _time_microseconds(
    sign: str | None, hours: str, minutes: str, seconds: str, fraction: str | None
) -> int:
    time = (int(hours) * 60 + int(minutes)) * 60_000_000 + _microseconds(seconds, fraction)
    return -time if sign == "-" else time


def _microseconds(seconds: str, fraction: str | None) -> int:
    return int(seconds) * 1_000_000 + (int(fraction.ljust(6, "0")) if fraction else 0)


# IntervalStyle postgres (the default): "1 year 2 mons -3 days +04:05:06.5".
_POSTGRES_INTERVAL = re.compile(
    r"(?:([+-]?\d+) years? ?)?(?:([+-]?\d+) mons? ?)?(?:([+-]?\d+) days? ?)?"
    rf"(?:([+-])?(\d+):(\d\d):{_SECONDS})?"
)


def _postgres_interval(value: str) -> _IntervalParts:
    match = _POSTGRES_INTERVAL.fullmatch(value)
    if match is None or not value:
        return None
    years, months, days, sign, hours, minutes, seconds, fraction = match.groups()
    time = _time_microseconds(sign, hours, minutes, seconds, fraction) if hours else 0
    return int(years or 0), int(months or 0), int(days or 0), time


# postgres_verbose: "@ 1 year 2 mons -3 days 4 hours 5 mins 6.5 secs ago", "@ 0"; "ago"
# negates every part.
_VERBOSE_INTERVAL = re.compile(r"@((?: [+-]?\d+(?:\.\d+)? [a-z]+)*)( 0)?( ago)?")
_VERBOSE_PART = re.compile(rf" ([+-]?)(?:(\d+) (year|mon|day|hour|min)s?|{_SECONDS} secs?)")


def _verbose_interval(value: str) -> _IntervalParts:
    match = _VERBOSE_INTERVAL.fullmatch(value)
    if match is None:
        return None
    parts = list(_VERBOSE_PART.finditer(match[1]))
    if "".join(part[0] for part in parts) != match[1]:
        return None  # a word that is not one of the units
    numbers = dict.fromkeys(("year", "mon", "day", "hour", "min"), 0)
    time = 0
    for part in parts:
        sign, number, unit, seconds, fraction = part.groups()
        amount = int(number) if unit else _microseconds(seconds, fraction)
        if sign == "-":
            amount = -amount
        if unit:
            numbers[unit] = amount
        else:
            time = amount
    time += (numbers["hour"] * 60 + numbers["min"]) * 60_000_000
    ago = -1 if match[3] else 1
    return ago * numbers["year"], ago * numbers["mon"], ago * numbers["day"], ago * time


# sql_standard: "0", "1-2" (years-months), "3 4:05:06.5", "4:05:06.5", each with one
# sign before it all; or, when both kinds of parts are there or signs differ,
# "+1-2 -3 +4:05:06.5", a sign before each.
_SQL_STANDARD_INTERVAL = re.compile(
    r"(?:(-)?(\d+)-(\d+))"
    r"|(?:(-)?(?:(\d+) )?(\d+):(\d\d):" + _SECONDS + r")"
    r"|(?:([+-])(\d+)-(\d+) ([+-])(\d+) ([+-])(\d+):(\d\d):" + _SECONDS + r")"
)


def _sql_standard_interval(value: str) -> _IntervalParts:
    if value == "0":
        return 0, 0, 0, 0
    match = _SQL_STANDARD_INTERVAL.fullmatch(value)
    if match is None:
        return None
    groups = match.groups()
    if groups[1] is not None:  # years-months
        sign = -1 if groups[0] else 1
        return sign * int(groups[1]), sign * int(groups[2]), 0, 0
    if groups[5] is not None:  # [days] time
        sign = -1 if groups[3] else 1
        time = _time_microseconds(None, groups[5], groups[6], groups[7], groups[8])
        return 0, 0, sign * int(groups[4] or 0), sign * time
    (year_sign, years, months, day_sign, days, time_sign, hours, minutes, seconds, fraction) = (
        groups[9:]
    )
    year = -1 if year_sign == "-" else 1
    return (
        year * int(years),
        year * int(months),
        -int(days) if day_sign == "-" else int(days),
        _time_microseconds(time_sign, hours, minutes, seconds, fraction),
    )


# iso_8601: "P1Y2M-3DT4H5M6.5S", "PT-0.5S", "PT0S"; a sign before each part.
_ISO_INTERVAL = re.compile(
    r"P(?:([+-]?\d+)Y)?(?:([+-]?\d+)M)?(?:([+-]?\d+)D)?"
    rf"(?:T(?:([+-]?\d+)H)?(?:([+-]?\d+)M)?(?:(-)?{_SECONDS}S)?)?"
)


def _iso_interval(value: str) -> _IntervalParts:
    match = _ISO_INTERVAL.fullmatch(value)
    if match is None:
        return None
    years, months, days, hours, minutes, sign, seconds, fraction = match.groups()
    time = (int(hours or 0) * 60 + int(minutes or 0)) * 60_000_000
    if seconds:
        second = _microseconds(seconds, fraction)
        time += -second if sign else second
    return int(years or 0), int(months or 0), int(days or 0), time


_INTERVAL_STYLES = (_postgres_interval, _iso_interval, _verbose_interval, _sql_standard_interval)


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


def _same(value: Any) -> Any:
    return value


# A range as PostgreSQL writes it: "empty", or a bracket, each bound (nothing for an
# infinite one; in double quotes, with " and \\ doubled, when it holds special
# characters, as a timestamptz's space does), and a bracket.
_RANGE = re.compile(r'([\[(])("(?:[^"\\]|""|\\.)*"|[^,]*),("(?:[^"\\]|""|\\.)*"|[^\])]*)([\])])')
_RANGE_ESCAPE = re.compile(r'""|\\(.)')


def _range_bound(text: str, convert: Converter) -> Any:
    if not text:
        return None  # infinite
    if text[0] == '"':
        text = _RANGE_ESCAPE.sub(lambda m: m[1] or '"', text[1:-1])
    return convert(text)


def _range(convert: Converter) -> Converter:
    """A range column's converter: its text (``to_json`` of a range is the range's
    text, its bounds rendered in the writer's session, as a timestamptz's offset)
    to the ``Range`` the database adapter gives, each bound read by ``convert``."""

    def convert_range(value: Any) -> Any:
        if type(value) is not str:
            raise TypeError(f"not a range: {value!r}")
        if value == "empty":
            return Range(empty=True)
        match = _RANGE.fullmatch(value)
        if match is None:
            raise ValueError(f"not a range: {value!r}")
        lower = _range_bound(match[2], convert)
        upper = _range_bound(match[3], convert)
        return Range(lower, upper, match[1] + match[4])

    return convert_range


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
# Range fields (django.contrib.postgres), by the type of their bounds.
_CONVERTERS.update(
    {
        "IntegerRangeField": _range(int),
        "BigIntegerRangeField": _range(int),
        "DecimalRangeField": _range(Decimal),
        "DateRangeField": _range(date.fromisoformat),
        "DateTimeRangeField": _range(_datetime),
    }
)

# The elements of an array, which triggers send as to_json() renders them (numeric
# as strings, see triggers._value): timestamptz with the writer's session offset,
# interval in its IntervalStyle, bytea in its bytea_output. Numeric elements came as
# JSON numbers from triggers of earlier versions, still read until they are
# reinstalled (a float holds about 17 digits of them). Types not named here
# (integers, text, booleans...) are taken as sent, as ArrayField.to_python does.
_ELEMENT_CONVERTERS: dict[str, Converter] = {
    **_CONVERTERS,
    "DurationField": _interval_text,
    "BinaryField": _binary_text,
}


def _integer(value: Any) -> int:
    """An integer as JSON carries it; a quoted one (a payload made by hand) too. Not a
    fraction, which ``int()`` would cut (``7.5`` a pk of 7), nor ``true``."""
    if type(value) is int:
        return value
    if type(value) is str or (type(value) is float and value.is_integer()):
        return int(value)
    raise ValueError(f"not an integer: {value!r}")


# Converters whose input, as JSON gives it, is already the Python value.
_AS_SENT = frozenset({_same, _integer})


def _naive_datetime(value: Any) -> datetime:
    parsed = parse_datetime(value)
    if parsed is None or parsed.tzinfo is not None:
        raise ValueError(f"not a timestamp without time zone: {value!r}")
    return parsed


# A field of an internal type not named above (a custom field, a subclass of a range
# field) is read by its column type. The triggers render it as the Django field of
# that type where there is one whose rendering they choose (numeric as its text,
# timestamptz in UTC, interval in seconds...: see declarations.rendering_types), and
# any other by PostgreSQL's to_json, as an array's elements are; either way it is
# read into what the database adapter makes of the type, for these. Any other type
# (inet and cidr, which Django has psycopg load as text; jsonb, which it loads as
# text too; hstore, which it loads as the dict to_json gives; varchar, tsvector...)
# is taken as sent: its JSON value is already what the ORM reads.
_COLUMN_TYPES: dict[str, Converter] = {
    "uuid": uuid.UUID,
    "numeric": _decimal,
    "decimal": _decimal,
    "date": date.fromisoformat,
    "timestamp with time zone": _datetime,
    "timestamptz": _datetime,
    "timestamp": _naive_datetime,
    "timestamp without time zone": _naive_datetime,
    "time": _time,
    "time without time zone": _time,
    "time with time zone": _time_with_zone,
    "timetz": _time_with_zone,
    "interval": _interval_text,
    "bytea": _binary_text,
    "double precision": float,
    "float8": float,
    "real": float,
    "float4": float,
    "int4range": _range(int),
    "int8range": _range(int),
    "numrange": _range(Decimal),
    "daterange": _range(date.fromisoformat),
    "tstzrange": _range(_datetime),
}


def _seconds_or_interval_text(value: Any) -> timedelta:
    # A scalar interval comes in seconds, as a DurationField's; in its IntervalStyle
    # from a trigger installed before such a column was rendered so.
    try:
        return _duration(value)
    except ArithmeticError:
        return _interval_text(value)


# Scalars whose rendering is not to_json's: an array's elements are to_json's.
_SCALAR_COLUMN_TYPES: dict[str, Converter] = {
    **_COLUMN_TYPES,
    "interval": _seconds_or_interval_text,
}


def _by_column_type(field: models.Field, using: str, element: bool = False) -> Converter:
    """A payload value of ``field``'s column read by the column's type (``db_type``),
    whatever the field's Python side does with values it is given; an array's
    element if ``element``."""
    base, array = column_type(field, connections[using])
    if base is None:  # a custom field's own code failed: its values are taken as sent
        return _same
    if not (array or element):
        return _SCALAR_COLUMN_TYPES.get(base, _same)
    convert = _COLUMN_TYPES.get(base, _same)
    return convert if convert is _same or not array else _elements(convert)


def converter_for(field: models.Field, using: str = DEFAULT_DB_ALIAS) -> Converter:
    """The function that turns a payload value into ``field``'s value, as the ORM gives it.

    The value is made the Python type the database adapter gives for the column
    (a foreign key's column: by the field it points to); then, if the field (or
    the one it points to) defines ``from_db_value``, it goes through the field's
    database converters, as the ORM applies them when it reads the row: NULL
    too, and with the connection of the alias ``using`` in the decoding thread.

    Args:
        field: A concrete field of a model.
        using: The database alias the payloads come from (the listener's).
    """
    stored = stored_field(field)
    if not (hasattr(field, "from_db_value") or hasattr(stored, "from_db_value")):
        return _typed(stored, using)
    # The column as the ORM selects it: for a foreign key, the field it points to
    # gives the converters, then the foreign key itself.
    expression = field.get_col(field.model._meta.db_table)
    converters = expression.get_db_converters(connections[using])
    if not converters or _typed_as_the_orm_reads(stored, converters):
        return _typed(stored, using)
    return _DatabaseConverters(_adapted(stored, using), converters, expression, using)


def _typed(field: models.Field, using: str) -> Converter:
    """A payload value of ``field``'s column to its Python value, ``from_db_value`` aside.

    Never the field's ``to_python``: that validates and cleans what a form or a
    fixture gives (``GenericIPAddressField(unpack_ipv4=True)`` makes
    ``'::ffff:10.0.0.1'`` ``'10.0.0.1'``), which the ORM does not do to what it reads.
    """
    texts = _json_texts_reader(field, using)
    if texts is not None:
        return texts
    if _is_array(field):
        return _array_converter(field, using)
    internal = field.get_internal_type()
    if internal == "JSONField":
        return _json_converter(field)
    if internal in _CONVERTERS:
        return _CONVERTERS[internal]
    if internal.endswith(("IntegerField", "AutoField")):
        return _integer
    return _by_column_type(field, using)


def _is_array(field: models.Field) -> bool:
    """Whether the ORM reads ``field``'s column as an array: an ``ArrayField``, or a
    subclass of one (a ``ChoiceArrayField``...), whose internal type is its class name."""
    if field.get_internal_type() == "ArrayField" and hasattr(field, "base_field"):
        return True
    from django.contrib.postgres.fields import ArrayField

    return isinstance(field, ArrayField)


def _innermost(field: models.Field) -> tuple[models.Field, int]:
    """An array's innermost base field and how many arrays hold it, as ``_is_array``
    tells them (``declarations.innermost_field`` goes by internal type alone)."""
    depth = 0
    while _is_array(field):
        field, depth = field.base_field, depth + 1  # type: ignore[attr-defined]  # an array's
    return field, depth


def _array_converter(field: models.Field, using: str) -> Converter:
    element, _ = _innermost(field)
    convert = _ELEMENT_CONVERTERS.get(element.get_internal_type())
    if convert is None:
        # Rendered by to_json as an element of any type is: read by its column type.
        convert = _by_column_type(element, using, element=True)
    return _same if convert in _AS_SENT else _elements(convert)


def _elements(convert: Converter) -> Converter:
    """An array's converter: ``convert`` for each element, nested to any depth (an
    array's JSON nests as its dimensions do), NULL elements kept."""

    def convert_array(value: Any) -> Any:
        if type(value) is not list:
            return convert(value)
        return [
            None if item is None else convert_array(item) if type(item) is list else convert(item)
            for item in value
        ]

    return convert_array


def _json_texts_reader(field: models.Field, using: str) -> Converter | None:
    """What reads an array whose elements triggers send as their texts (see
    ``declarations.json_texts_type``) into what psycopg loads for the ORM: a ``jsonb``
    element's text as it is, a ``json`` one parsed (psycopg's loader uses
    ``json.loads``); ``None`` for any other column."""
    loaded = json_texts_type(field, connections[using])
    if loaded is None:
        return None
    return _same if loaded == "jsonb" else _elements(json.loads)


def _json_converter(field: models.Field) -> Converter:
    # Triggers send the JSON text as a string: read it as the ORM reads jsonb
    # text, with the field's decoder. (A version 1 payload embeds the value
    # itself; _ModelCodec.values writes it back to text first.)
    decoder = getattr(field, "decoder", None)

    def convert(value: Any) -> Any:
        return json.loads(value, cls=decoder)

    def convert_with_decoder(value: Any) -> Any:
        # The decoder is the field's own code: whatever it raises for a value is a
        # value that cannot be converted (as from_db_value's), not an unreadable payload.
        try:
            return json.loads(value, cls=decoder)
        except _CONVERSION_ERRORS:
            raise
        except Exception as exc:
            name = getattr(decoder, "__qualname__", repr(decoder))
            raise _ConverterError(f"{name} raised {type(exc).__name__}: {exc}") from exc

    return convert if decoder is None else convert_with_decoder


def _typed_as_the_orm_reads(field: models.Field, converters: list[Any]) -> bool:
    """Whether ``_typed`` gives what ``converters`` would: those of ``JSONField``
    itself, which ``_json_converter`` applies, and of an array of it without a
    decoder, whose elements JSON embeds as the ORM would read them."""
    element, depth = _innermost(field)
    if len(converters) != 1 or not isinstance(element, models.JSONField):
        return False
    if type(element).from_db_value is not models.JSONField.from_db_value:
        return False
    if depth == 0:
        return True
    from django.contrib.postgres.fields import ArrayField

    # ArrayField's own, which calls its base field's for each element.
    per_element = ArrayField._from_db_value  # type: ignore[attr-defined]  # not in the stubs
    while isinstance(field, ArrayField):
        if getattr(field.from_db_value, "__func__", None) is not per_element:
            return False
        field = field.base_field
    return plain_json(element)


def _adapted(field: models.Field, using: str) -> Converter:
    """A payload value of ``field``'s column to what the database adapter gives for it,
    which ``from_db_value`` receives: JSON as its text (triggers send it so)."""
    if _is_array(field):
        element, depth = _innermost(field)
        if element.get_internal_type() == "JSONField":
            # Texts (declarations.json_texts_type), or values embedded (a plain
            # JSONField's, and every one's from triggers of earlier versions).
            return _json_texts(depth, json_texts_type(field, connections[using]) is not None)
    texts = _json_texts_reader(field, using)
    if texts is not None:
        return texts
    if _is_array(field):
        return _array_converter(field, using)
    internal = field.get_internal_type()
    if internal == "JSONField":
        return _same
    if internal in _CONVERTERS:
        return _CONVERTERS[internal]
    if internal.endswith(("IntegerField", "AutoField")):
        return _integer
    return _by_column_type(field, using)


def _json_texts(depth: int, texts: bool = False) -> Converter:
    """A JSON array's elements, embedded by to_json(), back to their text.

    A JSON array element looks like a dimension: the field's nesting says how
    deep the elements are, as ``ArrayField.from_db_value`` reads them. With
    ``texts``, the triggers send the elements' texts, which stay as they are; an
    element that is not a string was embedded by a trigger of an earlier version
    (one that was a string then is read as a text: ``"1"`` as ``1``).
    """

    def convert(value: Any, depth: int = depth) -> Any:
        if depth == 0:
            return value if texts and type(value) is str else wire.dumps(value)
        if type(value) is not list:
            raise TypeError(f"not an array of {depth} dimension(s): {value!r}")
        return [None if item is None else convert(item, depth - 1) for item in value]

    return convert


# What a converter raises for a value it cannot convert (_DatabaseConverters makes
# whatever a field's database converter raises one of them).
_CONVERSION_ERRORS = (TypeError, ValueError, ArithmeticError, AttributeError, ValidationError)


class _ConverterError(ValueError):
    """A field's database converter (``from_db_value``) raised."""


class _DatabaseConverters:
    """The payload value made what the adapter gives (``adapted``), then passed
    through the field's database ``converters`` as the ORM passes it.

    NULL is passed too (``_ModelCodec.null``). Whatever a converter raises
    becomes a ``_ConverterError``, which the codec handles as any value that
    cannot be converted.
    """

    __slots__ = ("adapted", "converters", "expression", "using")

    def __init__(
        self, adapted: Converter, converters: list[Any], expression: Any, using: str
    ) -> None:
        self.adapted = adapted
        self.converters = converters
        self.expression = expression
        self.using = using

    def __call__(self, value: Any) -> Any:
        if value is not None:
            value = self.adapted(value)
        # Looked up on each call: a connection belongs to the thread that decodes.
        connection = connections[self.using]
        for converter in self.converters:
            try:
                value = converter(value, self.expression, connection)
            except Exception as exc:
                name = getattr(converter, "__qualname__", repr(converter))
                raise _ConverterError(f"{name} raised {type(exc).__name__}: {exc}") from exc
        return value


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
        # Whether the message is read again, exactly: wire.read_shape's exactly.
        self.exactly = not codec.exact.isdisjoint(fields)
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
        kind = type(mask)
        # Looked up by an int or a str alone: true and 1.0 equal 1 and would find its
        # names, and a list cannot be looked up at all.
        names = self._changed.get(mask) if kind is int or kind is str else None
        if names is None:
            try:  # a string of digits past 62 watched columns
                names = frozenset(wire.changed_names(self.watched, mask))
            except wire.WireError as exc:
                raise DecodeError(str(exc)) from None
            wire.remember(self._changed, mask, names)  # masks repeat
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
        convert_pk, value, null = codec.pk, codec.value, codec.null
        database_converters = _DatabaseConverters
        # An integer pk is taken as sent, unless its field has converters of its own.
        int_pk_as_sent = type(convert_pk) is not database_converters

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
                if type(pk) is not int or not int_pk_as_sent:
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
                        elif type(converter) is database_converters:
                            values[name] = null(converter, column)
                    truncated = False
                    if is_update:
                        old = {name: row[index] for name, index in old_pairs}
                        for name, index, column, converter in old_converted:
                            if (item := row[index]) is not None:
                                old[name] = value(converter, column, item)
                            elif type(converter) is database_converters:
                                old[name] = null(converter, column)
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
    """Column name -> (attname, converter) for one model, whose rows come from ``using``.

    Values its fields cannot convert are passed on as sent, counted as
    ``unconverted`` in ``stats`` (its decoder's).
    """

    def __init__(self, model: type[models.Model], using: str, stats: Counter[str]) -> None:
        self.model = model
        self.stats = stats
        self.pk = converter_for(model._meta.pk, using)
        self.columns = {
            f.column: (f.attname, converter_for(f, using)) for f in model._meta.concrete_fields
        }
        # Columns whose JSON values the triggers embed as they are (see
        # declarations.embeds_json): a message holding one is read exactly.
        self.exact = frozenset(
            f.column for f in model._meta.concrete_fields if embeds_json(f, connections[using])
        )
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
            layout = _Layout(self, fields, watched, action, old)
            wire.remember(self._layouts, key, layout)
        return layout

    def value(self, converter: Converter, column: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return converter(value)
        except _CONVERSION_ERRORS as exc:
            return self._as_sent(column, value, exc)

    def null(self, converter: Converter, column: str) -> Any:
        """What a NULL becomes: ``None``, or what a field's database converters make of it."""
        if type(converter) is not _DatabaseConverters:
            return None
        try:
            return converter(None)
        except _CONVERSION_ERRORS as exc:
            return self._as_sent(column, None, exc)

    def _as_sent(self, column: str, value: Any, exc: Exception) -> Any:
        # Keep the raw value rather than lose the event (e.g. 'infinity'); warned
        # once per column, counted each time.
        self.stats["unconverted"] += 1
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
            if value is None:
                result[name] = self.null(converter, column)
                continue
            if column in self._embedded_json:
                value = wire.dumps(value)
            result[name] = self.value(converter, column, value)
        return result

    def names(self, columns: Iterable[str]) -> frozenset[str]:
        return frozenset(self.columns.get(c, (c,))[0] for c in columns)


class Decoder:
    """Turns payloads into ``RowChange`` objects for a set of models.

    ``stats`` counts, as ``unconverted``, the values passed on as sent because
    their field could not convert them (a listener passes its own counters).
    """

    def __init__(
        self,
        models_: Iterable[type[models.Model]],
        using: str = DEFAULT_DB_ALIAS,
        stats: Counter[str] | None = None,
    ) -> None:
        self.using = using
        self.stats: Counter[str] = Counter() if stats is None else stats
        self._codecs = {m._meta.label_lower: _ModelCodec(m, using, self.stats) for m in models_}
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
            wire.remember(self._layouts, shape, layout)  # shapes repeat
        if layout.exactly:  # an integer past 64 bits may have been read as a float
            try:
                shape, rows, xid, seconds, context = wire.read_shape(payload, exactly=True)
            except wire.WireError as exc:
                raise DecodeError(str(exc)) from None
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
