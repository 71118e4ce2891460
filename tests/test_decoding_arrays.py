"""Arrays, and fields with a ``from_db_value`` of their own, arrive as the ORM reads them.

``Logbook`` declares every field: arrays of types whose JSON rendering depends on
the writing session's settings (``timestamptz`` on ``TimeZone``, ``interval`` on
``IntervalStyle``, ``bytea`` on ``bytea_output``) and of other types the ORM reads
into Python objects, and custom fields whose ``from_db_value`` changes what is
stored. Rows are written through the ORM, in sessions of various settings, and
a real listener in this process (the ``changes`` fixture) receives what the
triggers send; each event's values must be what ``Logbook.objects.get()`` gives.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from django import forms
from django.contrib.postgres.fields import ArrayField
from django.db import connection, models, transaction
from django.db.models.expressions import RawSQL
from psycopg import sql

from django_pgnotify import Notify, wire
from django_pgnotify.declarations import embeds_json, get_declarations
from django_pgnotify.decoding import Decoder
from django_pgnotify.durable import Claimed, build_message
from tests.conftest import install_redeclared
from tests.test_decoding import message as v2_message
from tests.test_triggers_statements import install, receive, throwaway_model
from tests.testapp.models import Logbook, Order, PlainJSONField, SealedTextField

UTC = timezone.utc
# Instants around daylight saving changes, and one of 1890, when Kolkata, New York
# and Chatham kept local mean time: offsets with seconds (+05:53:28, -04:56:02...).
DST_START = datetime(2025, 3, 30, 0, 59, 59, 123456, tzinfo=UTC)
DST_END = datetime(2025, 11, 2, 6, 30, 0, 1, tzinfo=UTC)
MEAN_TIME = datetime(1890, 6, 1, 12, 0, 0, 500000, tzinfo=UTC)

# (TimeZone, IntervalStyle, bytea_output) of the writing session.
SESSIONS = [
    ("UTC", "postgres", "hex"),
    ("America/New_York", "postgres_verbose", "escape"),
    ("Asia/Kolkata", "sql_standard", "escape"),
    ("Pacific/Chatham", "iso_8601", "hex"),
]


def logbook_values(i: int = 0) -> dict[str, Any]:
    """Values of every field of a ``Logbook``, NULL elements and 2-D arrays among
    them; ``i`` varies them."""
    micro = timedelta(microseconds=i)
    return {
        "moments": [DST_START + micro, None, MEAN_TIME, DST_END],
        "shifts": [[DST_START, None], [MEAN_TIME - micro, DST_END]],
        "days": [date(2025, 3, 30), None, date(1, 1, 1)],
        "times": [time(23, 59, 58, 999999), None, time(0, 0, 0, i)],
        "spans": [
            [timedelta(days=2, seconds=3, microseconds=7) + micro, None],
            [-timedelta(microseconds=1), timedelta(days=-1, hours=2, microseconds=500)],
            [timedelta(days=-3, hours=-4, minutes=-5), timedelta(hours=1000, seconds=0.5)],
        ],
        "tokens": [uuid.UUID(int=i + 1), None],
        # Escape format writes b"cafe" as cafe, which a reader of hex would misread.
        "blobs": [b"\x00\xff\x01", b"\\x", b"", None, b"cafe", bytes(range(256))],
        "ratios": [0.1, 1.0, None, -2.5e-300, math.inf, 1 / 3 + i],
        "names": ["a", None, 'é "quoted" \\ [x]'],
        "secret": f"top secret {i}",
        "secrets": ["one", None, "two"],
        "tags": ["red", "green"],
        "seen_at": DST_START,
    }


EMPTY = {
    "moments": [],
    "shifts": None,
    "days": [],
    "times": [],
    "spans": [],
    "tokens": [],
    "blobs": [],
    "ratios": [],
    "names": [],
    "secret": None,
    "secrets": [],
    "tags": None,
    "seen_at": None,
}


def as_the_orm_reads(*pks: Any) -> dict[Any, dict[str, Any]]:
    """Each row's declared values as ``Logbook.objects.get()`` gives them, by pk."""
    fields = [f for f in Logbook._meta.concrete_fields if not f.primary_key]
    return {
        row.pk: {f.attname: getattr(row, f.attname) for f in fields}
        for row in Logbook.objects.filter(pk__in=pks)
    }


@contextmanager
def writers_session(timezone: str, interval_style: str, bytea_output: str) -> Iterator[None]:
    """Run the block in one transaction whose session settings are these."""
    with transaction.atomic(), connection.cursor() as cursor:
        for name, value in [
            ("TimeZone", timezone),
            ("IntervalStyle", interval_style),
            ("bytea_output", bytea_output),
        ]:
            cursor.execute("SELECT set_config(%s, %s, true)", [name, value])
        yield


@pytest.fixture(params=["statement", "row"])
def level(request, restore_triggers) -> str:
    """Logbook's triggers at the level of the parameter."""
    (declaration,) = get_declarations(["testapp.Logbook"])
    install_redeclared(declaration, level=request.param)
    return request.param


@pytest.mark.parametrize(
    "session", SESSIONS, ids=[f"{zone}-{style}-{output}" for zone, style, output in SESSIONS]
)
def test_arrays_arrive_as_the_orm_reads_them_whatever_the_writers_session_settings(
    changes, level, session
):
    with writers_session(*session):
        first = Logbook.objects.create(**logbook_values(0)).pk
        # More rows than the statement trigger's short path takes.
        more = Logbook.objects.bulk_create([Logbook(**logbook_values(i)) for i in range(1, 25)])
    pks = [first, *(m.pk for m in more)]
    stored = as_the_orm_reads(*pks)

    events = changes.wait(25)

    assert sorted(e.pk for e in events) == sorted(pks)
    # What was written, as the ORM reads it back: the comparison below means something.
    assert stored[first] == logbook_values(0)
    for event in events:
        assert not event.truncated
        # repr() tells an aware UTC datetime from one in another zone, 1.0 from 1,
        # and bytes from str.
        assert repr(event.fields) == repr(stored[event.pk])


@pytest.mark.parametrize(
    "session", SESSIONS[1:3], ids=[f"{zone}-{style}" for zone, style, _ in SESSIONS[1:3]]
)
def test_an_update_of_arrays_has_new_and_old_values_as_the_orm_reads_them(changes, level, session):
    pk = Logbook.objects.create(**logbook_values(0)).pk
    changes.wait(1)
    changes.clear()
    before = as_the_orm_reads(pk)[pk]

    with writers_session(*session):
        Logbook.objects.filter(pk=pk).update(**logbook_values(1))
    after = as_the_orm_reads(pk)[pk]

    (event,) = changes.wait(1)
    assert event.action == "update"
    assert repr(event.fields) == repr(after)
    assert repr(event.old) == repr(before)
    assert event.changed == {"moments", "shifts", "times", "spans", "tokens", "ratios", "secret"}


def test_empty_and_null_arrays_and_nulls_of_custom_fields_arrive_as_the_orm_reads_them(
    changes,
):
    pk = Logbook.objects.create(**EMPTY).pk
    stored = as_the_orm_reads(pk)[pk]

    (event,) = changes.wait(1)

    assert stored["tags"] == []  # NULL, which from_db_value reads as no words
    assert repr(event.fields) == repr(stored)


def test_old_nulls_of_custom_fields_arrive_as_the_orm_read_them(changes):
    pk = Logbook.objects.create(**EMPTY).pk
    changes.wait(1)
    changes.clear()
    before = as_the_orm_reads(pk)[pk]

    Logbook.objects.filter(pk=pk).update(tags=["blue"], secret="now")
    after = as_the_orm_reads(pk)[pk]

    (event,) = changes.wait(1)
    assert (before["tags"], before["secret"]) == ([], None)  # the NULLs, as the ORM reads them
    assert repr(event.old) == repr(before)
    assert repr(event.fields) == repr(after)
    assert event.changed == {"tags", "secret"}


def test_custom_fields_arrive_as_their_from_db_value_makes_them(changes):
    pk = Logbook.objects.create(**logbook_values(0)).pk
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret, secrets, tags FROM testapp_logbook WHERE id = %s", [pk])
        secret, secrets, tags = cursor.fetchone()

    (event,) = changes.wait(1)

    assert (secret, secrets, tags) == (
        "sealed:gbc frperg 0",
        ["sealed:bar", None, "sealed:gjb"],
        "red,green",
    )
    assert event.fields["secret"] == "top secret 0"
    assert event.fields["secrets"] == ["one", None, "two"]
    assert event.fields["tags"] == ["red", "green"]
    # Given the datetime the database adapter makes, it returns Berlin time.
    assert repr(event.fields["seen_at"]) == repr(DST_START.astimezone(ZoneInfo("Europe/Berlin")))


def test_a_from_db_value_that_raises_passes_the_value_on_as_sent_and_warns_once(changes, caplog):
    pk = Logbook.objects.create(**logbook_values(0)).pk
    changes.wait(1)
    changes.clear()
    unsealed = "UPDATE testapp_logbook SET secret = %s, secrets = %s WHERE id = %s"

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        with connection.cursor() as cursor:
            cursor.execute(unsealed, ["written by hand", ["sealed:bar", "by hand"], pk])
        with connection.cursor() as cursor:
            cursor.execute(unsealed, ["again by hand", ["sealed:gjb"], pk])
        first, second = changes.wait(2)

    assert first.fields["secret"] == "written by hand"
    assert first.fields["secrets"] == ["sealed:bar", "by hand"]  # as sent: one did not open
    assert first.old["secret"] == "top secret 0"
    assert first.fields["moments"] == logbook_values(0)["moments"]  # the rest converted
    assert second.fields["secret"] == "again by hand"
    assert second.fields["secrets"] == ["two"]
    assert second.old["secret"] == "written by hand"
    assert changes.stats["undecodable"] == 0  # no event was lost
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per column
    secret, secrets = sorted(messages, key=lambda m: "secrets" in m)
    for message, column, converter in [
        (secret, "secret", "SealedTextField.from_db_value"),
        (secrets, "secrets", "ArrayField._from_db_value"),
    ]:
        assert f"testapp.Logbook.{column} value" in message
        assert f"({converter} raised Unsealed: " in message
        assert "passing it on as sent" in message
    assert "'written by hand' was not sealed" in secret
    assert "'by hand' was not sealed" in secrets


class ChoiceArrayField(ArrayField):
    """The common recipe: an ``ArrayField`` edited as a multiple choice. Its internal
    type is its class name, not ``ArrayField``."""

    def formfield(self, **kwargs):
        defaults = {"form_class": forms.MultipleChoiceField, "choices": self.base_field.choices}
        return super(ArrayField, self).formfield(**{**defaults, **kwargs})


class DecimalDecoder(json.JSONDecoder):
    """Reads JSON numbers with a fraction as ``Decimal``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "parse_float": Decimal})


CHOICE_ARRAYS_TABLE = "pgnotify_test_choice_arrays"
CHOICE_ARRAYS_FIELDS = ["labels", "docs", "exact", "grid", "sealed"]


@pytest.fixture
def choice_arrays_table(other_connection):
    """A table of arrays declared with an ``ArrayField`` subclass, with its model."""
    with throwaway_model(
        other_connection,
        CHOICE_ARRAYS_TABLE,
        f"CREATE TABLE {CHOICE_ARRAYS_TABLE} (id integer PRIMARY KEY, labels varchar(5)[],"
        " docs jsonb[], exact jsonb[], grid jsonb[][], sealed text[])",
        f"DROP TABLE IF EXISTS {CHOICE_ARRAYS_TABLE}",
        "ChoiceArraysRow",
        id=models.IntegerField(primary_key=True),
        labels=ChoiceArrayField(
            models.CharField(max_length=5, choices=[("red", "Red"), ("green", "Green")]),
            null=True,
        ),
        docs=ChoiceArrayField(models.JSONField(null=True), null=True),
        exact=ChoiceArrayField(models.JSONField(null=True, decoder=DecimalDecoder), null=True),
        grid=ArrayField(
            ChoiceArrayField(models.JSONField(null=True, decoder=DecimalDecoder)), null=True
        ),
        sealed=ChoiceArrayField(SealedTextField(null=True), null=True),
    ) as model:
        yield model


def test_arrays_of_an_array_field_subclass_arrive_as_the_orm_reads_them(
    choice_arrays_table, other_connection, caplog
):
    """JSON elements too: JSONField.from_db_value is given each element's text, as
    the ORM gives it, not the value to_json embeds (which it would read again)."""
    model = choice_arrays_table
    declaration = install(model, other_connection, Notify(fields=CHOICE_ARRAYS_FIELDS))
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
            model.objects.create(
                id=1,
                labels=["red", None],
                # Strings that are JSON texts: read again, they would be 1 and [2].
                docs=["1", "[2]", None],
                exact=[{"n": 0.25}, 1.5, "x", None],
                grid=[[{"a": 0.5}, "s"], [None, [2.75]]],
                sealed=["one", None],
            )
            before = model.objects.get(pk=1)
            model.objects.filter(pk=1).update(
                docs=[{"n": 1}, "1"], exact=[0.125], grid=[["[1]"]], sealed=["two"]
            )
            after = model.objects.get(pk=1)
            inserted, updated = receive(listening, model, 2)

    def orm(row):
        return {name: getattr(row, name) for name in CHOICE_ARRAYS_FIELDS}

    # What the ORM reads: the comparison below means something.
    assert orm(before) == {
        "labels": ["red", None],
        "docs": ["1", "[2]", None],
        "exact": [{"n": Decimal("0.25")}, Decimal("1.5"), "x", None],
        "grid": [[{"a": Decimal("0.5")}, "s"], [None, [Decimal("2.75")]]],
        "sealed": ["one", None],
    }
    # repr() tells Decimal('0.25') from 0.25 and "1" from 1.
    assert repr(inserted.fields) == repr(orm(before))
    assert repr(updated.fields) == repr(orm(after))
    assert repr(updated.old) == repr(orm(before))
    assert updated.changed == {"docs", "exact", "grid", "sealed"}
    assert caplog.records == []  # nothing was passed on as sent


class JsonbArrayField(models.Field):
    """A field of its own on a ``jsonb[]`` column, not an ``ArrayField``: the ORM gives
    what psycopg loads, with no ``from_db_value`` to read it further."""

    def db_type(self, connection):
        return "jsonb[]"


class JsonArrayField(models.Field):
    """The same on a ``json[]`` column."""

    def db_type(self, connection):
        return "json[]"


class ParsedJsonbArrayField(JsonbArrayField):
    """A ``jsonb[]`` column whose ``from_db_value`` parses the texts the ORM reads."""

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        return [None if text is None else json.loads(text) for text in value]


class JsonbTextField(models.Field):
    """A field of its own on a ``jsonb`` column: here the elements of an ``ArrayField``."""

    def db_type(self, connection):
        return "jsonb"


JSON_ARRAYS_TABLE = "pgnotify_test_json_arrays"
# Enough that an update's row (pk, new and old values) is rendered by json_build_array,
# an insert's by concatenation (see triggers._row_text).
JSON_ARRAYS_FIELDS = ["docs", "grid", "loose", "parsed", "boxed", "plain", "deep", "spare"]
# More digits than a float holds, or a 64-bit integer.
BIG = "123456789012345678901234567890"


@pytest.fixture
def json_arrays_table(other_connection):
    """A table of ``jsonb[]`` and ``json[]`` columns of fields that are not a
    ``JSONField`` or an ``ArrayField`` of one, with its model."""
    with throwaway_model(
        other_connection,
        JSON_ARRAYS_TABLE,
        f"CREATE TABLE {JSON_ARRAYS_TABLE} (id integer PRIMARY KEY, docs jsonb[],"
        " grid jsonb[][], loose json[], parsed jsonb[], boxed jsonb[], plain json[],"
        " deep jsonb[], spare json[])",
        f"DROP TABLE IF EXISTS {JSON_ARRAYS_TABLE}",
        "JsonArraysRow",
        id=models.IntegerField(primary_key=True),
        docs=JsonbArrayField(null=True),
        grid=JsonbArrayField(null=True),
        loose=JsonArrayField(null=True),
        parsed=ParsedJsonbArrayField(null=True),
        boxed=ArrayField(JsonbTextField(null=True), null=True),
        # A TextField on json, as some declare one: its internal type is TextField's.
        plain=ArrayField(PlainJSONField(null=True), null=True),
        deep=JsonbArrayField(null=True),
        spare=JsonArrayField(null=True),
    ) as model:
        yield model


def durable_changes(other_connection: psycopg.Connection, model) -> list:
    """``model``'s durable changes, from the event table as a worker claims and decodes them."""
    decoder, label = Decoder([model]), model._meta.label_lower
    found = other_connection.execute(
        "SELECT id, declaration, action, layout, payload, size FROM pgnotify_event"
        " WHERE model = %s ORDER BY id",
        [label],
    )
    return [
        change
        for id, declaration, action, layout, payload, size in found
        for change in decoder.decode(
            build_message(
                Claimed(
                    *(id, declaration, label, action, None, None, "", layout, payload),
                    *(None, 0, size, None, False, 0.0),
                )
            ),
            event_id=id,
        )
    ]


@pytest.mark.parametrize(
    "options",
    [{}, {"level": "row"}, {"old": False}, {"durable": True}],
    ids=["statement", "row", "new values alone", "durable"],
)
def test_json_arrays_of_fields_of_their_own_arrive_as_the_orm_reads_them(
    json_arrays_table, other_connection, options
):
    """Each element as psycopg loads it for the ORM: a ``jsonb`` one as its text, a
    ``json`` one parsed from its text (every digit of its numbers kept), not the value
    to_json embeds; NULL elements, two dimensions and NULL columns too."""
    model = json_arrays_table
    declaration = install(model, other_connection, Notify(fields=JSON_ARRAYS_FIELDS, **options))
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        # Written as texts: every column's elements, (two) dimensions and NULLs as they are.
        other_connection.execute(
            f"INSERT INTO {JSON_ARRAYS_TABLE} VALUES (1, %s::text[]::jsonb[],"
            " %s::text[]::jsonb[], %s::text[]::json[], %s::text[]::jsonb[],"
            " %s::text[]::jsonb[], %s::text[]::json[], %s::text[]::jsonb[], '{}'),"
            " (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
            [
                ['{"b": [1.50, null], "a": "x"}', '"1"', BIG, "1e400", "null", None],
                [['{"a": 0.5}', None], ["[2]", '"s"']],
                ['{"a": 1, "a": 2.50}', " [0.1, 1e400] ", BIG, '"1"', None],
                ['{"n": 1.10}', None],
                ['{"k": true}', '"[2]"', None],
                [["[1.10]", None], ['"s"', "{}"]],
                [[["1", None]], [['"a"', "[]"]]],
            ],
        )
        before = orm_rows(model)
        other_connection.execute(
            f"UPDATE {JSON_ARRAYS_TABLE} SET docs = ARRAY['[1.0]', NULL]::jsonb[],"
            " loose = NULL, boxed = '{}' WHERE id = 1"
        )
        after = orm_rows(model)
        if options.get("durable"):
            changes = durable_changes(other_connection, model)
        else:
            changes = receive(listening, model, 3)

    # What the ORM reads: the comparison below means something.
    assert before == {
        1: {
            "docs": [
                '{"a": "x", "b": [1.50, null]}',
                '"1"',
                BIG,
                "1" + "0" * 400,  # jsonb keeps every digit of a numeric
                "null",
                None,
            ],
            "grid": [['{"a": 0.5}', None], ["[2]", '"s"']],
            "loose": [{"a": 2.5}, [0.1, math.inf], int(BIG), "1", None],
            "parsed": [{"n": 1.1}, None],
            "boxed": ['{"k": true}', '"[2]"', None],
            "plain": [[[1.1], None], ["s", {}]],
            "deep": [[["1", None]], [['"a"', "[]"]]],
            "spare": [],
        },
        2: dict.fromkeys(JSON_ARRAYS_FIELDS),
    }
    assert after[1] == {**before[1], "docs": ["[1.0]", None], "loose": None, "boxed": []}
    by_change = {(c.action, c.pk): c for c in changes}
    assert sorted(by_change) == [("insert", 1), ("insert", 2), ("update", 1)]
    # repr() tells '"1"' from "1" and 1, and a list of texts from the values they hold.
    assert repr(by_change["insert", 1].fields) == repr(before[1])
    assert repr(by_change["insert", 2].fields) == repr(before[2])
    assert repr(by_change["update", 1].fields) == repr(after[1])
    if options.get("old") is not False:
        assert repr(by_change["update", 1].old) == repr(before[1])
        assert by_change["update", 1].changed == {"docs", "loose", "boxed"}


class ExactJSONField(models.JSONField):
    """Reads numbers with a fraction as ``Decimal`` by a ``from_db_value`` of its own."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else json.loads(value, parse_float=Decimal)


class JsonTextField(models.Field):
    """A field of its own on a ``json`` column: the ORM gives what psycopg parses."""

    def db_type(self, connection):
        return "json"


BIG_NUMBERS_TABLE = "pgnotify_test_big_numbers"
BIG_NUMBERS_FIELDS = ["docs", "grid", "loose", "plain", "texts", "exact"]


@pytest.fixture
def big_numbers_table(other_connection):
    """JSON columns whose values the triggers embed as they are, and arrays of JSON
    fields that read their elements' texts in their own way (``grid``, ``exact``),
    with their model."""
    with throwaway_model(
        other_connection,
        BIG_NUMBERS_TABLE,
        f"CREATE TABLE {BIG_NUMBERS_TABLE} (id integer PRIMARY KEY, docs jsonb[],"
        " grid jsonb[][], loose json, plain json, texts jsonb, exact jsonb[])",
        f"DROP TABLE IF EXISTS {BIG_NUMBERS_TABLE}",
        "BigNumbersRow",
        id=models.IntegerField(primary_key=True),
        docs=ArrayField(models.JSONField(null=True), null=True),
        grid=ArrayField(ArrayField(models.JSONField(null=True, decoder=DecimalDecoder)), null=True),
        loose=JsonTextField(null=True),
        plain=PlainJSONField(null=True),
        texts=JsonbTextField(null=True),
        exact=ArrayField(ExactJSONField(null=True), null=True),
    ) as model:
        yield model


@pytest.mark.parametrize(
    "options",
    [{}, {"level": "row"}, {"old": False}, {"durable": True}],
    ids=["statement", "row", "new values alone", "durable"],
)
def test_integers_past_64_bits_in_embedded_json_arrive_with_every_digit(
    big_numbers_table, other_connection, options
):
    """The elements of an ``ArrayField(JSONField)`` and the value of a field of its own
    on a ``json`` column are embedded in the payload as JSON: an integer too large
    for 64 bits must arrive as the int the ORM reads, not as a float. Those of an
    array of a JSON field with a decoder or a ``from_db_value`` of its own are sent
    as texts, which it reads with every digit (trailing zeros too)."""
    model = big_numbers_table
    declaration = install(model, other_connection, Notify(fields=BIG_NUMBERS_FIELDS, **options))
    big, negative, unsigned = int(BIG), -(2**63) - 1, 2**64
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        other_connection.execute(
            f"INSERT INTO {BIG_NUMBERS_TABLE} VALUES (1, %s::text[]::jsonb[],"
            " %s::text[]::jsonb[], %s::json, %s::json, %s::jsonb, %s::text[]::jsonb[])",
            [
                [BIG, f'{{"n": {negative}, "f": 0.5}}', None],
                # A decoder of its own reads a number's every digit: trailing zeros too.
                [[f"[{unsigned}]", "1.250"]],
                f'{{"n": {BIG}, "m": [{negative}, 1.5]}}',
                f"[{unsigned}, {BIG}]",
                f'{{"n": {BIG}}}',
                [f'{{"a": 1.50, "n": {BIG}}}', "1.10", None],
            ],
        )
        before = model.objects.get(pk=1)
        other_connection.execute(f"UPDATE {BIG_NUMBERS_TABLE} SET docs = '{{}}' WHERE id = 1")
        after = model.objects.get(pk=1)
        if options.get("durable"):
            changes = durable_changes(other_connection, model)
        else:
            changes = receive(listening, model, 2)

    def orm(row):
        return {name: getattr(row, name) for name in BIG_NUMBERS_FIELDS}

    # What the ORM reads: the comparison below means something.
    assert orm(before) == {
        "docs": [big, {"f": 0.5, "n": negative}, None],
        "grid": [[[unsigned], Decimal("1.250")]],
        "loose": {"n": big, "m": [negative, 1.5]},
        "plain": [unsigned, big],
        "texts": f'{{"n": {BIG}}}',
        "exact": [{"a": Decimal("1.50"), "n": big}, Decimal("1.10"), None],
    }
    inserted, updated = changes
    # repr() tells 1.2345678901234568e+29 from the int.
    assert repr(inserted.fields) == repr(orm(before))
    assert repr(updated.fields) == repr(orm(after))
    if options.get("old") is not False:
        assert repr(updated.old) == repr(orm(before))


@pytest.mark.parametrize(
    "field, embedded",
    [
        (ArrayField(models.JSONField()), True),
        (ArrayField(ArrayField(models.JSONField())), True),
        # Its elements' texts, which its decoder reads as the ORM has it read them.
        (ArrayField(models.JSONField(decoder=DecimalDecoder)), False),
        (ArrayField(ExactJSONField()), False),  # and for a from_db_value of its own
        (JsonTextField(), True),
        (PlainJSONField(), True),
        (models.JSONField(), False),  # its text
        (JsonbTextField(), False),  # rendered as a JSONField
        (ArrayField(JsonbTextField()), False),  # its elements' texts
        (JsonbArrayField(), False),
        (ArrayField(models.IntegerField()), False),
        (models.TextField(), False),
    ],
    ids=repr,
)
def test_only_messages_with_embedded_json_are_read_again_exactly(field, embedded):
    """The others keep the faster parser: their numbers never need more than a float."""
    assert embeds_json(field, connection) is embedded


def test_a_message_without_embedded_json_is_parsed_once(monkeypatch):
    """The second, exact reading is for the declarations that need it: every other
    message keeps the faster parser's one reading."""

    def second_reading(payload):
        raise AssertionError("read again by the standard library")

    monkeypatch.setattr(wire, "_loads_stdlib", second_reading)
    payload = v2_message("testapp.order", "insert", {"pk": 1, "fields": {"status": "new"}})

    (change,) = Decoder([Order]).decode(payload)

    assert change.fields == {"status": "new"}


def orm_rows(model) -> dict[int, dict[str, Any]]:
    """The declared values of ``model``'s rows as ``model.objects`` gives them, by pk."""
    return {
        row.pk: {name: getattr(row, name) for name in JSON_ARRAYS_FIELDS}
        for row in model.objects.order_by("pk")
    }


# Decoded from PostgreSQL's own renderings, without a listener


INTERVALS = [
    "0",
    "1 day",
    "-1 day",
    "1 day -2 hours",
    "-1 day +2 hours",
    "1 year 2 mons",
    "-1 year -2 mons",
    "1 year -2 mons",
    "1 year 2 mons 3 days 04:05:06.789",
    "-1 year -2 mons -3 days -04:05:06.789",
    "-13 mons 1 day -00:00:01",
    "1 mon -1 day 1 second",
    "-0.5 seconds",
    "0.000001 seconds",
    "-0.000001 seconds",
    "1000000 hours 1 second",
    "-1 minute 1 second",
    "1 minute -1 second",
    "-2 days -00:00:00.5",
    "3 days 1 second",
    "12 mons",
    "-1 year",
    "59.999999 seconds",
]


@pytest.mark.parametrize("style", ["postgres", "postgres_verbose", "sql_standard", "iso_8601"])
def test_interval_arrays_in_every_interval_style_decode_as_the_orm_reads_them(
    other_connection, style
):
    other_connection.execute("SET IntervalStyle = postgres")
    with other_connection.transaction():
        other_connection.execute(
            "CREATE TEMP TABLE spans ON COMMIT DROP AS SELECT %s::text[]::interval[] AS spans",
            [INTERVALS],
        )
        # As psycopg reads them for the ORM, which needs the postgres style.
        (expected,) = other_connection.execute("SELECT spans FROM spans").fetchone()
        other_connection.execute("SELECT set_config('IntervalStyle', %s, true)", [style])
        (rendered,) = other_connection.execute("SELECT to_json(spans)::text FROM spans").fetchone()

    (change,) = Decoder([Logbook]).decode(logbook_message(spans=json.loads(rendered)))

    assert change.fields["spans"] == expected


@pytest.mark.parametrize("output", ["hex", "escape"])
def test_bytea_arrays_in_either_bytea_output_decode_as_the_orm_reads_them(other_connection, output):
    blobs = [b"\\x00", b"\\\\x", b"", b"\\", b"cafe", bytes(range(256)), None]
    other_connection.execute(sql.SQL("SET bytea_output = {}").format(sql.Literal(output)))
    (rendered,) = other_connection.execute("SELECT to_json(%s::bytea[])::text", [blobs]).fetchone()

    (change,) = Decoder([Logbook]).decode(logbook_message(blobs=json.loads(rendered)))

    assert change.fields["blobs"] == blobs


def logbook_message(**values: Any) -> str:
    """A version 2 insert of one ``Logbook`` row carrying ``values`` (by column)."""
    return json.dumps(
        {
            "v": 2,
            "model": "testapp.logbook",
            "action": "insert",
            "xid": 7,
            "ts": 1.5,
            "fields": list(values),
            "rows": [[1, *values.values()]],
        }
    )


GENERATED_TABLE = "pgnotify_test_generated_arrays"


def test_generated_arrays_arrive_as_the_orm_reads_them(other_connection):
    """A ``GeneratedField``'s column is its output field's: an ``ArrayField(JSONField)``
    one is rendered and read as that field is, not as a field of its own on ``jsonb[]``,
    and an ``ArrayField(DecimalField)`` one as strings of the stored digits, not JSON
    numbers read as floats; its JSON elements' texts, for a decoder of its own."""
    with throwaway_model(
        other_connection,
        GENERATED_TABLE,
        f"CREATE TABLE {GENERATED_TABLE} (id integer PRIMARY KEY, src jsonb[],"
        " gen jsonb[] GENERATED ALWAYS AS (src) STORED,"
        " exact jsonb[] GENERATED ALWAYS AS (src) STORED, amount numeric,"
        " amounts numeric[] GENERATED ALWAYS AS (ARRAY[amount, NULL, 1.50]) STORED)",
        f"DROP TABLE IF EXISTS {GENERATED_TABLE}",
        "GeneratedArraysRow",
        id=models.IntegerField(primary_key=True),
        src=ArrayField(models.JSONField(null=True), null=True),
        gen=models.GeneratedField(
            expression=models.F("src"),
            output_field=ArrayField(models.JSONField(null=True), null=True),
            db_persist=True,
        ),
        exact=models.GeneratedField(
            expression=models.F("src"),
            output_field=ArrayField(models.JSONField(null=True, decoder=DecimalDecoder)),
            db_persist=True,
        ),
        amount=models.DecimalField(max_digits=60, decimal_places=10, null=True),
        amounts=models.GeneratedField(
            expression=RawSQL("ARRAY[amount, NULL, 1.50]", []),
            output_field=ArrayField(
                models.DecimalField(max_digits=60, decimal_places=10, null=True)
            ),
            db_persist=True,
        ),
    ) as model:
        fields = ["src", "gen", "exact", "amount", "amounts"]
        declaration = install(model, other_connection, Notify(fields=fields))
        with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
            listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
            other_connection.execute(
                f"INSERT INTO {GENERATED_TABLE} (id, src, amount) VALUES"
                " (1, ARRAY['{\"a\": 1.50}', '\"1\"', NULL]::jsonb[],"
                " 123456789012345678901234567890.1234567890)"
            )
            (change,) = receive(listening, model, 1)
        row = model.objects.get(pk=1)

    # What the ORM reads: the comparisons below mean something.
    assert row.gen == [{"a": 1.5}, "1", None]
    assert repr(row.exact) == repr([{"a": Decimal("1.50")}, "1", None])
    assert row.amounts == [
        Decimal("123456789012345678901234567890.1234567890"),
        None,
        Decimal("1.50"),
    ]
    for name in fields:
        assert repr(change.fields[name]) == repr(getattr(row, name)), name
