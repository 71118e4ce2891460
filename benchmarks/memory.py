"""Memory: how much the listener's resident memory grows over a long run.

Each listener runs in a child process (``Listener(...).run()`` with one no-op
receiver that counts, to say when a checkpoint is reached). Its RSS (``VmRSS`` of
``/proc/<pid>/status``) is read by this process twice, each time with the
listener idle and every event so far dispatched: after a warm-up of 50,000
events, and after the measured events (1,000,000; 200,000 with ``--quick``).
Growth is the difference. Baseline: the same for a child running a do-nothing
psycopg 3 loop (``for n in conn.notifies(): ...``), told where the checkpoints
are by a NOTIFY on a channel of its own, committed after the events.

The repetitions (3+ listeners, as many psycopg loops) run side by side on one
stream of events: each is its own process, so their memory does not mix, and
sharing the stream saves writing the same rows once per repetition, which is
what takes the time. The events are ``benchapp_item`` inserts written by a
server-side ``DO`` loop: single-row statements by default (one notification
per row); ``--quick`` uses bulk statements of 1,000 rows (which the library may
pack into fewer notifications), to stay within the quick suite's time budget.

    python benchmarks/memory.py [--quick] [--repeat N] [--statements single|bulk]
"""

from __future__ import annotations

import argparse
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.listener import TABLE, write_backlog, writer_connection

WARMUP = 50_000
EVENTS = {False: 1_000_000, True: 200_000}
MARK = "bench_memory_mark"
#: Seconds the children may take per 1,000 events before the run counts as broken.
SECONDS_PER_1000 = 0.5
TARGET_MB = 10.0


# Children


def listener_child(checkpoints: list[int]) -> None:
    """``--child listener``: run a Listener; print a line when a checkpoint count is reached."""
    import django

    django.setup()
    from django_pgnotify import row_changed
    from django_pgnotify.declarations import get_declarations
    from django_pgnotify.listener import Listener

    count = 0
    marks = set(checkpoints)

    def on_change(sender: Any, event: Any, **kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count in marks:
            print(f"reached {count}", flush=True)

    row_changed.connect(on_change, weak=False)
    listener = Listener(get_declarations(["benchapp.Item"]))
    signal.signal(signal.SIGTERM, lambda *_: listener.stop())

    def say_ready() -> None:
        if listener.ready.wait(60):
            print("ready", flush=True)

    threading.Thread(target=say_ready, daemon=True).start()
    harness.freeze_like_pgnotify_listen()
    listener.run()


def psycopg_child(channel: str, limit: float) -> None:
    """``--child psycopg``: the do-nothing loop; prints the marks it sees (after the events)."""
    conn = harness.connect()
    conn.execute(f'LISTEN "{channel}"')
    conn.execute(f"LISTEN {MARK}")
    print("ready", flush=True)
    for notify in conn.notifies(timeout=limit):
        if notify.channel == MARK:
            print(f"reached {notify.payload}", flush=True)


# The parent


class Child:
    """A child process whose stdout lines can be awaited, with a timeout."""

    def __init__(self, kind: str, args: list[str]) -> None:
        self.kind = kind
        self.process = harness.spawn(
            [sys.executable, "-m", "benchmarks.memory", "--child", kind, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def expect(self, text: str, deadline: float) -> None:
        """Wait for the line ``text``; fail at ``deadline`` (monotonic) or if the child dies."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.kind} child exited with status {self.process.returncode}"
                    ) from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.kind} child: no {text!r} in time") from None
                continue
            if line == text:
                return

    def rss_mb(self) -> float:
        """Resident memory now, from ``/proc/<pid>/status``, in MB (10^6 bytes)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
        raise RuntimeError("no VmRSS in /proc/<pid>/status")


def run(repeat: int, events: int, bulk: bool) -> tuple[list[float], list[float], list[float]]:
    """Warm up, read RSS, write the events, read RSS again; growth per child, in MB."""
    from django_pgnotify.declarations import get_declarations

    channel = get_declarations(["benchapp.Item"])[0].channel
    total = WARMUP + events
    limit = total / 1000 * SECONDS_PER_1000 * repeat + 120
    listeners = [Child("listener", [f"--checkpoints={WARMUP},{total}"]) for _ in range(repeat)]
    loops = [Child("psycopg", [f"--channel={channel}", f"--limit={limit}"]) for _ in range(repeat)]
    children = listeners + loops
    try:
        deadline = time.monotonic() + 60
        for child in children:
            child.expect("ready", deadline)
        rss: dict[str, list[float]] = {}
        with writer_connection() as writer:
            writer.execute(f"TRUNCATE {TABLE}")
            for phase, rows in (("warm", WARMUP), ("done", events)):
                write_backlog(writer, rows, bulk)
                writer.execute(f"NOTIFY {MARK}, '{phase}'")
                deadline = time.monotonic() + rows / 1000 * SECONDS_PER_1000 * repeat + 60
                for child in listeners:
                    child.expect(f"reached {WARMUP if phase == 'warm' else total}", deadline)
                for child in loops:
                    child.expect(f"reached {phase}", deadline)
                rss[phase] = [child.rss_mb() for child in children]
                writer.execute(f"TRUNCATE {TABLE}")
    finally:
        for child in children:
            harness.stop(child.process)
    growth = [end - start for start, end in zip(rss["warm"], rss["done"], strict=True)]
    return growth[:repeat], growth[repeat:], rss["warm"][:repeat]


def megabytes(value: float) -> str:
    return f"{value:+.2f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--statements",
        choices=["single", "bulk"],
        help="how the events are written (default: single, bulk with --quick)",
    )
    parser.add_argument("--child", choices=["listener", "psycopg"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = harness.parse_args(parser.description or "", parser=parser)
    if args.child == "listener":
        listener_child([int(n) for n in args.checkpoints.split(",")])
        return 0
    if args.child == "psycopg":
        psycopg_child(args.channel, args.limit)
        return 0

    url = harness.setup_django()
    statements = args.statements or ("bulk" if args.quick else "single")
    events = EVENTS[args.quick]
    started = time.monotonic()
    library, baseline, warm = run(args.repeat, events, statements == "bulk")
    print(
        f"RSS growth over {events:,} events after a {WARMUP:,}-event warm-up "
        f"({statements}-row statements; {args.repeat} of each side by side, "
        f"{time.monotonic() - started:.0f}s):"
    )
    print(f"  psycopg loop (baseline)  {harness.summarize(baseline, megabytes)}")
    print(f"  listener, no-op receiver {harness.summarize(library, megabytes)}")
    print(f"  listener RSS after warm-up: {harness.summarize(warm, '{:.1f} MB'.format)}")
    report = harness.Report(quick=args.quick)
    base = statistics.median(baseline)
    harness.at_most(
        report,
        f"listener RSS growth over {events:,} events",
        statistics.median(library),
        TARGET_MB,
        "MB",
        f"psycopg loop {base:+.2f} MB",
    )
    return report.finish(url)


if __name__ == "__main__":
    sys.exit(main())
