"""Declarations at the edges of what a trigger can do, read as raw notifications.

A user's write must never fail because of a declaration that passed the
checks: not for a declared column whose type has no ``=`` operator, and not
for a context that, beside a long header, would push a notification past
PostgreSQL's 8000 bytes.
"""

from __future__ import annotations

import json

import psycopg
import pytest
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.test.utils import isolate_apps
from psycopg import sql

from django_pgnotify import Notify, triggers, wire
from django_pgnotify.declarations import Declaration, resolve_model
from django_pgnotify.transaction_settings import encode_context
from django_pgnotify.triggers import build_trigger_sql
from tests.test_triggers_bulk import notifications, rows_of
from tests.testapp.models import Legacy, PlainJSONField


@pytest.fixture
def listening(other_connection):
    """A client of its own, to LISTEN on the channels a test names."""
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as conn:
        yield conn


def declaration_of(model: type[models.Model], notify: Notify) -> Declaration:
    (declaration,), messages = resolve_model(model, notify)
    assert not [m for m in messages if m.is_serious()]
    return declaration


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
    small = encode_context({"actor": "user:1"})

    for context, where in [(large, "id = 1"), (large, "true"), (small, "id = 2")]:
        with other_connection.transaction():
            other_connection.execute("SELECT set_config('pgnotify.context', %s, true)", [context])
            other_connection.execute(
                sql.SQL("UPDATE pgnotify_wide SET {0} = coalesce({0}, 0) + 1 WHERE ").format(
                    sql.Identifier(declaration.fields[0].column)
                )
                + sql.SQL(where)
            )

    messages = [json.loads(p) for p in notifications(listening)]
    assert sum(len(m["rows"]) for m in messages) == 1 + 30 + 1
    assert [m.get(wire.CONTEXT) for m in messages] == [None] * (len(messages) - 1) + [small]
    assert all(len(r) > 1 for m in messages for r in m["rows"])  # whole rows, not pks
