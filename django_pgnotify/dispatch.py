"""The dispatcher: ``RowChange`` objects in, ``row_changed`` signals out.

Receivers are isolated from each other and from the listener: one that raises
is logged with its traceback and counted, and the rest still run.
"""

from __future__ import annotations

import logging
from collections import Counter

from .events import RowChange
from .signals import row_changed

logger = logging.getLogger("django_pgnotify.dispatch")


class Dispatcher:
    """Sends ``row_changed`` for each event and counts what happened."""

    def __init__(self, stats: Counter[str] | None = None) -> None:
        self.stats: Counter[str] = stats if stats is not None else Counter()

    def dispatch(self, event: RowChange) -> None:
        """Send ``row_changed`` for ``event`` to every receiver of its model."""
        for receiver, response in row_changed.send_robust(sender=event.model, event=event):
            if isinstance(response, Exception):
                self.stats["receiver_errors"] += 1
                logger.error(
                    "pgnotify: receiver %s failed on %s %s pk=%r",
                    getattr(receiver, "__qualname__", receiver),
                    event.model._meta.label,
                    event.action,
                    event.pk,
                    exc_info=response,
                )
        self.stats["dispatched"] += 1
