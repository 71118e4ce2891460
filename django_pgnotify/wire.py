"""The wire format: the JSON payload our triggers send, in one place.

The trigger builder takes its key names from here and the decoder parses with
``parse``, so the two sides cannot drift apart. Version 2 (what triggers send)::

    {"v": 2, "model": "shop.order", "action": "update", "xid": 5012,
     "ts": 1763717550.123456,
     "fields": ["status", "total"], "watched": ["status", "total"],
     "rows": [[7, "paid", 12.50, "new", 12.50, 1],
              [8, "paid", 30.00, "new", 30.00, 1]],
     "context": "{\\"actor\\": \\"user:42\\"}"}

- ``model``: the model's ``app_label.model_name``; ``action``: ``insert``,
  ``update`` or ``delete``; ``xid``: the writing transaction's 64-bit id;
  ``ts``: seconds since the epoch when the trigger ran (it also keeps
  PostgreSQL from folding two identical notifications into one).
- ``fields``: the declared column names, in the order of each row's values.
  ``watched`` (update only): the columns whose change is reported, in bit order.
  ``old`` (update only, optional): ``false`` when the declaration sends new
  values alone (``Notify(old=False)``); there is then no ``watched``.
- ``rows``: one array per changed row, all rows of one statement sharing the
  message (a statement's rows are split over as many messages as the size
  limit needs). A row is ``[pk, *values]`` for an insert or delete (a delete's
  values are those the row had), and ``[pk, *values, *old_values, changed]``
  for an update, where ``changed`` is a bit mask over ``watched`` (bit ``i``
  set: ``watched[i]`` changed), or ``[pk, *values]`` for an update whose
  message says ``"old": false``. Values are PostgreSQL's JSON renderings,
  ``timestamptz`` in UTC without an offset (an array's elements with the
  writer's session offset), except where a JSON number or
  value would lose something: ``numeric`` and ``interval`` (in seconds) are
  sent as strings of their digits (a ``numeric`` array as an array of them),
  and ``json``/``jsonb`` as a string of the JSON text, so that a reader
  parsing numbers as floats loses no digit.
- A row shorter than that layout was too large for a notification: it holds
  the pk alone (``[pk]``), or ``[null]`` when even the pk was too large.
- ``context``: optional: the writing transaction's ``pgnotify.context``
  setting as a JSON *string* holding a JSON object, or ``null``. The trigger
  does not parse it, so that a malformed value set by hand never fails a
  write; the reader does. It is left out when it would not fit.

Version 1 (still read, as are durable events stored by earlier versions) sends
one object per row: ``{"pk": 7, "fields": {...}, "old": {...}, "changed":
[...]}``, or ``{"pk": 7, "truncated": true}``, keyed by column name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

_orjson_loads: Callable[[str | bytes], Any] | None
try:  # optional: django-pgnotify[speedups]
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - depends on what is installed
    _orjson_loads = None

T = TypeVar("T")

#: The version triggers send.
VERSION = 2
#: Rows as objects: still read (earlier triggers, durable events stored by them).
OBJECT_ROWS_VERSION = 1

#: A NOTIFY payload must be shorter than this many bytes.
PAYLOAD_LIMIT = 8000

# Message keys.
VERSION_KEY = "v"
MODEL = "model"
ACTION = "action"
XID = "xid"
TIMESTAMP = "ts"
ROWS = "rows"
CONTEXT = "context"
WATCHED = "watched"
#: ``false`` on an update message whose rows carry no old values and no mask.
OLD_VALUES = "old"

# Row keys.
PK = "pk"
FIELDS = "fields"
OLD = "old"
CHANGED = "changed"
TRUNCATED = "truncated"

# Transaction-local settings the triggers read (set_config(name, value, true)).
#: ``on`` pauses every declaration; else a comma-separated list of model labels.
PAUSED_SETTING = "pgnotify.paused"
PAUSED_ALL = "on"
#: A JSON object sent as ``context`` with every change of the transaction.
CONTEXT_SETTING = "pgnotify.context"
#: The longest context (its JSON text, in bytes) that ``context()`` accepts.
CONTEXT_LIMIT = 1024

#: The table durable declarations' triggers insert their messages into (unqualified:
#: it is found on the writer's search_path, as Django's own tables are).
EVENT_TABLE = "pgnotify_event"
#: Event rows hold up to this many changes, and their ids are this far apart: a
#: durable change's ``event_id`` is its row's id plus its position in the row.
DURABLE_ID_STEP = 1024
#: The channel of durable declarations' wake-up notification (payload empty).
DURABLE_CHANNEL = "pgnotify_durable"

ACTIONS = frozenset({"insert", "update", "delete"})


# One decoder each for every payload: json.loads(..., parse_float=...) builds a new one per call.
_decode_stdlib = json.JSONDecoder().decode
# Version 1 sent numeric values as JSON numbers: read with every digit kept.
_decode_exact = json.JSONDecoder(parse_float=Decimal).decode


def _loads_stdlib(payload: str | bytes) -> Any:
    return _decode_stdlib(payload if isinstance(payload, str) else payload.decode())


#: Parses a payload (``str``, or ``bytes`` in UTF-8): orjson if installed, it
#: is about four times faster; else the standard library. Both give the same
#: values for what triggers send, but for an integer past 64 bits, which orjson
#: reads as a float: only a JSON value embedded as it is holds one (see
#: ``read_shape``'s ``exactly``).
loads: Callable[[str | bytes], Any] = _loads_stdlib if _orjson_loads is None else _orjson_loads


class WireError(ValueError):
    """A payload that is not a django-pgnotify message we can read."""


@dataclass(frozen=True)
class Message:
    """One parsed payload: a model, an action and the rows it concerns.

    ``rows`` holds arrays laid out by ``fields`` and ``watched`` (version 2)
    or objects (version 1, where ``fields`` and ``watched`` are ``None``).
    """

    model: str
    action: str
    rows: list[Any]
    xid: int | None = None
    timestamp: float | int | Decimal | None = None
    version: int = VERSION
    context: dict[str, Any] | None = None
    fields: tuple[str, ...] | None = None
    watched: tuple[str, ...] | None = None
    #: Whether an update's rows carry old values and the changed mask.
    old: bool = True

    def row_length(self) -> int:
        """How many items a full (not truncated) version 2 row has."""
        return row_length(self.action, len(self.fields or ()), self.old)

    def row_objects(self) -> list[dict[str, Any]]:
        """The rows as version 1 objects (``pk``, ``fields``, ``old``, ``changed``).

        For readers that prefer names to positions; the decoder reads the
        arrays directly.
        """
        if self.version == OBJECT_ROWS_VERSION:
            return self.rows
        fields, count, full = self.fields or (), len(self.fields or ()), self.row_length()
        objects = []
        for row in self.rows:
            if len(row) < full or row[0] is None:
                objects.append({PK: row[0], TRUNCATED: True})
                continue
            item: dict[str, Any] = {PK: row[0]}
            if count:
                item[FIELDS] = dict(zip(fields, row[1 : count + 1], strict=True))
            if self.action == "update" and self.old:
                if count:
                    item[OLD] = dict(zip(fields, row[count + 1 : -1], strict=True))
                item[CHANGED] = changed_names(self.watched or (), row[-1])
            objects.append(item)
        return objects


def changed_names(watched: Sequence[T], mask: int | str) -> list[T]:
    """The items of ``watched`` whose bit is set in an update row's ``changed`` mask
    (a string of digits past 62 watched columns: JSON readers round larger numbers).

    Raises:
        WireError: ``mask`` is neither an integer nor a string of digits (``true``
            and ``1.0`` equal 1 in Python, but are no mask).
    """
    if type(mask) is int:
        bits = mask
    elif type(mask) is str and mask.isascii() and mask.isdigit():
        bits = int(mask)
    else:
        raise WireError(f"changed mask {mask!r} is neither an integer nor a string of digits")
    return [name for i, name in enumerate(watched) if bits >> i & 1]


def row_length(action: str, field_count: int, old: bool = True) -> int:
    """Items in a full version 2 row: pk and values, plus old values and mask on
    an update (unless ``old`` is false: the message said ``"old": false``)."""
    return 1 + field_count + (field_count + 1 if action == "update" and old else 0)


def parse(payload: str | bytes) -> Message:
    """Parse a payload (``str``, or ``bytes`` in UTF-8).

    Numbers become ``int`` or ``float``, as in version 2 nothing that needs
    more is sent as a number; in version 1 a number with a fraction becomes a
    ``Decimal``, as every digit counts there.

    Raises:
        WireError: Not JSON, not an object of this format, or a newer version.
    """
    shape, rows, xid, timestamp, context = read_shape(payload)
    return Message(
        shape.model,
        shape.action,
        rows,
        xid,
        timestamp,
        shape.version,
        context,
        shape.fields,
        shape.watched,
        shape.old,
    )


_TIMESTAMP_TYPES = frozenset({int, float, Decimal})


@dataclass(frozen=True, slots=True, eq=False)
class Shape:
    """What a message says about its rows: model, action and layout.

    A version 2 shape seen before is the same object every time (compared and
    hashed by identity), so a reader can key its own per-shape caches by it.
    """

    version: int
    model: str
    action: str
    #: ``None`` for version 1 (rows as objects), as ``watched``.
    fields: tuple[str, ...] | None
    watched: tuple[str, ...] | None
    #: Items in a full version 2 row (``row_length``); 0 for version 1.
    full: int
    #: Whether an update's rows carry old values and the changed mask
    #: (``False`` when the message said ``"old": false``; ``True`` for other actions).
    old: bool = True


def read_shape(
    payload: str | bytes, exactly: bool = False
) -> tuple[Shape, list[Any], int | None, float | int | Decimal | None, dict[str, Any] | None]:
    """The decoder's hot path: the shape, rows, xid, timestamp and context of a payload.

    Same checks and errors as ``parse``: every row has been checked against
    the shape, so a reader may index it by that layout without looking again.
    ``exactly`` reads it with the standard library, which keeps every digit of
    an integer, as the ORM reads JSON (``loads`` may round one past 64 bits).

    Raises:
        WireError: As ``parse``.
    """
    try:
        data = _loads_stdlib(payload) if exactly else loads(payload)
    except (ValueError, RecursionError):
        data = None
    shape = None
    if type(data) is dict:
        # The usual case: a version 2 message of a shape seen before, whose model,
        # action and column names one lookup checks together. (Subscripts and
        # method calls rather than a bound get: the cheapest reads in 3.12.)
        try:
            version, fields, rows = data[VERSION_KEY], data[FIELDS], data[ROWS]
            watched = data.get(WATCHED)
            # type() rather than ==: true and 2.0 would find version 2's shapes.
            if type(version) is int and type(fields) is list and type(rows) is list:
                if type(watched) is list:
                    watched = tuple(watched)
                # Absent, or a bool: 0 and 1 would find the shapes of False and True.
                old = data.get(OLD_VALUES)
                if old is None or type(old) is bool:
                    key = (version, data[MODEL], data[ACTION], tuple(fields), watched, old)
                    shape = _shapes.get(key)
        except (KeyError, TypeError):  # a key missing, or unhashable: not a shape seen before
            shape = None
    if shape is None:
        data, shape = _check(payload, data)
        rows = data[ROWS]
    elif len(rows) == 1:  # one check per row; most messages hold one
        row = rows[0]
        if type(row) is not list or not 0 < len(row) <= shape.full:
            _check_rows(rows, shape.full)
    else:
        _check_rows(rows, shape.full)
    xid, timestamp, context = data.get(XID), data.get(TIMESTAMP), data.get(CONTEXT)
    return (
        shape,
        rows,
        xid if type(xid) is int else None,
        timestamp if type(timestamp) in _TIMESTAMP_TYPES else None,
        None if context is None else parse_context(context),
    )


def _check(payload: str | bytes, data: Any) -> tuple[dict[str, Any], Shape]:
    """Check every other payload (version 1, a new shape, or not ours at all).

    Returns the data (read again if version 1) and its shape, which is kept
    for ``read_shape`` to look up when it is a version 2 one.
    """
    try:
        if data is None:
            # The standard library reads a number orjson refuses (1e400, an integer past
            # 64 bits: a jsonb array's element may hold one), and the others as orjson
            # does: floats as floats.
            data = _loads_stdlib(payload)
        if type(data) is dict and data.get(VERSION_KEY) == OBJECT_ROWS_VERSION:
            # Version 1 keeps every digit of its numbers.
            data = _decode_exact(payload if isinstance(payload, str) else payload.decode())
    except (ValueError, RecursionError) as exc:
        raise WireError(f"payload is not JSON: {exc}") from None
    if type(data) is not dict:
        raise WireError("payload is not a JSON object")
    version = data.get(VERSION_KEY)
    # type() rather than ==: true and 1.0 equal 1 in Python.
    if type(version) is not int or version not in (VERSION, OBJECT_ROWS_VERSION):
        raise WireError(f"unsupported wire format version {version!r} (this reads 1 and 2)")
    model, action, rows = data.get(MODEL), data.get(ACTION), data.get(ROWS)
    if type(model) is not str or action not in ACTIONS:
        raise WireError("payload lacks a model label or a known action")
    if type(rows) is not list:
        raise WireError("payload rows must be a list")
    if version == OBJECT_ROWS_VERSION:
        if not all(_is_row(r) for r in rows):
            raise WireError(
                "payload rows must be objects with a pk, "
                "objects as fields and old, and a list of names as changed"
            )
        return data, Shape(version, model, action, None, None, 0)
    watching = data.get(WATCHED)
    # watched is checked whatever the action: its items are part of the cache key below.
    fields, watched = _names(data.get(FIELDS)), _names(watching)
    if fields is None or watched is None:
        raise WireError("payload fields and watched must be lists of column names")
    sent_old = data.get(OLD_VALUES)
    if sent_old is not None and type(sent_old) is not bool:
        raise WireError("payload old must be true or false")
    old = action != "update" or sent_old is not False
    if action != "update" or not old:
        watched = ()
    shape = Shape(
        version, model, action, fields, watched, row_length(action, len(fields), old), old
    )
    _check_rows(rows, shape.full)
    # As read_shape looks them up: a bound keeps memory flat.
    if watching is None or type(watching) is list:
        watching = None if watching is None else tuple(watching)
        remember(_shapes, (version, model, action, fields, watching, sent_old), shape)
    return data, shape


def remember(cache: dict[Any, Any], key: Any, value: Any, limit: int = 1024) -> None:
    """Keep ``value`` in ``cache``, emptied first when it holds ``limit`` entries.

    For caches of what payloads send: anyone may notify on our channels, so
    their keys are unbounded. Emptying when full keeps memory flat, and the
    shapes that keep coming are cached again at once; a cache that stopped
    taking entries would decode every later new shape the slow way for good.
    """
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _check_rows(rows: list[Any], full: int) -> None:
    # The decoder indexes rows by this layout without looking again. A loop is
    # cheapest for a few rows; for many, C-level passes are.
    if len(rows) < 8:
        for row in rows:
            if type(row) is not list or not 0 < len(row) <= full:
                break
        else:
            return
    elif (
        _LISTS_ONLY.issuperset(map(type, rows))
        and min(map(len, rows)) > 0
        and max(map(len, rows)) <= full
    ):
        return
    raise WireError(f"payload rows must be arrays of 1 to {full} values")


_LISTS_ONLY = frozenset({list})
_STRINGS_ONLY = frozenset({str})
# Version 2 shapes seen (and checked) before, by version, model, action, fields,
# watched and old as sent.
_shapes: dict[tuple[Any, ...], Shape] = {}


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if type(value) is not list or not _STRINGS_ONLY.issuperset(map(type, value)):
        return None
    return tuple(value)


def parse_context(value: Any) -> dict[str, Any] | None:
    """The context object from the ``context`` key, or ``None``.

    A value that is not a JSON object (set by hand, malformed) is dropped
    rather than failing the whole message: the change itself is still good.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _is_row(row: Any) -> bool:
    # Checked here so that a stray NOTIFY on our channel is a WireError, not a crash.
    return (
        isinstance(row, dict)
        and PK in row
        and isinstance(row.get(FIELDS) or {}, dict)
        and isinstance(row.get(OLD) or {}, dict)
        and isinstance(row.get(CHANGED) or [], list)
        and all(isinstance(name, str) for name in row.get(CHANGED) or [])
    )


def encode(message: Message) -> str:
    """Render ``message`` as the compact JSON a trigger would send."""
    data: dict[str, Any] = {
        VERSION_KEY: message.version,
        MODEL: message.model,
        ACTION: message.action,
        XID: message.xid,
        TIMESTAMP: message.timestamp,
    }
    if message.version != OBJECT_ROWS_VERSION:
        data[FIELDS] = list(message.fields or ())
        if message.action == "update" and message.old:
            data[WATCHED] = list(message.watched or ())
        elif message.action == "update":
            data[OLD_VALUES] = False
    data[ROWS] = message.rows
    if message.context is not None:
        data[CONTEXT] = dumps(message.context)
    return dumps(data)


def dumps(value: Any) -> str:
    """Compact JSON in which a ``Decimal`` keeps every digit, as PostgreSQL sends numbers.

    ``json.dumps`` would have to go through ``float`` and lose digits, so a
    value that ``parse`` read would not survive being written back.

    Raises:
        TypeError: A value JSON cannot represent (a ``Decimal`` NaN or infinity too).
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError(f"Decimal {value} has no JSON form")
        return str(value)  # e.g. "12.50" or "1E+2", both JSON numbers
    if isinstance(value, dict):
        items = (f"{json.dumps(str(key))}:{dumps(item)}" for key, item in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(item) for item in value) + "]"
    return json.dumps(value)
