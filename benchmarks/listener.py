"""Listener throughput: a backlog of committed changes drained into ``row_changed``.

What is timed is the listener alone: the backlog is committed first, while the
listener is already LISTENing (a notification committed before LISTEN is never
delivered) but held. It is held by its first event, a "primer" row committed
before the backlog, whose receiver call blocks until the backlog is in; the
clock starts when it is released and stops at the receiver call of the last
backlog event. So reading, decoding to Python types, the thread hop and
``row_changed`` dispatch are all inside the timing. While held, the listener
reads ahead only as far as its local queue (``QUEUE_SIZE``, 1,000 by default)
lets it: the rest of the backlog waits in PostgreSQL, as in production. As
``pgnotify_listen`` does, the process freezes its startup objects out of the
garbage collector's reach before it measures.

The receiver is as close to a no-op as a counter can be (one increment and two
comparisons per call): the benchmark has to know when the last event arrived.

Backlogs (``benchapp_item``, ``Notify(fields=["a", "b"])``, emptied before each):

- single-row statements: a server-side ``DO`` loop of one-row ``INSERT``
  statements, 10,000 per transaction (the hard case: one notification per row);
- bulk statements: ``INSERT ... SELECT generate_series`` of 1,000 rows per
  statement, 10 statements per transaction (the library may pack many rows into
  one notification).

Baseline, measured in the same repetition: a do-nothing psycopg 3 loop
(``for n in conn.notifies(): ...``) on its own connection, LISTENing on the same
channel while the same backlog is written (so both drain the very same
notifications), stopped by a sentinel NOTIFY committed after the backlog. Rates
are rows (events) per second for both. The two drain one after the other, in
alternating order from one repetition to the next. The async variant (one no-op
``async def`` receiver) gets a backlog of its own.

    python benchmarks/listener.py [--quick] [--repeat N] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness

TABLE = "benchapp_item"
#: Backlog rows: full and quick mode.
ROWS = {False: 200_000, True: 20_000}
#: Rows per transaction while building a backlog.
TRANSACTION_ROWS = 10_000
#: Rows per bulk statement.
BULK_ROWS = 1_000
#: Seconds any single wait may take before the run is declared broken.
TIMEOUT = 120.0
SENTINEL = "bench_listener_sentinel"

TARGET_SYNC = 100_000.0
TARGET_RATIO = 0.2
TARGET_ASYNC = 50_000.0


def rate(value: float) -> str:
    """Events per second, for the per-variant lines."""
    return f"{value:,.0f}/s"


# Building backlogs


def write_backlog(conn: Any, rows: int, bulk: bool) -> float:
    """Commit ``rows`` new rows of ``benchapp_item``; the seconds it took (for information)."""
    start = time.perf_counter()
    for first in range(0, rows, TRANSACTION_ROWS):
        count = min(TRANSACTION_ROWS, rows - first)
        if bulk:
            statement = (
                f"FOR s IN 0..{count // BULK_ROWS - 1} LOOP INSERT INTO {TABLE} (a, b, c, d) "
                f"SELECT g, 'item ' || g, g, g FROM generate_series({first} + s * {BULK_ROWS}, "
                f"{first} + s * {BULK_ROWS} + {BULK_ROWS - 1}) AS g; END LOOP;"
            )
            assert count % BULK_ROWS == 0
        else:
            statement = (
                f"FOR i IN {first}..{first + count - 1} LOOP INSERT INTO {TABLE} (a, b, c, d) "
                "VALUES (i, 'item ' || i, i, i); END LOOP;"
            )
        # Each DO runs as one transaction (autocommit): TRANSACTION_ROWS rows per commit.
        conn.execute(f"DO $$ DECLARE s int; i int; BEGIN {statement} END $$")
    return time.perf_counter() - start


def writer_connection() -> Any:
    """A connection for building backlogs; commits need not wait for the disk."""
    conn = harness.connect()
    conn.execute("SET synchronous_commit = off")
    return conn


# The do-nothing psycopg loop


class PsycopgLoop:
    """The baseline: a bare psycopg LISTEN loop that only looks for the sentinel."""

    def __init__(self, channel: str) -> None:
        self.conn = harness.connect()
        self.conn.execute(f'LISTEN "{channel}"')
        self.conn.execute(f"LISTEN {SENTINEL}")

    def drain(self) -> float:
        """Read everything up to the sentinel; the seconds it took."""
        start = time.perf_counter()
        for notify in self.conn.notifies(timeout=TIMEOUT):
            if notify.channel == SENTINEL:
                break
        else:
            raise TimeoutError(f"the psycopg loop did not see its sentinel within {TIMEOUT:.0f}s")
        elapsed = time.perf_counter() - start
        self.conn.close()
        return elapsed


# The library


@dataclass
class Gate:
    """Counts receiver calls; holds the first one until released; notes the last one's time."""

    expected: int
    count: int = 0
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    finished: float = 0.0

    def hold(self) -> None:
        """The primer's call: wait (in the receiver) until the backlog is committed."""
        self.entered.set()
        if not self.release.wait(TIMEOUT):
            raise TimeoutError("the benchmark never released the listener")

    def last(self) -> None:
        self.finished = time.perf_counter()
        self.done.set()


def sync_receiver(gate: Gate) -> Callable[..., None]:
    """One no-op sync receiver (it counts, to know when the backlog is drained)."""

    def on_change(sender: Any, event: Any, **kwargs: Any) -> None:
        gate.count += 1
        if gate.count == 1:
            gate.hold()
        elif gate.count == gate.expected:
            gate.last()

    return on_change


def async_receiver(gate: Gate) -> Callable[..., Any]:
    """One no-op ``async def`` receiver (it counts, as the sync one)."""

    async def on_change(sender: Any, event: Any, **kwargs: Any) -> None:
        gate.count += 1
        if gate.count == 1:
            await asyncio.get_running_loop().run_in_executor(None, gate.hold)
        elif gate.count == gate.expected:
            gate.last()

    return on_change


class RunningListener:
    """A ``Listener`` in a thread of this process, stopped (and joined) on exit."""

    def __init__(self) -> None:
        from django_pgnotify.declarations import get_declarations
        from django_pgnotify.listener import Listener

        self.listener = Listener(get_declarations(["benchapp.Item"]))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="listener", daemon=True)

    def _run(self) -> None:
        try:
            self.listener.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> RunningListener:
        self.thread.start()
        if not self.listener.ready.wait(30):
            raise TimeoutError(f"the listener did not start within 30s ({self.error!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.stop()
        self.thread.join(30)


@contextmanager
def released(gate: Gate) -> Iterator[Gate]:
    """Release the held receiver on the way out, so that an error never leaves it waiting."""
    try:
        yield gate
    finally:
        gate.release.set()


def drain_listener(
    writer: Any,
    rows: int,
    bulk: bool,
    receiver: Callable[[Gate], Callable[..., Any]],
    baseline: PsycopgLoop | None = None,
    baseline_first: bool = True,
    profile: cProfile.Profile | None = None,
) -> tuple[float, float | None]:
    """One repetition: the library's rate and, if ``baseline`` is given, the psycopg loop's."""
    from django_pgnotify import row_changed

    writer.execute(f"TRUNCATE {TABLE}")
    gate = Gate(expected=1 + rows)
    handler = receiver(gate)
    row_changed.connect(handler, weak=False, dispatch_uid="bench_listener")
    try:
        with RunningListener() as running, released(gate):
            writer.execute(f"INSERT INTO {TABLE} (a, b, c, d) VALUES (-1, 'primer', 0, 0)")
            if not gate.entered.wait(30):
                raise TimeoutError("the primer row never reached the receiver")
            write_backlog(writer, rows, bulk)
            writer.execute(f"NOTIFY {SENTINEL}")
            baseline_rate = None
            if baseline is not None and baseline_first:
                baseline_rate = rows / baseline.drain()
            if profile is not None:
                profile.enable()  # Python 3.12+: it sees every thread
            start = time.perf_counter()
            gate.release.set()
            finished = gate.done.wait(TIMEOUT)
            if profile is not None:
                profile.disable()
            if not finished:
                raise TimeoutError(
                    f"the listener dispatched {gate.count - 1} of {rows} events in {TIMEOUT:.0f}s"
                )
            library_rate = rows / (gate.finished - start)
            if baseline is not None and not baseline_first:
                baseline_rate = rows / baseline.drain()
            if running.error is not None:
                raise running.error
            undecodable = running.listener.stats["undecodable"]
            if undecodable or running.listener.stats["receiver_errors"]:
                raise RuntimeError(f"listener errors: {dict(running.listener.stats)}")
    finally:
        row_changed.disconnect(dispatch_uid="bench_listener")
    return library_rate, baseline_rate


def channel() -> str:
    from django_pgnotify.declarations import get_declarations

    return get_declarations(["benchapp.Item"])[0].channel


def run_backlog(
    writer: Any, rows: int, bulk: bool, repeat: int, label: str
) -> dict[str, harness.Measurement]:
    """Baseline, sync and async, round-robin over ``repeat`` repetitions after a warm-up."""
    names = ("psycopg loop (baseline)", "listener, sync receiver", "listener, async receiver")
    results = {name: harness.Measurement(name) for name in names}
    warmup_rows = min(rows, 5_000)
    drain_listener(writer, warmup_rows, bulk, sync_receiver, PsycopgLoop(channel()))
    for repetition in range(repeat):
        sync, base = drain_listener(
            writer, rows, bulk, sync_receiver, PsycopgLoop(channel()), repetition % 2 == 0
        )
        assert base is not None
        results[names[0]].values.append(base)
        results[names[1]].values.append(sync)
        results[names[2]].values.append(drain_listener(writer, rows, bulk, async_receiver)[0])
    print(label)
    width = max(map(len, names))
    for name, result in results.items():
        print(f"  {name:<{width}}  {harness.summarize(result.values, rate)}")
    sys.stdout.flush()
    return results


def profile_listener(writer: Any, rows: int) -> None:
    """Where the listener spends its time per event (single-row backlog, sync receiver).

    From Python 3.12 one cProfile profile sees every thread: the listener's
    event loop (reading) and its dispatch thread (decoding, receivers). Waiting
    (``poll``, lock and condition waits) is left out of the per-event totals.
    """
    profile = cProfile.Profile()
    library_rate, _ = drain_listener(writer, rows, False, sync_receiver, profile=profile)
    print(f"\nprofile of one drain of {rows:,} events ({rate(library_rate)} under the profiler)")
    idle = ("poll", "acquire", "wait", "select", "sleep", "disable")
    entries = []
    for (path, line, function), data in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        if any(word in function for word in idle):
            continue
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if line else ""
        entries.append((data[2], data[3], data[1], f"{function} {where}".strip()))
    total = sum(entry[0] for entry in entries)
    print(f"{total / rows * 1e6:.2f} µs per event, not waiting (profiled); by own time:")
    print("    own µs/event  cumulative  calls/event")
    for own, cumulative, calls, label in sorted(entries, reverse=True)[:20]:
        print(
            f"    {own / rows * 1e6:12.2f}  {cumulative / rows * 1e6:10.2f}  "
            f"{calls / rows:11.2f}  {label}"
        )


def quiet_expected_warnings() -> None:
    """The held listener fills its local queue on purpose: that warning is expected here."""
    logging.getLogger("django_pgnotify.listener").addFilter(
        lambda record: "local queue full" not in record.getMessage()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", action="store_true", help="also profile one drain (cProfile, both threads)"
    )
    args = harness.parse_args(parser.description or "", parser=parser)
    url = harness.setup_django()
    harness.freeze_like_pgnotify_listen()
    quiet_expected_warnings()
    rows = ROWS[args.quick]
    report = harness.Report(quick=args.quick)
    with writer_connection() as writer:
        single = run_backlog(
            writer,
            rows,
            False,
            args.repeat,
            f"{rows:,} changes by single-row INSERT statements ({TRANSACTION_ROWS:,} per "
            "transaction), events/s:",
        )
        bulk = run_backlog(
            writer,
            rows,
            True,
            args.repeat,
            f"{rows:,} changes by bulk INSERT statements ({BULK_ROWS:,} rows each), events/s:",
        )
        if args.profile:
            profile_listener(writer, rows)
        writer.execute(f"TRUNCATE {TABLE}")
    base, sync, asyn = (m.median for m in single.values())
    baseline = f"psycopg loop {base:,.0f} events/s"
    report.rate("listener throughput, sync receiver", sync, TARGET_SYNC, "events/s", baseline)
    report.rate("listener throughput / psycopg loop", sync / base, TARGET_RATIO, "x", baseline)
    report.rate("listener throughput, async receiver", asyn, TARGET_ASYNC, "events/s", baseline)
    bulk_base, bulk_sync, bulk_async = (m.median for m in bulk.values())
    print(
        f"\nbulk statements (not a target): sync {bulk_sync:,.0f}, async {bulk_async:,.0f}, "
        f"psycopg loop {bulk_base:,.0f} events/s"
    )
    return report.finish(url)


if __name__ == "__main__":
    sys.exit(main())
