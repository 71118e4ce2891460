"""Forwarding row changes to Channels groups, so that WebSocket consumers can push them.

The listener dispatches ``row_changed`` as usual; a :class:`ChannelsDispatcher`
then hands each dispatched event to a :class:`ChannelLayerForwarder`, which
sends it to the model's group (and the row's, with ``CHANNEL_ROW_GROUPS``)
from a task of its own. A channel layer that fails (Redis gone) therefore
never delays signal dispatch: messages wait in a bounded queue, sending is
retried with backoff, and what had to be dropped is followed by a ``resync``
message once sending works again. Needs the ``channels`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from channels.layers import BaseChannelLayer, get_channel_layer
from django.core.exceptions import ImproperlyConfigured
from django.utils.duration import duration_iso_string

from . import groups
from .backoff import Backoff
from .conf import get_setting
from .dispatch import Dispatcher
from .events import RowChange
from .signals import listener_reconnected, listener_started, listener_stopped

logger = logging.getLogger("django_pgnotify.channels")

#: The ``type`` of event messages; a consumer handles them in ``pgnotify_row_changed``.
ROW_CHANGED = "pgnotify.row_changed"
#: The ``type`` of resync messages; a consumer handles them in ``pgnotify_resync``.
RESYNC = "pgnotify.resync"
#: Messages waiting to be sent, at most; the oldest are dropped beyond (and resynced).
QUEUE_SIZE = 10_000
#: Seconds one ``group_send`` may take before it counts as failed.
SEND_TIMEOUT = 5.0
#: Seconds a stopping listener gives the queue to drain.
DRAIN_TIMEOUT = 2.0


def json_safe(value: Any) -> Any:
    """``value`` with every Python type the decoder produces turned into JSON types.

    Decimals become strings (no float rounding), dates and times ISO 8601,
    durations ISO 8601 durations, UUIDs strings, bytes base64.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return duration_iso_string(value)
    if isinstance(value, (bytes, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def event_message(event: RowChange, seq: int, stream: str) -> dict[str, Any]:
    """The channel-layer message for ``event`` (documented in docs/channels.md)."""
    return {
        "type": ROW_CHANGED,
        "model": event.label,
        "action": event.action,
        "pk": json_safe(event.pk),
        "fields": json_safe(event.fields),
        "old": json_safe(event.old),
        "changed": sorted(event.changed),
        "truncated": event.truncated,
        "context": json_safe(event.context),
        "xid": event.xid,
        "timestamp": event.timestamp.isoformat() if event.timestamp else None,
        "durable": event.durable,
        "event_id": event.event_id,
        "seq": seq,
        "stream": stream,
    }


def resync_message(label: str, reason: str, stream: str, **extra: Any) -> dict[str, Any]:
    """The message telling subscribers of ``label`` that they missed changes."""
    return {
        "type": RESYNC,
        "model": label,
        "reason": reason,
        "stream": stream,
        "id": uuid.uuid4().hex[:12],
        **extra,
    }


class ChannelLayerForwarder:
    """Sends events to Channels groups from a task of its own, retrying on failure.

    Args:
        layer: The ``CHANNEL_LAYERS`` alias to send through.
        row_groups: Also send each event to its row's group;
            ``PGNOTIFY["CHANNEL_ROW_GROUPS"]`` by default.
        stats: Where to count ``forwarded``, ``forward_errors`` and
            ``forward_dropped``.
        queue_size: Messages waiting to be sent, at most.

    Raises:
        ImproperlyConfigured: ``layer`` is not in ``CHANNEL_LAYERS``.
    """

    def __init__(
        self,
        layer: str = "default",
        *,
        row_groups: bool | None = None,
        stats: Counter[str] | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.layer_alias = layer
        self.layer: BaseChannelLayer | None = get_channel_layer(layer)
        if self.layer is None:
            raise ImproperlyConfigured(
                f"Channel layer {layer!r} is not configured: add it to settings.CHANNEL_LAYERS "
                'or change PGNOTIFY["CHANNEL_LAYER"] / --channel-layer.'
            )
        if row_groups is None:
            row_groups = bool(get_setting("CHANNEL_ROW_GROUPS"))
        self.row_groups = row_groups
        self.stats: Counter[str] = stats if stats is not None else Counter()
        #: Changes its ``seq`` counts from; new for each forwarder, so a client can
        #: tell a restarted listener (sequence numbers start over) from a gap.
        self.stream = uuid.uuid4().hex[:12]
        self.sequence: Counter[str] = Counter()
        self._pending: deque[tuple[list[str], dict[str, Any]]] = deque()
        self._queue_size = queue_size
        self._dropped_models: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Feeding

    def submit(self, events: Iterable[RowChange]) -> None:
        """Queue ``events`` for sending (on the event loop the forwarder runs on)."""
        for event in events:
            label = event.label
            self.sequence[label] += 1
            message = event_message(event, self.sequence[label], self.stream)
            targets = [groups.model_group(label)]
            if self.row_groups and event.pk is not None:
                targets.append(groups.row_group(label, event.pk))
            self._enqueue(targets, message)

    def resync(self, labels: Iterable[str], reason: str, **extra: Any) -> None:
        """Queue a ``resync`` message to the subscribers of each model of ``labels``."""
        for label in sorted(set(labels)):
            message = resync_message(label, reason, self.stream, **extra)
            self._enqueue([groups.model_group(label), groups.resync_group(label)], message)

    def _enqueue(self, targets: list[str], message: dict[str, Any]) -> None:
        if len(self._pending) >= self._queue_size:
            _, oldest = self._pending.popleft()
            self.stats["forward_dropped"] += 1
            self._dropped_models.add(oldest["model"])
        self._pending.append((targets, message))
        self._ensure_running()
        assert self._wake is not None
        self._wake.set()

    # Sending

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="pgnotify-channels-forwarder")

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            targets, message = self._pending[0]
            failing_since: float | None = None
            backoff = Backoff.from_settings()
            sent = 0
            while True:
                try:
                    for group in targets[sent:]:
                        await asyncio.wait_for(self._send(group, message), SEND_TIMEOUT)
                        sent += 1
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats["forward_errors"] += 1
                    if failing_since is None:
                        failing_since = time.monotonic()
                        logger.error(
                            "pgnotify: cannot forward %s %s to channel layer %r: %s; "
                            "retrying with backoff (signals are still dispatched)",
                            message["model"],
                            message.get("action", "resync"),
                            self.layer_alias,
                            " ".join(str(exc).split()) or type(exc).__name__,
                        )
                    else:
                        logger.warning(
                            "pgnotify: channel layer %r still failing (%d message(s) waiting): %s",
                            self.layer_alias,
                            len(self._pending),
                            " ".join(str(exc).split()) or type(exc).__name__,
                        )
                    await asyncio.sleep(backoff.next())
            if self._pending and self._pending[0][1] is message:
                self._pending.popleft()
            if message["type"] == ROW_CHANGED:
                self.stats["forwarded"] += 1
            if failing_since is not None:
                logger.warning(
                    "pgnotify: forwarding to channel layer %r works again after %.1fs "
                    "(%d message(s) dropped meanwhile)",
                    self.layer_alias,
                    time.monotonic() - failing_since,
                    self.stats["forward_dropped"],
                )
            if self._dropped_models:
                dropped, self._dropped_models = self._dropped_models, set()
                self.resync(dropped, "dropped")

    async def _send(self, group: str, message: dict[str, Any]) -> None:
        assert self.layer is not None
        await self.layer.group_send(group, message)

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait up to ``timeout`` seconds for the queue to empty, then stop sending."""
        deadline = time.monotonic() + timeout
        while self._pending and self._task is not None and not self._task.done():
            if time.monotonic() >= deadline:
                logger.warning(
                    "pgnotify: %d message(s) for channel layer %r not sent at stop",
                    len(self._pending),
                    self.layer_alias,
                )
                break
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class ChannelsDispatcher(Dispatcher):
    """A ``Dispatcher`` that also forwards every dispatched event to Channels groups.

    Pass it to a ``Listener`` (``pgnotify_listen --channel-layer`` does). After
    a reconnect of that listener, subscribers of each of its models get a
    ``resync`` message, because changes in the gap were never seen.

    Args:
        layer: The ``CHANNEL_LAYERS`` alias.
        labels: The labels of the models the listener serves (for resync).
        row_groups: As for :class:`ChannelLayerForwarder`.
        stats: The counter to count in.
    """

    def __init__(
        self,
        layer: str = "default",
        labels: Iterable[str] = (),
        *,
        row_groups: bool | None = None,
        stats: Counter[str] | None = None,
    ) -> None:
        super().__init__(stats)
        self.labels = sorted(set(labels))
        self.forwarder = ChannelLayerForwarder(layer, row_groups=row_groups, stats=self.stats)
        listener_started.connect(self._on_started)
        listener_reconnected.connect(self._on_reconnected)
        listener_stopped.connect(self._on_stopped)

    def has_async_receivers(self, events: Sequence[RowChange]) -> bool:
        # send_async is where events reach the event loop, so it always runs.
        return True

    async def send_async(self, events: Sequence[RowChange]) -> None:
        if super().has_async_receivers(events):
            await super().send_async(events)
        self.forwarder.submit(events)

    def _mine(self, sender: Any) -> bool:
        return getattr(sender, "dispatcher", None) is self

    async def _on_started(self, sender: Any, **kwargs: Any) -> None:
        if self._mine(sender):
            logger.info(
                "pgnotify: forwarding changes to channel layer %r (groups %s...)",
                self.forwarder.layer_alias,
                groups.model_group(self.labels[0]) if self.labels else groups.PREFIX,
            )

    async def _on_reconnected(self, sender: Any, downtime: float = 0.0, **kwargs: Any) -> None:
        if self._mine(sender):
            self.forwarder.resync(self.labels, "reconnected", downtime=round(downtime, 3))

    async def _on_stopped(self, sender: Any, **kwargs: Any) -> None:
        if self._mine(sender):
            await self.forwarder.drain()
            logger.info(
                "pgnotify: channel layer %r: forwarded=%d forward_errors=%d forward_dropped=%d",
                self.forwarder.layer_alias,
                self.stats["forwarded"],
                self.stats["forward_errors"],
                self.stats["forward_dropped"],
            )
