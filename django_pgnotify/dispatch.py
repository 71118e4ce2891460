"""The dispatcher: ``RowChange`` objects in, ``row_changed`` signals out.

Receivers are isolated from each other and from the listener: one that raises
is logged with its traceback and counted, and the rest still run.

Events are dispatched in batches so that a busy listener does not pay a
thread hop per event: the listener runs :meth:`Dispatcher.send_sync` for a
whole batch in one worker thread, then awaits :meth:`Dispatcher.send_async`
on its event loop. Each receiver sees the events in commit order; sync
receivers of a batch run before its async ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from asgiref.sync import async_to_sync
from django.db import connections
from django.db.models import Model

from .events import RowChange
from .signals import row_changed

logger = logging.getLogger("django_pgnotify.dispatch")

#: The attribute that marks a ``row_changed`` receiver as one that only watches the
#: changes go by (``pgnotify_listen -v 2``'s printer): ``Dispatcher.unheard`` does not
#: count it as hearing a model.
WATCHES_ONLY = "pgnotify_watches_only"


class Dispatcher:
    """Sends ``row_changed`` for each event and counts what happened.

    Args:
        stats: The counter to count in (``dispatched``, ``receiver_errors``).
    """

    #: What it counts beyond ``health.COUNTERS``, reported by the listener using it.
    counters: tuple[str, ...] = ()

    def __init__(self, stats: Counter[str] | None = None) -> None:
        self.stats: Counter[str] = stats if stats is not None else Counter()
        #: Seconds from the trigger's clock to the end of dispatch, of the last event.
        self.last_event_lag: float | None = None
        #: The first receiver error of each durable event, by event id (see take_errors).
        self.errors: dict[int, str] = {}
        #: Durable events whose async receivers have all run, a running count: the
        #: durable worker watches it grow to tell a slow batch from a stuck one.
        self.durable_awaited = 0
        self._connections_lost = False

    def unheard(self, models: Iterable[type[Model]]) -> list[type[Model]]:
        """Those of ``models`` whose changes would reach no one: no ``row_changed``
        receiver is connected for them (for the model, or for every sender), other
        than those marked ``WATCHES_ONLY``."""
        return [
            model
            for model in models
            if all(
                getattr(receiver, WATCHES_ONLY, False)
                for receivers in row_changed._live_receivers(model)
                for receiver in receivers
            )
        ]

    def connections_lost(self) -> None:
        """The listener lost its connection: the database may have restarted.

        The sync receivers' thread closes its Django connections before the
        next event (they reconnect when next used), so that a receiver using
        the ORM gets a working connection, not the broken one of before.
        Thread-safe.
        """
        self._connections_lost = True

    def dispatch(self, event: RowChange) -> None:
        """Send ``row_changed`` for ``event`` to every receiver, sync and async."""
        self.send_sync([event])
        if self.has_async_receivers([event]):
            async_to_sync(self.send_async)([event])

    def send_sync(
        self,
        events: Sequence[RowChange],
        stopping: threading.Event | None = None,
        done: list[RowChange] | None = None,
    ) -> list[RowChange]:
        """Call the sync receivers of each event, in order.

        Args:
            events: What to send.
            stopping: Once set, no further event is started (the event in hand
                is always finished).
            done: The list to append each event to once its receivers have run
                (a new one by default); another thread may watch it grow.

        Returns:
            The events handled (``done``): all of them, or those before
            ``stopping`` was set.
        """
        if done is None:
            done = []
        if self._connections_lost:
            self._connections_lost = False
            close_thread_connections()
        # Django's own lookup; once per model and batch. (Django 5+ splits sync and async.)
        by_model: dict[Any, list[Any]] = {}
        try:
            for event in events:
                if stopping is not None and stopping.is_set():
                    break
                model = event.model
                receivers = by_model.get(model)
                if receivers is None:
                    receivers = by_model[model] = row_changed._live_receivers(model)[0]
                failed = False
                for receiver in receivers:
                    try:
                        receiver(signal=row_changed, sender=model, event=event)
                    except (Exception, asyncio.CancelledError) as exc:  # e.g. via async_to_sync
                        self.failed(receiver, event, exc)
                        failed = True
                if failed:
                    # It may have failed on a broken ORM connection (the database
                    # restarted, idle_session_timeout): Django replaces it, as after a
                    # request, before the next event, not after the batch (up to 1,000).
                    close_broken_connections()
                done.append(event)
        finally:
            self.stats["dispatched"] += len(done)  # once per batch: a Counter is no list
        if done:
            self.measure_lag(done[-1])
        return done

    def has_async_receivers(self, events: Sequence[RowChange]) -> bool:
        """Whether any event of ``events`` has an async receiver."""
        models = {event.model for event in events}
        return any(row_changed._live_receivers(model)[1] for model in models)

    async def send_async(self, events: Sequence[RowChange]) -> None:
        """Await the async receivers of each event, in order, one after the other.

        Not interrupted by a stop: the events given are those the sync
        receivers saw, so every receiver sees the same events. A receiver
        that raises ``CancelledError`` while this task is not being cancelled
        has failed like any other: it does not end the dispatch.
        """
        by_model: dict[Any, list[Any]] = {}  # as in send_sync: once per model and batch
        durable = bool(events) and events[0].durable  # a batch is all live or all durable
        for event in events:
            model = event.model
            receivers = by_model.get(model)
            if receivers is None:
                receivers = by_model[model] = row_changed._live_receivers(model)[1]
            for receiver in receivers:
                try:
                    await receiver(signal=row_changed, sender=model, event=event)
                except asyncio.CancelledError as exc:
                    if _cancelling():
                        raise
                    self.failed(receiver, event, exc)
                except Exception as exc:
                    self.failed(receiver, event, exc)
            if durable:
                self.durable_awaited += 1

    def failed(self, receiver: Any, event: RowChange, exc: BaseException) -> None:
        """Log and count a receiver that raised."""
        self.stats["receiver_errors"] += 1
        if event.event_id is not None:  # durable: retried or dead-lettered with this error
            name = getattr(receiver, "__qualname__", repr(receiver))
            message = f"{name}: {type(exc).__name__}: {error_text(exc)}"
            self.errors.setdefault(event.event_id, message)
        logger.error(
            "pgnotify: receiver %s failed on %s %s pk=%r",
            getattr(receiver, "__qualname__", receiver),
            event.model._meta.label,
            event.action,
            event.pk,
            exc_info=exc,
        )

    def take_errors(self) -> dict[int, str]:
        """The durable events' receiver errors collected since the last call."""
        errors, self.errors = self.errors, {}
        return errors

    def measure_lag(self, event: RowChange) -> None:
        if event.timestamp is not None:
            self.last_event_lag = max(0.0, time.time() - event.timestamp.timestamp())


def close_thread_connections() -> None:
    """Close the calling thread's Django connections; each reconnects when next used."""
    for wrapper in connections.all(initialized_only=True):
        try:
            wrapper.close()
        except Exception:  # a broken connection may fail to close: it is gone either way
            logger.debug("pgnotify: closing database connection %r failed", wrapper.alias)


def close_broken_connections() -> None:
    """Close the calling thread's Django connections that an error left unusable, as
    Django does after a request (``close_old_connections``); those inside a
    transaction are left to it."""
    for wrapper in connections.all(initialized_only=True):
        if wrapper.in_atomic_block:
            continue
        try:
            wrapper.close_if_unusable_or_obsolete()
        except Exception:  # a broken connection may fail to close: it is gone either way
            logger.debug("pgnotify: closing database connection %r failed", wrapper.alias)


def error_text(exc: BaseException) -> str:
    """``str(exc)``, even when its ``__str__`` raises: receivers may raise anything."""
    try:
        return str(exc)
    except Exception:
        return "(its message could not be rendered)"


def _cancelling() -> bool:
    """Whether the running task is being cancelled, rather than a receiver having
    raised ``CancelledError`` of its own. Python 3.10 cannot tell: it says yes."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0
