"""Run every benchmark script in turn, then print all their SUMMARY lines again.

``python -m benchmarks [--quick] [--repeat N]``. Each script runs as its own
process; they share one embedded PostgreSQL, started here, unless
``DATABASE_URL`` is set (``instructions`` starts one of its own either way: it
runs the server's binary itself). Scripts not written yet are skipped. Exits 1 if any
script exited non-zero (see ``harness`` for when a script does).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ROOT, child_env, install_signal_handlers

#: The scripts, in the order they run.
SCRIPTS = ("write_path", "instructions", "durable", "listener", "latency", "memory")

#: A script that takes longer than this is stopped (a hang must not block CI).
TIMEOUT = {True: 300.0, False: 3600.0}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scripts; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed to every script")
    parser.add_argument("--repeat", type=int, metavar="N", help="passed to every script")
    parser.add_argument("scripts", nargs="*", metavar="SCRIPT", help="run only these")
    args = parser.parse_args(argv)
    install_signal_handlers()
    passthrough = (["--quick"] if args.quick else []) + (
        ["--repeat", str(args.repeat)] if args.repeat else []
    )
    collected: list[str] = []
    failures: list[str] = []
    started = time.monotonic()
    # One server for every script (exported as DATABASE_URL): starting one each took longer
    # than some quick measurements.
    from django_pgnotify.embedded import database_url

    database_url()
    for name in args.scripts or SCRIPTS:
        if not (ROOT / "benchmarks" / f"{name}.py").exists():
            print(f"== {name}: skipped (benchmarks/{name}.py does not exist yet)", flush=True)
            continue
        print(f"== {name}", flush=True)
        status, lines, elapsed = run_script(name, passthrough, TIMEOUT[args.quick])
        collected.extend(lines)
        collected.append(f"({name}: {elapsed:.0f}s, exit status {status})")
        if status != 0:
            failures.append(name)
    print(f"\n== all summaries ({time.monotonic() - started:.0f}s)")
    for line in collected:
        print(line)
    if failures:
        print(f"failed: {', '.join(failures)}")
        return 1
    return 0


def run_script(name: str, passthrough: list[str], timeout: float) -> tuple[int, list[str], float]:
    """Run one script, echoing its output; its status, summary lines and duration."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", f"benchmarks.{name}", *passthrough],
        cwd=str(ROOT),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def echo() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith(("SUMMARY", "machine:", "ABSURD")):
                lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"== {name}: stopped after {timeout:.0f}s", flush=True)
    finally:
        # Ctrl-C or a timeout: SIGTERM lets the script stop its children and server.
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        reader.join(5)
    status = process.returncode if process.returncode is not None else 1
    return status, lines, time.monotonic() - start


if __name__ == "__main__":
    sys.exit(main())
