import os
import sys
import threading
import time

from django.apps import AppConfig


def record_handling(sender, event, **kwargs):
    """Print one line per durable event handled, for tests reading a listener's output.

    ``handled <event_id> <os pid> <start> <end> <pk> <body length>``; a job whose name starts
    with "fail" raises, one whose name starts with "hang" prints ``hanging <event_id>`` and
    never returns (as a receiver stuck on a lock, or one the kernel kills for its memory),
    and PGNOTIFY_TEST_RECEIVER_DELAY slows every call. With PGNOTIFY_TEST_SAY_HANDLING set,
    ``handling <event_id>`` is printed first.
    """
    started = time.time()
    if os.environ.get("PGNOTIFY_TEST_SAY_HANDLING"):
        sys.stdout.write(f"handling {event.event_id}\n")
        sys.stdout.flush()
    if event.fields.get("name", "").startswith("hang"):
        sys.stdout.write(f"hanging {event.event_id}\n")
        sys.stdout.flush()
        threading.Event().wait()  # until the test kills the process
    delay = float(os.environ.get("PGNOTIFY_TEST_RECEIVER_DELAY", "0"))
    if delay:
        time.sleep(delay)
    if event.fields.get("name", "").startswith("fail"):
        sys.stdout.write(f"failing {event.event_id} {os.getpid()} {started}\n")
        sys.stdout.flush()
        raise RuntimeError(f"job {event.pk} fails on purpose")
    size = len(event.fields.get("body") or "")
    sys.stdout.write(
        f"handled {event.event_id} {os.getpid()} {started} {time.time()} {event.pk} {size}\n"
    )
    sys.stdout.flush()


class DurableAppConfig(AppConfig):
    name = "tests.durableapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        if os.environ.get("PGNOTIFY_TEST_DURABLE_RECEIVER"):
            from django_pgnotify import row_changed

            from .models import Job

            row_changed.connect(record_handling, sender=Job, dispatch_uid="durable_test")
