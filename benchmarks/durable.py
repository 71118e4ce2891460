"""Durable delivery: backlog processing rate, write cost, and concurrent writers.

- **Backlog**: a backlog of durable events (one bulk INSERT into ``DurableItem``)
  is processed by one listener, then by two (separate processes, round-robin
  per repetition), with a no-op receiver. Timed from the commit that creates
  the backlog until no event is pending, polled every 20 ms.
- **Write cost**: one bulk INSERT into ``DurableItem`` against the same INSERT
  into a table without trigger (and one with the live declaration).
- **Concurrent writers**: 4 connections doing single-row INSERT transactions
  for a fixed time; commits/s with no trigger, a hand-written per-row
  ``pg_notify``, a durable declaration with its wake-up notification and one
  poll-only (``PGNOTIFY["DURABLE_WAKEUP"] = False``), each as a ratio to no trigger.

The listeners are ``django_pgnotify.listener.Listener`` objects running in
child processes of this script (``--worker``), started and stopped over their
stdin so that their start-up is never part of a measurement.

    python benchmarks/durable.py [--quick] [--repeat N]
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.write_path import HAND_WRITTEN, INSERT_BULK, INSERT_ONE, ITEM, PLAIN

DURABLE = "benchapp_durableitem"
EVENTS = "pgnotify_event"
ROW_NOTIFY = "bench_row_notify"
WRITERS = 4

#: Seconds a listener may take to start, stop, or drain a backlog before the run fails.
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 300.0


# The listener child process


def worker() -> None:
    """Child process: serve ``DurableItem`` with a no-op receiver, on command.

    Reads ``start`` / ``stop`` lines on stdin and answers ``ready`` /
    ``stopped <events handled>``; exits at end of input.
    """
    harness.setup_django(migrate=False)
    from django.db import connections

    from benchmarks.benchapp.models import DurableItem
    from django_pgnotify.declarations import get_declarations
    from django_pgnotify.listener import Listener
    from django_pgnotify.signals import row_changed

    handled = 0

    def noop(sender: Any, event: Any, **kwargs: Any) -> None:
        nonlocal handled
        handled += 1

    row_changed.connect(noop, sender=DurableItem, weak=False)
    declarations = get_declarations(["benchapp.DurableItem"])
    harness.freeze_like_pgnotify_listen()
    listener: Listener | None = None
    thread: threading.Thread | None = None

    def stop() -> None:
        if listener is not None and thread is not None:
            listener.stop()
            thread.join(START_TIMEOUT)
            connections.close_all()

    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "start":
                handled = 0
                listener = Listener(declarations)
                thread = threading.Thread(target=listener.run, name="listener", daemon=True)
                thread.start()
                if not listener.ready.wait(START_TIMEOUT):
                    raise TimeoutError("listener not ready")
                print("ready", flush=True)
            elif command == "stop":
                stop()
                listener = thread = None
                print(f"stopped {handled}", flush=True)
    finally:
        stop()


class Worker:
    """The parent's handle on one listener child process."""

    def __init__(self) -> None:
        self.process = harness.spawn(
            [sys.executable, "-u", "-m", "benchmarks.durable", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, word: str, timeout: float = START_TIMEOUT) -> str:
        """The next line starting with ``word``; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"listener worker did not answer {word!r}") from None
            if line is None:
                raise RuntimeError(f"listener worker exited ({self.process.poll()})")
            if line.startswith(word):
                return line
            print(f"  [worker] {line}")

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):  # the child may be gone already
                self.process.stdin.close()
        # End of input makes it stop its listener and exit; SIGTERM if it does not.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(START_TIMEOUT / 4)
        harness.stop(self.process)


# Measurements


def pending(conn: Any) -> bool:
    """Whether any event is still pending (claimed ones included)."""
    return conn.execute(
        f"SELECT EXISTS (SELECT FROM {EVENTS} WHERE status = 'pending')"
    ).fetchone()[0]


def drain_rate(conn: Any, workers: list[Worker], rows: int) -> float:
    """Events/s for ``workers`` (already running the listener) to drain a new backlog."""
    conn.execute(f"TRUNCATE {DURABLE}, {EVENTS}")
    for w in workers:
        w.send("start")
    for w in workers:
        w.expect("ready")
    conn.execute(INSERT_BULK.format(DURABLE), (rows,))
    start = time.perf_counter()  # the backlog exists: its transaction has committed
    harness.wait_until(
        lambda: not pending(conn), DRAIN_TIMEOUT, interval=0.02, what="the backlog to drain"
    )
    elapsed = time.perf_counter() - start
    for w in workers:
        w.send("stop")
    handled = sum(int(w.expect("stopped").split()[1]) for w in workers)
    if handled < rows:
        raise RuntimeError(f"{handled} of {rows} events reached the receiver")
    return rows / elapsed


def bulk_insert(conn: Any, table: str, rows: int) -> float:
    """Seconds for one INSERT of ``rows`` rows into an emptied ``table``."""
    conn.execute(f"TRUNCATE {table}, {EVENTS}")
    start = time.perf_counter()
    conn.execute(INSERT_BULK.format(table), (rows,))
    return time.perf_counter() - start


def commits_per_second(url: str, table: str, seconds: float) -> float:
    """Total commits/s of ``WRITERS`` connections inserting single rows for ``seconds``."""
    with harness.connect(url) as conn:
        conn.execute(f"TRUNCATE {table}, {EVENTS}")
    connections = [harness.connect(url) for _ in range(WRITERS)]
    counts = [0] * WRITERS
    errors: list[BaseException] = []
    barrier = threading.Barrier(WRITERS + 1)
    deadline = 0.0

    def write(index: int) -> None:
        cursor = connections[index].cursor()
        statement = INSERT_ONE.format(table)
        try:
            barrier.wait(START_TIMEOUT)
            n = 0
            while time.perf_counter() < deadline:
                cursor.execute(statement, (n, f"item {n}", n % 1000, n), prepare=True)
                n += 1
            counts[index] = n
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(WRITERS)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + seconds
        barrier.wait(START_TIMEOUT)
        start = time.perf_counter()
        for thread in threads:
            thread.join(seconds + START_TIMEOUT)
        elapsed = time.perf_counter() - start
    finally:
        for conn in connections:
            conn.close()
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def set_wakeup(enabled: bool) -> None:
    """Reinstall the durable trigger with or without its wake-up notification."""
    from django.conf import settings
    from django.test import override_settings

    from django_pgnotify.installation import install_triggers

    with override_settings(PGNOTIFY={**settings.PGNOTIFY, "DURABLE_WAKEUP": enabled}):
        install_triggers(["benchapp.DurableItem"])


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def main() -> int:
    """Measure, print, and return the exit status (see ``harness``)."""
    args = harness.parse_args(__doc__.splitlines()[0])
    backlog = 20_000 if args.quick else 100_000
    bulk_rows = 20_000 if args.quick else 100_000
    writing = 0.75 if args.quick else 10.0
    url = harness.setup_django()
    report = harness.Report(quick=args.quick)
    started = time.monotonic()
    workers: list[Worker] = []
    with harness.connect(url) as conn:
        label, trigger = HAND_WRITTEN[ROW_NOTIFY]
        conn.execute(f"DROP TABLE IF EXISTS {ROW_NOTIFY}")
        conn.execute(f"CREATE TABLE {ROW_NOTIFY} (LIKE {PLAIN} INCLUDING ALL)")
        conn.execute(trigger)
        try:
            set_wakeup(True)
            workers = [Worker(), Worker()]
            print(f"durable: {args.repeat} repetitions (+1 warm-up), round-robin")
            drain: dict[str, Callable[[], float]] = {
                "1 listener": lambda: drain_rate(conn, workers[:1], backlog),
                "2 listeners": lambda: drain_rate(conn, workers, backlog),
            }
            rates = harness.interleave(
                drain, args.repeat, label=f"backlog of {backlog:,} events:", fmt=rate
            )
            for w in workers:
                w.close()
            workers = []

            writes = harness.interleave(
                {
                    "no trigger": lambda: bulk_insert(conn, PLAIN, bulk_rows),
                    "pgnotify live": lambda: bulk_insert(conn, ITEM, bulk_rows),
                    "pgnotify durable": lambda: bulk_insert(conn, DURABLE, bulk_rows),
                },
                args.repeat,
                label=f"one INSERT of {bulk_rows:,} rows:",
            )

            settings = conn.execute(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit')"
            ).fetchone()

            def durable_writers(wakeup: bool) -> float:
                set_wakeup(wakeup)
                return commits_per_second(url, DURABLE, writing)

            concurrent = harness.interleave(
                {
                    "no trigger": lambda: commits_per_second(url, PLAIN, writing),
                    label: lambda: commits_per_second(url, ROW_NOTIFY, writing),
                    "durable + wake-up": lambda: durable_writers(True),
                    "durable poll-only": lambda: durable_writers(False),
                },
                args.repeat,
                label=(
                    f"{WRITERS} writers, single-row INSERT transactions for {writing:g}s"
                    f" (fsync={settings[0]}, synchronous_commit={settings[1]}):"
                ),
                fmt=rate,
            )
        finally:
            for w in workers:
                w.close()
            set_wakeup(True)
            conn.execute(f"DROP TABLE IF EXISTS {ROW_NOTIFY}")
            conn.execute(f"DROP FUNCTION IF EXISTS {ROW_NOTIFY}()")
            conn.execute(f"TRUNCATE {PLAIN}, {ITEM}, {DURABLE}, {EVENTS}")

    one = rates["1 listener"].median
    report.rate(
        f"durable: backlog {backlog:,}, 1 listener",
        one,
        20_000,
        "events/s",
        "-",
    )
    report.rate(
        f"durable: backlog {backlog:,}, 2 listeners / 1",
        rates["2 listeners"].median / one,
        1.5,
        "x",
        f"1 listener {one:,.0f} events/s",
    )
    live = harness.ratio(writes, "pgnotify live", "no trigger")
    report.ratio(
        f"durable: bulk INSERT {bulk_rows:,}",
        harness.ratio(writes, "pgnotify durable", "no trigger"),
        2.5,
        f"no trigger 1.00x; pgnotify live {live:.2f}x",
    )
    base = concurrent["no trigger"].median
    ratios = {name: m.median / base for name, m in concurrent.items()}
    text = "; ".join(f"{name} {value:.2f}x" for name, value in ratios.items())
    print(f"\nconcurrent writers, commits/s as a ratio to no trigger ({base:,.0f}/s): {text}")
    for name in ("durable + wake-up", "durable poll-only"):
        # Shown for comparison: no target is set for these.
        report.compare(f"durable: {WRITERS} writers, {name}", ratios[name], text)
    print(f"\ndurable took {time.monotonic() - started:.0f}s")
    return report.finish(url)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        sys.exit(main())
