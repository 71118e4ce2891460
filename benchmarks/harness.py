"""What every benchmark script shares: setup, repetition, summaries, child processes.

A script calls ``parse_args``, then ``setup_django`` (which starts the embedded
PostgreSQL unless ``DATABASE_URL`` is set), measures with ``interleave`` or
``measure``, records its targets on a ``Report`` and ends with
``sys.exit(report.finish())``. (``instructions.py`` counts instead of timing, on
a server of its own.)

Exit status (the rule CI relies on): a missed target prints a FAIL line, and
in ``--quick`` mode it does not fail the run: quick figures on a shared CI
machine are too noisy to assert. A script exits 1 if it crashes, or if a
result is absurd: a ratio above 10x its limit, or a rate below a tenth of its
minimum (that is a regression or a broken setup, not noise). In full mode a
missed target exits 1 too.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The repository root, put on the path of child processes.
ROOT = Path(__file__).resolve().parent.parent

#: A result this many times worse than its target is absurd, even in quick mode.
ABSURD_FACTOR = 10.0

SETTINGS_MODULE = "benchmarks.settings"


# Arguments


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> argparse.Namespace:
    """``--quick`` and ``--repeat N`` (default 3 quick, 5 full); pass ``parser`` to add more."""
    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rows and repetitions (CI); missed targets do not fail the run",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="repetitions of each measurement (default: 3 with --quick, else 5; at least 3)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.repeat < 3:
        parser.error("--repeat must be at least 3")
    return args


# Django and the database


def freeze_like_pgnotify_listen() -> None:
    """Exempt the objects alive now from the cyclic GC, as ``pgnotify_listen`` does
    before it starts listening: a listener measured in this process then runs as it
    would in its own."""
    from django_pgnotify.listener import freeze_startup_objects

    freeze_startup_objects()


def setup_django(extra_settings: dict[str, Any] | None = None, migrate: bool = True) -> str:
    """Configure Django for the benchmark project, migrate, install triggers; return the URL.

    Child processes pass ``migrate=False``: their parent has set the database up.

    ``extra_settings`` override ``benchmarks/settings.py`` (a ``PGNOTIFY`` dict is
    merged); they travel in the environment so child processes get them too, as
    they get ``DATABASE_URL`` (exported by ``database_url()`` when it starts the
    embedded server).
    """
    install_signal_handlers()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if extra_settings:
        export_settings(extra_settings)
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE

    from django_pgnotify.embedded import database_url

    url = database_url()
    # After the embedded server's own exit hook, so that it runs first (LIFO):
    # children disconnect before the server stops.
    atexit.register(stop_children)
    import django
    from django.core.management import call_command

    django.setup()
    if migrate:
        call_command("migrate", verbosity=0, interactive=False)
        from django_pgnotify.installation import install_triggers

        install_triggers()
    return url


def export_settings(extra_settings: dict[str, Any]) -> None:
    """Override settings for child processes started from now on (a ``PGNOTIFY`` dict is merged)."""
    merged = json.loads(os.environ.get("BENCH_SETTINGS") or "{}")
    for key, value in extra_settings.items():
        if key == "PGNOTIFY":
            merged.setdefault("PGNOTIFY", {}).update(value)
        else:
            merged[key] = value
    os.environ["BENCH_SETTINGS"] = json.dumps(merged)


def connect(url: str | None = None, autocommit: bool = True) -> Any:
    """A plain psycopg connection (for timed statements: no ORM in the measurement)."""
    import psycopg

    return psycopg.connect(url or os.environ["DATABASE_URL"], autocommit=autocommit)


def server_version(url: str | None = None) -> str:
    """PostgreSQL's ``version()``, shortened to its first part."""
    with connect(url) as conn:
        version = conn.execute("SELECT version()").fetchone()[0]
    return version.split(",")[0]


def machine_line(url: str | None = None) -> str:
    """Where the figures come from: cores, PostgreSQL, Python."""
    python = ".".join(platform.python_version_tuple()[:2])
    return f"machine: {os.cpu_count()} cores, {server_version(url)}, Python {python}"


# Waiting


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` every ``interval`` seconds until it is truthy; return its value.

    Raises ``TimeoutError`` after ``timeout`` seconds, so no run waits forever.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# Measuring


@dataclass
class Measurement:
    """The values of one variant over the repetitions (seconds, or a rate)."""

    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        return f"{self.name}: {summarize(self.values)}"


def measure(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Run ``fn`` ``repeat`` times; its wall-clock seconds each time.

    If ``fn`` returns a number, that is taken as the measured value instead
    (so it can leave its own setup out of the timing).
    """
    values = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        values.append(float(result) if isinstance(result, int | float) else elapsed)
    return values


def interleave(
    variants: dict[str, Callable[[], Any]],
    repeat: int,
    warmup: bool = True,
    label: str = "",
    fmt: Callable[[float], str] | None = None,
) -> dict[str, Measurement]:
    """Run the variants round-robin, ``repeat`` times each, after one untimed round.

    Round-robin (baseline, A, B, baseline, A, B, ...) spreads machine noise over
    all variants alike, so the ratios of their medians stay meaningful. Each
    callable is measured as in ``measure``. Prints every variant's median and
    range as it goes.
    """
    if warmup:
        for fn in variants.values():
            fn()
    results = {name: Measurement(name) for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            results[name].values.extend(measure(fn, 1))
    width = max(len(name) for name in variants)
    if label:
        print(label)
    for name, result in results.items():
        print(f"  {name:<{width}}  {summarize(result.values, fmt)}")
    sys.stdout.flush()
    return results


def seconds(value: float) -> str:
    """``value`` seconds in a readable unit."""
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def summarize(values: Sequence[float], fmt: Callable[[float], str] | None = None) -> str:
    """``median (min - max)``, seconds by default."""
    fmt = fmt or seconds
    return f"{fmt(statistics.median(values))} ({fmt(min(values))} - {fmt(max(values))})"


def ratio(measurements: dict[str, Measurement], name: str, baseline: str) -> float:
    """Median of ``name`` over median of ``baseline``."""
    return measurements[name].median / measurements[baseline].median


# Summaries


def summary_line(
    name: str, measured: float, target: str, baseline: str, passed: bool, unit: str = "x"
) -> str:
    """One line per target, the form the runner collects and the docs quote."""
    value = f"{measured:.2f}x" if unit == "x" else f"{measured:,.0f} {unit}"
    verdict = "PASS" if passed else "FAIL"
    return f"SUMMARY  {name}  {value}  target {target}  baseline {baseline}  {verdict}"


@dataclass
class Report:
    """Collects the targets of one script and decides its exit status (see module doc)."""

    quick: bool
    lines: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    absurd: list[str] = field(default_factory=list)

    def ratio(self, name: str, measured: float, limit: float, baseline: str) -> bool:
        """A ratio that must be at most ``limit``."""
        passed = measured <= limit
        self._add(name, passed, measured > limit * ABSURD_FACTOR)
        self.lines.append(summary_line(name, measured, f"<= {limit:g}x", baseline, passed))
        return passed

    def rate(self, name: str, measured: float, minimum: float, unit: str, baseline: str) -> bool:
        """A rate (or ratio of rates, ``unit="x"``) that must be at least ``minimum``."""
        passed = measured >= minimum
        self._add(name, passed, measured < minimum / ABSURD_FACTOR)
        target = f">= {minimum:g}x" if unit == "x" else f">= {minimum:,.0f} {unit}"
        self.lines.append(summary_line(name, measured, target, baseline, passed, unit))
        return passed

    def check(self, name: str, passed: bool, detail: str) -> bool:
        """A yes/no target (e.g. "never fails"); a failure here is always absurd."""
        self._add(name, passed, not passed)
        verdict = "PASS" if passed else "FAIL"
        self.lines.append(f"SUMMARY  {name}  {detail}  target always  baseline -  {verdict}")
        return passed

    def compare(self, name: str, measured: float, baseline: str) -> None:
        """A ratio printed beside its baselines with no target, and so no verdict."""
        self.lines.append(f"SUMMARY  {name}  {measured:.2f}x  target none  baseline {baseline}  -")

    def _add(self, name: str, passed: bool, absurd: bool) -> None:
        if not passed:
            self.failed.append(name)
        if absurd:
            self.absurd.append(name)

    def finish(self, url: str | None = None, machine: str | None = None) -> int:
        """Print the summary lines and the machine line; return the exit status.

        ``machine`` is a ``machine_line`` taken earlier, for a script whose server
        has stopped by now.
        """
        print()
        for line in self.lines:
            print(line)
        print(machine or machine_line(url))
        if self.absurd:
            print(f"ABSURD (more than {ABSURD_FACTOR:g}x off target): {', '.join(self.absurd)}")
            return 1
        if self.failed and not self.quick:
            return 1
        return 0


# Child processes


_children: list[subprocess.Popen[Any]] = []


def child_env() -> dict[str, str]:
    """The environment of a child: ours, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    return env


def spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a child process that is stopped, at the latest, when this process exits."""
    kwargs.setdefault("env", child_env())
    kwargs.setdefault("cwd", str(ROOT))
    process = subprocess.Popen(list(args), **kwargs)
    _children.append(process)
    return process


def stop(process: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    # Two threads may stop the same child (one that waited for it, one stopping all).
    with contextlib.suppress(ValueError):
        _children.remove(process)
    return process.returncode


def stop_children() -> None:
    """Stop every child still running (at exit, on errors and Ctrl-C)."""
    for process in list(_children):
        stop(process, timeout=5.0)


atexit.register(stop_children)

_handlers_installed = False


def install_signal_handlers() -> None:
    """Turn SIGTERM into an exit, so children and the embedded server are cleaned up."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def at_most(
    report: Report,
    name: str,
    measured: float,
    limit: float,
    unit: str,
    baseline: str,
    baseline_value: float | None = None,
) -> bool:
    """Record a value (a latency, a memory growth) that must be at most ``limit`` ``unit``.

    Absurd, as for ratios, beyond ``ABSURD_FACTOR`` times the limit; when
    ``baseline_value`` is given, only if it is that far beyond the baseline too
    (a machine where the baseline itself is that slow is not a regression).
    """
    passed = measured <= limit
    absurd = measured > limit * ABSURD_FACTOR
    if baseline_value is not None:
        absurd = absurd and measured > baseline_value * ABSURD_FACTOR
    report._add(name, passed, absurd)
    verdict = "PASS" if passed else "FAIL"
    report.lines.append(
        f"SUMMARY  {name}  {measured:.2f} {unit}  target <= {limit:g} {unit}  "
        f"baseline {baseline}  {verdict}"
    )
    return passed
