"""The decoder: payloads as PostgreSQL sends them in, typed ``RowChange`` objects out."""

from __future__ import annotations

import json
import logging
import math
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import psycopg
import pytest
from django.contrib.postgres.fields import ArrayField, DateRangeField, DateTimeRangeField
from django.core.exceptions import ValidationError
from django.db import connection, models, transaction
from django.test import override_settings
from django.test.utils import isolate_apps
from psycopg import sql

from django_pgnotify import Notify, wire
from django_pgnotify.declarations import resolve_model
from django_pgnotify.decoding import DecodeError, Decoder, ModelNotServed
from tests.test_triggers_statements import install, receive, throwaway_model
from tests.testapp.models import (
    Measurement,
    Order,
    Reading,
    Tag,
    WallClockDateTimeField,
    Weird,
)

READING_ID = uuid.UUID("6f1c2a4e-6b1f-4c8e-9a57-0c3b7d1e2f90")
TOKEN = uuid.UUID("0b7e4c1a-93d2-4f65-8a10-5c2e9f3d7a41")

# An insert of a Reading as its trigger renders it: timestamps in UTC without
# an offset, durations in seconds, bytea as hex, numbers as written.
READING_INSERT = r"""
{"v" : 1, "model" : "testapp.reading", "action" : "insert", "xid" : 5012,
 "ts" : 1763717550.123456, "rows" : [{"pk" : "6f1c2a4e-6b1f-4c8e-9a57-0c3b7d1e2f90",
 "fields" : {"order_id" : 42, "taken_at" : "2025-07-01T10:00:00.123456",
 "day" : "2025-07-01", "at" : "23:59:59.5", "took" : 93784.500001,
 "amount" : 12345678901234.123456, "ratio" : 0.1, "flag" : true,
 "data" : {"a" : 1.5, "b" : [1, null, "x"]}, "blob" : "\\x00ff10",
 "token" : "0b7e4c1a-93d2-4f65-8a10-5c2e9f3d7a41", "count" : 9007199254740993}}]}
"""


def message(model: str, action: str, *rows: dict) -> str:
    """A version 2 payload (what triggers send) of rows written as version 1 objects."""
    full = [row for row in rows if not row.get("truncated")]
    fields = list(full[0].get("fields", {})) if full else []
    watched = list(dict.fromkeys(name for row in full for name in row.get("changed", [])))
    arrays = []
    for row in rows:
        if row.get("truncated"):
            arrays.append([row["pk"]])
            continue
        array = [row["pk"], *(row["fields"][name] for name in fields)]
        if action == "update":
            array += [row.get("old", {}).get(name) for name in fields]
            array.append(sum(1 << watched.index(name) for name in row.get("changed", [])))
        arrays.append(array)
    data = {"v": 2, "model": model, "action": action, "xid": 7, "ts": 1.5, "fields": fields}
    if action == "update":
        data["watched"] = watched
    return json.dumps({**data, "rows": arrays})


def message_v1(model: str, action: str, *rows: dict) -> str:
    return json.dumps({"v": 1, "model": model, "action": action, "xid": 7, "ts": 1.5, "rows": rows})


def decode_one(model, payload: str):
    (change,) = Decoder([model]).decode(payload, channel="pgnotify_test", pid=4242)
    return change


def reading_with(**fields):
    """A Reading insert carrying only ``fields`` (by column)."""
    row = {"pk": str(READING_ID), "fields": fields}
    return decode_one(Reading, message("testapp.reading", "insert", row))


def test_every_field_type_arrives_as_its_python_type():
    change = decode_one(Reading, READING_INSERT)

    assert change.model is Reading
    assert change.action == "insert"
    assert change.pk == READING_ID
    assert change.fields == {
        "order_id": 42,
        "taken_at": datetime(2025, 7, 1, 10, 0, 0, 123456, tzinfo=timezone.utc),
        "day": date(2025, 7, 1),
        "at": time(23, 59, 59, 500000),
        "took": timedelta(days=1, hours=2, minutes=3, seconds=4, microseconds=500001),
        "amount": Decimal("12345678901234.123456"),
        "ratio": 0.1,
        "flag": True,
        "data": {"a": 1.5, "b": [1, None, "x"]},
        "blob": b"\x00\xff\x10",
        "token": TOKEN,
        "count": 2**53 + 1,
    }


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("order_id", int),
        ("taken_at", datetime),
        ("amount", Decimal),
        ("ratio", float),
        ("took", timedelta),
        ("blob", bytes),
        ("token", uuid.UUID),
    ],
)
def test_values_have_the_type_the_orm_gives(field, kind):
    assert type(decode_one(Reading, READING_INSERT).fields[field]) is kind


def test_numbers_inside_json_fields_are_floats_as_the_orm_reads_them():
    data = decode_one(Reading, READING_INSERT).fields["data"]

    assert type(data["a"]) is float


def test_event_carries_the_notification_details():
    change = decode_one(Reading, READING_INSERT)

    assert change.channel == "pgnotify_test"
    assert change.pid == 4242
    assert change.xid == 5012
    assert change.timestamp == datetime(2025, 11, 21, 9, 32, 30, 123456, tzinfo=timezone.utc)
    assert change.using == "default"


def test_a_datetime_with_an_offset_is_converted_to_utc():
    change = reading_with(taken_at="2025-07-01T12:00:00+02:00")

    assert change.fields["taken_at"] == datetime(2025, 7, 1, 10, 0, tzinfo=timezone.utc)
    assert change.fields["taken_at"].utcoffset() == timedelta(0)


@override_settings(USE_TZ=False)
def test_without_use_tz_datetimes_are_naive_in_the_projects_time_zone():
    change = reading_with(taken_at="2025-07-01T10:00:00")

    assert change.fields["taken_at"] == datetime(2025, 7, 1, 12, 0)  # Europe/Berlin, CEST


def test_a_negative_duration_keeps_its_sign():
    assert reading_with(took=-1.5).fields["took"] == timedelta(seconds=-1.5)


def test_null_values_stay_none():
    change = reading_with(taken_at=None, amount=None, data=None, blob=None)

    assert change.fields == {"taken_at": None, "amount": None, "data": None, "blob": None}


def test_keys_are_field_names_even_when_the_column_is_named_otherwise():
    row = {"pk": 3, "fields": {"La bel's $$ é": "hi"}}

    change = decode_one(Weird, message("testapp.weird", "insert", row))

    assert change.fields == {"label": "hi"}


def test_update_maps_old_values_and_changed_columns_to_field_names():
    row = {
        "pk": 3,
        "fields": {"La bel's $$ é": "new"},
        "old": {"La bel's $$ é": "old"},
        "changed": ["La bel's $$ é"],
    }

    change = decode_one(Weird, message("testapp.weird", "update", row))

    assert change.fields == {"label": "new"}
    assert change.old == {"label": "old"}
    assert change.changed == frozenset({"label"})


def test_update_old_values_are_typed_too():
    row = {
        "pk": 1,
        "fields": {"status": "paid", "total": "12.50"},
        "old": {"status": "new", "total": "0.10"},
        "changed": ["status", "total"],
    }

    change = decode_one(Order, message("testapp.order", "update", row))

    assert change.old == {"status": "new", "total": Decimal("0.10")}
    assert change.changed == frozenset({"status", "total"})


def test_insert_has_no_old_values_and_nothing_changed():
    change = decode_one(Order, message("testapp.order", "insert", {"pk": 1, "fields": {}}))

    assert change.old is None
    assert change.changed == frozenset()


def test_delete_has_the_rows_last_values_and_no_old_values():
    row = {"pk": "blue", "fields": {}}

    change = decode_one(Tag, message("testapp.tag", "delete", row))

    assert change.action == "delete"
    assert change.pk == "blue"
    assert change.old is None


def test_a_truncated_row_has_its_pk_and_no_values():
    row = {"pk": str(READING_ID), "truncated": True}

    change = decode_one(Reading, message("testapp.reading", "update", row))

    assert change.truncated is True
    assert change.pk == READING_ID
    assert change.fields == {}
    assert change.old is None
    assert change.changed == frozenset()


def test_a_row_too_large_even_for_its_pk_has_pk_none():
    change = decode_one(
        Reading, message("testapp.reading", "delete", {"pk": None, "truncated": True})
    )

    assert change.truncated is True
    assert change.pk is None


def test_a_model_the_decoder_does_not_serve_is_a_decode_error_naming_it():
    with pytest.raises(ModelNotServed, match=r"testapp\.tag") as raised:
        Decoder([Order]).decode(message("testapp.tag", "insert", {"pk": "x"}))

    assert isinstance(raised.value, DecodeError)
    assert raised.value.model == "testapp.tag"


@pytest.mark.parametrize("seconds", ["1e400", "-1e20", "-1e11"])
def test_a_timestamp_no_datetime_can_hold_leaves_the_change_without_one(seconds):
    payload = message("testapp.tag", "insert", {"pk": "blue"}).replace(
        '"ts": 1.5', f'"ts": {seconds}'
    )

    change = decode_one(Tag, payload)

    assert change.pk == "blue"
    assert change.timestamp is None


def test_the_listener_counts_the_values_it_passes_on_as_sent(changes):
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO testapp_reading (id, taken_at, day, flag) VALUES"
            " (%s, 'infinity', '-infinity', false), (%s, 'infinity', NULL, false)",
            [uuid.uuid4(), uuid.uuid4()],
        )

    first, second = changes.wait(2)

    assert (first.fields["taken_at"], first.fields["day"]) == ("infinity", "-infinity")
    assert second.fields["taken_at"] == "infinity"
    assert changes.stats["unconverted"] == 3


def test_a_payload_that_is_not_our_format_is_a_decode_error():
    with pytest.raises(DecodeError):
        Decoder([Order]).decode("hello")


def test_a_value_that_cannot_be_converted_is_passed_on_as_sent_and_logged_once(caplog):
    decoder = Decoder([Reading])
    payload = message(
        "testapp.reading", "insert", {"pk": str(READING_ID), "fields": {"taken_at": "infinity"}}
    )

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        first = decoder.decode(payload)[0]
        second = decoder.decode(payload)[0]

    assert first.fields["taken_at"] == "infinity"
    assert second.fields["taken_at"] == "infinity"
    assert decoder.stats["unconverted"] == 2  # logged once, counted each time
    (record,) = caplog.records
    assert "testapp.Reading" in record.getMessage()
    assert "taken_at" in record.getMessage()
    assert "'infinity'" in record.getMessage()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("day", "infinity"),
        ("token", 17),
        ("amount", "lots"),
        ("took", "1 day"),
        ("data", 17),
        # Not hex with its \x, which triggers always send: refused, not guessed at.
        ("blob", "cafe"),
    ],
)
def test_other_unconvertible_values_are_passed_on_as_sent(column, value):
    assert reading_with(**{column: value}).fields == {column: value}


def test_an_integer_quoted_in_a_payload_made_by_hand_is_read_as_the_integer_it_spells():
    """Triggers send integers as JSON numbers. A quoted one (a payload made by hand) is
    read as the integer, as a pk, and in the object rows of version 1 as any value."""
    order = decode_one(Order, message("testapp.order", "insert", {"pk": "7", "fields": {}}))
    fields = {"order_id": "42", "count": "9007199254740993"}
    reading = decode_one(
        Reading,
        message_v1("testapp.reading", "insert", {"pk": str(READING_ID), "fields": fields}),
    )

    assert order.pk == 7
    assert reading.fields == {"order_id": 42, "count": 9007199254740993}


@pytest.mark.parametrize("pk", [7.5, True, [7]], ids=repr)
def test_a_pk_that_is_no_integer_is_passed_on_as_sent_not_cut_to_one(pk, caplog):
    """``int()`` made a pk of 7.5 the pk 7, another row's, and took ``true`` for 1."""
    decoder = Decoder([Order])

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        (change,) = decoder.decode(
            message("testapp.order", "insert", {"pk": pk, "fields": {}}), "pgnotify_test", 1
        )

    assert change.pk == pk and type(change.pk) is type(pk)
    assert decoder.stats["unconverted"] == 1
    assert "testapp.Order.pk value" in caplog.text


def test_an_integral_float_pk_made_by_hand_is_read_as_its_integer():
    assert decode_one(Order, message("testapp.order", "insert", {"pk": 7.0, "fields": {}})).pk == 7


class ValidatingDecoder(json.JSONDecoder):
    """Refuses an object without a "kind", as a JSON field's decoder may, with Django's
    ``ValidationError``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "object_hook": self.validated})

    @staticmethod
    def validated(value):
        if "kind" not in value:
            raise ValidationError("an object without a kind")
        return value


@isolate_apps("tests.testapp")
def test_a_json_fields_decoder_that_raises_validation_error_passes_the_value_on_as_sent(caplog):
    """The decoder is the field's own code, run as the ORM runs it: what it raises for
    a value is a value that cannot be converted, not a payload that cannot be read."""

    class Shipment(models.Model):
        label = models.JSONField(null=True, decoder=ValidatingDecoder)
        weight = models.DecimalField(max_digits=5, decimal_places=2, null=True)

        class Meta:
            app_label = "testapp"

    row = {"pk": 1, "fields": {"label": '{"to": "x"}', "weight": "1.50"}}

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        change = decode_one(Shipment, message("testapp.shipment", "insert", row))

    assert change.fields == {"label": '{"to": "x"}', "weight": Decimal("1.50")}
    (record,) = caplog.records
    assert "testapp.Shipment.label value" in record.getMessage()
    assert "an object without a kind" in record.getMessage()


class KindDecoder(json.JSONDecoder):
    """Reads an object's "kind", raising ``KeyError`` without one, as user code may."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "object_hook": lambda value: value["kind"]})


@isolate_apps("tests.testapp")
def test_whatever_a_json_fields_decoder_raises_passes_that_value_on_as_sent(caplog):
    """A decoder raising anything else (``KeyError``) lost the whole change."""

    class Parcel(models.Model):
        label = models.JSONField(null=True, decoder=KindDecoder)
        weight = models.DecimalField(max_digits=5, decimal_places=2, null=True)

        class Meta:
            app_label = "testapp"

    rows = [
        {"pk": 1, "fields": {"label": '{"to": "x"}', "weight": "1.50"}},
        {"pk": 2, "fields": {"label": '{"kind": "box"}', "weight": "2.00"}},
    ]
    decoder = Decoder([Parcel])

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        changes = decoder.decode(message("testapp.parcel", "insert", *rows), "pgnotify_test", 1)

    assert [c.fields for c in changes] == [
        {"label": '{"to": "x"}', "weight": Decimal("1.50")},
        {"label": "box", "weight": Decimal("2.00")},
    ]
    assert decoder.stats["unconverted"] == 1
    (record,) = caplog.records
    assert "testapp.Parcel.label value" in record.getMessage()
    assert "KindDecoder raised KeyError" in record.getMessage()


def test_the_context_of_the_writing_transaction_reaches_every_row_change():
    payload = json.loads(message("testapp.tag", "insert", {"pk": "a"}))
    payload["context"] = json.dumps({"actor": "user:42", "request_id": "r-1"})

    change = decode_one(Tag, json.dumps(payload))

    assert change.context == {"actor": "user:42", "request_id": "r-1"}


def test_a_payload_without_context_decodes_with_context_none():
    assert decode_one(Tag, message("testapp.tag", "insert", {"pk": "a"})).context is None


def test_a_context_set_by_hand_too_deeply_nested_to_read_is_dropped_not_the_change(changes):
    """The trigger sends ``pgnotify.context`` unparsed; one that JSON cannot read for
    its depth (a RecursionError, not a ValueError) leaves the change without one."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('pgnotify.context', %s, true)", ["[" * 2000])
        order = Order.objects.create(status="deep")

    (event,) = changes.wait(1)

    assert (event.pk, event.fields["status"], event.context) == (order.pk, "deep", None)


def test_version_1_payloads_still_decode():
    row = {"pk": 1, "fields": {"status": "paid"}, "old": {"status": "new"}, "changed": ["status"]}

    change = decode_one(Order, message_v1("testapp.order", "update", row))

    assert (change.fields, change.old, change.changed) == (
        {"status": "paid"},
        {"status": "new"},
        frozenset({"status"}),
    )
    assert decode_one(Order, message_v1("testapp.order", "delete", {"pk": 2, "truncated": True}))


def test_version_1_updates_name_changed_columns_by_field_and_a_truncated_one_has_no_old():
    column = "La bel's $$ é"
    row = {"pk": 3, "fields": {column: "new"}, "old": {column: "old"}, "changed": [column]}

    change = decode_one(Weird, message_v1("testapp.weird", "update", row))
    truncated = decode_one(
        Weird, message_v1("testapp.weird", "update", {"pk": 4, "truncated": True})
    )

    assert (change.fields, change.old, change.changed) == (
        {"label": "new"},
        {"label": "old"},
        frozenset({"label"}),
    )
    assert (truncated.truncated, truncated.fields, truncated.old, truncated.changed) == (
        True,
        {},
        None,
        frozenset(),
    )


def test_one_message_of_many_rows_gives_one_row_change_per_row_in_order():
    rows = [{"pk": i, "fields": {"status": f"s{i}", "total": "1.50"}} for i in range(50)]

    changes = Decoder([Order]).decode(message("testapp.order", "insert", *rows))

    assert [c.pk for c in changes] == list(range(50))
    assert changes[7].fields == {"status": "s7", "total": Decimal("1.50")}
    assert len({c.timestamp for c in changes}) == 1


def test_the_changed_mask_names_the_watched_fields_that_changed():
    payload = json.dumps(
        {
            "v": 2,
            "model": "testapp.order",
            "action": "update",
            "xid": 1,
            "ts": 1,
            "fields": ["status"],
            "watched": ["status", "total"],
            "rows": [[1, "a", "b", 2], [2, "a", "a", 0], [3, "a", "b", 3]],
        }
    )

    changes = Decoder([Order]).decode(payload)

    assert [c.changed for c in changes] == [
        frozenset({"total"}),
        frozenset(),
        frozenset({"status", "total"}),
    ]


@pytest.mark.parametrize(
    "mask",
    [True, 1.0, [1], {"1": 1}, "1.0", "status"],
    ids=["true", "float", "array", "object", "text", "a name"],
)
@pytest.mark.parametrize("seen", ["first", "after a valid mask"])
def test_a_changed_mask_of_another_type_is_a_decode_error_whatever_came_before(mask, seen):
    """true and 1.0 equal 1 in Python: a mask 1 seen before must not make them valid."""

    def update(mask):
        return json.dumps(
            {
                "v": 2,
                "model": "testapp.order",
                "action": "update",
                "xid": 1,
                "ts": 1,
                "fields": [],
                "watched": ["status"],
                "rows": [[1, mask]],
            }
        )

    decoder = Decoder([Order])
    if seen != "first":
        assert decoder.decode(update(1))[0].changed == {"status"}
        assert decoder.decode(update("1"))[0].changed == {"status"}

    neither = r"changed mask .* is neither an integer nor a string of digits"
    with pytest.raises(DecodeError, match=neither):
        decoder.decode(update(mask))


def test_decoded_changes_equal_those_built_by_the_constructor_and_stay_immutable():
    from dataclasses import FrozenInstanceError, replace

    from django_pgnotify.events import RowChange

    update = {"pk": 3, "fields": {"status": "b"}, "old": {"status": "a"}, "changed": ["status"]}
    payload = message("testapp.order", "update", update, {"pk": 4, "truncated": True})
    full, truncated = Decoder([Order]).decode(payload, channel="c", pid=9, event_id=11)

    assert full == RowChange(
        model=Order,
        action="update",
        pk=3,
        fields={"status": "b"},
        old={"status": "a"},
        changed=frozenset({"status"}),
        channel="c",
        pid=9,
        xid=7,
        timestamp=datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=timezone.utc),
        durable=True,
        event_id=11,
    )
    assert truncated == replace(
        full, pk=4, fields={}, old=None, changed=frozenset(), truncated=True
    )
    assert truncated.fields is not Decoder([Order]).decode(payload)[1].fields
    with pytest.raises(FrozenInstanceError):
        full.pk = 5  # type: ignore[misc]
    assert hash(replace(truncated, fields=None)) == hash(replace(truncated, fields=None))


def test_a_changed_mask_beyond_64_bits_arrives_as_digits_and_names_its_columns():
    decoder = Decoder([Tag])
    watched = ["name", *(f"c{i}" for i in range(69)), "colour"]  # colour is bit 70
    payload = json.dumps(
        {
            "v": 2,
            "model": "testapp.tag",
            "action": "update",
            "xid": 7,
            "ts": 1.5,
            "fields": ["colour"],
            "watched": watched,
            "rows": [["blue", "red", "green", str(1 << 70 | 1)]],
        }
    )

    (change,) = decoder.decode(payload)

    assert change.changed == {"name", "colour"}
    assert change.fields == {"colour": "red"}


def test_numeric_sent_as_digits_becomes_an_exact_decimal():
    change = reading_with(amount="12345678901234.000010")

    assert change.fields["amount"] == Decimal("12345678901234.000010")
    assert str(change.fields["amount"]) == "12345678901234.000010"


def measurement_with(readings, grid, old=None):
    """A Measurement update carrying these arrays, new and ``old``, as sent."""
    row = {"pk": 1, "fields": {"readings": readings, "grid": grid}, "changed": ["readings"]}
    row["old"] = old or row["fields"]
    return decode_one(Measurement, message("testapp.measurement", "update", row))


def test_decimals_in_arrays_sent_as_strings_become_exact_decimals_at_any_depth():
    long = "12345678901234567890.1234567890"

    change = measurement_with(
        [long, None, "-0.0000000001"],
        [[long, None], ["NaN", "1.5000000000"]],
        old={"readings": [], "grid": None},
    )

    assert repr(change.fields) == repr(
        {
            "readings": [Decimal(long), None, Decimal("-0.0000000001")],
            "grid": [[Decimal(long), None], [Decimal("NaN"), Decimal("1.5000000000")]],
        }
    )
    assert change.old == {"readings": [], "grid": None}


def test_decimals_in_arrays_sent_as_json_numbers_by_earlier_triggers_still_become_decimals():
    # As triggers installed by earlier versions send them, until they are reinstalled.
    change = measurement_with([19.9, None, -1e-10, 3], [[0.1, None], [2, 12345678.12345678]])

    assert repr(change.fields) == repr(change.old)
    assert repr(change.fields) == repr(
        {
            "readings": [Decimal("19.9"), None, Decimal("-1E-10"), Decimal(3)],
            "grid": [[Decimal("0.1"), None], [Decimal(2), Decimal("12345678.12345678")]],
        }
    )


def test_decimals_in_arrays_of_a_version_1_payload_keep_every_digit():
    long = "12345678901234567890.1234567890"
    payload = message_v1(
        "testapp.measurement",
        "insert",
        {"pk": 1, "fields": {"readings": "READINGS", "grid": None}},
    ).replace('"READINGS"', f"[{long}, null]")

    change = decode_one(Measurement, payload)

    assert repr(change.fields["readings"]) == repr([Decimal(long), None])


# READING_INSERT's values as triggers send them in version 2: numeric and
# interval as strings of digits, json as its text.
READING_COLUMNS = {
    "order_id": 42,
    "taken_at": "2025-07-01T10:00:00.123456",
    "day": "2025-07-01",
    "at": "23:59:59.5",
    "took": "93784.500001",
    "amount": "12345678901234.123456",
    "ratio": 0.1,
    "flag": True,
    "data": '{"a": 1.5, "b": [1, null, "x"]}',
    "blob": "\\x00ff10",
    "token": "0b7e4c1a-93d2-4f65-8a10-5c2e9f3d7a41",
    "count": 9007199254740993,
}


def test_every_field_type_arrives_as_its_python_type_in_new_and_old_values_of_version_2():
    expected = decode_one(Reading, READING_INSERT).fields
    row = {
        "pk": str(READING_ID),
        "fields": READING_COLUMNS,
        "old": READING_COLUMNS,
        "changed": ["day"],
    }

    change = decode_one(Reading, message("testapp.reading", "update", row))

    assert change.fields == change.old == expected
    assert {name: type(value) for name, value in change.old.items()} == {
        name: type(value) for name, value in expected.items()
    }
    assert change.changed == frozenset({"day"})


def test_nulls_and_unconvertible_old_values_stay_as_sent():
    old = {"taken_at": None, "amount": "lots", "data": None, "token": 17}
    row = {"pk": str(READING_ID), "fields": dict.fromkeys(old), "old": old, "changed": []}

    change = decode_one(Reading, message("testapp.reading", "update", row))

    assert change.fields == dict.fromkeys(old)
    assert change.old == old


@pytest.mark.parametrize(
    "rows",
    [
        [{"pk": 1, "fields": {"status": "a", "total": "1.50"}}],
        [{"pk": 1, "truncated": True}],
        [{"pk": 1, "fields": {"status": "a", "total": "1"}}, {"pk": 2, "truncated": True}],
    ],
    ids=["one-row", "truncated", "many-rows"],
)
@pytest.mark.parametrize("action", ["insert", "update", "delete"])
@pytest.mark.parametrize("event_id", [None, 11])
def test_every_field_of_a_decoded_change_is_its_own_in_field_order(rows, action, event_id):
    from django_pgnotify.events import FIELD_ORDER, RowChange

    rows = [{**row, "old": row.get("fields"), "changed": []} for row in rows]
    changes = Decoder([Order]).decode(message("testapp.order", action, *rows), "c", 9, event_id)

    assert len(changes) == len(rows)
    for change in changes:
        # All stored, none left to a class default; the order instances share.
        assert tuple(vars(change)) == FIELD_ORDER
        assert change == RowChange(**{name: vars(change)[name] for name in FIELD_ORDER})
        assert (change.action, change.durable, change.event_id) == (
            action,
            event_id is not None,
            event_id,
        )
    assert len({id(vars(change)) for change in changes}) == len(changes)
    assert len({id(change.fields) for change in changes}) == len(changes)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        ("1.5", datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=timezone.utc)),
        ("2", datetime(1970, 1, 1, 0, 0, 2, tzinfo=timezone.utc)),
        ('"2"', None),
    ],
    ids=["float", "int", "string"],
)
def test_the_timestamp_is_read_from_a_float_or_an_int(seconds, expected):
    payload = message("testapp.tag", "insert", {"pk": "blue"}).replace(
        '"ts": 1.5', f'"ts": {seconds}'
    )

    assert decode_one(Tag, payload).timestamp == expected


def test_a_decoder_reads_a_shape_it_knows_as_it_read_it_first(monkeypatch):
    from django_pgnotify import wire

    decoder = Decoder([Order])
    row = {"pk": 1, "fields": {"status": "a", "total": "1.50"}}
    payload = message("testapp.order", "insert", row)
    first = decoder.decode(payload)
    shapes = len(decoder._layouts)

    assert decoder.decode(payload) == first
    wire._shapes.clear()  # a new Shape object for the same shape: a new key, same layout
    assert decoder.decode(payload) == first
    assert len(decoder._layouts) == shapes + 1
    monkeypatch.setattr(wire, "_shapes", {})
    monkeypatch.setattr(decoder, "_layouts", dict.fromkeys(range(1024)))  # full: emptied
    assert decoder.decode(payload) == first
    assert len(decoder._layouts) == 1


@pytest.mark.parametrize("first", ["old values", "new values alone"])
def test_updates_with_and_without_old_values_of_one_model_are_read_each_by_its_layout(first):
    # Tag declares no fields: both update shapes have no fields and no watched
    # columns, and only "old": false tells [pk, mask] from a new-values row [pk].
    with_old = json.dumps(
        {"v": 2, "model": "testapp.tag", "action": "update", "xid": 7, "ts": 1.5,
         "fields": [], "watched": [], "rows": [[1, 0]]}
    )  # fmt: skip
    new_only = json.dumps(
        {"v": 2, "model": "testapp.tag", "action": "update", "xid": 7, "ts": 1.5,
         "fields": [], "old": False, "rows": [[2]]}
    )  # fmt: skip
    decoder = Decoder([Tag])
    payloads = [with_old, new_only] if first == "old values" else [new_only, with_old]

    changes = {
        change.pk: change
        for payload in payloads
        for change in decoder.decode(payload, channel="pgnotify_test", pid=1)
    }

    assert (changes[1].truncated, changes[1].old, changes[1].changed) == (False, {}, frozenset())
    assert (changes[2].truncated, changes[2].old, changes[2].changed) == (False, None, frozenset())


# Arrays of every type, and fields with a from_db_value of their own


LOGBOOK_VALUES = {
    # As to_json() renders them in a session with TimeZone America/New_York,
    # IntervalStyle postgres_verbose and bytea_output escape.
    "moments": ["2025-06-01T08:00:00.5-04:00", None, "1890-06-01T07:03:58.5-04:56:02"],
    "shifts": [["2025-06-01T08:00:00-04:00"], [None]],
    "days": ["2025-06-01", None],
    "times": ["23:59:59.000001", None],
    "spans": [["@ 1 day 2 hours ago", None], ["@ 1 year 2 mons -3 days 4.5 secs", "@ 0"]],
    "tokens": [str(TOKEN), None],
    "blobs": ["\\000\\377ab", "\\\\x", "", None],
    "ratios": [1, 0.5, "NaN", None],
    "names": ["a", None],
    "secret": "sealed:nop",
    "secrets": ["sealed:nop", None],
    "tags": None,
    "seen_at": "2025-06-01T12:00:00",
}
LOGBOOK_FIELDS = {
    "moments": [
        datetime(2025, 6, 1, 12, 0, 0, 500000, tzinfo=timezone.utc),
        None,
        datetime(1890, 6, 1, 12, 0, 0, 500000, tzinfo=timezone.utc),
    ],
    "shifts": [[datetime(2025, 6, 1, 12, tzinfo=timezone.utc)], [None]],
    "days": [date(2025, 6, 1), None],
    "times": [time(23, 59, 59, 1), None],
    "spans": [
        [-timedelta(days=1, hours=2), None],
        [timedelta(days=365 + 60 - 3, seconds=4, microseconds=500000), timedelta(0)],
    ],
    "tokens": [TOKEN, None],
    "blobs": [b"\x00\xffab", b"\\x", b"", None],
    "ratios": [1.0, 0.5, math.nan, None],
    "names": ["a", None],
    "secret": "abc",
    "secrets": ["abc", None],
    "tags": [],
    "seen_at": datetime(2025, 6, 1, 14, tzinfo=ZoneInfo("Europe/Berlin")),
}


@pytest.mark.parametrize("version", [1, 2])
def test_array_elements_and_custom_fields_become_what_the_orm_gives(version):
    from tests.testapp.models import Logbook

    row = {"pk": 1, "fields": LOGBOOK_VALUES}
    build = message_v1 if version == 1 else message

    change = decode_one(Logbook, build("testapp.logbook", "insert", row))

    # repr() tells 1.0 from 1 and an aware UTC datetime from one in another zone.
    assert repr(change.fields) == repr(LOGBOOK_FIELDS)


def test_datetimes_in_arrays_are_naive_in_the_default_time_zone_without_use_tz():
    from tests.testapp.models import Logbook

    row = {"pk": 1, "fields": {"moments": ["2025-06-01T08:00:00.5-04:00", None]}}

    with override_settings(USE_TZ=False):  # TIME_ZONE is Europe/Berlin
        change = decode_one(Logbook, message("testapp.logbook", "insert", row))

    assert repr(change.fields["moments"]) == repr([datetime(2025, 6, 1, 14, 0, 0, 500000), None])


def test_an_offset_with_seconds_is_read_after_a_fraction_of_a_second():
    from tests.testapp.models import Logbook

    # Local mean time in Kolkata: Python 3.10 reads this with the decoder's help.
    row = {"pk": 1, "fields": {"moments": ["1890-06-01T17:53:28.5+05:53:28"]}}

    change = decode_one(Logbook, message("testapp.logbook", "insert", row))

    assert change.fields["moments"] == [datetime(1890, 6, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)]


class DecimalDecoder(json.JSONDecoder):
    """Reads JSON numbers with a fraction as ``Decimal``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "parse_float": Decimal})


class LoadedJSONField(models.JSONField):
    """Wraps what ``JSONField.from_db_value`` reads from the column's text."""

    def from_db_value(self, value, expression, connection):
        return {"loaded": super().from_db_value(value, expression, connection)}


@isolate_apps("tests.testapp")
def test_json_in_arrays_and_json_fields_with_their_own_from_db_value_are_read_once():
    from django.contrib.postgres.fields import ArrayField

    class Documents(models.Model):
        plain = ArrayField(models.JSONField(null=True))
        exact = ArrayField(models.JSONField(null=True, decoder=DecimalDecoder))
        grid = ArrayField(ArrayField(models.JSONField(null=True, decoder=DecimalDecoder)))
        loaded = LoadedJSONField(null=True)

        class Meta:
            app_label = "testapp"

    # As triggers send them: jsonb[] embedded by to_json(), but the elements' texts for
    # a decoder of its own (as the ORM has it read them); jsonb as its text.
    elements = [{"a": 1.5}, None, [1, 2.25], "text"]
    row = {
        "pk": 1,
        "fields": {
            "plain": elements,
            "exact": ['{"a": 1.50}', None, "[1, 2.25]", '"text"'],
            "grid": [['{"a": 1.5}'], ["[0.250]"]],
            "loaded": '{"a": 1.5}',
        },
    }

    change = decode_one(Documents, message("testapp.documents", "insert", row))

    assert repr(change.fields) == repr(
        {
            "plain": elements,
            "exact": [{"a": Decimal("1.50")}, None, [1, Decimal("2.25")], "text"],
            "grid": [[{"a": Decimal("1.5")}], [[Decimal("0.250")]]],
            "loaded": {"loaded": {"a": 1.5}},
        }
    )
    # As triggers of earlier versions sent them, embedded: read as they were read then.
    row["fields"] = {"exact": elements[:3], "grid": [[{"a": 1.5}], [[0.25]]]}
    change = decode_one(Documents, message("testapp.documents", "insert", row))
    assert repr(change.fields) == repr(
        {
            "exact": [{"a": Decimal("1.5")}, None, [1, Decimal("2.25")]],
            "grid": [[{"a": Decimal("1.5")}], [[Decimal("0.25")]]],
        }
    )


@isolate_apps("tests.testapp")
def test_a_foreign_key_reads_its_column_through_the_converters_of_the_field_it_points_to():
    from tests.testapp.models import SealedTextField

    class Code(models.Model):
        code = SealedTextField(primary_key=True)

        class Meta:
            app_label = "testapp"

    class Use(models.Model):
        code = models.ForeignKey(Code, on_delete=models.CASCADE)

        class Meta:
            app_label = "testapp"

    use = decode_one(
        Use, message("testapp.use", "insert", {"pk": 1, "fields": {"code_id": "sealed:nop"}})
    )
    code = decode_one(Code, message("testapp.code", "delete", {"pk": "sealed:nop", "fields": {}}))

    assert use.fields == {"code_id": "abc"}
    assert code.pk == "abc"


class WrappedId(int):
    """An id as a hashid-style field's ``from_db_value`` gives it."""


class WrappedIdField(models.BigAutoField):
    def from_db_value(self, value, expression, connection):
        return None if value is None else WrappedId(value)


@isolate_apps("tests.testapp")
def test_an_integer_pk_goes_through_its_fields_from_db_value_in_either_wire_version():
    class Wrapped(models.Model):
        id = WrappedIdField(primary_key=True)

        class Meta:
            app_label = "testapp"

    row = {"pk": 5, "fields": {"id": 5}}
    current = decode_one(Wrapped, message("testapp.wrapped", "insert", row))
    version_1 = decode_one(Wrapped, message_v1("testapp.wrapped", "insert", row))

    assert type(current.pk) is WrappedId and current.pk == 5
    assert type(current.fields["id"]) is WrappedId
    assert type(version_1.pk) is WrappedId


def test_payloads_of_ever_new_shapes_keep_the_decoders_memory_bounded(monkeypatch):
    # Anyone may notify on a model's channel: shapes it never declared must not
    # accumulate without end. (The wire module's own cache of shapes, shared by the
    # whole process, is bounded too: it is replaced here so other tests find room.)
    monkeypatch.setattr(wire, "_shapes", {})
    decoder = Decoder([Tag])
    for i in range(1500):
        payload = json.dumps(
            {"v": 2, "model": "testapp.tag", "action": "insert", "xid": 7, "ts": 1.5,
             "fields": [f"c{i}"], "rows": [["red", i]]}
        )  # fmt: skip
        decoder.decode(payload, channel="pgnotify_test", pid=4242)

    codec = decoder._codecs["testapp.tag"]
    assert len(codec._layouts) <= 1024
    assert len(decoder._layouts) <= 1024
    # And the shapes that come after are cached still: each is read the slow way once.
    payload = json.dumps(
        {"v": 2, "model": "testapp.tag", "action": "insert", "xid": 7, "ts": 1.5,
         "fields": ["name"], "rows": [["red", "blue"]]}
    )  # fmt: skip
    shape = wire.read_shape(payload)[0]
    decoder.decode(payload, channel="pgnotify_test", pid=4242)
    assert wire.read_shape(payload)[0] is shape
    assert shape in decoder._layouts
    assert (("name",), (), "insert", True) in codec._layouts


# Fields the decoder reads by their column type: what the ORM reads, not what the
# field's to_python would make of it


class ShoutedField(models.Field):
    """A text column whose ``to_python`` cleans what forms give (the ORM never calls it)."""

    def db_type(self, connection):
        return "text"

    def to_python(self, value):
        return value if value is None else value.upper()


class TokenField(models.Field):
    """A ``uuid`` column, which the database adapter reads into a ``UUID``."""

    def db_type(self, connection):
        return "uuid"


class SpanField(models.Field):
    """An ``interval`` column, which the database adapter reads into a ``timedelta``."""

    def db_type(self, connection):
        return "interval"


class StampField(models.Field):
    """A ``timestamp(3) with time zone`` column, read into an aware ``datetime``."""

    def db_type(self, connection):
        return "timestamp(3) with time zone"


class ShiftField(DateTimeRangeField):
    """A range field's subclass: its internal type is its class name."""


BY_TYPE_TABLE = "pgnotify_test_by_type"
BY_TYPE_FIELDS = ["unpacked", "address", "slug", "shouted", "token", "span", "stamp", "shift"]


@pytest.fixture
def by_type_table(other_connection):
    """A table of columns the decoder reads by their type, with its model."""
    with throwaway_model(
        other_connection,
        BY_TYPE_TABLE,
        f"CREATE TABLE {BY_TYPE_TABLE} (id integer PRIMARY KEY, unpacked inet, address inet,"
        " slug varchar(50), shouted text, token uuid, span interval,"
        " stamp timestamp(3) with time zone, shift tstzrange)",
        f"DROP TABLE IF EXISTS {BY_TYPE_TABLE}",
        "ByTypeRow",
        id=models.IntegerField(primary_key=True),
        unpacked=models.GenericIPAddressField(unpack_ipv4=True, null=True),
        address=models.GenericIPAddressField(null=True),
        slug=models.SlugField(null=True),
        shouted=ShoutedField(null=True),
        token=TokenField(null=True),
        span=SpanField(null=True),
        stamp=StampField(null=True),
        shift=ShiftField(null=True),
    ) as model:
        yield model


@pytest.mark.parametrize("level", ["statement", "row"])
def test_fields_read_by_column_type_arrive_as_the_orm_reads_them_not_as_to_python_cleans_them(
    by_type_table, other_connection, level, caplog
):
    model = by_type_table
    declaration = install(model, other_connection, Notify(fields=BY_TYPE_FIELDS, level=level))
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        # Written by hand, in a session whose settings show in to_json's renderings.
        other_connection.execute("SET TimeZone = 'Asia/Kolkata'")
        other_connection.execute("SET IntervalStyle = 'sql_standard'")
        other_connection.execute(
            f"INSERT INTO {BY_TYPE_TABLE} VALUES"
            " (1, '::ffff:10.0.0.1', '2001:db8::1/64', 'a-slug', 'quiet',"
            " '0b7e4c1a-93d2-4f65-8a10-5c2e9f3d7a41', '1 day -02:00:00.5',"
            " '2025-03-30 00:59:59.123+00', '[\"2024-01-01 10:00+00\",)'),"
            " (2, '10.0.0.1', '10.1.2.3/8', NULL, NULL, NULL, NULL, NULL, 'empty')"
        )
        other_connection.execute(
            f"UPDATE {BY_TYPE_TABLE} SET unpacked = '::ffff:192.0.2.1' WHERE id = 2"
        )
        with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
            events = receive(listening, model, 3)
    read = {row.pk: row for row in model.objects.all()}

    assert [(e.action, e.pk) for e in events] == [("insert", 1), ("insert", 2), ("update", 2)]
    # What the ORM reads: as stored, typed as the database adapter types the column.
    assert read[1].unpacked == "::ffff:10.0.0.1"
    assert read[1].address == "2001:db8::1/64"
    assert read[1].shouted == "quiet"
    assert read[1].token == uuid.UUID("0b7e4c1a-93d2-4f65-8a10-5c2e9f3d7a41")
    assert read[1].span == timedelta(days=1, hours=-2, milliseconds=-500)
    assert read[2].unpacked == "::ffff:192.0.2.1"
    for event in events:
        # repr() tells an aware UTC datetime from one in another zone, and str from UUID.
        expected = {name: getattr(read[event.pk], name) for name in BY_TYPE_FIELDS}
        if event.action == "insert" and event.pk == 2:
            expected["unpacked"] = "10.0.0.1"
        assert repr(event.fields) == repr(expected)
    assert events[2].old["unpacked"] == "10.0.0.1"
    assert events[2].changed == {"unpacked"}
    assert caplog.records == []  # nothing was passed on as sent


class MoneyField(models.Field):
    """A ``numeric(30, 2)`` column, which the database adapter reads into an exact ``Decimal``."""

    def db_type(self, connection):
        return "numeric(30, 2)"


class MoniesField(models.Field):
    """A ``numeric(30, 2)[]`` column of a field that is no ``ArrayField``."""

    def db_type(self, connection):
        return "numeric(30, 2)[]"


class JsonbTextField(models.Field):
    """A ``jsonb`` column, which Django has the database adapter read as its text."""

    def db_type(self, connection):
        return "jsonb"


class ParsedJsonbField(JsonbTextField):
    """A ``jsonb`` column whose ``from_db_value`` parses the text the ORM reads."""

    def from_db_value(self, value, expression, connection):
        return None if value is None else json.loads(value)


class DaysField(DateRangeField):
    """A range field's subclass: its internal type is its class name."""


class ClockField(models.Field):
    """An ``interval`` column with field qualifiers and a precision."""

    def db_type(self, connection):
        return "interval day to second(3)"


CUSTOM_TABLE = "pgnotify_test_custom_types"
CUSTOM_FIELDS = ["money", "doc", "parsed", "stamp", "span", "shift", "days", "monies", "amounts"]


@pytest.fixture
def custom_types_table(other_connection):
    """A table of custom fields whose internal type is not Django's, with its model."""
    with throwaway_model(
        other_connection,
        CUSTOM_TABLE,
        f"CREATE TABLE {CUSTOM_TABLE} (id integer PRIMARY KEY, money numeric(30, 2),"
        " doc jsonb, parsed jsonb, stamp timestamp(3) with time zone, span interval,"
        " shift tstzrange, days daterange, monies numeric(30, 2)[], amounts numeric(30, 2)[])",
        f"DROP TABLE IF EXISTS {CUSTOM_TABLE}",
        "CustomTypesRow",
        id=models.IntegerField(primary_key=True),
        money=MoneyField(null=True),
        doc=JsonbTextField(null=True),
        parsed=ParsedJsonbField(null=True),
        stamp=StampField(null=True),
        span=SpanField(null=True),
        shift=ShiftField(null=True),
        days=DaysField(null=True),
        monies=ArrayField(MoneyField(), null=True),
        amounts=MoniesField(null=True),
    ) as model:
        yield model


@pytest.mark.parametrize("level", ["statement", "row"])
def test_custom_fields_are_rendered_by_their_column_type_and_arrive_as_the_orm_reads_them(
    custom_types_table, other_connection, level, caplog
):
    """A custom field's numeric keeps every digit, its jsonb arrives as the text the ORM
    reads, its timestamptz and ranges of moments whatever the writer's session."""
    model = custom_types_table
    declaration = install(model, other_connection, Notify(fields=CUSTOM_FIELDS, level=level))
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        # Written by hand, in a session whose settings show in to_json's renderings.
        other_connection.execute("SET DateStyle = 'SQL, DMY'")
        other_connection.execute("SET TimeZone = 'America/New_York'")
        other_connection.execute("SET IntervalStyle = 'sql_standard'")
        other_connection.execute(
            f"INSERT INTO {CUSTOM_TABLE} VALUES"
            ' (1, \'1234567890123456789012.34\', \'{"b": [1, 2.50], "a": "x"}\','
            " '{\"n\": 1.10}', '2025-03-30 00:59:59.123+00', '1 day -02:00:00.5',"
            " '[\"2024-01-01 10:00+00\",\"2024-07-01 10:00+00\")', '[2024-01-31,2024-02-29)',"
            " '{{1.50,NULL},{1234567890123456789012.34,2}}', '{1.50,2.00}'),"
            " (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        )
        before = {row.pk: row for row in model.objects.all()}
        other_connection.execute(
            f"UPDATE {CUSTOM_TABLE} SET money = '1.50', parsed = '[1.0, null]',"
            " stamp = stamp + interval '1 day', span = span * 3, days = '[2024-03-01,)',"
            " shift = '(,\"2025-11-21 09:02:11.5-05\"]', monies = '{0.10}',"
            " amounts = '{NULL,10.00}' WHERE id = 1"
        )
        with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
            events = receive(listening, model, 3)
    after = {row.pk: row for row in model.objects.all()}

    assert [(e.action, e.pk) for e in events] == [("insert", 1), ("insert", 2), ("update", 1)]
    # What the ORM reads: every digit, jsonb as its text (parsed by from_db_value), in UTC.
    assert before[1].money == Decimal("1234567890123456789012.34")
    assert after[1].money == Decimal("1.50") and str(after[1].money) == "1.50"
    assert before[1].doc == '{"a": "x", "b": [1, 2.50]}'
    assert before[1].parsed == {"n": 1.1}
    assert before[1].days.lower == date(2024, 1, 31)

    def orm(row):
        return {name: getattr(row, name) for name in CUSTOM_FIELDS}

    # repr() tells Decimal('1.50') from Decimal('1.5'), str from dict, and the zone.
    assert repr(events[0].fields) == repr(orm(before[1]))
    assert repr(events[1].fields) == repr(orm(before[2]))
    assert repr(events[2].fields) == repr(orm(after[1]))
    assert repr(events[2].old) == repr(orm(before[1]))
    assert events[2].changed == {
        "money",
        "parsed",
        "stamp",
        "span",
        "days",
        "shift",
        "monies",
        "amounts",
    }
    assert caplog.records == []  # nothing was passed on as sent


class ZonedTimeField(models.Field):
    """A ``time with time zone`` column, which the database adapter reads into an aware time."""

    def db_type(self, connection):
        return "time(3) with time zone"


ZONED_TABLE = "pgnotify_test_zoned_times"


@pytest.mark.parametrize("level", ["statement", "row"])
def test_a_custom_time_with_zone_column_arrives_as_the_aware_time_the_orm_reads(
    other_connection, level, caplog
):
    """``timetz`` has no Django field: its values arrive as the ORM reads them, aware
    ``time`` objects with their offsets (seconds too), not as their text."""
    with throwaway_model(
        other_connection,
        ZONED_TABLE,
        f"CREATE TABLE {ZONED_TABLE} (id integer PRIMARY KEY, clock time(3) with time zone,"
        " clocks timetz[])",
        f"DROP TABLE IF EXISTS {ZONED_TABLE}",
        "ZonedTimesRow",
        id=models.IntegerField(primary_key=True),
        clock=ZonedTimeField(null=True),
        clocks=ArrayField(ZonedTimeField(), null=True),
    ) as model:
        declaration = install(
            model, other_connection, Notify(fields=["clock", "clocks"], level=level)
        )
        with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
            listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
            other_connection.execute(
                f"INSERT INTO {ZONED_TABLE} VALUES"
                " (1, '12:34:56.5+02', '{23:59:59.999999-14,NULL,00:00+05:53:28}'),"
                " (2, NULL, NULL)"
            )
            with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
                events = receive(listening, model, 2)
        read = {row.pk: row for row in model.objects.all()}

    assert read[1].clock == time(12, 34, 56, 500000, tzinfo=timezone(timedelta(hours=2)))
    assert [(e.action, e.pk) for e in events] == [("insert", 1), ("insert", 2)]
    for event in events:
        # repr() tells an aware time from a naive one, and from its text.
        expected = {"clock": read[event.pk].clock, "clocks": read[event.pk].clocks}
        assert repr(event.fields) == repr(expected)
    assert caplog.records == []  # nothing was passed on as sent


@isolate_apps("tests.testapp")
def test_custom_fields_are_rendered_as_the_django_field_of_their_column_type():
    """Other column types, and Django's own fields, keep their internal type."""

    class Odd(models.Model):
        money = MoneyField()
        amounts = MoniesField()
        monies = ArrayField(ArrayField(MoneyField()))
        span = SpanField()
        clock = ClockField()
        shift = ShiftField()
        shouted = ShoutedField()
        wall = WallClockDateTimeField()
        doubled = models.GeneratedField(
            expression=models.F("money") * 2, output_field=MoneyField(), db_persist=True
        )

        class Meta:
            app_label = "testapp"

    (declaration,), errors = resolve_model(Odd, Notify(fields="__all__"))
    assert not errors

    assert {c.field: (c.internal_type, c.element_type) for c in declaration.fields} == {
        "money": ("DecimalField", None),
        "amounts": ("ArrayField", "DecimalField"),
        "monies": ("ArrayField", "DecimalField"),
        "span": ("DurationField", None),
        "clock": ("DurationField", None),
        "shift": ("DateTimeRangeField", None),
        "shouted": ("ShoutedField", None),
        "wall": ("DateTimeField", None),
        "doubled": ("DecimalField", None),  # its output field's column type
    }


@isolate_apps("tests.testapp")
@pytest.mark.parametrize(
    "sent", ["::ffff:10.0.0.1", "2001:db8::1/64", "::ffff:10.0.0.1/128", "10.1.2.3/8"]
)
def test_an_inet_arrives_as_its_text_whatever_the_fields_to_python_would_clean(sent, caplog):
    """The ORM reads inet as PostgreSQL's text: it does not unpack an IPv4-mapped address,
    and an address with a netmask, which to_python refuses, is no value it cannot read."""

    class Host(models.Model):
        unpacked = models.GenericIPAddressField(unpack_ipv4=True)
        address = models.GenericIPAddressField()

        class Meta:
            app_label = "testapp"

    row = {"pk": 1, "fields": {"unpacked": sent, "address": sent}}

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        change = decode_one(Host, message("testapp.host", "insert", row))

    assert change.fields == {"unpacked": sent, "address": sent}
    assert caplog.records == []


class Wrapped(str):
    """What ``WrappedTokenField.from_db_value`` returns: the text of what it was given."""


class WrappedTokenField(models.Field):
    """A ``uuid`` column whose ``from_db_value`` shows what the database adapter gave it."""

    def db_type(self, connection):
        return "uuid"

    def from_db_value(self, value, expression, connection):
        return None if value is None else Wrapped(f"{type(value).__name__}:{value}")


@isolate_apps("tests.testapp")
def test_a_from_db_value_of_a_field_read_by_column_type_is_given_what_the_adapter_gives():
    class Ticket(models.Model):
        token = WrappedTokenField(null=True)
        tokens = ArrayField(TokenField(), null=True)

        class Meta:
            app_label = "testapp"

    row = {"pk": 1, "fields": {"token": str(TOKEN), "tokens": [[str(TOKEN)], [None]]}}

    change = decode_one(Ticket, message("testapp.ticket", "insert", row))

    assert change.fields == {"token": f"UUID:{TOKEN}", "tokens": [[TOKEN], [None]]}


class WallTimestampField(models.Field):
    """A ``timestamp(3)`` column, without time zone: read into a naive ``datetime``."""

    def db_type(self, connection):
        return "timestamp(3)"


class LocalTimestampField(models.Field):
    def db_type(self, connection):
        return "timestamp without time zone"


class SingleFloatField(models.Field):
    """A ``real`` column: whole values are JSON integers, which the ORM reads as floats."""

    def db_type(self, connection):
        return "real"


class DoubleFloatField(models.Field):
    def db_type(self, connection):
        return "double precision"


class ClockTimeField(models.Field):
    def db_type(self, connection):
        return "time"


class DayField(models.Field):
    def db_type(self, connection):
        return "date"


class AmountsField(models.Field):
    def db_type(self, connection):
        return "numrange"


class CountsField(models.Field):
    def db_type(self, connection):
        return "int8range"


class PriceField(models.Field):
    def db_type(self, connection):
        return "decimal(30, 2)"


class BlobField(models.Field):
    """A ``bytea`` column: in an array, its elements come in the writer's ``bytea_output``."""

    def db_type(self, connection):
        return "bytea"


MORE_TYPES_TABLE = "pgnotify_test_more_types"
MORE_TYPES_FIELDS = [
    "wall",
    "local",
    "single",
    "double",
    "clock",
    "day",
    "amounts",
    "counts",
    "price",
    "blobs",
    "decimals",
    "bigs",
    "took",
    "doc",
]


@pytest.fixture
def more_types_table(other_connection):
    """A table of columns whose JSON value is not yet the Python value the ORM gives
    (whole floats, exact range bounds, a naive timestamp...), with its model."""
    from django.contrib.postgres.fields import BigIntegerRangeField, DecimalRangeField

    with throwaway_model(
        other_connection,
        MORE_TYPES_TABLE,
        f"CREATE TABLE {MORE_TYPES_TABLE} (id integer PRIMARY KEY, wall timestamp(3),"
        " local timestamp, single real, double double precision, clock time, day date,"
        " amounts numrange, counts int8range, price decimal(30, 2), blobs bytea[],"
        " decimals numrange, bigs int8range, took interval, doc jsonb)",
        f"DROP TABLE IF EXISTS {MORE_TYPES_TABLE}",
        "MoreTypesRow",
        id=models.IntegerField(primary_key=True),
        wall=WallTimestampField(null=True),
        local=LocalTimestampField(null=True),
        single=SingleFloatField(null=True),
        double=DoubleFloatField(null=True),
        clock=ClockTimeField(null=True),
        day=DayField(null=True),
        amounts=AmountsField(null=True),
        counts=CountsField(null=True),
        price=PriceField(null=True),
        blobs=ArrayField(BlobField(null=True), null=True),
        decimals=DecimalRangeField(null=True),
        bigs=BigIntegerRangeField(null=True),
        took=models.DurationField(null=True),
        doc=models.JSONField(null=True, decoder=DecimalDecoder),
    ) as model:
        yield model


def test_values_json_gives_as_another_type_arrive_as_the_orm_reads_them(
    more_types_table, other_connection, caplog
):
    """Whole floats are JSON integers, range bounds and durations must keep every
    digit, a timestamp without time zone stays naive, a JSON field's decoder applies."""
    model = more_types_table
    declaration = install(model, other_connection, Notify(fields=MORE_TYPES_FIELDS))
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as listening:
        listening.execute(sql.SQL("LISTEN {}").format(sql.Identifier(declaration.channel)))
        # Written by hand, in a session whose settings show in to_json's renderings.
        other_connection.execute("SET DateStyle = 'SQL, DMY'")
        other_connection.execute("SET TimeZone = 'America/New_York'")
        other_connection.execute("SET bytea_output = 'escape'")
        other_connection.execute(
            f"INSERT INTO {MORE_TYPES_TABLE} VALUES"
            " (1, '2025-03-30 02:30:00.125', '2025-11-02 01:30:00', 2, 3, '23:59:59.5',"
            " '2024-02-29', '[0.10,2.25)', '[-9000000000,9000000000)',"
            " '1234567890123456789012.30', ARRAY['\\x00ff'::bytea, NULL, 'cafe', '\\x5c'],"
            " '(,0.1]', '[1,9007199254740993]', '100 days 00:00:00.000004',"
            ' \'{"n": 1.10, "m": [0.1]}\'),'
            " (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
            " NULL, NULL)"
        )
        with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
            events = receive(listening, model, 2)
    read = {row.pk: row for row in model.objects.all()}

    assert [(e.action, e.pk) for e in events] == [("insert", 1), ("insert", 2)]
    # What the ORM reads: the comparison below means something.
    assert repr(read[1].wall) == repr(datetime(2025, 3, 30, 2, 30, 0, 125000))
    assert repr(read[1].single) == repr(2.0)
    assert read[1].blobs == [b"\x00\xff", None, b"cafe", b"\\"]
    assert read[1].took == timedelta(days=100, microseconds=4)
    assert read[1].doc == {"n": Decimal("1.10"), "m": [Decimal("0.1")]}
    for event in events:
        # repr() tells 2.0 from 2, Decimal('0.1') from 0.1 and a naive datetime from UTC.
        expected = {name: getattr(read[event.pk], name) for name in MORE_TYPES_FIELDS}
        assert repr(event.fields) == repr(expected)
    assert caplog.records == []  # nothing was passed on as sent


@isolate_apps("tests.testapp")
def test_an_interval_of_a_custom_field_sent_in_its_interval_style_is_still_read(caplog):
    """Triggers installed before such a column was sent in seconds sent the writer's
    IntervalStyle text: read so until they are reinstalled."""

    class Timer(models.Model):
        span = SpanField(null=True)

        class Meta:
            app_label = "testapp"

    sent = {
        "93784.5": timedelta(days=1, hours=2, minutes=3, seconds=4.5),
        "1 day -02:00:00.5": timedelta(days=1, hours=-2, milliseconds=-500),
        "@ 1 day -2 hours ago": timedelta(days=-1, hours=2),
        "P-1DT2H": timedelta(days=-1, hours=2),
    }

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        spans = {
            text: decode_one(
                Timer, message("testapp.timer", "insert", {"pk": 1, "fields": {"span": text}})
            ).fields["span"]
            for text in sent
        }

    assert spans == sent
    assert caplog.records == []


class NotNullTextField(models.TextField):
    """Refuses a NULL it reads, as a field that never expects one may."""

    def from_db_value(self, value, expression, connection):
        if value is None:
            raise ValueError("a NULL where none was expected")
        return value


@isolate_apps("tests.testapp")
def test_a_from_db_value_that_raises_for_null_passes_none_on_and_warns(caplog):
    class Note(models.Model):
        text = NotNullTextField(null=True)

        class Meta:
            app_label = "testapp"

    row = {"pk": 1, "fields": {"text": None}}

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.decoding"):
        change = decode_one(Note, message("testapp.note", "insert", row))

    assert change.fields == {"text": None}
    (record,) = caplog.records
    assert "testapp.Note.text value None" in record.getMessage()
    assert "a NULL where none was expected" in record.getMessage()


class UntypedField(models.Field):
    """A custom field whose ``db_type`` fails: its own code, which the decoder survives."""

    def db_type(self, connection):
        raise RuntimeError("no column type here")


@isolate_apps("tests.testapp")
def test_a_field_whose_column_type_cannot_be_found_is_taken_as_sent():
    class Gadget(models.Model):
        part = UntypedField(null=True)

        class Meta:
            app_label = "testapp"

    row = {"pk": 1, "fields": {"part": "x-1"}}

    assert decode_one(Gadget, message("testapp.gadget", "insert", row)).fields == {"part": "x-1"}
