"""The bulk path of the live trigger, read as raw notifications from a real PostgreSQL.

Every payload must stay under 8000 bytes and every changed row must be sent
exactly once, whatever the rows hold: NULLs, unicode, the byte the trigger
joins rows with (chr(1)), rows long enough to take the window function's
path, and rows too long for a notification.
"""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

from django_pgnotify import triggers, wire
from django_pgnotify.declarations import get_declarations
from django_pgnotify.triggers import build_trigger_sql
from tests.testapp.models import Order, Reading

ARTICLE_CHANNEL = "pgnotify_testapp_article"
TAG_CHANNEL = "pgnotify_testapp_tag"


def notifications(conn: psycopg.Connection) -> list[str]:
    """The payloads that arrived on ``conn`` so far."""
    return [n.payload for n in conn.notifies(timeout=0.5)]


@pytest.fixture
def listening(other_connection):
    with psycopg.connect(other_connection.info.dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {ARTICLE_CHANNEL}")
        conn.execute(f"LISTEN {TAG_CHANNEL}")
        yield conn


def rows_of(payloads: list[str], action: str) -> list[list]:
    rows = []
    for payload in payloads:
        assert len(payload.encode()) < wire.PAYLOAD_LIMIT
        message = json.loads(payload)
        assert message["v"] == 2
        assert message["action"] == action
        rows.extend(message["rows"])
    return rows


def body(i: int) -> str:
    """Bodies of every size class: short, past the joined rows' limit, too long."""
    kinds = [
        "",
        f'é ☃ 😀 \x01 " \\ \n {i}',
        "x" * 600,
        "é" * 1500,  # 3000 bytes, alone or paired in a notification
        "y" * 9000,  # too long: sent as [pk]
    ]
    return kinds[i % len(kinds)]


def insert_articles(conn, count: int) -> list[int]:
    """One statement inserting ``count`` articles with the bodies of ``body()``; their ids."""
    cursor = conn.execute(
        "INSERT INTO testapp_article (title, body)"
        " SELECT 't' || i, b FROM unnest(%s::text[]) WITH ORDINALITY AS u(b, i)"
        " RETURNING id",
        [[body(i) for i in range(count)]],
    )
    return [row[0] for row in cursor]


@pytest.mark.parametrize("count", [1, 20, 21, 100, 2000])
def test_every_row_of_a_bulk_insert_and_update_arrives_once_and_whole_if_it_fits(
    other_connection, listening, count
):
    ids = insert_articles(other_connection, count)
    bodies = dict(zip(ids, (body(i) for i in range(count)), strict=True))

    inserted = rows_of(notifications(listening), "insert")

    assert sorted(r[0] for r in inserted) == sorted(ids)
    for row in inserted:
        if len(bodies[row[0]]) == 9000:
            assert row == [row[0]]
        else:
            assert row[2] == bodies[row[0]]

    other_connection.execute(
        "UPDATE testapp_article SET title = title || ' é' WHERE id = ANY(%s)", [ids]
    )

    updated = rows_of(notifications(listening), "update")

    assert sorted(r[0] for r in updated) == sorted(ids)
    for row in updated:
        if len(row) > 1:
            pk, title, text, old_title, old_text, mask = row
            assert title == old_title + " é"
            assert text == old_text == bodies[pk]
            assert mask == 1  # title changed, body did not


def test_a_bulk_update_that_changes_pks_announces_each_row_once_with_null_old_values(
    other_connection, listening
):
    other_connection.execute(
        "INSERT INTO testapp_tag (name, colour)"
        " SELECT 'tag' || i, 'red' FROM generate_series(1, 50) i"
    )
    notifications(listening)

    other_connection.execute("UPDATE testapp_tag SET name = name || '!' WHERE name LIKE 'tag%%'")

    updated = rows_of(notifications(listening), "update")
    assert sorted(r[0] for r in updated) == sorted(f"tag{i}!" for i in range(1, 51))
    assert all(r[1:] == [0] for r in updated)  # no fields: [pk, changed]


def test_a_bulk_update_that_changes_nothing_sends_nothing(other_connection, listening):
    other_connection.execute(
        "INSERT INTO testapp_tag (name, colour)"
        " SELECT 'same' || i, 'red' FROM generate_series(1, 30) i"
    )
    notifications(listening)

    other_connection.execute("UPDATE testapp_tag SET colour = colour WHERE name LIKE 'same%%'")
    other_connection.execute(
        "UPDATE testapp_tag SET colour = 'blue' WHERE name LIKE 'same%%' AND name < 'same2'"
    )

    updated = rows_of(notifications(listening), "update")
    assert sorted(r[0] for r in updated) == sorted(
        f"same{i}" for i in range(1, 31) if f"same{i}" < "same2"
    )


def test_a_statement_of_more_rows_than_are_joined_takes_the_window_function_alone(
    other_connection, listening, restore_triggers, monkeypatch
):
    monkeypatch.setattr(triggers, "_JOINED_ROWS", 30)
    (article,) = [d for d in get_declarations(["testapp.Article"]) if d.name == "default"]
    other_connection.execute(build_trigger_sql(article).install)
    count = 100

    ids = insert_articles(other_connection, count)

    inserted = rows_of(notifications(listening), "insert")
    assert sorted(r[0] for r in inserted) == sorted(ids)
    bodies = dict(zip(ids, (body(i) for i in range(count)), strict=True))
    assert all(len(r) == 1 or r[2] == bodies[r[0]] for r in inserted)


def test_a_bulk_update_of_undeclared_columns_only_is_announced_by_the_second_query(
    other_connection, listening
):
    # doc is json, which has no '=': only record_image_ne can tell it changed.
    listening.execute("LISTEN pgnotify_testapp_legacy")
    ids = [
        row[0]
        for row in other_connection.execute(
            "INSERT INTO testapp_legacy (doc, title)"
            " SELECT '{\"n\": 1}', 't' || i FROM generate_series(1, 60) i RETURNING id"
        )
    ]
    notifications(listening)

    other_connection.execute("UPDATE testapp_legacy SET doc = doc WHERE id = ANY(%s)", [ids])
    assert notifications(listening) == []

    other_connection.execute(
        "UPDATE testapp_legacy SET doc = '{\"n\": 2}' WHERE id = ANY(%s) AND id %% 2 = 0", [ids]
    )
    other_connection.execute(
        "UPDATE testapp_legacy SET title = title || '!' WHERE id = ANY(%s) AND id %% 2 = 1", [ids]
    )

    updated = rows_of(notifications(listening), "update")
    assert sorted(r[0] for r in updated) == sorted(ids)
    for pk, title, old_title, mask in updated:
        assert (title, mask) == ((old_title, 0) if pk % 2 == 0 else (old_title + "!", 1))


def test_json_scalar_renders_every_field_type_as_to_json_does(other_connection):
    # The installer renders values with JSON_SCALAR() where the server has it;
    # the payloads must be the same text as to_json()'s, byte for byte.
    if other_connection.info.server_version < triggers.JSON_SCALAR_SINCE:
        pytest.skip("JSON_SCALAR() needs PostgreSQL 17")
    (reading,) = get_declarations(["testapp.Reading"])
    order = Order.objects.create(status="new")
    Reading.objects.create()  # every nullable field NULL
    Reading.objects.create(
        order=order,
        taken_at=datetime(2025, 7, 1, 10, 0, 0, 123456, tzinfo=timezone.utc),
        day=date(1, 1, 1),
        at=time(23, 59, 59, 500000),
        took=-timedelta(days=1, microseconds=1),
        amount=Decimal("-1234567890123.123456"),
        ratio=float("nan"),
        flag=True,
        data={"é ☃": ['"\\\n\x01', 1.5, None, True]},
        blob=b"\x00\xff\x10",
        token=uuid.uuid4(),
        count=-(2**63),
    )
    Reading.objects.create(ratio=float("-inf"), data="text", amount=Decimal("1E+13"))
    rows = [
        triggers._row_text(reading, "insert", "n", scalar) for scalar in ("to_json", "JSON_SCALAR")
    ]
    query = sql.SQL("SELECT {}, {} FROM testapp_reading AS n").format(*rows)

    rendered = other_connection.execute(query).fetchall()

    assert len(rendered) == 3
    for portable, newer in rendered:
        assert newer == portable
