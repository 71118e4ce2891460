"""Forwarding row changes to Channels groups, so that WebSocket consumers can push them.

The listener dispatches ``row_changed`` as usual; a :class:`ChannelsDispatcher`
then hands each dispatched event to a :class:`ChannelLayerForwarder`, which
sends it to the model's group (and the row's, with ``CHANNEL_ROW_GROUPS``)
from a task of its own. A channel layer that fails (Redis gone) therefore
never delays signal dispatch: messages wait in a bounded queue, sending is
retried with backoff, and what had to be dropped is followed by a ``resync``
message once sending works again. A batch the layer refuses to carry (it
cannot serialize it, which no retry changes) is dropped and resynced at once.
Needs the ``channels`` extra.

Every channel-layer message costs roughly a millisecond at each end (channels_redis),
so the forwarder sends whatever is waiting when it is ready as one ``pgnotify.batch``
message per group: one event when the load is light (nothing waits to fill a
batch), more under load, so that the cost is paid per batch instead of per event.
Rounds of sending start at most every ``MIN_INTERVAL``: the forwarder alone would
keep up with a message per event where consumers, which pay more per message, fall behind.

A channel layer drops messages to a consumer whose channel is full, without telling
anyone; a consumer following many rows gets one message per row per round. So that
consumers can tell, each event says the ``seq`` of its row's previous change (``prev``),
and each model gets a ``pgnotify.checkpoint`` now and then, listing the rows changed since
its last one with their last ``seq``: sent after a quiet spell too, it reveals a change
lost last, which no later change of its row would. That one is timed from when the model's
last change was sent, not queued, and sent again later: a checkpoint that reaches a channel
still full of the changes it names is dropped with them.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import datetime
import logging
import math
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Model
from django.utils.duration import duration_iso_string

from . import groups
from .backoff import Backoff
from .conf import get_setting
from .connection import cancel_and_wait
from .dispatch import Dispatcher
from .events import RowChange
from .health import FORWARD_COUNTERS
from .signals import listener_reconnected, listener_started, listener_stopped

logger = logging.getLogger("django_pgnotify.channels")

#: The ``type`` of event messages; a consumer handles them in ``pgnotify_row_changed``.
ROW_CHANGED = "pgnotify.row_changed"
#: The ``type`` of resync messages; a consumer handles them in ``pgnotify_resync``.
RESYNC = "pgnotify.resync"
#: The ``type`` of checkpoint messages: the rows of a model changed since its previous
#: checkpoint and the ``seq`` of the last change of each, so that a consumer can tell that
#: it missed one; a consumer handles them in ``pgnotify_checkpoint``.
CHECKPOINT = "pgnotify.checkpoint"
#: The ``type`` of what the forwarder sends: ``messages``, a list of the kinds above, in
#: order; a consumer handles it in ``pgnotify_batch``.
BATCH = "pgnotify.batch"
#: Messages taken from the queue for one round of sending, at most (one batch per group).
BATCH_SIZE = 100
#: Seconds from the start of one round of sending to the next, at least. A change after a
#: quiet spell goes at once; under load, changes wait up to this long and go in one batch,
#: which keeps the messages per second low enough for consumers to keep up.
MIN_INTERVAL = 0.005
#: Messages waiting to be sent, at most; the oldest are dropped beyond (and resynced).
QUEUE_SIZE = 10_000
#: Seconds one ``group_send`` may take before it counts as failed.
SEND_TIMEOUT = 5.0
#: Seconds a stopping listener gives the queue to drain.
DRAIN_TIMEOUT = 2.0
#: Seconds between two warnings that the queue is full, at least: a burst fills it many times.
FULL_WARNING_INTERVAL = 60.0
#: A model gets a checkpoint once this many of its rows changed since its previous one
#: (which bounds the checkpoint's size)...
CHECKPOINT_ROWS = 100
#: ...this many seconds after the sending of its first change since its previous one, at
#: the latest; once more this long after the sending of its last change, when consumers
#: have had time to catch up; and that quiet one again this long after it was sent: a
#: checkpoint sent to a channel still full of the changes it names is dropped with them.
CHECKPOINT_DELAY = 1.0
#: What a channel layer raises for a message it cannot serialize (msgpack: a type it
#: does not know, an integer past 64 bits, a string UTF-8 cannot encode). Retrying
#: cannot help, so the batch is dropped and resynced instead of blocking every later one.
UNSENDABLE = (TypeError, ValueError, ArithmeticError)


#: Integers beyond these are sent as strings of their digits: a browser's numbers hold
#: every integer only up to 2**53 - 1 (``Number.MAX_SAFE_INTEGER``), and ``JSON.parse``
#: would read a BIGINT past it as another number.
SAFE_INTEGER_MIN, SAFE_INTEGER_MAX = -(2**53 - 1), 2**53 - 1
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (the replacement character).

    JSON's ``\\ud800`` escape decodes to a lone surrogate, which is not
    Unicode text: UTF-8 cannot encode it, so msgpack (channels_redis) refuses
    the whole message and no browser could be sent it. A client's
    ``pgnotify.context`` or a ``json`` column can hold one.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def json_safe(value: Any) -> Any:
    """``value`` with every Python type the decoder produces turned into JSON types.

    Decimals become strings (no float rounding), dates and times ISO 8601,
    durations ISO 8601 durations, UUIDs strings, bytes base64. Integers
    outside +-(2**53 - 1) become strings of their digits, as a browser would
    read another number (and msgpack, which channel layers use, cannot carry
    those past 64 bits); so do the floats JSON has no word for (``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``), which no browser parses. Strings and
    keys lose their lone surrogates (see :func:`valid_text`).
    """
    if isinstance(value, str):
        return value if value.isascii() else valid_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if SAFE_INTEGER_MIN <= value <= SAFE_INTEGER_MAX else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else _NON_FINITE[str(value)]
    if isinstance(value, dict):
        return {valid_text(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, Decimal):
        return _digits(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return duration_iso_string(value)
    if isinstance(value, (bytes, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return valid_text(str(value))


# Decimals are written out in full ("0.0000000123", not str()'s "1.23E-8") while their
# exponent stays within this bound, which every numeric column's value does; a JSON
# field's decoder can make "1e999999999", which must not become a billion digits.
_FULL_DIGITS_EXPONENT = 1000


def _digits(value: Decimal) -> str:
    if value.is_finite() and abs(value.adjusted()) <= _FULL_DIGITS_EXPONENT:
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= -_FULL_DIGITS_EXPONENT:
            return format(value, "f")
    return str(value)


def event_message(
    event: RowChange, seq: int, stream: str, prev: int | None = None
) -> dict[str, Any]:
    """The channel-layer message for ``event`` (documented in docs/channels.md).

    ``prev`` is the ``seq`` of the previous change of the same row since its
    model's last checkpoint, if any: a consumer following the row that did not
    get that one missed it.
    """
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
        "xid": json_safe(event.xid),
        "timestamp": event.timestamp.isoformat() if event.timestamp else None,
        "durable": event.durable,
        "event_id": json_safe(event.event_id),
        "seq": seq,
        "stream": stream,
        "prev": prev,
    }


def resync_message(label: str, reason: str, stream: str, **extra: Any) -> dict[str, Any]:
    """The message telling subscribers of ``label`` that they missed changes.

    The forwarder adds ``seq`` and ``checkpoint``, the model's last ``seq``
    and checkpoint number before it: what reloading covers, so that a consumer
    does not count it missing later.
    """
    return {
        "type": RESYNC,
        "model": label,
        "reason": reason,
        "stream": stream,
        "id": uuid.uuid4().hex[:12],
        **extra,
    }


def _seconds_at_least(span: float) -> float:
    """``span`` rounded down to the millisecond: an age consumers take as a lower bound."""
    return math.floor(span * 1000) / 1000


class _Unchecked:
    """What a model's next checkpoint covers: its rows' last ``seq`` since its previous one,
    and when its changes were sent (the end of the round that sent them)."""

    __slots__ = ("covered", "first", "quiet", "quiet_sent", "rows", "sent")

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}  # row group -> seq of its last change
        self.covered = 0  # the seq of its last checkpoint
        # When the first change after that one was sent; None: none sent yet.
        self.first: float | None = None
        # When its last change was sent; None while one waits to be.
        self.sent: float | None = None
        # Its last checkpoint, when it was sent after a quiet spell: it goes again once
        # CHECKPOINT_DELAY passed since quiet_sent (None: not sent yet). A change cancels it.
        self.quiet: dict[str, Any] | None = None
        self.quiet_sent: float | None = None


class ChannelLayerForwarder:
    """Sends events to Channels groups from a task of its own, retrying on failure.

    Args:
        layer: The ``CHANNEL_LAYERS`` alias to send through.
        row_groups: Also send each event to its row's group;
            ``PGNOTIFY["CHANNEL_ROW_GROUPS"]`` by default.
        stats: Where to count ``forwarded`` (events), ``forward_batches``
            (channel-layer messages), ``forward_errors`` and ``forward_dropped``.
        queue_size: Messages waiting to be sent, at most.
        min_interval: Seconds between the starts of two rounds of sending, at least.

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
        min_interval: float = MIN_INTERVAL,
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
        # Models changed since their last checkpoint, or whose last checkpoint came too
        # soon after a change (another follows once they are quiet); checkpoints sent.
        self._unchecked: dict[str, _Unchecked] = {}
        self.checkpoints: Counter[str] = Counter()
        # With row groups: when the round that sent each model's last checkpoint or resync
        # ended; when the rounds that sent its changes since its last checkpoint ended,
        # with the last seq of each; the models of both in the round being sent.
        self._marked: dict[str, float] = {}
        self._sent: dict[str, list[tuple[int, float]]] = {}
        self._round_marks: set[str] = set()
        self._round_seqs: dict[str, int] = {}
        # When the round that sent each model's last change ended; the models with a
        # change in the round being sent (see _stamp_last).
        self._changed: dict[str, float] = {}
        self._round_changed: set[str] = set()
        self._pending: deque[tuple[list[str], dict[str, Any]]] = deque()
        self._queue_size = queue_size
        self._sending = 0  # messages taken off the queue, not yet sent
        self._min_interval = min_interval
        self._last_round = -math.inf
        self._dropped_models: set[str] = set()
        self._full_warned = -math.inf
        # The id of the last message of each resync() call not sent yet: (reason, models).
        self._resync_notes: dict[str, tuple[str, int]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Feeding

    def submit(self, events: Iterable[RowChange]) -> None:
        """Queue ``events`` for sending (on the event loop the forwarder runs on)."""
        now = time.monotonic()
        for event in events:
            label = event.label
            self.sequence[label] += 1
            seq = self.sequence[label]
            unchecked = self._unchecked.get(label)
            if unchecked is None:
                unchecked = self._unchecked[label] = _Unchecked()
            # Not quiet any more: the next checkpoint's number tells of a quiet one lost.
            unchecked.sent = unchecked.quiet = unchecked.quiet_sent = None
            targets = [groups.model_group(label)]
            prev = None
            if self.row_groups and event.pk is not None:
                row = groups.row_group(label, event.pk)
                targets.append(row)
                prev = unchecked.rows.get(row)
                unchecked.rows[row] = seq
            self._enqueue(targets, event_message(event, seq, self.stream, prev))
            if len(unchecked.rows) >= CHECKPOINT_ROWS:
                self._checkpoint(label, unchecked, now)

    def _checkpoint(self, label: str, unchecked: _Unchecked, now: float) -> None:
        """Queue ``label``'s checkpoint, after the changes it covers.

        To the model group, whose subscribers check it against ``seq``, and with
        row groups to the resync group, where every follower of one of its rows is.
        One sent ``CHECKPOINT_DELAY`` after the model's last change was is quiet:
        it goes again as long after its own sending (see ``_checkpoints_due``).
        """
        model = groups.model_group(label)
        self.checkpoints[label] += 1
        message = {
            "type": CHECKPOINT,
            "model": label,
            "stream": self.stream,
            "n": self.checkpoints[label],
            "seq": self.sequence[label],
            "since": None,  # set as it is sent
            # Row groups without their model group's name and dot: "row.42".
            "rows": {row[len(model) + 1 :]: seq for row, seq in unchecked.rows.items()},
        }
        unchecked.rows = {}
        unchecked.first = None
        unchecked.covered = self.sequence[label]
        if unchecked.sent is not None and unchecked.sent + CHECKPOINT_DELAY <= now:
            unchecked.quiet = message  # consumers had time to catch up before it
        self._enqueue(self._checkpoint_targets(label), message)

    def _checkpoint_targets(self, label: str) -> list[str]:
        model = groups.model_group(label)
        return [model, groups.resync_group(label)] if self.row_groups else [model]

    def _checkpoints_due(self) -> float | None:
        """Queue the checkpoints that are due; seconds until the next one is, if any.

        A model gets one ``CHECKPOINT_DELAY`` after the sending of its first change
        since its previous one; when that one came before the model was quiet, another
        as long after the sending of its last change; and that quiet one again as long
        after it was sent, for a consumer whose channel was still full then. Then
        nothing until the model changes again.
        """
        now = time.monotonic()
        wait = None
        for label, unchecked in list(self._unchecked.items()):
            if unchecked.quiet is not None:
                if unchecked.quiet_sent is None:
                    continue  # not sent yet
                due = unchecked.quiet_sent + CHECKPOINT_DELAY
            elif unchecked.first is not None:
                due = unchecked.first + CHECKPOINT_DELAY
            elif unchecked.sent is not None:  # its last checkpoint came before it was quiet
                due = unchecked.sent + CHECKPOINT_DELAY
            else:
                continue  # its changes wait to be sent
            if due > now:
                if wait is None or due - now < wait:
                    wait = due - now
            elif unchecked.quiet is not None:
                del self._unchecked[label]
                self._enqueue(self._checkpoint_targets(label), self._again(unchecked, now))
            else:
                self._checkpoint(label, unchecked, now)
        return wait

    def _again(self, unchecked: _Unchecked, now: float) -> dict[str, Any]:
        """The quiet checkpoint of ``unchecked`` to send again, its number unchanged.

        A consumer that had it skips it; one that lost it checks this one as it.
        Its ages (stamped as it was sent) grow by the time since, at least.
        """
        assert unchecked.quiet is not None and unchecked.quiet_sent is not None
        quiet, later = unchecked.quiet, now - unchecked.quiet_sent
        message = {**quiet, "again": True}
        if quiet.get("last_age") is not None:
            message["last_age"] = _seconds_at_least(quiet["last_age"] + later)
        if self.row_groups:
            if quiet["since"] is not None:
                message["since"] = _seconds_at_least(quiet["since"] + later)
            message["rows"] = {
                row: [seq, _seconds_at_least(age + later)]
                for row, (seq, age) in quiet["rows"].items()
            }
        return message

    def _note_sent(self, taken: list[dict[str, Any]], now: float) -> None:
        """Note when the changes and quiet checkpoints of a round were sent (``now``).

        A resync counts as its model's changes up to its ``seq``: those dropped
        before being sent are among them.
        """
        for message in taken:
            label = message["model"]
            unchecked = self._unchecked.get(label)
            if unchecked is None:
                continue
            if message["type"] == CHECKPOINT:
                if message is unchecked.quiet:
                    unchecked.quiet_sent = now
                continue
            seq = message.get("seq")
            if not isinstance(seq, int):
                continue
            # A resync is no change: it only tells that those before it were sent.
            first = message["type"] == ROW_CHANGED and seq > unchecked.covered
            if first and unchecked.first is None:
                unchecked.first = now
            if seq >= self.sequence[label]:
                unchecked.sent = now

    def resync(self, labels: Iterable[str], reason: str, **extra: Any) -> None:
        """Queue a ``resync`` message to the subscribers of each model of ``labels``.

        Once the last of them is sent, the forwarder logs that it was.
        """
        labels = sorted(set(labels))
        for label in labels:
            message = resync_message(
                label,
                reason,
                self.stream,
                seq=self.sequence[label],
                checkpoint=self.checkpoints[label],
                **extra,
            )
            self._enqueue([groups.model_group(label), groups.resync_group(label)], message)
        if labels:
            self._resync_notes[message["id"]] = (reason, len(labels))

    def _enqueue(self, targets: list[str], message: dict[str, Any]) -> None:
        if len(self._pending) >= self._queue_size:
            _, oldest = self._pending.popleft()
            self.stats["forward_dropped"] += 1
            self._dropped_models.add(oldest["model"])
            if oldest["type"] == ROW_CHANGED:  # never sent: what follows has no last_age
                self._changed.pop(oldest["model"], None)
                self._round_changed.discard(oldest["model"])  # nor from the round sending
            unchecked = self._unchecked.get(oldest["model"])
            if unchecked is not None and oldest is unchecked.quiet:
                unchecked.quiet = None  # never sent: another checkpoint follows the resync
            if oldest["type"] == RESYNC:
                self._resync_notes.pop(oldest["id"], None)
            if time.monotonic() - self._full_warned >= FULL_WARNING_INTERVAL:
                self._full_warned = time.monotonic()
                logger.warning(
                    "pgnotify: the queue for channel layer %r is full (%d messages): dropping "
                    "the oldest, their models' subscribers get a resync (%d dropped so far)",
                    self.layer_alias,
                    self._queue_size,
                    self.stats["forward_dropped"],
                )
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
            self._sending = 0  # a task of a closed loop took them with it
            self._round_marks = set()
            self._round_seqs = {}
            for label in self._round_changed:  # perhaps never sent, as dropped ones
                self._changed.pop(label, None)
            self._round_changed = set()
            # Models whose last change (or a resync in its place) is still to be sent.
            waiting = {m["model"] for _, m in self._pending if m["type"] != CHECKPOINT}
            now = time.monotonic()
            for label, unchecked in self._unchecked.items():
                if unchecked.quiet_sent is None:
                    unchecked.quiet = None  # perhaps among them
                if unchecked.sent is None and label not in waiting:
                    # Its last changes were among them and will never be sent: its
                    # checkpoints are timed from now, and name them.
                    unchecked.sent = now
            self._task = loop.create_task(self._run(), name="pgnotify-channels-forwarder")

    @property
    def backlog(self) -> int:
        """Messages not sent yet: waiting in the queue or being sent."""
        return len(self._pending) + self._sending

    def _take_round(self) -> tuple[list[dict[str, Any]], list[tuple[str, list[dict[str, Any]]]]]:
        """Take what waits off the queue: the messages, and ``(group, batch)`` pairs to send.

        A consumer in several groups receives their batches one after the
        other, so a round ends where that would change the order it sees: a
        model's messages form one run (a client following two models sees their
        interleaving), so do a row group's among its model's, and a ``resync``
        ends the round (its resync group is sent last). The model group comes
        before its row groups: a consumer in both gets every event from the
        model's batch first and skips the row batch's repeats by ``seq``. A
        checkpoint goes to the resync group after the row batches, so after the
        changes it covers; a second one would too, after changes it does not
        cover, so it waits for the next round.
        """
        taken: list[dict[str, Any]] = []
        batches: dict[str, list[dict[str, Any]]] = {}
        model_group = row_group = None
        while self._pending and len(taken) < BATCH_SIZE:
            targets, message = self._pending[0]
            resync = message["type"] == RESYNC
            if targets[0] != model_group:
                if targets[0] in batches:
                    break
                model_group, row_group = targets[0], None
            if len(targets) > 1:
                if message["type"] == ROW_CHANGED:
                    if targets[1] != row_group and targets[1] in batches:
                        break
                    row_group = targets[1]
                elif targets[1] in batches:  # a resync group's second checkpoint or resync
                    break
            self._pending.popleft()
            taken.append(message)
            self._stamp_last(message)
            if self.row_groups:
                self._stamp(message)
            for group in targets:
                batches.setdefault(group, []).append(message)
            if resync:
                break
        return taken, list(batches.items())

    def _stamp_last(self, message: dict[str, Any]) -> None:
        """Add to a change or checkpoint, taken for sending, ``last_age``: how long before it
        the model's last change before it was sent (its ``seq - 1``, the checkpoint's ``seq``).

        A lower bound, in seconds, as ``_stamp``'s. A consumer that followed the model
        after the time it arrived minus that knows the changes it skipped were sent before
        it joined (to a subscription before, whose last ones may still be in its channel),
        not lost. Taken in the round, from the end of the last round that sent a change.
        """
        label = message["model"]
        if message["type"] == ROW_CHANGED:
            if message["seq"] > 1:
                message["last_age"] = self._last_age(label)
            self._round_changed.add(label)
        elif message["type"] == CHECKPOINT and not message.get("again"):
            message["last_age"] = self._last_age(label)

    def _last_age(self, label: str) -> float:
        changed = self._changed.get(label)
        if changed is None or label in self._round_changed:
            # In this round; or none sent, or the last ones were dropped (then resynced,
            # a resync a consumer may lose too): a jump in seq is a gap.
            return 0.0
        return _seconds_at_least(self._last_round - changed)

    def _stamp(self, message: dict[str, Any]) -> None:
        """Add to ``message``, taken for sending, how long before it what it names was sent.

        Each is a lower bound, in seconds: from the end of the round that sent it
        to the start of this one. A consumer that followed a row after the time
        it arrived minus that knows the change was sent before it joined, not lost.
        """
        label, start = message["model"], self._last_round
        if message["type"] == ROW_CHANGED:
            self._round_seqs[label] = message["seq"]
            if message["prev"] is not None:
                message["prev_age"] = self._age(label, message["prev"], start)
            return
        if message["type"] == CHECKPOINT and not message.get("again"):
            marked = self._marked.get(label)
            if marked is not None:  # a consumer that subscribed before may have lost that
                message["since"] = _seconds_at_least(start - marked)
            message["rows"] = {
                row: [seq, self._age(label, seq, start)] for row, seq in message["rows"].items()
            }
            rounds = self._sent.get(label, [])
            del rounds[: bisect.bisect_right(rounds, (message["seq"], math.inf))]
        self._round_marks.add(label)

    def _age(self, label: str, seq: int, start: float) -> float:
        """Seconds from the sending of ``label``'s change ``seq`` to ``start``, at least."""
        rounds = self._sent.get(label, [])
        i = bisect.bisect_left(rounds, (seq, -math.inf))
        if i == len(rounds):
            return 0.0  # in this round
        return _seconds_at_least(start - rounds[i][1])

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            due = self._checkpoints_due() if self._unchecked else None
            if not self._pending:
                self._wake.clear()
                if due is None:
                    await self._wake.wait()
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), due)
                continue
            wait = self._last_round + self._min_interval - time.monotonic()
            if wait > 0:  # under load only: let what follows join this round
                await asyncio.sleep(wait)
            self._last_round = time.monotonic()
            taken, sends = self._take_round()
            self._sending = len(taken)
            failing_since: float | None = None
            dropped_before = 0  # forward_dropped when sending started failing
            backoff = Backoff.from_settings()
            sent = 0
            unsendable: dict[int, dict[str, Any]] = {}  # by id(): dropped in this round
            while True:
                try:
                    for group, batch in sends[sent:]:
                        message = {"type": BATCH, "messages": batch}
                        try:
                            await asyncio.wait_for(self._send(group, message), SEND_TIMEOUT)
                        except UNSENDABLE as exc:
                            if isinstance(exc, OSError):  # the network's (io's are both)
                                raise
                            self._drop_unsendable(group, batch, exc, unsendable)
                        else:
                            self.stats["forward_batches"] += 1
                        sent += 1
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats["forward_errors"] += 1
                    if failing_since is None:
                        failing_since = time.monotonic()
                        dropped_before = self.stats["forward_dropped"]
                        first = taken[0]
                        logger.error(
                            "pgnotify: cannot forward %s %s%s to channel layer %r: %s; "
                            "retrying with backoff (signals are still dispatched)",
                            first["model"],
                            first.get("action", first["type"].removeprefix("pgnotify.")),
                            f" and {len(taken) - 1} more" if len(taken) > 1 else "",
                            self.layer_alias,
                            " ".join(str(exc).split()) or type(exc).__name__,
                        )
                    else:
                        logger.warning(
                            "pgnotify: channel layer %r still failing (%d message(s) waiting): %s",
                            self.layer_alias,
                            self.backlog,
                            " ".join(str(exc).split()) or type(exc).__name__,
                        )
                    await asyncio.sleep(backoff.next())
            self._sending = 0
            now = time.monotonic()
            self._note_sent(taken, now)
            for label in self._round_changed:
                self._changed[label] = now
            self._round_changed = set()
            if self._round_marks or self._round_seqs:
                for label in self._round_marks:
                    self._marked[label] = now
                for label, seq in self._round_seqs.items():
                    self._sent.setdefault(label, []).append((seq, now))
                self._round_marks = set()
                self._round_seqs = {}
            self.stats["forwarded"] += sum(
                1 for m in taken if m["type"] == ROW_CHANGED and id(m) not in unsendable
            )
            if self._resync_notes:
                self._log_resyncs_sent(taken, unsendable)
            if failing_since is not None:
                logger.warning(
                    "pgnotify: forwarding to channel layer %r works again after %.1fs "
                    "(%d message(s) dropped meanwhile)",
                    self.layer_alias,
                    time.monotonic() - failing_since,
                    self.stats["forward_dropped"] - dropped_before,
                )
            if self._dropped_models:
                dropped, self._dropped_models = self._dropped_models, set()
                self.resync(dropped, "dropped")

    def _drop_unsendable(
        self,
        group: str,
        batch: list[dict[str, Any]],
        exc: BaseException,
        unsendable: dict[int, dict[str, Any]],
    ) -> None:
        """Drop a batch the layer refused to serialize; its models get a ``resync``."""
        new = [m for m in batch if id(m) not in unsendable]
        unsendable.update((id(m), m) for m in new)
        self.stats["forward_dropped"] += len(new)
        # A resync that cannot be sent is not followed by another: it would fail alike.
        self._dropped_models.update(m["model"] for m in new if m["type"] == ROW_CHANGED)
        first = batch[0]
        if first["type"] == ROW_CHANGED:
            what = f"{first['action']} pk={first['pk']}"
        else:
            what = first["type"].removeprefix("pgnotify.")
        logger.error(
            "pgnotify: channel layer %r cannot carry %s %s%s (group %s): %s; "
            "dropped, its subscribers get a resync",
            self.layer_alias,
            first["model"],
            what,
            f" and {len(batch) - 1} more" if len(batch) > 1 else "",
            group,
            " ".join(str(exc).split()) or type(exc).__name__,
        )

    def _log_resyncs_sent(
        self, taken: list[dict[str, Any]], unsendable: dict[int, dict[str, Any]]
    ) -> None:
        for message in taken:
            if message["type"] != RESYNC:
                continue
            note = self._resync_notes.pop(message["id"], None)
            if note is not None and id(message) not in unsendable:
                logger.info("pgnotify: sent resync (%s) to the subscribers of %d model(s)", *note)

    async def _send(self, group: str, message: dict[str, Any]) -> None:
        assert self.layer is not None
        await self.layer.group_send(group, message)

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait up to ``timeout`` seconds for everything to be sent, then stop sending.

        What is still not sent then is logged and counted as ``forward_dropped``.
        """
        deadline = time.monotonic() + timeout
        while self.backlog and self._task is not None and not self._task.done():
            if time.monotonic() >= deadline:
                self.stats["forward_dropped"] += self.backlog
                logger.warning(
                    "pgnotify: %d message(s) for channel layer %r not sent at stop",
                    self.backlog,
                    self.layer_alias,
                )
                break
            await asyncio.sleep(0.02)
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self._sending = 0


class ChannelsDispatcher(Dispatcher):
    """A ``Dispatcher`` that also forwards every dispatched event to Channels groups.

    Pass it to a ``Listener`` (``pgnotify_listen --channel-layer`` does). When
    that listener starts and after each reconnect, subscribers of each of its
    models get a ``resync`` message, because changes committed while no
    listener listened were never seen.

    Args:
        layer: The ``CHANNEL_LAYERS`` alias.
        labels: The labels of the models the listener serves (for resync).
        row_groups: As for :class:`ChannelLayerForwarder`.
        stats: The counter to count in.
        in_process: The consumers run in this process (``with_listener``). When
            they do not, a warning at start says that Channels' in-memory layer
            reaches none of them.
    """

    counters = FORWARD_COUNTERS

    def unheard(self, models: Iterable[type[Model]]) -> list[type[Model]]:
        """None: every event goes to the Channels groups, receivers or not."""
        return []

    def __init__(
        self,
        layer: str = "default",
        labels: Iterable[str] = (),
        *,
        row_groups: bool | None = None,
        stats: Counter[str] | None = None,
        in_process: bool = False,
    ) -> None:
        super().__init__(stats)
        self.labels = sorted(set(labels))
        self.in_process = in_process
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
            if not self.in_process and isinstance(self.forwarder.layer, InMemoryChannelLayer):
                logger.warning(
                    "pgnotify: channel layer %r is Channels' in-memory layer, which only "
                    "consumers in this process can read: no WebSocket client will see these "
                    "changes. Run the listener in the ASGI server (with_listener) or use "
                    "channels_redis.",
                    self.forwarder.layer_alias,
                )
            # Changes committed before this listener listened (a deploy, a crash) were
            # never seen: the pages open meanwhile must reload.
            self.forwarder.resync(self.labels, "started")

    async def _on_reconnected(self, sender: Any, downtime: float = 0.0, **kwargs: Any) -> None:
        if self._mine(sender):
            self.forwarder.resync(self.labels, "reconnected", downtime=round(downtime, 3))

    async def _on_stopped(self, sender: Any, **kwargs: Any) -> None:
        if self._mine(sender):
            await self.forwarder.drain()
            logger.info(
                "pgnotify: channel layer %r: forwarded=%d forward_batches=%d forward_errors=%d "
                "forward_dropped=%d",
                self.forwarder.layer_alias,
                self.stats["forwarded"],
                self.stats["forward_batches"],
                self.stats["forward_errors"],
                self.stats["forward_dropped"],
            )
