"""What a running listener knows about its own health, for logs, files and metrics.

The listener updates a :class:`ListenerHealth`; a liveness probe reads the
age of the health file, Prometheus reads :mod:`django_pgnotify.metrics`, and
the periodic log record is built from the same fields.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("django_pgnotify.listener")

#: Counters every listener reports, zero included.
COUNTERS = (
    "received",
    "dispatched",
    "receiver_errors",
    "undecodable",
    "unconverted",
    "ignored",
    "own_changes",
    "reconnects",
    "probes",
    "probe_failures",
    "queue_full",
)
#: Counters a listener also reports when it serves durable declarations.
DURABLE_COUNTERS = ("durable_claimed", "retries", "dead_letters", "durable_lost_leases")
#: Counters a listener also reports when it forwards changes to a channel layer.
FORWARD_COUNTERS = ("forwarded", "forward_batches", "forward_errors", "forward_dropped")


@dataclass
class ListenerHealth:
    """The gauges of one listener; counters live in ``Listener.stats``.

    Attributes:
        connected: Listening right now.
        backend_pid: PID of the listening connection (``None`` when not connected).
        connected_since: ``time.time()`` of the last (re)connection.
        last_probe_ok: ``time.monotonic()`` of the last probe that came back.
        last_event_lag: Seconds from trigger to end of dispatch, of the last event;
            for a change read from a notification, that end is when its async
            receivers have run too.
        queue_usage: ``pg_notification_queue_usage()`` when last sampled (0 to 1);
            1.0 also when a probe was refused because that queue is full. Reported as
            sampled, never rounded: one page of a large queue is a fraction of a
            millionth, and a usage just above ``QUEUE_USAGE_WARNING`` must not read as
            equal to it.
        local_queue: Notifications read but not dispatched yet.
        local_queue_size: The local queue's bound (``PGNOTIFY["QUEUE_SIZE"]``).
    """

    connected: bool = False
    backend_pid: int | None = None
    connected_since: float | None = None
    last_probe_ok: float | None = None
    last_event_lag: float | None = None
    queue_usage: float | None = None
    local_queue: int = 0
    local_queue_size: int = 0

    def as_dict(self, stats: Counter[str], counters: Iterable[str] = COUNTERS) -> dict[str, Any]:
        """``counters`` and the gauges, JSON-safe, for a structured log record."""
        data: dict[str, Any] = {key: stats[key] for key in counters}
        data.update(
            connected=self.connected,
            backend_pid=self.backend_pid,
            last_event_lag=_round(self.last_event_lag),
            queue_usage=self.queue_usage,
            local_queue=self.local_queue,
        )
        return data


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class HealthFile:
    """A file touched while the listener is healthy; its age is the liveness signal.

    Args:
        path: Where to write. Created on the first touch, removed on stop.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: The error of the last touch that failed, until one succeeds again.
        self.failing: str | None = None

    def touch(self) -> None:
        """Create or touch the file. A failure is logged once, not on every touch (the
        listener touches it several times a second), and so is the recovery."""
        try:
            self.path.touch()
            os.utime(self.path)
        except OSError as exc:  # a read-only volume must not stop the listener
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            if error != self.failing:
                logger.warning(
                    "pgnotify: cannot touch health file %s: %s (said once; a liveness "
                    "probe that checks the file will fail)",
                    self.path,
                    exc,
                )
            self.failing = error
        else:
            if self.failing is not None:
                logger.warning("pgnotify: health file %s is touched again", self.path)
            self.failing = None

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("pgnotify: cannot remove health file %s: %s", self.path, exc)


def format_record(data: dict[str, Any]) -> str:
    """``key=value`` pairs on one line, for log files without a JSON formatter."""
    return " ".join(f"{key}={'-' if value is None else value}" for key, value in data.items())
