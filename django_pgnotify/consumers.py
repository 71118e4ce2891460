"""``RowChangeConsumer``: row changes pushed to WebSocket clients that may see them.

The client subscribes to a model (``{"subscribe": "shop.order"}``) or to one
row (``{"subscribe": "shop.order", "pk": 42}``); the consumer checks the
permission hook, joins the group the listener forwards to, and only then
acknowledges, so a change committed after the acknowledgement always arrives.
Authorization is deny-by-default; override :meth:`RowChangeConsumer.has_permission`
and :meth:`RowChangeConsumer.filter_event` for your own rules. Needs the
``channels`` extra. The protocol is documented in docs/channels.md.

Group memberships are renewed while the connection lasts (a layer forgets
those older than its ``group_expiry``) and left however the consumer ends,
a handler that raised included.

A channel layer drops messages to a channel over its capacity without a word, so the
consumer checks what it receives: a model's changes come with consecutive ``seq``, each
change names its row's previous one (``prev``) and checkpoints list the rows changed
since the last. Whatever it finds missing becomes a ``resync`` (reason ``gap``) to the
client, logged.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import math
import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.signals import setting_changed
from django.db import models
from django.db.backends.base.operations import BaseDatabaseOperations
from django.dispatch import receiver
from django.utils import timezone

from . import groups
from .conf import get_setting
from .connection import cancel_and_wait
from .declarations import DJANGO_INTERNAL_TYPES, column_type, get_declarations, stored_field
from .decoding import converter_for

logger = logging.getLogger("django_pgnotify.consumers")


class SubscriptionError(Exception):
    """A request the consumer refuses; sent to the client as an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: The integers each integer column type holds (PostgreSQL's, as Django's validators say).
_INTEGER_RANGES = BaseDatabaseOperations.integer_field_ranges
#: The Django field whose range each integer column type (as ``column_type`` names it) holds.
_INTEGER_COLUMNS = {
    "smallint": "SmallIntegerField",
    "smallserial": "SmallIntegerField",
    "integer": "IntegerField",
    "serial": "IntegerField",
    "bigint": "BigIntegerField",
    "bigserial": "BigIntegerField",
}


def _integer_range(field: models.Field, internal_type: str) -> tuple[str, int, int] | None:
    """What ``field``'s column holds: its class's range, named by its internal type,
    unless its column is of another type (``db_type()`` overridden: the ``bigserial``
    ``AutoField`` of old projects), whose range it is then; ``None`` for a column
    that is no integer type known here (a domain, ``numeric``): no bound is known."""
    low, high = _INTEGER_RANGES[internal_type]
    column = column_type(field)[0]
    if column is None:  # no PostgreSQL alias to ask: its class's
        return internal_type, low, high
    kind = _INTEGER_COLUMNS.get(column)
    if kind is None:
        return None
    if _INTEGER_RANGES[kind][1] == high:  # its class's own column (Positive*: no negatives)
        return internal_type, low, high
    return (column, *_INTEGER_RANGES[kind])


def _pk_value(model: type[models.Model], value: Any) -> Any:
    """The Python value of ``model``'s pk that ``value`` (as JSON carries it) spells.

    The pk field's ``to_python`` (for a custom field, what the listener's
    decoder makes of it), and for a datetime the time zone the listener
    decodes with: a naive one is in ``TIME_ZONE`` with ``USE_TZ``, as a query
    takes it; an aware one is made naive without. ``groups.pk_text`` of the
    result is then the text the listener names the row's group with.

    Raises:
        ValidationError: ``value`` is not a pk of ``model`` (an integer past
            its column's range included).
        ArithmeticError: A datetime within hours of year 1 or 9999 has no
            value in the other time zone.
    """
    field = model._meta.pk
    internal_type = stored_field(field).get_internal_type()
    if internal_type in DJANGO_INTERNAL_TYPES:
        pk = field.to_python(value)
    else:
        # A custom field's to_python is often the identity: read the pk as the
        # listener decodes it, by its column type ("1.50" a Decimal, as 1.5 is).
        try:
            pk = converter_for(field)(value)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise ValidationError(str(exc)) from None
    if isinstance(pk, int) and internal_type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[internal_type]
        # No row has it; 10**30 would name a group all the same. Past its class's range,
        # the column's type decides (looked up then only: this runs for every event).
        known = None if low <= pk <= high else _integer_range(stored_field(field), internal_type)
        if known is not None and not known[1] <= pk <= known[2]:
            raise ValidationError(f"{known[0]} holds integers from {known[1]} to {known[2]}")
    elif isinstance(pk, Decimal):
        field.run_validators(pk)  # max_digits: no row has a pk past them
    elif isinstance(pk, datetime.datetime):
        if settings.USE_TZ and timezone.is_naive(pk):
            pk = timezone.make_aware(pk, timezone.get_default_timezone())
        elif not settings.USE_TZ and timezone.is_aware(pk):
            pk = timezone.make_naive(pk, timezone.get_default_timezone())
    return pk


def _row_key(label: str, pk: Any) -> str | None:
    """The key of the row an event message (its JSON-safe ``pk``) is about."""
    if pk is None:  # no row's change
        return None
    try:
        return groups.pk_text(_pk_value(apps.get_model(label), pk))
    except (LookupError, ValidationError, TypeError, ValueError, ArithmeticError):
        return None


def _has_perm_now(user: Any, perm: str) -> bool:
    """``user.has_perm(perm)``, for the user as the database has it now.

    The scope's user is loaded once per connection, and Django's ModelBackend
    caches its permissions on it: asked directly, a permission revoked (or the
    user deactivated or deleted) after the first subscription would never count.
    """
    if isinstance(user, models.Model):  # a LazyObject's __class__ is its user's
        user = user.__class__._default_manager.filter(pk=user.pk).first()
        if user is None:
            return False
    return bool(user.has_perm(perm))


@functools.cache
def _announces(label: str) -> bool:
    """Whether the model ``label`` (an installed model's) declares anything valid.

    Asked on every subscribe message, in the event loop: resolving declarations
    takes a few hundred microseconds, and they change only with the settings.
    """
    try:
        return bool(get_declarations([label]))
    except ImproperlyConfigured:
        return False


@receiver(setting_changed)
def _forget_declarations(setting: str, **kwargs: Any) -> None:
    if setting == "PGNOTIFY":
        _announces.cache_clear()


#: Seconds joining or leaving the groups (a subscription, a renewal, a consumer that
#: ends) may take. A layer that does not answer (Redis stalled, a read timeout of
#: ``None``) must not keep a consumer alive once its socket closed: the ASGI server
#: waits for it at shutdown.
LEAVE_TIMEOUT = 5.0
#: Group memberships are renewed this many times per ``group_expiry`` of the layer, so
#: that a membership lapses only when several renewals in a row failed (Redis restarting).
RENEWALS_PER_EXPIRY = 4
#: Seconds between two warnings that consumers of this process missed messages, at least.
GAP_WARNING_INTERVAL = 60.0
#: Listeners (``stream``) per model whose sequence a consumer follows at once: two overlap
#: during a deploy, several share durable events; the oldest is forgotten beyond.
MAX_STREAMS = 8

#: What the listener adds to its messages for consumers to check them, not for clients.
_CHANGE_CHECKS = frozenset({"type", "prev", "prev_age", "last_age"})
_RESYNC_CHECKS = frozenset({"type", "seq", "checkpoint"})

#: What the consumers of this process found missing: ``gaps`` counts the ``resync``
#: frames they sent for it (one per gap, whatever the changes it stands for).
stats: Counter[str] = Counter()
_gap_warned = -math.inf


def _note_gap(consumer: RowChangeConsumer, label: str) -> None:
    """Count a gap; log it, at most once per ``GAP_WARNING_INTERVAL`` in this process."""
    global _gap_warned
    stats["gaps"] += 1
    now = time.monotonic()
    if now - _gap_warned < GAP_WARNING_INTERVAL:
        return
    _gap_warned = now
    layer = consumer.channel_layer
    capacity = getattr(layer, "capacity", None)
    if hasattr(layer, "get_capacity"):
        capacity = layer.get_capacity(consumer.channel_name)
    if capacity:
        cause = (
            f"A layer drops messages to a channel already holding its capacity ({capacity}) "
            "of them, and a client following many rows that change together gets one "
            "message per row: raise the layer's capacity, or follow the model instead of "
            "many of its rows"
        )
    else:  # channels_redis's pub/sub layer
        cause = "A layer without a capacity loses what is sent while it reconnects to Redis"
    logger.warning(
        "pgnotify: the channel layer lost messages of %s to a consumer, which sent its "
        "client a resync (%d such gap(s) in this process so far). %s",
        label,
        stats["gaps"],
        cause,
    )


class _Heard:
    """What a consumer has of one model's changes from one listener (``stream``).

    Seqs "up to which it has every change": received, or before a ``resync``
    that made its client reload. ``None`` where it cannot tell yet.
    """

    __slots__ = ("checkpoint", "floor", "last", "model", "rows", "shown")

    def __init__(self, rows: Any = ()) -> None:
        #: The highest seq handled: a change that comes through two groups is sent once.
        self.last = 0
        #: While following the model: every change up to this seq (``None``: from the next
        #: message that only the model group carries, see ``RowChangeConsumer._counts``).
        self.model: int | None = None
        #: Each followed row's last seq (``None``: none since it was followed, see ``floor``).
        self.rows: dict[str, int | None] = dict.fromkeys(rows)
        #: The ``n`` of the last checkpoint received.
        self.checkpoint: int | None = None
        #: The seq of that checkpoint: the changes of a row followed since have later ones.
        self.floor = 0
        #: Whose changes the client was sent since it followed them (the model: all of them)
        #: and last reloaded them: followed rows' keys, ``None`` for the model's other rows.
        #: One found later to be of a subscription before may be older than what its client
        #: reloaded.
        self.shown: set[str | None] = set()

    def cover(self, seq: int, model: bool) -> None:
        """Count every change up to ``seq`` as had: the client reloads them."""
        if model:
            self.model = max(self.model or 0, seq)
        for key, had in self.rows.items():
            self.rows[key] = max(self.floor if had is None else had, seq)


class RowChangeConsumer(AsyncJsonWebsocketConsumer):
    """An async JSON WebSocket consumer that pushes ``row_changed`` events to subscribers.

    Attributes:
        max_message_bytes: Longer client messages get a ``too_large`` error.
        max_subscriptions: Subscriptions per connection, at most.
    """

    max_message_bytes = 4096
    max_subscriptions = 100

    async def __call__(
        self, scope: Any, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Channels calls disconnect() only for a closed socket; a handler that
            # raised ends the consumer without it, and the layer would keep pushing
            # every batch to the dead channel until its group_expiry (a day).
            await self.leave_groups()

    async def connect(self) -> None:
        # model label -> {"model": bool, "rows": {pk text: pk as sent},
        #                 "names": {row group without the model group's name: pk text},
        #                 "joined": {pk text: time.monotonic() as it began joining},
        #                 "model_joined": the same for the model, None: not followed}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.joined: set[str] = set()
        # model label -> {stream: what this consumer has of it}
        self.heard: dict[str, dict[str, _Heard]] = {}
        self.seen_resyncs: set[Any] = set()
        self.row_groups = bool(get_setting("CHANNEL_ROW_GROUPS"))
        self._groups_lock = asyncio.Lock()
        self._renewing: asyncio.Task[None] | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.leave_groups()

    async def leave_groups(self) -> None:
        """Leave every group joined, each one even when leaving another fails."""
        renewing = getattr(self, "_renewing", None)
        if renewing is not None:
            await cancel_and_wait(renewing)
            self._renewing = None
        joined: set[str] = getattr(self, "joined", set())
        self.joined = set()
        if not joined:
            return
        try:
            failed = await asyncio.wait_for(self._discard(joined), LEAVE_TIMEOUT)
        except asyncio.TimeoutError:
            failed = joined
        if failed:
            logger.warning(
                "pgnotify: could not leave %d group(s) (%s...); the channel layer drops "
                "them after its group_expiry",
                len(failed),
                min(failed),
            )

    async def _discard(self, joined: set[str]) -> set[str]:
        failed: set[str] = set()
        for group in sorted(joined):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:
                failed.add(group)
        return failed

    # Hooks

    async def has_permission(self, model: type[models.Model], pk: Any | None) -> bool:
        """Whether this connection may follow ``model`` (``pk`` is ``None``) or one of its rows.

        Deny by default: only an authenticated user with the model's ``view``
        permission (``user.has_perm("shop.view_order")``), as the database has it
        now. Override for other rules; ``self.scope["user"]`` is set by Channels'
        ``AuthMiddlewareStack``.
        """
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return False
        codename = f"{model._meta.app_label}.view_{model._meta.model_name}"
        return await database_sync_to_async(_has_perm_now)(user, codename)

    async def filter_event(
        self, model: type[models.Model], event: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The event as this client may see it, or ``None`` to drop it (row-level rules).

        ``event`` is the frame about to be sent (see docs/channels.md); return a
        copy with fields removed, or ``None``. By default every event of a
        permitted subscription is sent as is.
        """
        return event

    # Receiving from the client

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if text_data is not None:  # a WebSocket's text is UTF-8; a test's str may be anything
            size = len(text_data.encode("utf-8", "surrogatepass"))
        else:
            size = len(bytes_data or b"")
        if size > self.max_message_bytes:
            await self.send_error(
                "too_large", f"Messages may be at most {self.max_message_bytes} bytes."
            )
            return
        if text_data is None:
            await self.send_error("malformed", "Send JSON text frames, not binary ones.")
            return
        try:
            content = json.loads(text_data)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." within the size limit
            await self.send_error("malformed", "Not JSON.")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        request = content if isinstance(content, dict) else None
        try:
            if request is None:
                raise SubscriptionError("malformed", "Send a JSON object.")
            if "subscribe" in request:
                await self.subscribe(request)
            elif "unsubscribe" in request:
                await self.unsubscribe(request)
            else:
                raise SubscriptionError(
                    "malformed",
                    'Expected {"subscribe": "app_label.model"} or {"unsubscribe": ...}.',
                )
        except SubscriptionError as exc:
            await self.send_error(exc.code, exc.message, request)

    async def subscribe(self, request: dict[str, Any]) -> None:
        """Follow a model or a row, as ``request`` asks; again what it follows renews it.

        A renewal the permission hook refuses ends the subscription: what the
        connection was allowed to follow it may not follow any more.
        """
        model, label = self.resolve_model(request["subscribe"])
        pk = self.resolve_pk(model, request) if "pk" in request else None
        key = None if pk is None else groups.pk_text(pk)
        renewed = self._follows(label, key)
        if not await self.has_permission(model, pk):
            if renewed:
                self._forget(label, key)
                await self.sync_groups()
            # The same answer whether the model or the row exists or not.
            raise SubscriptionError("forbidden", f"You may not follow {label}.")
        count = sum(int(e["model"]) + len(e["rows"]) for e in self.subscriptions.values())
        if count >= self.max_subscriptions and not renewed:
            raise SubscriptionError(
                "too_many", f"At most {self.max_subscriptions} subscriptions per connection."
            )
        entry = self.subscriptions.setdefault(
            label, {"model": False, "rows": {}, "names": {}, "joined": {}, "model_joined": None}
        )
        streams = self.heard.get(label, {}).values()
        if key is None:
            if not renewed:
                entry["model_joined"] = time.monotonic()
                for heard in streams:
                    heard.model = None  # from its first change or checkpoint
                    heard.shown.clear()  # the client reloads the model, its rows included
            entry["model"] = True
        else:
            if not renewed:
                cut = len(groups.model_group(label)) + 1  # the row group's name from there
                entry["names"][groups.row_group(label, key)[cut:]] = key
                entry["joined"][key] = time.monotonic()
                for heard in streams:  # with the model followed, it has had its changes
                    heard.rows[key] = heard.model if entry["model"] else None
                    heard.shown.discard(key)
            entry["rows"][key] = request["pk"]
        await self.sync_groups()
        await self.send_frame("subscribed", request, label)

    async def unsubscribe(self, request: dict[str, Any]) -> None:
        model, label = self.resolve_model(request["unsubscribe"])
        if label in self.subscriptions:
            key = groups.pk_text(self.resolve_pk(model, request)) if "pk" in request else None
            self._forget(label, key)
        await self.sync_groups()
        await self.send_frame("unsubscribed", request, label)

    def _follows(self, label: str, key: str | None) -> bool:
        """Whether the connection follows the model ``label`` (``key`` None) or its row."""
        entry = self.subscriptions.get(label)
        if entry is None:
            return False
        return bool(entry["model"]) if key is None else key in entry["rows"]

    def _forget(self, label: str, key: str | None) -> None:
        """End the subscription to the model ``label`` (``key`` None) or to its row ``key``,
        and what it expected of it (``sync_groups`` leaves its groups)."""
        entry = self.subscriptions.get(label)
        if entry is None:
            return
        streams = self.heard.get(label, {}).values()
        if key is not None:
            entry["rows"].pop(key, None)
            entry["joined"].pop(key, None)
            entry["names"] = {n: k for n, k in entry["names"].items() if k != key}
            for heard in streams:
                heard.rows.pop(key, None)
                heard.shown.discard(key)  # followed again, it starts from its reload
        else:
            entry["model"] = False
            entry["model_joined"] = None
            for heard in streams:
                heard.model = None
                heard.shown.discard(None)
        if not entry["model"] and not entry["rows"]:
            del self.subscriptions[label]
            self.heard.pop(label, None)

    def resolve_model(self, value: Any) -> tuple[type[models.Model], str]:
        if not isinstance(value, str) or value.count(".") != 1 or len(value) > 200:
            raise SubscriptionError("malformed", 'Name a model as "app_label.model".')
        try:
            model = apps.get_model(value)
        except (LookupError, ValueError):
            raise SubscriptionError("unknown_model", f"No model {value!r}.") from None
        label = model._meta.label_lower
        if not _announces(label):
            raise SubscriptionError("not_notifying", f"{label} does not announce its changes.")
        return model, label

    def resolve_pk(self, model: type[models.Model], request: dict[str, Any]) -> Any:
        value = request["pk"]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise SubscriptionError("invalid_pk", "pk must be a string or an integer.")
        try:
            if isinstance(value, str):
                value.encode("utf-8")  # a lone surrogate (JSON's "\ud800") is no row's
            pk = _pk_value(model, value)
        except (ValidationError, TypeError, ValueError, ArithmeticError) as exc:
            if isinstance(exc, ValidationError):
                reason = " ".join(exc.messages)
            else:
                reason = " ".join(str(exc).split()) or type(exc).__name__
            raise SubscriptionError(
                "invalid_pk",
                f"{value!r} is not a valid pk of {model._meta.label_lower} "
                f"(field {model._meta.pk.name}): {reason.rstrip('.')}.",
            ) from None
        if not self.row_groups:
            raise SubscriptionError(
                "rows_unavailable",
                'Row subscriptions need PGNOTIFY["CHANNEL_ROW_GROUPS"] = True; '
                "subscribe to the model instead.",
            )
        return pk

    async def sync_groups(self) -> None:
        """Join and leave groups so that membership matches the subscriptions."""
        wanted: set[str] = set()
        for label, entry in self.subscriptions.items():
            if entry["model"]:
                wanted.add(groups.model_group(label))
            if entry["rows"]:
                wanted.add(groups.resync_group(label))
                wanted.update(groups.row_group(label, pk) for pk in entry["rows"])
        async with self._groups_lock:
            try:
                # Bounded: Channels handles a client's messages one at a time, so the
                # disconnect of a socket closed meanwhile waits for this to end.
                await asyncio.wait_for(self._apply_groups(wanted), LEAVE_TIMEOUT)
            except asyncio.TimeoutError:
                # As a layer that fails: the consumer ends (and leaves its groups).
                raise TimeoutError(
                    f"channel layer did not join or leave groups within {LEAVE_TIMEOUT}s"
                ) from None
        if self.joined and self._renewing is None:
            expiry = getattr(self.channel_layer, "group_expiry", None)
            if expiry:  # channels_redis's core layer and the in-memory one forget members
                self._renewing = asyncio.get_running_loop().create_task(
                    self._renew_groups(expiry / RENEWALS_PER_EXPIRY),
                    name="pgnotify-renew-groups",
                )

    async def _apply_groups(self, wanted: set[str]) -> None:
        for group in sorted(wanted - self.joined):
            # Before the add: cancelled during it, the consumer still leaves the group.
            self.joined.add(group)
            await self.channel_layer.group_add(group, self.channel_name)
        for group in sorted(self.joined - wanted):
            await self.channel_layer.group_discard(group, self.channel_name)
            self.joined.discard(group)

    async def _renew_groups(self, interval: float) -> None:
        """Join the joined groups again every ``interval`` seconds.

        A layer with a ``group_expiry`` (channels_redis's core layer: a day by
        default) drops members that joined longer ago, and a page left open that
        long would go deaf, quietly. Joining again restarts that clock; it runs on a
        timer because a quiet page receives nothing that could trigger it.
        """
        while True:
            await asyncio.sleep(interval)
            async with self._groups_lock:
                try:
                    # Bounded: a subscribe waits for this lock, and a layer may hang.
                    await asyncio.wait_for(self._join_again(), LEAVE_TIMEOUT)
                except Exception as exc:  # tried again at the next interval
                    logger.warning(
                        "pgnotify: could not renew the group memberships of %s: %s",
                        self.channel_name,
                        " ".join(str(exc).split()) or type(exc).__name__,
                    )

    async def _join_again(self) -> None:
        for group in sorted(self.joined):
            await self.channel_layer.group_add(group, self.channel_name)

    # Sending to the client

    async def send_frame(self, kind: str, request: dict[str, Any], label: str) -> None:
        frame: dict[str, Any] = {"type": kind, "model": label}
        if "pk" in request:
            frame["pk"] = request["pk"]
        if "id" in request:
            frame["id"] = request["id"]
        await self.send_json(frame)

    async def send_error(
        self, code: str, message: str, request: dict[str, Any] | None = None
    ) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if request is not None and "id" in request:
            frame["id"] = request["id"]
        await self.send_json(frame)

    # Messages from the channel layer

    async def pgnotify_batch(self, message: dict[str, Any]) -> None:
        """Several messages in one, as the listener sends them: each handled in turn.

        Each is one of the message types below; the client gets one frame per
        event, in order, exactly as when they came one by one. Handlers are
        called directly rather than through ``dispatch``, which would close
        stale database connections again for every event.
        """
        handlers = {
            "pgnotify.row_changed": self.pgnotify_row_changed,
            "pgnotify.resync": self.pgnotify_resync,
            "pgnotify.checkpoint": self.pgnotify_checkpoint,
        }
        for item in message.get("messages", ()):
            handler = handlers.get(item.get("type"))
            if handler is not None:  # a type of a newer listener is skipped, not fatal
                await handler(item)

    def _heard(self, label: str, stream: str) -> _Heard:
        streams = self.heard.setdefault(label, {})
        heard = streams.get(stream)
        if heard is None:
            if len(streams) >= MAX_STREAMS:
                del streams[next(iter(streams))]
            heard = streams[stream] = _Heard(self.subscriptions[label]["rows"])
        return heard

    async def pgnotify_row_changed(self, message: dict[str, Any]) -> None:
        label = message.get("model", "")
        entry = self.subscriptions.get(label)
        if entry is None:
            return  # unsubscribed while the message was on its way
        key = _row_key(label, message.get("pk")) if entry["rows"] else None
        if key not in entry["rows"]:
            if not entry["model"]:
                return
            key = None
        stream, seq = message.get("stream", ""), message.get("seq", 0)
        heard = self._heard(label, stream)
        # Model and row groups both carry an event subscribed both ways: send it once.
        if seq <= heard.last:
            return
        before, heard.last = heard.last, seq
        if self._counts(entry, heard, key is None):  # every change, one after the other
            missed = heard.model is not None and seq > heard.model + 1
            # The first one checked, after changes of followed rows shown through their
            # groups: those sent between them may have been before the model was followed.
            leftover = heard.model is None and bool(heard.shown) and seq > before + 1
            heard.model = seq
            if key is not None:
                heard.rows[key] = seq
            if missed:
                heard.cover(seq, model=True)
                await self._model_gap(entry, heard, label, stream, message.get("last_age"))
            elif leftover and self._before_model(entry, message.get("last_age")):
                heard.cover(seq, model=True)
                await self.send_gap(label, stream, None, sure=False)  # as _model_gap's
        elif key is not None:  # the row's previous change, since its model's last checkpoint
            had = heard.rows.get(key)
            heard.rows[key] = seq
            prev = message.get("prev")
            # One sent before the row was followed is none of its business, even after a
            # change it got: one of an earlier subscription still on its way, say.
            if (
                isinstance(prev, int)
                and prev > (heard.floor if had is None else had)
                and not self._before(entry, key, message.get("prev_age"))
            ):
                await self.send_gap(label, stream, key, sure=had is not None)
        event = {k: v for k, v in message.items() if k not in _CHANGE_CHECKS}
        event = {"type": "row_changed", **event}
        filtered = await self.filter_event(apps.get_model(label), event)
        if filtered is not None:
            await self.send_json(filtered)
            heard.shown.add(key)

    async def pgnotify_checkpoint(self, message: dict[str, Any]) -> None:
        """The rows of a model changed since its previous checkpoint, with their last ``seq``.

        Reveals a change this consumer never got, even the last of its row.
        Followers of the model compare ``seq`` instead; a checkpoint missed
        hides which rows it named, so all the model's rows are resynced. Before
        the first one since it subscribed, a consumer cannot count: the
        previous one (or the listener's resync) was missed if it was sent after
        the subscription, which ``since`` (its age when this one was sent, at
        least) tells: ``now - since`` is when it was sent, at the latest.
        """
        label = message.get("model", "")
        entry = self.subscriptions.get(label)
        n, seq = message.get("n"), message.get("seq")
        if entry is None or not isinstance(n, int) or not isinstance(seq, int):
            return
        stream = message.get("stream", "")
        heard = self._heard(label, stream)
        if heard.checkpoint is not None and n <= heard.checkpoint:
            return  # through the model group and the resync group
        lost: list[str] = []  # rows
        stale: list[str] = []  # rows whose change of a subscription before the client got
        sure = True
        model = self._counts(entry, heard, not entry["rows"])
        if model:
            missed = heard.model is not None and seq > heard.model
            if missed and self._before_model(entry, message.get("last_age")):
                heard.cover(seq, model=True)
                heard.checkpoint = n
                heard.floor = seq
                await self._model_gap(entry, heard, label, stream, message.get("last_age"))
                return
        else:
            missed = heard.checkpoint is not None and n > heard.checkpoint + 1
            since = message.get("since")
            if heard.checkpoint is None and isinstance(since, (int, float)):
                sent = time.monotonic() - since  # the previous one's sending, at the latest
                missed = any(joined < sent for joined in entry["joined"].values())
                sure = False  # or it was sent as the consumer joined, and arrived late
        heard.checkpoint = n
        if not model and not missed:
            rows = message.get("rows")
            rows = rows if isinstance(rows, dict) else {}  # of a newer listener: not fatal
            for name, key in entry["names"].items():
                had = heard.rows.get(key)
                named = rows.get(name)  # its last change, how long ago
                last, age = named if isinstance(named, list) and len(named) == 2 else (None, None)
                if not isinstance(last, int) or last <= (heard.floor if had is None else had):
                    continue
                if self._before(entry, key, age):  # a change sent before it subscribed
                    if key in heard.shown:  # after one the client got: of a subscription before
                        stale.append(key)
                    continue
                lost.append(key)
                sure = sure and had is not None
        heard.cover(seq, model=model)
        heard.floor = seq
        sure = sure and (missed or bool(lost))  # stale rows alone: nothing was lost
        if missed or len(lost) + len(stale) > 1:
            await self.send_gap(label, stream, None, sure=sure)
        elif lost or stale:
            await self.send_gap(label, stream, (lost or stale)[0], sure=sure)

    @staticmethod
    def _counts(entry: dict[str, Any], heard: _Heard, model_group_only: bool) -> bool:
        """Whether a message is checked against the model's every ``seq``.

        Once following the model, from the first message that only its group
        carries (``model_group_only``): a row's change or a checkpoint can come
        through the row or resync group from a round whose model batch was sent
        before the consumer joined the model group, and a later round's too.
        """
        return bool(entry["model"]) and (heard.model is not None or model_group_only)

    async def _model_gap(
        self, entry: dict[str, Any], heard: _Heard, label: str, stream: str, age: Any
    ) -> None:
        """Changes of the model followed that the consumer did not get, up to a change or
        checkpoint whose model's last change before it was sent ``age`` seconds before it.

        A gap, unless that one was sent before the consumer followed the model: they were
        sent while it did not, and what it had got since came from a subscription before,
        still in its channel. The client reloaded after them, so it is told to reload
        again only if it was sent one of those (which may be older), without counting a gap:
        whatever its row, a followed one's included (followed again with the model).
        """
        if not self._before_model(entry, age):
            await self.send_gap(label, stream, None, sure=True)
        elif heard.shown:
            await self.send_gap(label, stream, None, sure=False)

    @staticmethod
    def _before_model(entry: dict[str, Any], age: Any) -> bool:
        """Whether a change was sent before the consumer began to follow the model, being
        ``age`` seconds older, at least, than what named it (just received)."""
        joined = entry["model_joined"]
        return (
            joined is not None and isinstance(age, (int, float)) and time.monotonic() - age < joined
        )

    def _before(self, entry: dict[str, Any], key: str, age: Any) -> bool:
        """Whether a change of the row ``key`` was sent before the consumer began to follow
        it, being ``age`` seconds older, at least, than what named it (just received)."""
        return isinstance(age, (int, float)) and time.monotonic() - age < entry["joined"][key]

    async def send_gap(self, label: str, stream: str, key: str | None, *, sure: bool) -> None:
        """Tell the client to reload ``label`` (its row ``key``): it missed changes.

        ``sure`` is false for a change that may have been sent as the consumer
        subscribed: it is resynced all the same, but neither counted nor logged.
        """
        frame: dict[str, Any] = {"type": "resync", "model": label}
        if key is not None:
            frame["pk"] = self.subscriptions[label]["rows"][key]
        frame.update(reason="gap", stream=stream, id=uuid.uuid4().hex[:12])
        await self.send_json(frame)
        for heard in self.heard.get(label, {}).values():  # what the client reloads
            if key is None:
                heard.shown.clear()
            else:
                heard.shown.discard(key)
        if sure:
            _note_gap(self, label)

    async def pgnotify_resync(self, message: dict[str, Any]) -> None:
        label = message.get("model", "")
        entry = self.subscriptions.get(label)
        if entry is None:
            return
        # Sent to the model group and the resync group: a client in both gets it once.
        if message.get("id") in self.seen_resyncs:
            return
        self.seen_resyncs = {*list(self.seen_resyncs)[-20:], message.get("id")}
        seq, checkpoint = message.get("seq"), message.get("checkpoint")
        if isinstance(seq, int) and isinstance(checkpoint, int):  # what the client reloads
            heard = self._heard(label, message.get("stream", ""))
            heard.checkpoint = max(heard.checkpoint or 0, checkpoint)
            heard.cover(seq, model=self._counts(entry, heard, not entry["rows"]))
            heard.floor = max(heard.floor, seq)  # for rows followed later: not theirs
        for each in self.heard.get(label, {}).values():  # the client reloads the model
            each.shown.clear()
        frame = {k: v for k, v in message.items() if k not in _RESYNC_CHECKS}
        await self.send_json({"type": "resync", **frame})
