"""Latency: from a commit returning to the receiver (or a WebSocket client) seeing it.

Writes come from a child process, paced open-loop (the i-th write is due at
``start + i / rate`` whatever the previous ones took): one single-row ``INSERT``
per transaction into ``benchapp_item`` with ``a = i``, ``synchronous_commit``
off (the disk is not what is measured). The writer notes ``CLOCK_MONOTONIC``
when each commit returns; the receiving side notes the same clock (it is
system-wide on Linux) when it gets the event, so latency is the difference,
matched by ``a`` (or, for the psycopg loop, by arrival order: one writer, one
notification per commit, delivered in commit order). A latency can be slightly
negative: the notification may arrive before the writer's ``commit()`` returns.

Two measurements, each run round-robin with its baseline, 3+ times:

1. Signals, 2,000 commits/s: a ``Listener`` in a thread of this process with
   one receiver that notes the time. Baseline: a do-nothing psycopg loop
   (``for n in conn.notifies(): ...``) in a thread, noting the time.
2. Channels, 500 commits/s: a real ``pgnotify_listen`` process forwarding to
   channels_redis (``REDIS_URL``, else an embedded Redis), a Uvicorn process
   serving ``RowChangeConsumer`` (``benchmarks/channels_asgi.py``), and a
   ``websockets`` client here noting when each frame arrives. Baseline: a child
   process calling channels_redis ``group_send`` directly with the same kind of
   message (batches of what is due) at the same pace, to the same client.
   Measured with both of channels_redis's layers: the pub/sub one (the target's
   line) and the core one (lists in Redis, whose consumers poll).

    python benchmarks/latency.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness

TABLE = "benchapp_item"
LABEL = "benchapp.item"
#: Paced rates (commits per second) and run lengths (seconds), full and quick.
SIGNAL_RATE = 2_000
CHANNELS_RATE = 500
SECONDS = {False: 10.0, True: 1.0}
#: Seconds a run may take beyond its paced length before it counts as broken.
GRACE = 30.0
#: Seconds without a frame, after the last send, that end a Channels run.
QUIET = 1.0

TARGET_P50 = 0.5
TARGET_P99 = 2.0
TARGET_CHANNELS_P99 = 15.0


def now_ns() -> int:
    """The clock both sides use: CLOCK_MONOTONIC, shared by every process of the machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def pace(rate: float, count: int, act: Any) -> list[int]:
    """Call ``act(i)`` at ``rate`` per second, open-loop; the times (ns) each call returned."""
    times = []
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        act(i)
        times.append(now_ns())
    return times


# Child processes: the paced writers


def run_writer(rate: float, count: int) -> None:
    """``--child writer``: paced single-row INSERT transactions; prints the commit times."""
    conn = harness.connect()
    conn.execute("SET synchronous_commit = off")
    insert = f"INSERT INTO {TABLE} (a, b, c, d) VALUES (%s, 'latency', 0, 0)"
    conn.execute("SELECT 1")
    times = pace(rate, count, lambda i: conn.execute(insert, [i], prepare=True))
    conn.close()
    print(json.dumps(times), flush=True)


def run_sender(rate: float, count: int) -> None:
    """``--child sender``: paced ``group_send`` of event-like messages; prints their times.

    It sends as the listener's forwarder does: one ``pgnotify.batch`` message with
    every event due when the previous ``group_send`` returned, and at most one per
    ``MIN_INTERVAL`` (one event when it keeps up). An event's time is when it was
    due, or the call when the sender was idle waiting for it: timing a late event
    from the call that finally sends it would hide the wait (and flatter the baseline).
    """
    import django

    django.setup()
    from channels.layers import get_channel_layer

    from django_pgnotify import groups
    from django_pgnotify.channels_bridge import BATCH, MIN_INTERVAL

    layer = get_channel_layer()
    assert layer is not None
    group = groups.model_group(LABEL)
    stream = f"baseline-{uuid.uuid4().hex[:8]}"

    def message(i: int) -> dict[str, Any]:
        # The shape the listener sends (docs/channels.md), so the consumer does the same work.
        return {
            "type": "pgnotify.row_changed",
            "model": LABEL,
            "action": "insert",
            "pk": i + 1,
            "fields": {"a": i, "b": "latency"},
            "old": None,
            "changed": [],
            "truncated": False,
            "context": None,
            "xid": 1000 + i,
            "timestamp": "2025-01-01T00:00:00+00:00",
            "durable": False,
            "event_id": None,
            "seq": i + 1,
            "stream": stream,
        }

    async def send_all() -> list[int]:
        # Connect before the clock starts (seq 0: the consumer skips it).
        await layer.group_send(group, {"type": BATCH, "messages": [{**message(-1), "seq": 0}]})
        times: list[int] = []
        start = now_ns()
        step = 1e9 / rate
        last = -math.inf
        while len(times) < count:
            first = len(times)
            delay = (start + first * step - now_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            hold = (last + MIN_INTERVAL * 1e9 - now_ns()) / 1e9
            if hold > 0:
                await asyncio.sleep(hold)
            called = last = now_ns()
            idle = delay > 0 and hold <= 0
            due = range(first, max(first, min(count - 1, int((called - start) // step))) + 1)
            times.extend(called if idle and i == first else int(start + i * step) for i in due)
            await layer.group_send(group, {"type": BATCH, "messages": [message(i) for i in due]})
        return times

    print(json.dumps(asyncio.run(send_all())), flush=True)


def paced_child(kind: str, rate: float, count: int) -> Any:
    """Start ``--child kind`` (writer or sender); its output is the JSON list of times."""
    import subprocess

    return harness.spawn(
        [
            sys.executable,
            "-m",
            "benchmarks.latency",
            "--child",
            kind,
            "--rate",
            str(rate),
            "--count",
            str(count),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def child_times(process: Any, timeout: float) -> list[int]:
    """Wait for a paced child; its times, or an error if it failed."""
    out, _ = process.communicate(timeout=timeout)
    harness.stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"{process.args[-5:]} exited with status {process.returncode}")
    return list(json.loads(out.strip().splitlines()[-1]))


# Latencies


def latencies_ms(sent: list[int], received: dict[int, int]) -> list[float]:
    """Milliseconds from ``sent[i]`` to ``received[i]``; infinite for an event that never came.

    channels_redis drops group messages to a consumer whose channel holds
    ``capacity`` (100) messages: a lost event counts as infinitely late, so
    losing more than 1% shows as an infinite p99 rather than a flattering one.
    """
    return [(received[i] - sent[i]) / 1e6 if i in received else math.inf for i in range(len(sent))]


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank), e.g. 0.99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


class Percentiles:
    """p50 and p99 of each repetition of one variant."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.p50 = harness.Measurement(f"{name} p50")
        self.p99 = harness.Measurement(f"{name} p99")
        self.worst: list[float] = []
        self.lost: list[int] = []

    def add(self, values: list[float]) -> None:
        self.p50.values.append(percentile(values, 0.50))
        self.p99.values.append(percentile(values, 0.99))
        self.worst.append(max(values))
        self.lost.append(sum(1 for value in values if value == math.inf))

    def print(self, width: int) -> None:
        ms = "{:.3f} ms".format
        print(
            f"  {self.name:<{width}}  p50 {harness.summarize(self.p50.values, ms)}"
            f"   p99 {harness.summarize(self.p99.values, ms)}   max {ms(max(self.worst))}"
            f"   lost {sum(self.lost)}"
        )


# 1. Commit to receiver: psycopg loop and Listener


def psycopg_run(channel: str, count: int) -> list[float]:
    """The do-nothing psycopg loop in a thread, the paced writer in a child."""
    conn = harness.connect()
    conn.execute(f'LISTEN "{channel}"')
    arrived: list[int] = []
    timeout = count / SIGNAL_RATE + GRACE

    def loop() -> None:
        for _ in conn.notifies(timeout=timeout, stop_after=count):
            arrived.append(now_ns())

    reader = threading.Thread(target=loop, name="psycopg-loop", daemon=True)
    reader.start()
    try:
        sent = child_times(paced_child("writer", SIGNAL_RATE, count), timeout)
        reader.join(timeout)
    finally:
        conn.close()
    return latencies_ms(sent, dict(enumerate(arrived)))


def listener_run(count: int) -> list[float]:
    """A ``Listener`` in a thread with one time-noting receiver; the paced writer in a child."""
    from django_pgnotify import row_changed
    from django_pgnotify.declarations import get_declarations
    from django_pgnotify.listener import Listener

    arrived: dict[int, int] = {}
    done = threading.Event()

    def on_change(sender: Any, event: Any, **kwargs: Any) -> None:
        arrived[event.fields["a"]] = now_ns()
        if len(arrived) == count:
            done.set()

    listener = Listener(get_declarations(["benchapp.Item"]))
    row_changed.connect(on_change, weak=False, dispatch_uid="bench_latency")
    thread = threading.Thread(target=listener.run, name="listener", daemon=True)
    thread.start()
    try:
        if not listener.ready.wait(30):
            raise TimeoutError("the listener did not start within 30s")
        timeout = count / SIGNAL_RATE + GRACE
        sent = child_times(paced_child("writer", SIGNAL_RATE, count), timeout)
        done.wait(GRACE)
    finally:
        listener.stop()
        thread.join(30)
        row_changed.disconnect(dispatch_uid="bench_latency")
    return latencies_ms(sent, arrived)


def measure_signals(quick: bool, repeat: int) -> tuple[Percentiles, Percentiles]:
    """Baseline and library, round-robin, after one short untimed round."""
    from django_pgnotify.declarations import get_declarations

    channel = get_declarations(["benchapp.Item"])[0].channel
    count = int(SIGNAL_RATE * SECONDS[quick])
    base, library = Percentiles("psycopg loop (baseline)"), Percentiles("listener, sync receiver")
    psycopg_run(channel, 200)
    listener_run(200)
    for _ in range(repeat):
        base.add(psycopg_run(channel, count))
        library.add(listener_run(count))
    print(f"commit -> receiver, {SIGNAL_RATE:,} single-row commits/s, {count:,} per run:")
    for result in (base, library):
        result.print(len("psycopg loop (baseline)"))
    sys.stdout.flush()
    return base, library


# 2. Commit to WebSocket client: the Channels bridge


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def collect(ws: Any, count: int, timeout: float, sent: asyncio.Event) -> dict[int, int]:
    """Frames until ``count`` events (``a >= 0``) arrived: ``a`` -> arrival time (ns).

    Also stops once everything was sent and no frame came for ``QUIET`` seconds
    (events were lost), and at ``timeout``.
    """
    frames: list[tuple[int, str]] = []
    found = 0
    deadline = time.monotonic() + timeout
    while found < count:
        remaining = deadline - time.monotonic()
        if sent.is_set():
            remaining = min(remaining, QUIET)
        if remaining <= 0:
            break
        try:
            raw = await asyncio.wait_for(ws.recv(), remaining)
        except asyncio.TimeoutError:
            break
        frames.append((now_ns(), raw))
        # Only events count (parsed after the run); warm-up rows have a = -1.
        if '"type": "row_changed"' in raw and '"a": -1' not in raw:
            found += 1
    arrived = {}
    for at, raw in frames:
        frame = json.loads(raw)
        if frame.get("type") == "row_changed" and frame["fields"]["a"] >= 0:
            arrived[frame["fields"]["a"]] = at
    return arrived


async def paced_to_client(ws: Any, kind: str, count: int) -> list[float]:
    """One run: a paced child (writer or sender) and the client collecting its events."""
    timeout = count / CHANNELS_RATE + GRACE
    process = paced_child(kind, CHANNELS_RATE, count)
    finished = asyncio.Event()

    async def times() -> list[int]:
        try:
            return await asyncio.to_thread(child_times, process, timeout)
        finally:
            finished.set()

    try:
        arrived, sent = await asyncio.gather(collect(ws, count, timeout, finished), times())
    finally:
        harness.stop(process)
    return latencies_ms(sent, arrived)


async def until_forwarding(ws: Any, writer: Any, timeout: float = 30.0) -> None:
    """Commit warm-up rows (``a = -1``) until one reaches the client: the chain works."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        writer.execute(f"INSERT INTO {TABLE} (a, b, c, d) VALUES (-1, 'warm-up', 0, 0)")
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
        except asyncio.TimeoutError:
            continue
        if frame.get("type") == "row_changed":
            return
    raise TimeoutError(f"no event reached the WebSocket client within {timeout:.0f}s")


async def channels_runs(
    url: str, kind: str, quick: bool, repeat: int
) -> tuple[Percentiles, Percentiles]:
    from websockets.asyncio.client import connect

    count = int(CHANNELS_RATE * SECONDS[quick])
    base = Percentiles("group_send (baseline)")
    library = Percentiles("listener + channels_redis")
    with harness.connect() as writer:
        async with connect(url, max_queue=None) as ws:
            await ws.send(json.dumps({"subscribe": LABEL}))
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if answer.get("type") != "subscribed":
                raise RuntimeError(f"subscription refused: {answer}")
            await until_forwarding(ws, writer)
            if not quick:  # quick: the warm-up rows above have to do
                await paced_to_client(ws, "sender", 100)
                await paced_to_client(ws, "writer", 100)
            for _ in range(repeat):
                base.add(await paced_to_client(ws, "sender", count))
                library.add(await paced_to_client(ws, "writer", count))
    print(
        f"commit -> WebSocket client, channels_redis {kind} layer, "
        f"{CHANNELS_RATE:,} single-row commits/s, {count:,} per run:"
    )
    for result in (base, library):
        result.print(len("listener + channels_redis"))
    sys.stdout.flush()
    return base, library


def measure_channels(kind: str, quick: bool, repeat: int) -> tuple[Percentiles, Percentiles]:
    """Start Uvicorn and ``pgnotify_listen`` on channels_redis's ``kind`` layer, then
    time both paths to one client."""
    from django_pgnotify.embedded_redis import redis_channel_layer, redis_url

    layer = redis_channel_layer(redis_url(), prefix=f"bench-{uuid.uuid4().hex[:8]}", kind=kind)
    harness.export_settings(  # for the children
        {"CHANNEL_LAYERS": {"default": layer}, "PGNOTIFY": {"CHANNEL_LAYER": "default"}}
    )
    port = free_port()
    server = harness.spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.channels_asgi:application",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    )
    listener = harness.spawn(
        [
            sys.executable,
            str(harness.ROOT / "benchmarks" / "manage.py"),
            "pgnotify_listen",
            *("-v", "0", "benchapp.Item"),  # warnings still reach stderr (benchmarks/settings.py)
        ]
    )
    try:
        harness.wait_until(lambda: port_open(port), 30, what="Uvicorn")
        for process in (server, listener):
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with status {process.returncode}")
        url = f"ws://127.0.0.1:{port}/ws/pgnotify/"
        return asyncio.run(channels_runs(url, kind, quick, repeat))
    finally:
        harness.stop(listener)
        harness.stop(server)


def ms(result: Percentiles, which: str) -> float:
    """The median over the repetitions of one percentile, in ms."""
    return statistics.median(getattr(result, which).values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=["signals", "channels"], help="run one of the two measurements"
    )
    parser.add_argument("--child", choices=["writer", "sender"], help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = harness.parse_args(parser.description or "", parser=parser)
    if args.child == "writer":
        run_writer(args.rate, args.count)
        return 0
    if args.child == "sender":
        run_sender(args.rate, args.count)
        return 0

    url = harness.setup_django()
    harness.freeze_like_pgnotify_listen()
    report = harness.Report(quick=args.quick)
    with harness.connect() as conn:
        conn.execute(f"TRUNCATE {TABLE}")
    if args.only != "channels":
        base, library = measure_signals(args.quick, args.repeat)
        for which, limit in (("p50", TARGET_P50), ("p99", TARGET_P99)):
            harness.at_most(
                report,
                f"latency commit -> receiver {which} at {SIGNAL_RATE:,}/s",
                ms(library, which),
                limit,
                "ms",
                f"psycopg loop {ms(base, which):.2f} ms",
            )
    if args.only != "signals":
        channels_base, channels = measure_channels("pubsub", args.quick, args.repeat)
        core_base, core = measure_channels("core", args.quick, args.repeat)
        harness.at_most(
            report,
            f"latency commit -> WebSocket p99 at {CHANNELS_RATE}/s (pub/sub layer)",
            ms(channels, "p99"),
            TARGET_CHANNELS_P99,
            "ms",
            f"group_send {ms(channels_base, 'p99'):.2f} ms; core layer "
            f"{ms(core, 'p99'):.2f} ms, its group_send {ms(core_base, 'p99'):.2f} ms",
            # Quick mode (CI) reports events lost on a loaded machine as a FAIL
            # line rather than failing the run: channels_redis itself may not
            # keep up with 500/s there (see the group_send baseline).
            float("inf") if args.quick else ms(channels_base, "p99"),
        )
    with harness.connect() as conn:
        conn.execute(f"TRUNCATE {TABLE}")

    return report.finish(url)


if __name__ == "__main__":
    sys.exit(main())
