"""Capped exponential backoff with jitter, for every reconnect and retry loop."""

from __future__ import annotations

import random

from .conf import get_setting


class Backoff:
    """Capped exponential delays with jitter, so many listeners do not reconnect in step.

    Args:
        minimum: The first delay, in seconds.
        maximum: The cap, in seconds.
    """

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.attempts = 0
        # Doubled until it reaches the cap, never past it: ``minimum * 2**attempts``
        # would overflow a float after 1024 attempts (hours of outage).
        self._ceiling = minimum

    @classmethod
    def from_settings(cls) -> Backoff:
        """The reconnect backoff of ``PGNOTIFY["RECONNECT_DELAY_MIN"/"_MAX"]``."""
        return cls(
            float(get_setting("RECONNECT_DELAY_MIN")), float(get_setting("RECONNECT_DELAY_MAX"))
        )

    def next(self) -> float:
        """The delay before the next attempt: up to double the last, within the cap."""
        ceiling = self._ceiling
        self._ceiling = min(self.maximum, ceiling * 2)
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
        self._ceiling = self.minimum
