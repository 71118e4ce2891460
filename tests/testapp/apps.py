"""The test app. With ``PGNOTIFY_TEST_SLOW=<seconds>`` in the environment it
connects a receiver that takes that long, so that tests can stop a listener
while it is handling an event; without it, it adds nothing."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"

    def ready(self) -> None:
        delay = os.environ.get("PGNOTIFY_TEST_SLOW")
        if delay:
            from django_pgnotify import row_changed

            row_changed.connect(SlowReceiver(float(delay)), weak=False)


class SlowReceiver:
    """Prints when it starts and finishes each event, sleeping in between."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, sender: Any, event: Any, **kwargs: Any) -> None:
        self.write(f"slow receiver started {event.label} pk={event.pk!r}")
        time.sleep(self.seconds)
        self.write(f"slow receiver finished {event.label} pk={event.pk!r}")

    @staticmethod
    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
