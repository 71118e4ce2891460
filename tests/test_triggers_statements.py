"""Statements a DBA or an application runs, against real triggers on tables made for
the test; payloads read with LISTEN and decoded as the listener decodes them."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timezone
from decimal import Decimal

import psycopg
import pytest
from django.contrib.postgres.fields import (
    ArrayField,
    BigIntegerRangeField,
    DateRangeField,
    DateTimeRangeField,
    DecimalRangeField,
    IntegerRangeField,
)
from django.db import connection, models
from django.test.utils import isolate_apps
from psycopg.types.range import Range

from django_pgnotify import Notify
from django_pgnotify.declarations import resolve_model
from django_pgnotify.decoding import Decoder
from django_pgnotify.triggers import build_trigger_sql

TABLE = "pgnotify_test_ranges"
RANGE_FIELDS = ["ints", "bigs", "decimals", "moments", "days", "spans"]


installed: list[str] = []


@contextmanager
def throwaway_model(
    other_connection: psycopg.Connection,
    table: str,
    ddl: str,
    drop: str,
    name: str,
    **fields: models.Field,
) -> Iterator[type[models.Model]]:
    """The tables ``ddl`` makes, and an unmanaged model ``name`` of ``fields`` on
    ``table``; then ``drop``, with the trigger functions installed and the model's
    durable events."""
    other_connection.execute(ddl)
    try:
        with isolate_apps("tests.testapp"):
            meta = type("Meta", (), {"app_label": "testapp", "db_table": table, "managed": False})
            yield type(name, (models.Model,), {"__module__": __name__, "Meta": meta, **fields})
    finally:
        other_connection.execute("RESET search_path")
        other_connection.execute(drop)
        other_connection.execute(
            "DELETE FROM pgnotify_event WHERE model = %s", [f"testapp.{name.lower()}"]
        )
        for function in installed:
            other_connection.execute(f"DROP FUNCTION IF EXISTS {function}()")
        installed.clear()


def install(model: type[models.Model], other_connection: psycopg.Connection, notify: Notify):
    """Install ``notify`` of ``model``, as the listener's tests' triggers are; its declaration."""
    (declaration,), errors = resolve_model(model, notify)
    assert not errors
    built = build_trigger_sql(declaration, connection.pg_version)
    installed.append(built.function.as_string(None))
    other_connection.execute(built.install)
    return declaration


@pytest.fixture
def ranges_table(other_connection):
    """A table of range columns, with its model."""
    with throwaway_model(
        other_connection,
        TABLE,
        f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, ints int4range, bigs int8range,"
        " decimals numrange, moments tstzrange, days daterange, spans int4range[])",
        f"DROP TABLE IF EXISTS {TABLE}",
        "RangesRow",
        id=models.IntegerField(primary_key=True),
        ints=IntegerRangeField(null=True),
        bigs=BigIntegerRangeField(null=True),
        decimals=DecimalRangeField(null=True),
        moments=DateTimeRangeField(null=True),
        days=DateRangeField(null=True),
        spans=ArrayField(IntegerRangeField(), null=True),
    ) as model:
        yield model


def install_ranges(model, other_connection, **options):
    return install(model, other_connection, Notify(fields=RANGE_FIELDS, **options))


def receive(listening: psycopg.Connection, model, count: int, timeout: float = 10) -> list:
    """The first ``count`` changes ``listening`` is notified of, decoded as the listener
    decodes them (however many rows each notification holds)."""
    decoder, events = Decoder([model]), []
    deadline = time.monotonic() + timeout
    while len(events) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(events)} of {count} changes arrived within {timeout}s"
        for notify in listening.notifies(timeout=left, stop_after=1):
            events += decoder.decode(notify.payload)
    return events


def stored_rows(other_connection: psycopg.Connection, model: str, action: str = "%") -> list:
    """The row arrays of the durable events of ``model`` (a label) and ``action``, in order."""
    return [
        row
        for (payload,) in other_connection.execute(
            "SELECT payload FROM pgnotify_event WHERE model = %s AND action LIKE %s ORDER BY id",
            [model, action],
        )
        for row in json.loads(f"[{payload}]")
    ]


@pytest.mark.parametrize("options", [{}, {"level": "row"}, {"old": False}])
def test_range_fields_arrive_as_the_ranges_the_orm_reads(ranges_table, other_connection, options):
    declaration = install_ranges(ranges_table, other_connection, **options)
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        # The writer's time zone is in the text of a tstzrange's bounds.
        other_connection.execute("SET TimeZone = 'Asia/Kolkata'")
        other_connection.execute(
            f"INSERT INTO {TABLE} VALUES"
            " (1, 'empty', '(,)', '[1.50,2.25]', '[2024-01-01 10:00+00,)', '(,2024-02-01)',"
            " ARRAY['[1,2)'::int4range, 'empty']),"
            " (2, '[3,4]', '[-9000000000,9000000000)', '(,0)',"
            " '[\"1890-06-01 12:00:00+00\",\"2030-01-01 00:00:00+00\"]', '[2024-01-01,2024-01-01]',"
            " NULL)"
        )
        other_connection.execute(f"UPDATE {TABLE} SET ints = '[5,6)' WHERE id = 1")
        events = receive(listening, ranges_table, 3)

    assert [(e.action, e.pk) for e in events] == [("insert", 1), ("insert", 2), ("update", 1)]
    read = {row.pk: row for row in ranges_table.objects.all()}
    assert events[0].fields == {
        "ints": Range(empty=True),
        "bigs": Range(None, None, "()"),
        "decimals": Range(Decimal("1.50"), Decimal("2.25"), "[]"),
        "moments": Range(datetime(2024, 1, 1, 10, tzinfo=timezone.utc), None, "[)"),
        "days": Range(None, date(2024, 2, 1), "()"),
        "spans": [Range(1, 2, "[)"), Range(empty=True)],
    }
    for event in events[1:]:
        assert event.fields == {name: getattr(read[event.pk], name) for name in RANGE_FIELDS}
    if options.get("old") is not False:
        assert events[2].old == events[0].fields
        assert events[2].changed == {"ints"}


def test_moments_within_a_day_of_the_first_and_last_years_arrive_as_the_orm_reads_them(
    ranges_table, other_connection
):
    """A writer ahead of UTC renders 9999-12-31 23:00 UTC in the year 10000, one behind
    it renders 0001-01-01 00:00 UTC in 1 BC: moments the ORM reads, which came as text."""
    declaration = install_ranges(ranges_table, other_connection, level="row", old=False)
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        for pk, zone, moments in [
            (1, "Asia/Kolkata", "[9999-12-31 00:00:00+00,9999-12-31 23:00:00.5+00]"),
            (2, "America/St_Johns", "[0001-01-01 00:00:00+00,0001-01-02 00:00:00+00)"),
        ]:
            other_connection.execute(f"SET TimeZone = '{zone}'")
            other_connection.execute(
                f"INSERT INTO {TABLE} (id, moments) VALUES (%s, %s)", (pk, moments)
            )
        events = receive(listening, ranges_table, 2)

    read = {row.pk: row.moments for row in ranges_table.objects.all()}
    assert [(e.pk, e.fields["moments"]) for e in events] == [(1, read[1]), (2, read[2])]
    assert read[1] == Range(
        datetime(9999, 12, 31, tzinfo=timezone.utc),
        datetime(9999, 12, 31, 23, 0, 0, 500000, tzinfo=timezone.utc),
        "[]",
    )
    assert read[2].lower == datetime(1, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("options", [{}, {"level": "row"}])
def test_moment_ranges_arrive_as_the_orm_reads_them_whatever_the_writers_datestyle(
    ranges_table, other_connection, options
):
    """A range's own text follows the writer's DateStyle (day first, zone abbreviations),
    which cannot be read back for certain: the bounds are sent in ISO 8601."""
    declaration = install_ranges(ranges_table, other_connection, **options)
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        other_connection.execute("SET DateStyle = 'SQL, DMY'")
        other_connection.execute("SET TimeZone = 'Europe/Berlin'")
        other_connection.execute(
            f"INSERT INTO {TABLE} (id, moments, days) VALUES"
            " (1, '[2024-03-04 10:00:00.25+00,2024-03-05 00:00+00)', '[2024-03-04,2024-04-03]'),"
            " (2, '(,2024-01-02 03:04:05+00]', '[2024-01-02,)'), (3, 'empty', NULL)"
        )
        events = receive(listening, ranges_table, 3)

    read = {row.pk: row for row in ranges_table.objects.all()}
    assert [e.pk for e in events] == [1, 2, 3]
    for event in events:
        assert event.fields["moments"] == read[event.pk].moments
        assert event.fields["days"] == read[event.pk].days
    assert events[0].fields["days"] == Range(date(2024, 3, 4), date(2024, 4, 4), "[)")


PARENTS, CHILDREN = "pgnotify_test_parents", "pgnotify_test_children"


@pytest.fixture
def children_table(other_connection):
    """Rows with two foreign keys declared in the database, both ``ON DELETE SET NULL``
    to one parent table, with their model."""
    with throwaway_model(
        other_connection,
        CHILDREN,
        f"CREATE TABLE {PARENTS} (id integer PRIMARY KEY);"
        f" CREATE TABLE {CHILDREN} (id integer PRIMARY KEY,"
        f" first integer REFERENCES {PARENTS} ON DELETE SET NULL,"
        f" second integer REFERENCES {PARENTS} ON DELETE SET NULL, label text)",
        f"DROP TABLE IF EXISTS {CHILDREN}, {PARENTS} CASCADE",
        "Child",
        id=models.IntegerField(primary_key=True),
        first=models.IntegerField(null=True),
        second=models.IntegerField(null=True),
        label=models.TextField(),
    ) as model:
        yield model


@pytest.mark.parametrize("rows", [1, 25], ids=["short path", "bulk"])
@pytest.mark.parametrize(
    "options",
    [{}, {"level": "row"}, {"old": False}, {"durable": True}],
    ids=["statement", "row", "new values alone", "durable"],
)
def test_a_row_changed_twice_by_one_statement_arrives_as_two_updates(
    children_table, other_connection, options, rows
):
    declaration = install(
        children_table, other_connection, Notify(fields=["first", "second"], **options)
    )
    other_connection.execute(f"INSERT INTO {PARENTS} VALUES (1), (2)")
    # One DELETE nulls both keys of each of the first ``rows`` rows, and one key of the
    # last; then an UPDATE changes every row once, which pairs them by primary key.
    other_connection.execute(
        f"INSERT INTO {CHILDREN} SELECT g, 1, CASE WHEN g <= %s THEN 1 ELSE 2 END, 'x'"
        " FROM generate_series(1, %s + 1) AS g",
        [rows, rows],
    )
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        other_connection.execute(f"DELETE FROM {PARENTS} WHERE id = 1")
        other_connection.execute(f"UPDATE {CHILDREN} SET label = 'y'")
        if options.get("durable"):
            changes = [
                (pk, (first, second), (old_first, old_second))
                for pk, first, second, old_first, old_second, _mask in stored_rows(
                    other_connection, "testapp.child", "update"
                )
            ]
        else:
            events = receive(listening, children_table, 3 * rows + 2)
            assert all(e.action == "update" for e in events)
            changes = [
                (e.pk, (e.fields["first"], e.fields["second"]), e.old and tuple(e.old.values()))
                for e in events
            ]

    def update(pk: int, new: tuple, old: tuple) -> tuple:
        return (pk, new, old if options.get("old") is not False else None)

    assert Counter(changes) == Counter(
        [
            *(update(pk, (None, 1), (1, 1)) for pk in range(1, rows + 1)),
            *(update(pk, (None, None), (None, 1)) for pk in range(1, rows + 1)),
            update(rows + 1, (None, 2), (1, 2)),
            *(update(pk, (None, None), (None, None)) for pk in range(1, rows + 1)),
            update(rows + 1, (None, 2), (None, 2)),
        ]
    )


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_a_row_changed_twice_is_paired_whatever_the_writers_search_path_and_pk_name(
    other_connection, durable
):
    """The pairing by position names no type (the writer's search_path would find it, or
    another of that name), and the primary key may have the name of a variable of the
    function (``size``, ``xid``)."""
    with throwaway_model(
        other_connection,
        CHILDREN,
        f"CREATE TABLE {PARENTS} (id integer PRIMARY KEY);"
        f" CREATE TABLE {CHILDREN} (size integer PRIMARY KEY,"
        f" first integer REFERENCES {PARENTS} ON DELETE SET NULL,"
        f" xid integer REFERENCES {PARENTS} ON DELETE SET NULL)",
        f"DROP TABLE IF EXISTS {CHILDREN}, {PARENTS} CASCADE",
        "Child",
        size=models.IntegerField(primary_key=True),
        first=models.IntegerField(null=True),
        xid=models.IntegerField(null=True),
    ) as model:
        declaration = install(
            model, other_connection, Notify(fields=["first", "xid"], durable=durable)
        )
        other_connection.execute(
            f"INSERT INTO {PARENTS} VALUES (1);"
            f" INSERT INTO {CHILDREN} VALUES (1, 1, 1), (2, 1, NULL)"
        )
        with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
            listening.execute(f"LISTEN {declaration.channel}")
            if not durable:  # a durable function finds its event table on the search_path
                other_connection.execute("SET search_path = pg_catalog")
            other_connection.execute(f"DELETE FROM public.{PARENTS} WHERE id = 1")
            other_connection.execute("RESET search_path")
            if durable:
                changes = [
                    (pk, (first, xid), (old_first, old_xid))
                    for pk, first, xid, old_first, old_xid, _ in stored_rows(
                        other_connection, "testapp.child", "update"
                    )
                ]
            else:
                changes = [
                    (e.pk, (e.fields["first"], e.fields["xid"]), tuple(e.old.values()))
                    for e in receive(listening, model, 3)
                ]

    assert Counter(changes) == Counter(
        [(1, (None, 1), (1, 1)), (2, (None, None), (1, None)), (1, (None, None), (None, 1))]
    )


def test_a_renumbered_row_whose_reference_cascades_to_itself_arrives_as_two_updates(
    children_table, other_connection
):
    """A self-referencing ``ON UPDATE CASCADE`` key: one UPDATE renumbers rows 1 and 2,
    and the cascade changes row 2 again (its reference to row 1) and row 3."""
    other_connection.execute(
        f"ALTER TABLE {CHILDREN} DROP CONSTRAINT {CHILDREN}_first_fkey,"
        f" ADD FOREIGN KEY (first) REFERENCES {CHILDREN} ON UPDATE CASCADE"
    )
    declaration = install(children_table, other_connection, Notify(fields=["first"]))
    other_connection.execute(f"INSERT INTO {CHILDREN} VALUES (1, NULL), (2, 1), (3, 2)")
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        other_connection.execute(f"UPDATE {CHILDREN} SET id = id + 100 WHERE id IN (1, 2)")
        events = receive(listening, children_table, 4)

    assert Counter((e.pk, e.fields["first"], e.old["first"]) for e in events) == Counter(
        [(101, None, None), (102, 1, 1), (102, 101, 1), (3, 102, 2)]
    )


@pytest.fixture
def case_blind_table(other_connection):
    """A text column of a nondeterministic collation ('abc' = 'ABC'), with its model."""
    try:
        other_connection.execute(
            "CREATE COLLATION pgnotify_test_blind"
            " (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
        )
    except psycopg.errors.FeatureNotSupported:
        pytest.skip("this PostgreSQL is built without ICU")
    with throwaway_model(
        other_connection,
        CHILDREN,
        f"CREATE TABLE {CHILDREN} (id integer PRIMARY KEY, label text COLLATE pgnotify_test_blind)",
        f"DROP TABLE IF EXISTS {CHILDREN}; DROP COLLATION IF EXISTS pgnotify_test_blind",
        "Blind",
        id=models.IntegerField(primary_key=True),
        label=models.TextField(db_collation="pgnotify_test_blind"),
    ) as model:
        yield model


@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_change_that_a_nondeterministic_collation_finds_equal_is_announced(
    case_blind_table, other_connection, level
):
    declaration = install(
        case_blind_table,
        other_connection,
        Notify(fields=["label"], when_changed=["label"], level=level),
    )
    other_connection.execute(f"INSERT INTO {CHILDREN} VALUES (1, 'abc')")
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        other_connection.execute(f"UPDATE {CHILDREN} SET label = 'ABC'")
        (event,) = receive(listening, case_blind_table, 1)

    assert (event.action, event.fields, event.old, event.changed) == (
        "update",
        {"label": "ABC"},
        {"label": "abc"},
        {"label"},
    )


FLOATS = "pgnotify_test_floats"


@pytest.fixture
def floats_table(other_connection):
    with throwaway_model(
        other_connection,
        FLOATS,
        f"CREATE TABLE {FLOATS} (id integer PRIMARY KEY, ratio float8, ratios float8[])",
        f"DROP TABLE IF EXISTS {FLOATS}",
        "Floats",
        id=models.IntegerField(primary_key=True),
        ratio=models.FloatField(null=True),
        ratios=ArrayField(models.FloatField(), null=True),
    ) as model:
        yield model


class SingleFloatField(models.Field):
    """A custom ``real`` column: its internal type is its class name, not FloatField."""

    def db_type(self, connection):
        return "real"


@pytest.mark.parametrize("options", [{}, {"level": "row"}], ids=["statement", "row"])
def test_a_custom_real_column_arrives_exact_whatever_the_writers_extra_float_digits(
    other_connection, options
):
    """Without a FloatField beside it, the function set no extra_float_digits of its own:
    1.2345678 arrived as the writer's 1.23457."""
    table = "pgnotify_test_singles"
    with throwaway_model(
        other_connection,
        table,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, single real)",
        f"DROP TABLE IF EXISTS {table}",
        "Singles",
        id=models.IntegerField(primary_key=True),
        single=SingleFloatField(null=True),
    ) as model:
        declaration = install(model, other_connection, Notify(fields=["single"], **options))
        with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
            listening.execute(f"LISTEN {declaration.channel}")
            other_connection.execute("SET extra_float_digits = 0")
            other_connection.execute(f"INSERT INTO {table} VALUES (1, 1.2345678)")
            (event,) = receive(listening, model, 1)
        read = model.objects.get()

    assert read.single == 1.2345678
    assert event.fields == {"single": read.single}


@pytest.mark.parametrize(
    "options", [{}, {"level": "row"}, {"durable": True}], ids=["statement", "row", "durable"]
)
def test_floats_arrive_exact_whatever_the_writers_extra_float_digits(
    floats_table, other_connection, options
):
    declaration = install(
        floats_table, other_connection, Notify(fields=["ratio", "ratios"], **options)
    )
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(f"LISTEN {declaration.channel}")
        # 15 significant digits: 0.1 + 0.2 prints as 0.3, the largest double as Infinity.
        other_connection.execute("SET extra_float_digits = 0")
        other_connection.execute(
            f"INSERT INTO {FLOATS} VALUES"
            " (1, 0.1::float8 + 0.2::float8, ARRAY[1.7976931348623157e308, 0.1::float8 + 0.2])"
        )
        other_connection.execute(f"UPDATE {FLOATS} SET ratio = ratio * 3")
        assert other_connection.execute("SHOW extra_float_digits").fetchone() == ("0",)
        if options.get("durable"):
            changes = [
                (row[1], row[2], row[3] if len(row) > 3 else None)
                for row in stored_rows(other_connection, "testapp.floats")
            ]
        else:
            changes = [
                (e.fields["ratio"], e.fields["ratios"], e.old and e.old["ratio"])
                for e in receive(listening, floats_table, 2)
            ]

    read = floats_table.objects.get()
    assert read.ratio == (0.1 + 0.2) * 3 and read.ratios == [1.7976931348623157e308, 0.1 + 0.2]
    assert changes == [(0.1 + 0.2, read.ratios, None), (read.ratio, read.ratios, 0.1 + 0.2)]
