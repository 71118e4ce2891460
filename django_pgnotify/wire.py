"""The wire format: the JSON payload our triggers send, in one place.

The trigger builder takes its key names from here and the decoder parses with
``parse``, so the two sides cannot drift apart. Version 1::

    {"v": 1, "model": "shop.order", "action": "update", "xid": 5012,
     "ts": 1763717550.123456,
     "rows": [{"pk": 7,
               "fields": {"status": "paid", "total": 12.50},
               "old": {"status": "new", "total": 12.50},
               "changed": ["status"]}],
     "context": "{\\"actor\\": \\"user:42\\"}"}

- ``model``: the model's ``app_label.model_name``; ``action``: ``insert``,
  ``update`` or ``delete``; ``xid``: the writing transaction's 64-bit id;
  ``ts``: seconds since the epoch when the trigger ran (it also keeps
  PostgreSQL from folding two identical changes of one row into one).
- ``rows``: one entry per changed row (a row trigger sends one). Keys of
  ``fields`` and ``old`` and items of ``changed`` are column names; values are
  PostgreSQL's JSON renderings, ``timestamptz`` in UTC without an offset and
  ``interval`` in seconds.
- ``fields``: the declared columns (for a delete, the values the row had);
  ``old``: their previous values (update only); ``changed``: the declared and
  ``when_changed`` columns whose values changed (update only).
- ``context``: optional (added without a version bump: readers ignore keys
  they do not know, and must accept its absence): the writing transaction's
  ``pgnotify.context`` setting as a JSON *string* holding a JSON object, or
  ``null``. The trigger does not parse it, so that a malformed value set by
  hand never fails a write; the reader does.
- ``truncated: true`` replaces ``fields``/``old``/``changed`` when the payload
  would reach PostgreSQL's 8000-byte limit; only the pk is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

VERSION = 1

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
#: The channel of durable declarations' wake-up notification (payload empty).
DURABLE_CHANNEL = "pgnotify_durable"

ACTIONS = frozenset({"insert", "update", "delete"})


class WireError(ValueError):
    """A payload that is not a django-pgnotify message we can read."""


@dataclass(frozen=True)
class Message:
    """One parsed payload: a model, an action and the rows it concerns."""

    model: str
    action: str
    rows: list[dict[str, Any]]
    xid: int | None = None
    timestamp: Decimal | int | None = None
    version: int = VERSION
    context: dict[str, Any] | None = None


def parse(payload: str) -> Message:
    """Parse a payload; numbers with a fraction become ``Decimal`` (no float loss).

    Raises:
        WireError: Not JSON, not an object of this format, or a newer version.
    """
    try:
        data = json.loads(payload, parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("payload is not a JSON object")
    version = data.get(VERSION_KEY)
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python
        raise WireError(f"unsupported wire format version {version!r} (this reads {VERSION})")
    model, action, rows = data.get(MODEL), data.get(ACTION), data.get(ROWS)
    if not isinstance(model, str) or action not in ACTIONS:
        raise WireError("payload lacks a model label or a known action")
    if not isinstance(rows, list) or not all(_is_row(r) for r in rows):
        raise WireError(
            "payload rows must be a list of objects with a pk, "
            "objects as fields and old, and a list of names as changed"
        )
    xid, timestamp = data.get(XID), data.get(TIMESTAMP)
    return Message(
        model=model,
        action=action,
        rows=rows,
        xid=xid if isinstance(xid, int) and not isinstance(xid, bool) else None,
        timestamp=timestamp if isinstance(timestamp, (Decimal, int)) else None,
        context=parse_context(data.get(CONTEXT)),
    )


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
        ROWS: message.rows,
    }
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
