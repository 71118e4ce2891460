"""Write path: what a declaration costs the statements that change its table.

Times plain psycopg statements (no ORM: the measurement is of the database)
on tables with identical columns that differ only in their trigger:

- no trigger (``benchapp_plainitem``): the denominator of every ratio;
- hand-written triggers, created here: a row-level ``pg_notify(id)``, a
  row-level ``json_build_object`` of the row (the common tutorial), and a
  statement-level one with transition tables sending one notification per
  200 ids;
- the library's triggers, installed by ``install_triggers`` for
  ``Notify(fields=["a", "b"])`` (``Item``), the same with ``level="row"``
  (``RowItem``) and, for updates, with ``old=False`` (``NewValuesItem``: the
  pk and two fields, no old values) and with ``when_changed=["a", "c"]``
  (``ChangedItem``).

Every table is emptied before each timed run and, for the bulk UPDATE, filled
with the same rows and vacuumed, and each timed run starts from a checkpoint, so
the variants start from the same state.

    python benchmarks/write_path.py [--quick] [--repeat N]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from benchmarks import harness

PLAIN = "benchapp_plainitem"
ITEM = "benchapp_item"
ROW_ITEM = "benchapp_rowitem"
CHANGED = "benchapp_changeditem"
NEW_VALUES = "benchapp_newvaluesitem"

#: Hand-written baselines: table name, label and the SQL that creates its trigger.
HAND_WRITTEN: dict[str, tuple[str, str]] = {
    "bench_row_notify": (
        "row pg_notify(id)",
        """
        CREATE OR REPLACE FUNCTION bench_row_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('ch', NEW.id::text);
          RETURN NULL;
        END $$;
        CREATE OR REPLACE TRIGGER bench_row_notify AFTER INSERT OR UPDATE ON bench_row_notify
          FOR EACH ROW EXECUTE FUNCTION bench_row_notify();
        """,
    ),
    "bench_row_json": (
        "row json_build_object",
        """
        CREATE OR REPLACE FUNCTION bench_row_json() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('ch', json_build_object(
            'table', TG_TABLE_NAME, 'action', TG_OP, 'data', row_to_json(NEW))::text);
          RETURN NULL;
        END $$;
        CREATE OR REPLACE TRIGGER bench_row_json AFTER INSERT OR UPDATE ON bench_row_json
          FOR EACH ROW EXECUTE FUNCTION bench_row_json();
        """,
    ),
    "bench_stmt_agg": (
        "statement string_agg/200",
        """
        CREATE OR REPLACE FUNCTION bench_stmt_agg() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('ch', ids)
          FROM (
            SELECT string_agg(id::text, ',') AS ids
            FROM (SELECT id, (row_number() OVER ()) / 200 AS grp FROM new_rows) AS numbered
            GROUP BY grp
          ) AS chunks;
          RETURN NULL;
        END $$;
        CREATE OR REPLACE TRIGGER bench_stmt_agg_insert AFTER INSERT ON bench_stmt_agg
          REFERENCING NEW TABLE AS new_rows
          FOR EACH STATEMENT EXECUTE FUNCTION bench_stmt_agg();
        CREATE OR REPLACE TRIGGER bench_stmt_agg_update AFTER UPDATE ON bench_stmt_agg
          REFERENCING NEW TABLE AS new_rows
          FOR EACH STATEMENT EXECUTE FUNCTION bench_stmt_agg();
        """,
    ),
}

LIBRARY = "pgnotify fields=[a, b]"
LIBRARY_ROW = "pgnotify level=row"
LIBRARY_CHANGED = "pgnotify when_changed=[a, c]"
LIBRARY_NEW_VALUES = "pgnotify old=False"
NONE = "no trigger"

INSERT_ONE = "INSERT INTO {} (a, b, c, d) VALUES (%s, %s, %s, %s)"
INSERT_BULK = (
    "INSERT INTO {} (a, b, c, d) SELECT i, 'item ' || i, i %% 1000, i FROM generate_series(1, %s) i"
)
# Changes a and c of every row: each row is announced, by every variant.
UPDATE_BULK = "UPDATE {} SET a = a + 1, c = c + 1"


def create_baselines(conn: Any) -> None:
    """Tables like the plain one, each with its hand-written trigger."""
    for table, (_, trigger) in HAND_WRITTEN.items():
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (LIKE {PLAIN} INCLUDING ALL)")
        conn.execute(trigger)


def drop_baselines(conn: Any) -> None:
    """Leave a shared server (``DATABASE_URL``) as it was."""
    for table in HAND_WRITTEN:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"DROP FUNCTION IF EXISTS {table}()")


class Bench:
    """The timed statements, on one autocommit connection."""

    def __init__(self, conn: Any, single_rows: int, bulk_rows: int) -> None:
        self.conn = conn
        self.single_rows = single_rows
        self.bulk_rows = bulk_rows
        #: Library statements that raised: a bulk write must never fail for the trigger.
        self.errors: list[str] = []
        self.library_statements = 0
        self.checkpoints = True

    def reset(self, table: str) -> None:
        self.conn.execute(f"TRUNCATE {table} RESTART IDENTITY")

    def checkpoint(self) -> None:
        """Start a timed run from a checkpoint, as every other run starts.

        Otherwise a checkpoint that falls within a run makes the first change to each
        page after it log the whole page, which made some runs of a bulk statement
        twice as slow as the others. A role that may not run ``CHECKPOINT`` (neither
        superuser nor ``pg_checkpoint``) measures without.
        """
        if self.checkpoints:
            try:
                self.conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                self.checkpoints = False
                print("  (no CHECKPOINT before each run: this role may not run it)")

    def single(self, table: str) -> float:
        """``single_rows`` INSERTs, each its own transaction; total seconds."""
        self.reset(table)
        self.checkpoint()
        statement = INSERT_ONE.format(table)
        cursor = self.conn.cursor()
        start = time.perf_counter()
        for i in range(self.single_rows):
            cursor.execute(statement, (i, f"item {i}", i % 1000, i), prepare=True)
        return time.perf_counter() - start

    def bulk_insert(self, table: str) -> float:
        """One INSERT of ``bulk_rows`` rows; seconds."""
        self.reset(table)
        self.checkpoint()
        return self._timed(table, INSERT_BULK.format(table), (self.bulk_rows,))

    def bulk_update(self, table: str) -> float:
        """One UPDATE changing every one of ``bulk_rows`` rows; seconds."""
        self.reset(table)
        self.conn.execute(INSERT_BULK.format(table), (self.bulk_rows,))
        self.conn.execute(f"VACUUM ANALYZE {table}")
        self.checkpoint()
        return self._timed(table, UPDATE_BULK.format(table), None)

    def _timed(self, table: str, statement: str, params: tuple[Any, ...] | None) -> float:
        library = table in (ITEM, ROW_ITEM, CHANGED, NEW_VALUES)
        start = time.perf_counter()
        try:
            self.conn.execute(statement, params)
        except Exception as exc:
            if not library:
                raise
            self.errors.append(f"{table}: {type(exc).__name__}: {exc}".splitlines()[0])
        finally:
            self.library_statements += library
        return time.perf_counter() - start


def variants(
    step: Callable[[str], float], library: dict[str, str]
) -> dict[str, Callable[[], float]]:
    """No trigger first, then the hand-written baselines, then the library's tables."""
    tables = {NONE: PLAIN, **{label: table for table, (label, _) in HAND_WRITTEN.items()}}
    tables.update(library)
    return {label: (lambda table=table: step(table)) for label, table in tables.items()}


def baselines_text(results: dict[str, harness.Measurement]) -> str:
    """The hand-written baselines' ratios (and the row-level declaration's), printed
    beside each library ratio."""
    labels = [label for label, _ in HAND_WRITTEN.values()]
    if LIBRARY_ROW in results:
        labels.append(LIBRARY_ROW)
    parts = [f"{NONE} 1.00x"] + [
        f"{label} {harness.ratio(results, label, NONE):.2f}x" for label in labels
    ]
    return "; ".join(parts)


def main() -> int:
    """Measure, print, and return the exit status (see ``harness``)."""
    args = harness.parse_args(__doc__.splitlines()[0])
    single_rows = 500 if args.quick else 2000
    bulk_rows = 20_000 if args.quick else 100_000
    url = harness.setup_django()
    report = harness.Report(quick=args.quick)
    started = time.monotonic()
    with harness.connect(url) as conn:
        create_baselines(conn)
        try:
            bench = Bench(conn, single_rows, bulk_rows)
            print(
                f"write path: {single_rows} single-row INSERTs, bulk of {bulk_rows:,} rows,"
                f" {args.repeat} repetitions (+1 warm-up), round-robin"
            )
            single = harness.interleave(
                variants(bench.single, {LIBRARY: ITEM, LIBRARY_ROW: ROW_ITEM}),
                args.repeat,
                label=f"{single_rows} single-row INSERT transactions:",
            )
            insert = harness.interleave(
                variants(bench.bulk_insert, {LIBRARY: ITEM, LIBRARY_ROW: ROW_ITEM}),
                args.repeat,
                label=f"one INSERT of {bulk_rows:,} rows:",
            )
            update = harness.interleave(
                variants(
                    bench.bulk_update,
                    {
                        LIBRARY: ITEM,
                        LIBRARY_NEW_VALUES: NEW_VALUES,
                        LIBRARY_ROW: ROW_ITEM,
                        LIBRARY_CHANGED: CHANGED,
                    },
                ),
                args.repeat,
                label=f"one UPDATE of {bulk_rows:,} rows (every row changes):",
            )
        finally:
            drop_baselines(conn)
            for table in (PLAIN, ITEM, ROW_ITEM, CHANGED, NEW_VALUES):
                conn.execute(f"TRUNCATE {table}")

    report.ratio(
        "write: single-row INSERT",
        harness.ratio(single, LIBRARY, NONE),
        1.15,
        baselines_text(single),
    )
    report.ratio(
        "write: single-row INSERT, level=row",
        harness.ratio(single, LIBRARY_ROW, NONE),
        1.15,
        baselines_text(single),
    )
    report.ratio(
        f"write: bulk INSERT {bulk_rows:,}",
        harness.ratio(insert, LIBRARY, NONE),
        1.5,
        baselines_text(insert),
    )
    report.ratio(
        f"write: bulk UPDATE {bulk_rows:,}, old values and changed list",
        harness.ratio(update, LIBRARY, NONE),
        1.5,
        baselines_text(update),
    )
    report.ratio(
        f"write: bulk UPDATE {bulk_rows:,}, old=False (pk and two fields)",
        harness.ratio(update, LIBRARY_NEW_VALUES, NONE),
        1.5,
        baselines_text(update),
    )
    report.ratio(
        f"write: bulk UPDATE {bulk_rows:,} when_changed",
        harness.ratio(update, LIBRARY_CHANGED, NONE),
        2.0,
        baselines_text(update),
    )
    detail = f"{len(bench.errors)} of {bench.library_statements} library bulk statements failed" + (
        f" ({bench.errors[0]})" if bench.errors else ""
    )
    report.check("write: bulk statement never fails", not bench.errors, detail)
    print(f"\nwrite path took {time.monotonic() - started:.0f}s")
    return report.finish(url)


if __name__ == "__main__":
    sys.exit(main())
