"""The wire format: what a trigger sends and what the listener reads."""

import json
from decimal import Decimal

import pytest

from django_pgnotify import wire

# Version 1, as PostgreSQL's json_build_object renders it.
PAYLOAD = (
    '{"v" : 1, "model" : "shop.order", "action" : "update", "xid" : 5012, '
    '"ts" : 1763717550.123456, "rows" : [{"pk" : 7, '
    '"fields" : {"status" : "paid", "total" : 12345678901234.10}, '
    '"old" : {"status" : "new", "total" : 12345678901234.10}, "changed" : ["status"]}]}'
)


def payload(without: str = "", **changes) -> str:
    """``PAYLOAD`` with some keys changed, or one left out."""
    data = json.loads(PAYLOAD)
    data.update(changes)
    data.pop(without, None)
    return json.dumps(data)


def test_parse_reads_a_version_1_payload():
    message = wire.parse(PAYLOAD)

    assert message.model == "shop.order"
    assert message.action == "update"
    assert message.xid == 5012
    assert message.version == 1
    (row,) = message.rows
    assert row["pk"] == 7
    assert row["fields"]["status"] == "paid"
    assert row["changed"] == ["status"]


def test_parse_keeps_numbers_with_a_fraction_exact_as_decimal():
    message = wire.parse(PAYLOAD)

    assert message.timestamp == Decimal("1763717550.123456")
    assert message.rows[0]["fields"]["total"] == Decimal("12345678901234.10")
    assert str(message.rows[0]["fields"]["total"]) == "12345678901234.10"


def test_parse_reads_a_truncated_row():
    (row,) = wire.parse(payload(rows=[{"pk": None, "truncated": True}])).rows

    assert row == {"pk": None, "truncated": True}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"v": 1, "model": ',
        '["v", 1]',
        '"a string"',
        payload(v=3),
        payload(v="1"),
        payload(v=True),
        payload(without="v"),
        payload(model=None),
        payload(action="truncate"),
        payload(without="action"),
        payload(rows={"pk": 7}),
        payload(rows=[{"fields": {}}]),
        payload(rows=[7]),
        payload(rows=[{"pk": 7, "fields": ["paid"]}]),
        payload(rows=[{"pk": 7, "old": "new"}]),
        payload(rows=[{"pk": 7, "changed": "status"}]),
        payload(rows=[{"pk": 7, "changed": [1]}]),
    ],
    ids=[
        "not-json",
        "cut-short",
        "array",
        "string",
        "newer-version",
        "version-as-string",
        "version-true",
        "no-version",
        "no-model",
        "unknown-action",
        "no-action",
        "rows-not-a-list",
        "row-without-pk",
        "row-not-an-object",
        "fields-not-an-object",
        "old-not-an-object",
        "changed-not-a-list",
        "changed-not-names",
    ],
)
def test_parse_rejects_what_is_not_this_format_with_a_wire_error(text):
    with pytest.raises(wire.WireError):
        wire.parse(text)


def test_wire_error_is_a_value_error_that_says_what_is_wrong():
    with pytest.raises(ValueError, match="version 3"):
        wire.parse(payload(v=3))


def test_encode_then_parse_gives_the_same_message():
    message = wire.Message(
        model="shop.order",
        action="update",
        rows=[
            {
                "pk": 7,
                "fields": {"status": "pàid \"'", "total": Decimal("12345678901234.123456")},
                "old": {"status": None, "total": Decimal("1E+2")},
                "changed": ["status", "total"],
            },
            {"pk": 2**63 - 1, "truncated": True},
        ],
        xid=5012,
        timestamp=Decimal("1763717550.123456"),
        version=1,
    )

    assert wire.parse(wire.encode(message)) == message


def test_encode_writes_the_compact_json_a_trigger_sends():
    message = wire.Message(model="shop.order", action="insert", rows=[{"pk": 1}], xid=3, version=1)

    assert json.loads(wire.encode(message)) == {
        "v": 1,
        "model": "shop.order",
        "action": "insert",
        "xid": 3,
        "ts": None,
        "rows": [{"pk": 1}],
    }
    assert " " not in wire.encode(message)


def test_parse_reads_the_context_a_trigger_sends_as_a_json_string():
    payload = (
        '{"v" : 1, "model" : "shop.order", "action" : "insert", "xid" : 9, "ts" : 1.5,'
        ' "rows" : [{"pk" : 1}], "context" : "{\\"actor\\":\\"user:42\\",\\"n\\":1.5}"}'
    )

    assert wire.parse(payload).context == {"actor": "user:42", "n": 1.5}


@pytest.mark.parametrize("context", [None, "", "not json {", "[1, 2]", '"a string"', 7], ids=repr)
def test_a_missing_or_malformed_context_is_none_and_the_message_still_parses(context):
    data = {"v": 1, "model": "shop.order", "action": "insert", "rows": [{"pk": 1}]}
    if context is not None:
        data["context"] = context

    message = wire.parse(json.dumps(data))

    assert message.context is None
    assert message.rows == [{"pk": 1}]


@pytest.mark.parametrize("reader", ["installed", "standard library"])
def test_a_payload_or_context_too_deeply_nested_to_read_is_refused_not_raised(reader, monkeypatch):
    if reader == "standard library":
        monkeypatch.setattr(wire, "loads", wire._loads_stdlib)
    deep = "[" * 100_000
    data = {"v": 2, "model": "shop.order", "action": "delete", "fields": [], "rows": [[1]]}

    with pytest.raises(wire.WireError, match="not JSON"):
        wire.parse('{"v": 2, "rows": ' + deep + "}")
    message = wire.parse(json.dumps({**data, "context": deep}))

    assert (message.rows, message.context) == ([[1]], None)


def test_encode_then_parse_keeps_the_context():
    message = wire.Message(
        model="shop.order",
        action="update",
        rows=[{"pk": 1}],
        context={"reason": "refund"},
        version=1,
    )

    assert json.loads(wire.encode(message))["context"] == '{"reason":"refund"}'
    assert wire.parse(wire.encode(message)) == message


# Version 2, as the statement-level trigger renders it: one array per row.
PAYLOAD_2 = (
    '{"v":2,"model":"shop.order","action":"update","xid":5012,"ts":1763717550.123456,'
    '"fields":["status","total"],"watched":["status","total","note"],'
    '"rows":[[7,"paid","12345678901234.10","new","12345678901234.10",1],[8],[null]]}'
)


def test_parse_reads_a_version_2_payload_with_its_column_names():
    message = wire.parse(PAYLOAD_2)

    assert message.version == 2
    assert message.fields == ("status", "total")
    assert message.watched == ("status", "total", "note")
    # numeric is sent as a string of its digits: nothing is lost on the way.
    assert message.rows[0] == [7, "paid", "12345678901234.10", "new", "12345678901234.10", 1]
    assert message.timestamp == 1763717550.123456
    assert message.row_length() == 6


def test_a_version_2_row_shorter_than_its_layout_is_read_as_truncated_not_rejected():
    assert wire.parse(PAYLOAD_2).rows[1:] == [[8], [None]]


def test_version_2_insert_and_delete_rows_have_no_old_values_or_mask():
    assert wire.row_length("insert", 2) == 3
    assert wire.row_length("delete", 0) == 1
    assert wire.row_length("update", 2) == 6


# An update of a declaration with old=False: new values alone, no watched list.
PAYLOAD_NEW_VALUES = (
    '{"v":2,"model":"shop.order","action":"update","xid":5013,"ts":1763717550.5,'
    '"fields":["status","total"],"old":false,"rows":[[7,"paid","12.50"],[8]]}'
)


def test_an_update_message_with_old_false_has_rows_of_new_values_alone():
    message = wire.parse(PAYLOAD_NEW_VALUES)

    assert (message.action, message.old, message.watched) == ("update", False, ())
    assert message.row_length() == wire.row_length("update", 2, old=False) == 3
    assert message.row_objects() == [
        {"pk": 7, "fields": {"status": "paid", "total": "12.50"}},
        {"pk": 8, "truncated": True},
    ]
    # Read again through the shape seen before: the same layout.
    assert wire.read_shape(PAYLOAD_NEW_VALUES)[0].full == 3


def test_an_update_with_old_false_encodes_as_a_trigger_sends_it():
    message = wire.parse(PAYLOAD_NEW_VALUES)

    assert json.loads(wire.encode(message)) == json.loads(PAYLOAD_NEW_VALUES)
    assert wire.parse(wire.encode(message)) == message


@pytest.mark.parametrize("old", [0, 1, "false", None])
def test_old_is_read_only_as_a_json_boolean(old):
    wire.parse(PAYLOAD_NEW_VALUES)  # its shape, with "old": false, is known
    text = PAYLOAD_NEW_VALUES.replace('"old":false', f'"old":{json.dumps(old)}')
    if old is None:  # as absent: an update of old and new values, rows [pk, ...] truncated
        assert wire.parse(text).row_length() == 6
        return
    with pytest.raises(wire.WireError, match="old must be true or false"):
        wire.parse(text)


def test_an_update_row_of_old_and_new_values_is_too_long_when_old_is_false():
    text = PAYLOAD_NEW_VALUES.replace("[8]", '[8,"paid","1.00","new","1.00",1]')

    with pytest.raises(wire.WireError):
        wire.parse(text)


def payload_2(**changes) -> str:
    data = json.loads(PAYLOAD_2)
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    "text",
    [
        payload_2(fields="status"),
        payload_2(fields=[1]),
        payload_2(watched={"status": 1}),
        payload_2(rows=[{"pk": 7}]),
        payload_2(rows=[[]]),
        payload_2(rows=[[7, "paid", 1, "new", 1, 1, "extra"]]),
        payload_2(action="insert", watched=[["status"]], rows=[[7, "paid", 1]]),
        payload_2(action="delete", watched=[{}], rows=[[7, "paid", 1]]),
    ],
    ids=[
        "fields-not-a-list",
        "fields-not-names",
        "watched-not-a-list",
        "row-an-object",
        "row-empty",
        "row-too-long",
        "insert-watched-unhashable",
        "delete-watched-unhashable",
    ],
)
def test_parse_rejects_malformed_version_2_payloads(text):
    with pytest.raises(wire.WireError):
        wire.parse(text)


def test_version_2_encode_then_parse_gives_the_same_message():
    message = wire.Message(
        model="shop.order",
        action="update",
        rows=[[7, "pàid \"'", "1E+2", None, 0.1, 3], [2**63 - 1]],
        xid=5012,
        timestamp=1763717550.123456,
        fields=("status", "total"),
        watched=("status", "total"),
        context={"actor": "user:42"},
    )

    assert wire.parse(wire.encode(message)) == message
    assert json.loads(wire.encode(message))["v"] == 2


def test_version_2_insert_messages_carry_no_watched_list():
    message = wire.Message(
        model="shop.order", action="insert", rows=[[1, "new"]], fields=("status",)
    )

    data = json.loads(wire.encode(message))

    assert data["fields"] == ["status"]
    assert "watched" not in data
    assert wire.parse(wire.encode(message)).watched == ()


@pytest.mark.parametrize(
    "rows",
    [
        [[7, "paid"], {"pk": 8}],
        [[7, "paid"], []],
        [[7], [8, "paid", 1, "new", 1, 1, "extra"]],
        # Enough rows to be checked all at once rather than one by one.
        [[7]] * 8 + [[]],
        [[7]] * 8 + [[8, "paid", 1, "new", 1, 1, "extra"]],
    ],
    ids=[
        "object-after-array",
        "empty-after-full",
        "too-long-after-truncated",
        "empty-among-many",
        "too-long-among-many",
    ],
)
def test_parse_rejects_a_malformed_row_anywhere_in_the_message(rows):
    with pytest.raises(wire.WireError, match="arrays of 1 to 6 values"):
        wire.parse(payload_2(rows=rows))


def test_a_parsed_message_is_frozen_and_equal_to_one_built_directly():
    parsed = wire.parse(payload_2(rows=[[7]]))

    assert parsed == wire.Message(
        model=parsed.model,
        action=parsed.action,
        rows=[[7]],
        xid=parsed.xid,
        timestamp=parsed.timestamp,
        context=parsed.context,
        fields=parsed.fields,
        watched=parsed.watched,
    )
    with pytest.raises(AttributeError):
        parsed.model = "other.model"  # type: ignore[misc]


def test_messages_with_the_same_columns_share_one_tuple_of_names():
    first, second = wire.parse(payload_2()), wire.parse(payload_2(rows=[[8]]))

    assert first.fields == ("status", "total")
    assert first.fields is second.fields


# Payloads both JSON readers must read alike: what triggers send, and edge cases.
ALIKE = [
    PAYLOAD_2,
    '{"v":2,"model":"a.b","action":"insert","xid":1,"ts":1763717550.000001,"fields":["é"],'
    '"rows":[[1,"\\u00e9 \\" \\\\ ünï"],[2,null],[9223372036854775807,-1.5e-7]],'
    '"context":"{\\"actor\\": \\"user:42\\"}"}',
    '{"v":2,"model":"a.b","action":"delete","xid":1,"ts":1,"fields":[],"rows":[[1]]}',
    # A number orjson refuses (an element of a jsonb array may hold one): the others
    # are read as the standard library reads them all, floats as floats.
    '{"v":2,"model":"a.b","action":"insert","xid":1,"ts":1763717550.000001,"fields":["j"],'
    '"rows":[[1,[0.1,1e400]],[2,[-1.5e-7]]]}',
]


@pytest.mark.parametrize("payload", ALIKE)
def test_orjson_and_the_standard_library_read_payloads_alike(payload, monkeypatch):
    orjson = pytest.importorskip("orjson")  # installed with django-pgnotify[speedups]
    assert wire.loads is orjson.loads
    fast = wire.parse(payload.encode())
    monkeypatch.setattr(wire, "loads", wire._loads_stdlib)
    wire._shapes.clear()  # the same path both times: the first sight of a shape

    assert wire.parse(payload.encode()) == fast == wire.parse(payload)


def test_a_payload_is_read_from_utf8_bytes_as_from_text():
    text = PAYLOAD_2.replace('"paid"', '"pàid ü"')

    assert wire.parse(text.encode()) == wire.parse(text)


def test_a_shape_seen_before_is_still_checked_row_by_row():
    wire.parse(PAYLOAD_2)  # the shape is known now

    with pytest.raises(wire.WireError, match="arrays of 1 to 6 values"):
        wire.parse(payload_2(rows=[[7, "paid", 1, "new", 1, 1, "extra"]]))
    with pytest.raises(wire.WireError, match="arrays of 1 to 6 values"):
        wire.parse(payload_2(rows=[[7]] * 10 + [{"pk": 7}]))


def test_version_1_numbers_keep_every_digit_whichever_reader_is_installed():
    payload = (
        '{"v":1,"model":"a.b","action":"insert","xid":1,"ts":1763717550.123456,'
        '"rows":[{"pk":1,"fields":{"price":12345678901234567890.10}}]}'
    )

    message = wire.parse(payload.encode())

    assert message.rows[0]["fields"]["price"] == Decimal("12345678901234567890.10")
    assert message.timestamp == Decimal("1763717550.123456")


# Each one differs from PAYLOAD_2 so that a lookup of its shape must not find
# PAYLOAD_2's (or its row check fails); 2.0 and "ab" (as a tuple) would equal
# the known shape's version and fields in Python.
KNOWN_SHAPE_MALFORMED = {
    "version-2.0": {"v": 2.0},
    "version-true": {"v": True},
    "fields-a-string": {"fields": "ab", "watched": ["a", "b"]},
    "no-version": {"v": None},
    "no-model": {"model": None},
    "no-rows": {"rows": None},
    "rows-an-object": {"rows": {"0": [7]}},
    "watched-unhashable": {"watched": [["status"]]},
    "one-row-an-object": {"rows": [{"pk": 7}]},
    "one-row-a-string": {"rows": ["7"]},
    "one-row-empty": {"rows": [[]]},
    "one-row-too-long": {"rows": [[7, "paid", 1, "new", 1, 1, "extra"]]},
}


@pytest.mark.parametrize("changes", KNOWN_SHAPE_MALFORMED.values(), ids=KNOWN_SHAPE_MALFORMED)
def test_a_malformed_payload_of_a_known_shape_is_still_rejected(changes):
    wire.parse(PAYLOAD_2)  # the shape is known now
    wire.parse(payload_2(fields=["a", "b"], watched=["a", "b"], rows=[[1]]))
    data = {**json.loads(PAYLOAD_2), **changes}
    text = json.dumps({key: value for key, value in data.items() if value is not None})

    with pytest.raises(wire.WireError):
        wire.read_shape(text)
    with pytest.raises(wire.WireError):
        wire.parse(text)


def test_a_shape_seen_before_is_the_same_object_and_its_rows_are_checked_once_each():
    first = wire.read_shape(PAYLOAD_2)
    second = wire.read_shape(payload_2(rows=[[9, "new", "1", "new", "1", 0]], xid=3))

    assert second[0] is first[0]
    assert second[1:] == ([[9, "new", "1", "new", "1", 0]], 3, 1763717550.123456, None)
    assert (first[0].model, first[0].action, first[0].full) == ("shop.order", "update", 6)


def test_version_1_shapes_are_new_objects_without_a_layout():
    first, second = wire.read_shape(PAYLOAD)[0], wire.read_shape(PAYLOAD)[0]

    assert first is not second
    assert (first.version, first.fields, first.watched, first.full) == (1, None, None, 0)


@pytest.mark.parametrize(
    ("changes", "xid", "timestamp", "context"),
    [
        ({"xid": "5012", "ts": "1.5", "context": 7}, None, None, None),
        ({"xid": 1, "ts": 2, "context": '{"a": 1}'}, 1, 2, {"a": 1}),
    ],
    ids=["wrong-types-dropped", "right-types-kept"],
)
def test_a_known_shape_reads_its_xid_timestamp_and_context_as_the_first_sight_does(
    changes, xid, timestamp, context
):
    wire.parse(PAYLOAD_2)  # the shape is known now

    known = wire.read_shape(payload_2(**changes))
    wire._shapes.clear()
    first = wire.read_shape(payload_2(**changes))

    assert known[2:] == first[2:] == (xid, timestamp, context)


def test_an_insert_message_carrying_update_keys_is_read_as_an_insert():
    text = (
        '{"v":2,"model":"shop.order","action":"insert","xid":1,"ts":1,"fields":["status"],'
        '"watched":["status"],"old":false,"rows":[[7,"new"]]}'
    )

    message = wire.parse(text)

    assert (message.watched, message.old, message.row_length()) == ((), True, 2)


def test_rows_as_objects_of_a_message_without_fields_tell_a_truncated_pk():
    # Without fields a full row is [pk], as long as the [null] of a pk too large to send.
    text = (
        '{"v":2,"model":"shop.tag","action":"insert","xid":1,"ts":1,"fields":[],'
        '"rows":[["blue"],[null]]}'
    )

    full, truncated = wire.parse(text).row_objects()

    assert full["pk"] == "blue" and not full.get("truncated")
    assert truncated == {"pk": None, "truncated": True}


def test_rows_as_objects_read_a_mask_past_62_watched_columns():
    """Triggers send such a mask as a string of digits; row_objects() raised TypeError."""
    watched = [f"f{i}" for i in range(64)]
    mask = str(1 << 63 | 1 << 62 | 1)
    text = json.dumps(
        {
            "v": 2,
            "model": "shop.wide",
            "action": "update",
            "xid": 1,
            "ts": 1,
            "fields": [],
            "watched": watched,
            "rows": [[7, mask]],
        }
    )

    (row,) = wire.parse(text).row_objects()

    assert row == {"pk": 7, "changed": ["f0", "f62", "f63"]}


@pytest.mark.parametrize("mask", [True, 1.0, " 1", "-1", [1]], ids=repr)
def test_rows_as_objects_refuse_a_mask_that_is_no_integer(mask):
    """``int()`` took ``true``, ``1.0`` and ``" 1"`` for 1 (and ``-1`` for every bit)."""
    text = json.dumps(
        {
            "v": 2,
            "model": "shop.order",
            "action": "update",
            "xid": 1,
            "ts": 1,
            "fields": [],
            "watched": ["status"],
            "rows": [[7, mask]],
        }
    )

    with pytest.raises(wire.WireError, match=r"changed mask .* is neither an integer"):
        wire.parse(text).row_objects()


def test_dumps_keeps_every_digit_in_tuples_and_writes_keys_as_json_does():
    value = {1: (Decimal("12345678901234567890.10"), None), "é": [Decimal("1E+2")]}

    text = wire.dumps(value)

    assert text == '{"1":[12345678901234567890.10,null],"\\u00e9":[1E+2]}'
    assert json.loads(text, parse_float=Decimal) == {
        "1": [Decimal("12345678901234567890.10"), None],
        "é": [Decimal("1E+2")],
    }
    for number in ["NaN", "Infinity", "-Infinity"]:
        with pytest.raises(TypeError, match="no JSON form"):
            wire.dumps([Decimal(number)])
