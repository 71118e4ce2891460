"""The listener: one dedicated connection, LISTEN, and a small loop.

It reads notifications, hands each payload to the decoder and each resulting
``RowChange`` to the dispatcher, in the order PostgreSQL delivers them
(commit order). ``stop()`` may be called from a signal handler or another
thread; the event in hand is finished first.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable

import psycopg
from django.db import DEFAULT_DB_ALIAS
from psycopg import sql

from . import connection
from .conf import get_setting
from .declarations import Declaration
from .decoding import DecodeError, Decoder, ModelNotServed
from .dispatch import Dispatcher

logger = logging.getLogger("django_pgnotify.listener")


class Listener:
    """LISTENs on the channels of ``declarations`` and dispatches their changes.

    Args:
        declarations: What to listen for (see ``get_declarations``).
        using: The Django database alias whose settings the connection uses.
        dispatcher: Where decoded events go; a new ``Dispatcher`` by default.
        poll_interval: Seconds between looks at the stop flag while idle;
            ``PGNOTIFY["POLL_INTERVAL"]`` by default.
    """

    def __init__(
        self,
        declarations: Iterable[Declaration],
        using: str = DEFAULT_DB_ALIAS,
        dispatcher: Dispatcher | None = None,
        poll_interval: float | None = None,
    ) -> None:
        declarations = list(declarations)
        self.using = using
        self.channels = sorted({d.channel for d in declarations})
        self.dispatcher = dispatcher or Dispatcher()
        self.poll_interval = poll_interval
        self.stats: Counter[str] = self.dispatcher.stats
        self.decoder = Decoder({d.model for d in declarations}, using)
        self.ready = threading.Event()
        self._ignored_models: set[str] = set()
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Ask the loop to return after the event in hand (thread- and signal-safe)."""
        self._stopping.set()

    def run(self) -> None:
        """Connect, LISTEN and dispatch until ``stop()`` is called.

        Raises:
            psycopg.OperationalError: The connection could not be made or was lost.
        """
        poll = float(self.poll_interval or get_setting("POLL_INTERVAL"))
        with connection.connect(self.using, get_setting("APPLICATION_NAME")) as conn:
            for channel in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            logger.info(
                "pgnotify: listening on %s (backend pid %s)",
                ", ".join(self.channels),
                conn.info.backend_pid,
            )
            self.ready.set()
            while not self._stopping.is_set():
                for notify in conn.notifies(timeout=poll):
                    self.handle(notify)
                    if self._stopping.is_set():
                        break
        logger.info("pgnotify: listener stopped (%s)", _summary(self.stats))

    def handle(self, notify: psycopg.Notify) -> None:
        """Decode one notification and dispatch its changes."""
        self.stats["received"] += 1
        try:
            events = self.decoder.decode(notify.payload, notify.channel, notify.pid)
        except ModelNotServed as exc:
            # A shared channel carries models this listener was not started
            # for: say so once per model, then count them quietly.
            self.stats["ignored"] += 1
            level = logging.DEBUG if exc.model in self._ignored_models else logging.WARNING
            self._ignored_models.add(exc.model)
            logger.log(
                level,
                "pgnotify: ignoring changes of %s on %s: this listener does not serve it",
                exc.model,
                notify.channel,
            )
            return
        except Exception as exc:
            # Anyone may NOTIFY on our channels: no payload may stop the loop.
            self.stats["undecodable"] += 1
            logger.warning(
                "pgnotify: skipped undecodable payload on %s from pid %s (%s): %.200r",
                notify.channel,
                notify.pid,
                exc,
                notify.payload,
                exc_info=not isinstance(exc, DecodeError),
            )
            return
        for event in events:
            self.dispatcher.dispatch(event)


def _summary(stats: Counter[str]) -> str:
    keys = ("received", "dispatched", "receiver_errors", "undecodable", "ignored")
    return ", ".join(f"{key}={stats[key]}" for key in keys)
