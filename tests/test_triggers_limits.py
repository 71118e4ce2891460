"""Declarations and writes at the edges of what a trigger can do, read as raw
notifications.

A user's write must never fail because of a declaration that passed the
checks: not for a declared column whose type has no ``=`` operator, and not
for a context that, beside a long header, would push a notification past
PostgreSQL's 8000 bytes. At the limits (the room for rows, the longest
context, rows and keys too long to send, rows changed twice by foreign keys,
values equal but written differently, NULLs), every path sends the same.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import psycopg
import pytest
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.test.utils import isolate_apps
from psycopg import sql

from django_pgnotify import Notify, triggers, wire
from django_pgnotify.declarations import Declaration, resolve_model
from django_pgnotify.decoding import Decoder
from django_pgnotify.transaction_settings import encode_context
from django_pgnotify.triggers import build_trigger_sql
from tests.test_triggers_bulk import insert_articles_with, notifications, rows_of
from tests.test_triggers_statements import install, stored_rows, throwaway_model
from tests.testapp.models import Article, Legacy, Logbook, PlainJSONField


@pytest.fixture
def listening(other_connection):
    """A client of its own, to LISTEN on the channels a test names."""
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as conn:
        yield conn


def declaration_of(model: type[models.Model], notify: Notify) -> Declaration:
    (declaration,), messages = resolve_model(model, notify)
    assert not [m for m in messages if m.is_serious()]
    return declaration


def decoded(listening: psycopg.Connection, model: type[models.Model]) -> list:
    """What was committed before the call on the channels ``listening`` listens on,
    decoded as the listener decodes it."""
    decoder = Decoder([model])
    return [change for payload in notifications(listening) for change in decoder.decode(payload)]


@pytest.mark.parametrize("level", ["statement", "row"])
@pytest.mark.parametrize(("fields", "when_changed"), [(["doc", "title"], []), (["title"], ["doc"])])
def test_declared_columns_without_an_equality_operator_are_compared_by_their_bytes(
    other_connection, listening, restore_triggers, level, fields, when_changed
):
    # doc is json: "json = json" does not exist, and the update must not fail.
    notify = Notify(fields=fields, when_changed=when_changed, level=level)
    declaration = declaration_of(Legacy, notify)
    other_connection.execute(build_trigger_sql(declaration).install)
    listening.execute("LISTEN pgnotify_testapp_legacy")
    ids = [
        row[0]
        for row in other_connection.execute(
            "INSERT INTO testapp_legacy (doc, title)"
            " SELECT '{\"n\": 1}', 't' || i FROM generate_series(1, 30) i RETURNING id"
        )
    ]
    notifications(listening)
    doc_bit = 1 << [c.field for c in declaration.watched].index("doc")

    other_connection.execute("UPDATE testapp_legacy SET doc = doc WHERE id = ANY(%s)", [ids])
    assert notifications(listening) == []

    evens = [pk for pk in ids if pk % 2 == 0]
    other_connection.execute(  # fewer rows than the statement trigger's short path takes
        "UPDATE testapp_legacy SET doc = '{\"n\": 2}' WHERE id = ANY(%s)", [evens]
    )
    other_connection.execute(  # and more
        "UPDATE testapp_legacy SET doc = '{\"n\":  2}' WHERE id = ANY(%s)", [ids]
    )

    updated = rows_of(notifications(listening), "update")
    assert sorted(r[0] for r in updated) == sorted(evens + ids)
    assert {r[-1] for r in updated} == {doc_bit}


def test_the_column_types_compared_with_equals_are_read_from_each_fields_type():
    with isolate_apps("tests.testapp"):

        class Kinds(models.Model):
            number = models.DecimalField(max_digits=5, decimal_places=2)
            document = models.JSONField()
            tags = ArrayField(models.CharField(max_length=5), size=3)
            matrix = ArrayField(ArrayField(models.IntegerField()))
            search = SearchVectorField()
            legacy = PlainJSONField()
            spot = models.ForeignKey(Legacy, on_delete=models.CASCADE)
            name = models.CharField(max_length=5, db_collation="und-x-icu")
            names = ArrayField(models.CharField(max_length=5, db_collation="und-x-icu"))

            class Meta:
                app_label = "testapp"

        declaration = declaration_of(Kinds, Notify(fields="__all__"))

    comparable = {column.field: column.comparable for column in declaration.fields}
    assert comparable == {
        "number": True,
        "document": True,
        "tags": True,
        "matrix": True,
        "search": True,
        "legacy": False,  # json
        "spot": True,  # the type of the pk it points to
        # A collation of its own may find different values equal (nondeterministic).
        "name": False,
        "names": False,
    }


WIDE_COLUMNS = 53  # names of 60 characters: the update header leaves about 1070 bytes


@pytest.fixture
def wide_table(other_connection):
    """A table of ``WIDE_COLUMNS`` integer columns with long names, and its model."""
    names = [f"{'c' * 56}{i:04}" for i in range(WIDE_COLUMNS)]
    other_connection.execute(
        sql.SQL("CREATE TABLE pgnotify_wide (id bigint PRIMARY KEY, {})").format(
            sql.SQL(", ").join(sql.SQL("{} integer").format(sql.Identifier(n)) for n in names)
        )
    )
    try:
        with isolate_apps("tests.testapp"):
            columns = {name: models.IntegerField(null=True) for name in names}
            meta = type("Meta", (), {"app_label": "testapp", "db_table": "pgnotify_wide"})
            yield type("Wide", (models.Model,), {"__module__": __name__, "Meta": meta, **columns})
    finally:
        other_connection.execute("DROP TABLE pgnotify_wide")


@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_context_that_would_leave_rows_too_little_room_is_left_out(
    other_connection, listening, wide_table, level
):
    declaration = declaration_of(wide_table, Notify(fields="__all__", level=level))
    limit = triggers.context_limit(declaration)
    assert 0 < limit < triggers.CONTEXT_MAX  # context() itself accepts more
    other_connection.execute(build_trigger_sql(declaration).install)
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
    other_connection.execute("INSERT INTO pgnotify_wide (id) SELECT generate_series(1, 30)")
    notifications(listening)
    # What context() accepts, of quotes, which JSON escapes twice: about 2000 bytes.
    large = encode_context({"q": '"' * ((wire.CONTEXT_LIMIT - 8) // 2)})
    # Far shorter than what notifications of a few columns take, but the rows would
    # keep less than MIN_ROWS_ROOM bytes beside it.
    medium = encode_context({"q": "m" * 300})
    assert triggers.least_rows_room(declaration) - len(medium) < triggers.MIN_ROWS_ROOM
    small = encode_context({"actor": "user:1"})

    contexts = [(large, "id = 1"), (large, "true"), (medium, "id = 2"), (small, "id = 3")]
    for context, where in contexts:
        with other_connection.transaction():
            other_connection.execute("SELECT set_config('pgnotify.context', %s, true)", [context])
            other_connection.execute(
                sql.SQL("UPDATE pgnotify_wide SET {0} = coalesce({0}, 0) + 1 WHERE ").format(
                    sql.Identifier(declaration.fields[0].column)
                )
                + sql.SQL(where)
            )

    messages = [json.loads(p) for p in notifications(listening)]
    assert sum(len(m["rows"]) for m in messages) == 1 + 30 + 1 + 1
    assert [m.get(wire.CONTEXT) for m in messages] == [None] * (len(messages) - 1) + [small]
    assert all(len(r) > 1 for m in messages for r in m["rows"])  # whole rows, not pks


KEYED = "pgnotify_test_keyed"


@pytest.fixture
def keyed_table(other_connection):
    """Rows with a text primary key, which may be longer than a notification holds."""
    with throwaway_model(
        other_connection,
        KEYED,
        f"CREATE TABLE {KEYED} (id text PRIMARY KEY, body text)",
        f"DROP TABLE IF EXISTS {KEYED}",
        "Keyed",
        id=models.TextField(primary_key=True),
        body=models.TextField(null=True),
    ) as model:
        yield model


@pytest.mark.parametrize("filler", [0, 30], ids=["few rows", "bulk"])
@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_row_too_long_arrives_as_its_pk_and_one_whose_pk_is_too_long_as_null(
    keyed_table, other_connection, listening, level, filler
):
    declaration = install(keyed_table, other_connection, Notify(fields=["body"], level=level))
    huge = "k" * 9000  # repetitive: compressed, it fits the primary key's index
    rows = [("short", "x"), ("long", "y" * 9000), (huge, "z")]
    rows += [(f"filler{i}", "f") for i in range(filler)]
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
    other_connection.execute(
        f"INSERT INTO {KEYED} SELECT * FROM unnest(%s::text[], %s::text[])",
        [[pk for pk, _ in rows], [body for _, body in rows]],
    )
    other_connection.execute(f"UPDATE {KEYED} SET body = body || '!'")
    other_connection.execute(f"DELETE FROM {KEYED}")
    events = decoded(listening, keyed_table)

    assert len(events) == 3 * len(rows)
    for action in ["insert", "update", "delete"]:
        sent = {e.pk: e for e in events if e.action == action}
        assert len(sent) == len(rows)
        assert (sent["short"].truncated, sent["short"].fields) == (
            False,
            {"body": "x" if action == "insert" else "x!"},
        )
        assert (sent["long"].truncated, sent["long"].fields) == (True, {})
        assert (sent[None].truncated, sent[None].fields) == (True, {})
        assert huge not in sent


@pytest.mark.parametrize("count", [20, 200], ids=["few rows", "bulk"])
def test_the_largest_context_travels_in_full_notifications_without_failing_the_write(
    other_connection, listening, count
):
    listening.execute("LISTEN pgnotify_testapp_article")
    # What context() accepts, of quotes, which JSON escapes twice: about 2000 bytes.
    large = encode_context({"q": '"' * ((wire.CONTEXT_LIMIT - 8) // 2)})
    with other_connection.transaction():
        other_connection.execute("SELECT set_config('pgnotify.context', %s, true)", [large])
        other_connection.execute(  # 300-byte rows: together, more than the room left
            "INSERT INTO testapp_article (title, body)"
            " SELECT 't' || i, repeat('b', 300) FROM generate_series(1, %s) AS i",
            [count],
        )

    # The setting outlives the transaction, empty: the session's next write has no context.
    other_connection.execute("INSERT INTO testapp_article (title, body) VALUES ('after', '')")

    *messages, after = [json.loads(p) for p in notifications(listening)]
    assert sum(len(m["rows"]) for m in messages) == count
    assert [m[wire.CONTEXT] for m in messages] == [large] * len(messages)
    assert all(len(r) == 3 for m in messages for r in m["rows"])  # whole rows, not pks
    assert other_connection.execute("SHOW pgnotify.context").fetchone() == ("",)
    assert wire.CONTEXT not in after


NULLABLE = "pgnotify_test_nullable"


@pytest.fixture
def nullable_table(other_connection):
    with throwaway_model(
        other_connection,
        NULLABLE,
        f"CREATE TABLE {NULLABLE} (id integer PRIMARY KEY, label text, amount numeric)",
        f"DROP TABLE IF EXISTS {NULLABLE}",
        "Nullable",
        id=models.IntegerField(primary_key=True),
        label=models.TextField(null=True),
        amount=models.DecimalField(max_digits=20, decimal_places=10, null=True),
    ) as model:
        yield model


@pytest.mark.parametrize("level", ["statement", "row"])
@pytest.mark.parametrize("when_changed", [[], ["label"]], ids=["any column", "when_changed"])
def test_an_update_from_null_to_a_value_and_back_is_a_change_of_that_field(
    nullable_table, other_connection, listening, level, when_changed
):
    notify = Notify(fields=["label"], when_changed=when_changed, level=level)
    declaration = install(nullable_table, other_connection, notify)
    other_connection.execute(f"INSERT INTO {NULLABLE} SELECT generate_series(1, 25)")
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
    other_connection.execute(f"UPDATE {NULLABLE} SET label = 'a'")  # the bulk path
    other_connection.execute(f"UPDATE {NULLABLE} SET label = NULL WHERE id = 1")
    events = decoded(listening, nullable_table)

    assert Counter((e.pk, e.old["label"], e.fields["label"], e.changed) for e in events) == Counter(
        [
            *((pk, None, "a", frozenset({"label"})) for pk in range(1, 26)),
            (1, "a", None, frozenset({"label"})),
        ]
    )


PARENTS, CHILDREN = "pgnotify_test_parents", "pgnotify_test_children"


@contextmanager
def cascading_children(conn: psycopg.Connection, *, labelled: bool = False) -> Iterator[type]:
    """A throwaway ``Child`` model whose two keys, ``first`` and ``second``, reference
    ``PARENTS`` ``ON UPDATE CASCADE``: renaming a parent changes each child twice."""
    label = {"label": models.TextField()} if labelled else {}
    with throwaway_model(
        conn,
        CHILDREN,
        f"CREATE TABLE {PARENTS} (id text PRIMARY KEY);"
        f" CREATE TABLE {CHILDREN} (id integer PRIMARY KEY,"
        f" first text REFERENCES {PARENTS} ON UPDATE CASCADE,"
        f" second text REFERENCES {PARENTS} ON UPDATE CASCADE{', label text' if label else ''})",
        f"DROP TABLE IF EXISTS {CHILDREN}, {PARENTS} CASCADE",
        "Child",
        id=models.IntegerField(primary_key=True),
        first=models.TextField(),
        second=models.TextField(),
        **label,
    ) as model:
        yield model


@pytest.fixture(
    params=[
        "ON DELETE SET DEFAULT",
        "ON UPDATE SET NULL",
        "ON UPDATE SET DEFAULT",
        "ON UPDATE CASCADE",
    ]
)
def twice_referencing_table(request, other_connection):
    """Rows with two foreign keys to one parent table, both with the action of the
    parameter, which changes a row twice when its one parent row goes or is renumbered."""
    with throwaway_model(
        other_connection,
        CHILDREN,
        f"CREATE TABLE {PARENTS} (id integer PRIMARY KEY);"
        f" CREATE TABLE {CHILDREN} (id integer PRIMARY KEY,"
        f" first integer REFERENCES {PARENTS} {request.param},"
        f" second integer REFERENCES {PARENTS} {request.param})",
        f"DROP TABLE IF EXISTS {CHILDREN}, {PARENTS} CASCADE",
        "Child",
        id=models.IntegerField(primary_key=True),
        first=models.IntegerField(null=True),
        second=models.IntegerField(null=True),
    ) as model:
        yield model, request.param


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_every_foreign_key_action_that_changes_the_only_row_twice_makes_two_updates(
    twice_referencing_table, other_connection, listening, durable
):
    """One row changed twice is the statement's only row: two rows in each transition
    table, paired by position whatever the action of the keys that changed it."""
    model, action = twice_referencing_table
    declaration = install(
        model, other_connection, Notify(fields=["first", "second"], durable=durable)
    )
    other_connection.execute(
        f"INSERT INTO {PARENTS} VALUES (1); INSERT INTO {CHILDREN} VALUES (1, 1, 1)"
    )
    value = 2 if "CASCADE" in action else None
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
    if "DELETE" in action:
        other_connection.execute(f"DELETE FROM {PARENTS}")
    else:
        other_connection.execute(f"UPDATE {PARENTS} SET id = 2")
    if durable:
        changes = [
            (pk, (first, second), (old_first, old_second))
            for pk, first, second, old_first, old_second, _ in stored_rows(
                other_connection, "testapp.child", "update"
            )
        ]
    else:
        changes = [
            (e.pk, (e.fields["first"], e.fields["second"]), tuple(e.old.values()))
            for e in decoded(listening, model)
        ]

    # Each key's action changes one column; PostgreSQL runs them in either order.
    assert Counter(changes) in [
        Counter([(1, (value, 1), (1, 1)), (1, (value, value), (value, 1))]),
        Counter([(1, (1, value), (1, 1)), (1, (value, value), (1, value))]),
    ]


def test_a_bulk_statement_sends_rows_whole_up_to_the_room(
    other_connection, listening, restore_triggers
):
    """A row as long as the room a notification leaves for rows is sent as its pk, one
    a byte shorter whole, in a statement of more rows than the short path takes."""
    notify = Notify(fields=["title", "body"], events=["insert", "update"])
    declaration = declaration_of(Article, notify)
    other_connection.execute(build_trigger_sql(declaration).install)
    listening.execute("LISTEN pgnotify_testapp_article")
    room = triggers.rows_room(declaration, "insert")
    shorter, longest = 10**7, 10**7 + 1
    empty = len(json.dumps([shorter, "t", ""], separators=(",", ":")))
    rows = [(shorter, "b" * (room - 1 - empty)), (longest, "b" * (room - empty))]
    rows += [(10**7 + 2 + i, "f") for i in range(30)]
    insert_articles_with(other_connection, [pk for pk, _ in rows], [b for _, b in rows])

    sent = {row[0]: row for row in rows_of(notifications(listening), "insert")}
    assert len(json.dumps(sent[shorter], separators=(",", ":"))) == room - 1
    assert sent[longest] == [longest]
    assert len(sent) == len(rows)


@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_row_written_alone_is_truncated_only_when_its_notification_would_not_fit(
    other_connection, listening, restore_triggers, level
):
    """Alone in its statement, or from a row trigger, a row is sent whole while its
    whole notification is shorter than PostgreSQL's 8000 bytes, past the room a bulk
    statement keeps for rows (which holds a reserve for the xid and ts); longer, as its pk.

    The rows written grow a byte at a time across that limit, each in a statement
    of its own; a truncated row is checked against the notification it would have
    made, so the xid's and ts's lengths need not be known."""
    notify = Notify(fields=["title", "body"], events=["insert"], level=level)
    declaration = declaration_of(Article, notify)
    other_connection.execute(build_trigger_sql(declaration).install)
    listening.execute("LISTEN pgnotify_testapp_article")
    room = triggers.rows_room(declaration, "insert")
    first = 10**7
    empty = len(json.dumps([first, "t", ""]))  # with json_build_array's spaces
    bodies = {first + i: "b" * (room + 20 + i - empty) for i in range(40)}
    for pk, body in bodies.items():
        insert_articles_with(other_connection, [pk], [body])

    whole, truncated = [], []
    for payload in notifications(listening):
        ((row,),) = [json.loads(payload)["rows"]]
        written = json.dumps([row[0], "t", bodies[row[0]]])
        if row == [row[0]]:
            size = len(payload.encode()) - len(json.dumps(row)) + len(written)
            truncated.append(size)
        else:
            assert row == [row[0], "t", bodies[row[0]]]
            whole.append(len(written))
            assert len(payload.encode()) < wire.PAYLOAD_LIMIT
    assert len(whole) + len(truncated) == len(bodies)
    assert whole and truncated  # the rows span the limit
    assert min(truncated) >= wire.PAYLOAD_LIMIT  # would not have fitted
    assert max(whole) > room  # past the bulk statement's room, and sent whole


@pytest.mark.parametrize("rows", [1, 3, 30], ids=["one row", "few rows", "bulk"])
@pytest.mark.parametrize(
    ("options", "change"),
    [({}, "body = body"), ({"when_changed": ["title"]}, "body = body || '!'")],
    ids=["nothing changed", "no watched field changed"],
)
@pytest.mark.parametrize("level", ["statement", "row"])
def test_an_update_with_nothing_to_announce_sends_no_notification(
    other_connection, listening, restore_triggers, level, options, change, rows
):
    """Not even an empty one, which the listener would count as undecodable."""
    notify = Notify(fields=["title", "body"], level=level, **options)
    other_connection.execute(build_trigger_sql(declaration_of(Article, notify)).install)
    ids = list(range(10**7, 10**7 + rows))
    insert_articles_with(other_connection, ids, ["b"] * rows)
    listening.execute("LISTEN pgnotify_testapp_article")

    other_connection.execute(f"UPDATE testapp_article SET {change} WHERE id = ANY(%s)", [ids])

    assert notifications(listening) == []


@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_context_set_by_hand_is_left_out_only_when_longer_than_the_limit(
    other_connection, listening, restore_triggers, level
):
    notify = Notify(fields=["title", "body"], events=["insert", "update"], level=level)
    declaration = declaration_of(Article, notify)
    other_connection.execute(build_trigger_sql(declaration).install)
    listening.execute("LISTEN pgnotify_testapp_article")
    limit = triggers.context_limit(declaration)
    assert limit == triggers.CONTEXT_MAX
    key = f',"{wire.CONTEXT}":'
    # The setting as the trigger adds it: a key and a JSON string, of the limit's length.
    at_limit = "x" * (limit - len(key) - 2)
    assert len(key + json.dumps(at_limit)) == limit

    for context in [at_limit, at_limit + "x"]:
        with other_connection.transaction():
            other_connection.execute("SELECT set_config('pgnotify.context', %s, true)", [context])
            other_connection.execute("INSERT INTO testapp_article (title, body) VALUES ('t', '')")

    contexts = [json.loads(p).get(wire.CONTEXT) for p in notifications(listening)]
    assert contexts == [at_limit, None]


@pytest.mark.parametrize("level", ["statement", "row"])
def test_floats_in_arrays_alone_arrive_exact_and_the_writer_keeps_its_float_digits(
    other_connection, listening, restore_triggers, level
):
    # 15 significant digits print 0.1 + 0.2 as 0.3: the function renders floats with
    # extra_float_digits = 1, and gives the writer its own back at once.
    declaration = declaration_of(Logbook, Notify(fields=["ratios"], level=level))
    other_connection.execute(build_trigger_sql(declaration).install)
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
    other_connection.execute("SET extra_float_digits = 0")
    with other_connection.transaction():
        (pk,) = other_connection.execute(
            "INSERT INTO testapp_logbook"
            " (moments, days, times, tokens, blobs, ratios, names, secrets)"
            " VALUES ('{}', '{}', '{}', '{}', '{}', ARRAY[0.1::float8 + 0.2], '{}', '{}')"
            " RETURNING id"
        ).fetchone()
        assert other_connection.execute("SHOW extra_float_digits").fetchone() == ("0",)

    assert rows_of(notifications(listening), "insert") == [[pk, [0.1 + 0.2]]]


def test_the_two_changes_of_a_row_changed_twice_arrive_in_order_on_the_bulk_path(
    other_connection, listening
):
    """Renaming a parent key changes each child twice (two ``ON UPDATE CASCADE`` keys):
    a listener sees each child's changes in the order they were made, the last one last,
    also when the statement's rows take the window function (a few kilobytes each)."""
    with cascading_children(other_connection, labelled=True) as model:
        notify = Notify(fields=["first", "second", "label"])
        declaration = install(model, other_connection, notify)
        old, new = "o" * 300, "n" * 300
        other_connection.execute(f"INSERT INTO {PARENTS} VALUES (%s)", [old])
        other_connection.execute(
            f"INSERT INTO {CHILDREN} SELECT g, %s, %s, repeat('l', 600)"
            " FROM generate_series(1, 25) AS g",
            [old, old],
        )
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        other_connection.execute(f"UPDATE {PARENTS} SET id = %s", [new])
        events = decoded(listening, model)

    seen: dict[int, list[tuple[str, str]]] = {}
    for event in events:
        seen.setdefault(event.pk, []).append((event.fields["first"], event.fields["second"]))
    assert seen.keys() == set(range(1, 26))
    assert all(len(changes) == 2 for changes in seen.values())
    # Each key's action changes one column; PostgreSQL runs them in either order.
    assert {tuple(changes) for changes in seen.values()} in [
        {((new, old), (new, new))},
        {((old, new), (new, new))},
    ]


@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_row_changed_twice_arrives_in_order_when_one_change_is_long_and_the_other_short(
    other_connection, listening, level
):
    """Renaming a long parent key to a short one changes each child twice (two ``ON UPDATE
    CASCADE`` keys): the first change still holds the long key (a row the bulk path does not
    join, 512 bytes or more), the second does not. Each child's changes arrive in the order
    the row-level trigger sees them, the one that leaves both keys renamed last."""
    with cascading_children(other_connection) as model:
        declaration = install(model, other_connection, Notify(fields="__all__", level=level))
        old, new = "p" * 200, "q"
        other_connection.execute(f"INSERT INTO {PARENTS} VALUES (%s)", [old])
        other_connection.execute(
            f"INSERT INTO {CHILDREN} SELECT g, %s, %s FROM generate_series(1, 20) AS g",
            [old, old],
        )
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        other_connection.execute(f"UPDATE {PARENTS} SET id = %s", [new])
        events = decoded(listening, model)

    seen: dict[int, list[tuple[dict, dict]]] = {}
    for event in events:
        seen.setdefault(event.pk, []).append((event.old, event.fields))
    assert seen.keys() == set(range(1, 21))
    for pk, changes in seen.items():
        (first_old, first_new), (second_old, second_new) = changes
        assert first_old == {"first": old, "second": old}, pk
        assert first_new in [{"first": new, "second": old}, {"first": old, "second": new}], pk
        assert second_old == first_new, pk
        assert second_new == {"first": new, "second": new}, pk


@pytest.mark.parametrize("level", ["statement", "row"])
@pytest.mark.parametrize("when_changed", [[], ["amount"]], ids=["any column", "when_changed"])
def test_a_value_written_again_in_another_form_is_no_change_of_that_field(
    nullable_table, other_connection, listening, level, when_changed
):
    """Declared columns are compared by value, as the ORM reads them: 1.0 and 1.00 are
    one number. The row's stored bytes changed, which announces it without when_changed."""
    notify = Notify(fields=["amount"], when_changed=when_changed, level=level)
    declaration = install(nullable_table, other_connection, notify)
    other_connection.execute(
        f"INSERT INTO {NULLABLE} SELECT g, NULL, 1.0 FROM generate_series(1, 25) AS g"
    )
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
    other_connection.execute(f"UPDATE {NULLABLE} SET amount = 1.00")  # the bulk path
    other_connection.execute(f"UPDATE {NULLABLE} SET amount = 2 WHERE id = 1")

    changes = [(e.pk, e.fields["amount"], e.changed) for e in decoded(listening, nullable_table)]

    moved = (1, Decimal(2), {"amount"})
    if when_changed:
        assert changes == [moved]
    else:
        assert sorted(changes[:-1]) == [(pk, Decimal("1.00"), set()) for pk in range(1, 26)]
        assert changes[-1] == moved


def test_a_durable_statement_that_changes_nothing_stores_nothing_and_wakes_no_one(
    nullable_table, other_connection, listening
):
    install(nullable_table, other_connection, Notify(fields=["label"], durable=True))
    other_connection.execute(f"INSERT INTO {NULLABLE} SELECT generate_series(1, 25)")
    listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wire.DURABLE_CHANNEL)))
    notifications(listening)

    other_connection.execute(f"UPDATE {NULLABLE} SET label = label")
    other_connection.execute(f"UPDATE {NULLABLE} SET label = 'a' WHERE id <= 2")

    assert notifications(listening) == [""]  # the second statement's wake-up alone
    assert sorted(stored_rows(other_connection, "testapp.nullable", "update")) == [
        [pk, "a", None, 1] for pk in (1, 2)
    ]


def test_models_paused_by_hand_are_named_in_any_case_and_spacing(other_connection, listening):
    listening.execute("LISTEN pgnotify_testapp_article")
    # As Model._meta.label prints it, and as a list typed by hand.
    for paused in ["testapp.Article", " testapp.tag , TESTAPP.ARTICLE "]:
        with other_connection.transaction():
            other_connection.execute("SELECT set_config('pgnotify.paused', %s, true)", [paused])
            other_connection.execute(
                "INSERT INTO testapp_article (title, body) VALUES ('quiet', '')"
            )
    other_connection.execute("INSERT INTO testapp_article (title, body) VALUES ('heard', '')")

    assert [row[1] for row in rows_of(notifications(listening), "insert")] == ["heard"]


@pytest.mark.parametrize("old", [True, False], ids=["old", "old=False"])
def test_a_row_changed_twice_arrives_in_order_when_short_rows_come_before_its_long_change(
    other_connection, listening, old
):
    """The bulk path groups short rows by their running total: the second, short change of
    a child (pk 100) whose first change is long (its old key, 600 bytes, in it) must not go
    out with the short changes of other children made before both. Eleven children of a
    short-keyed parent, then that one, and both parents renamed in one statement (the
    short-keyed one first): 24 changes, more than the short path takes."""
    with cascading_children(other_connection, labelled=True) as model:
        notify = Notify(fields=["first", "second", "label"], old=old)
        declaration = install(model, other_connection, notify)
        long = "x" * 600
        other_connection.execute(f"INSERT INTO {PARENTS} VALUES ('z'), (%s)", [long])
        other_connection.execute(
            f"INSERT INTO {CHILDREN} SELECT g, 'z', 'z', 'l' FROM generate_series(1, 11) AS g"
        )
        other_connection.execute(f"INSERT INTO {CHILDREN} VALUES (100, %s, %s, 'l')", [long, long])
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        other_connection.execute(
            f"UPDATE {PARENTS} SET id = CASE WHEN id = 'z' THEN 'zz' ELSE 'y' END"
        )
        events = decoded(listening, model)

    assert len(events) == 24
    changes = [(e.fields["first"], e.fields["second"]) for e in events if e.pk == 100]
    assert len(changes) == 2 and changes[0] in [("y", long), (long, "y")]
    assert changes[1] == ("y", "y")


PERCENT = "pgnotify_test_percent"


@pytest.mark.parametrize("rows", [1, 2, 21], ids=["one row", "few rows", "bulk"])
@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_column_name_with_percent_signs_travels_in_every_message(
    other_connection, listening, level, rows
):
    """The short path writes its message with ``format()``, whose template holds the
    column names: a ``%`` in one is written as itself, the write never fails."""
    with throwaway_model(
        other_connection,
        PERCENT,
        f'CREATE TABLE {PERCENT} (id integer PRIMARY KEY, "off%s %%" text)',
        f"DROP TABLE IF EXISTS {PERCENT}",
        "Percent",
        id=models.IntegerField(primary_key=True),
        off=models.TextField(null=True, db_column="off%s %%"),
    ) as model:
        declaration = install(model, other_connection, Notify(fields=["off"], level=level))
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        other_connection.execute(
            f"INSERT INTO {PERCENT} SELECT g, g || '%%s' FROM generate_series(1, %s) AS g", [rows]
        )
        # Without parameters, psycopg sends a statement as it is.
        other_connection.execute(f'UPDATE {PERCENT} SET "off%s %%" = "off%s %%" || \'!\'')
        other_connection.execute(f"DELETE FROM {PERCENT}")
        payloads = notifications(listening)
        events = [change for p in payloads for change in Decoder([model]).decode(p)]

    assert all('"fields":["off%s %%"]' in payload for payload in payloads)
    for action, suffix in [("insert", "%s"), ("update", "%s!"), ("delete", "%s!")]:
        sent = {e.pk: e.fields for e in events if e.action == action}
        assert sent == {i: {"off": f"{i}{suffix}"} for i in range(1, rows + 1)}
