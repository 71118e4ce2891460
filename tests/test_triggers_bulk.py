"""The bulk path of the live trigger, read as raw notifications from a real PostgreSQL.

Every payload must stay under 8000 bytes and every changed row must be sent
exactly once, whatever the rows hold: NULLs, unicode, the byte the trigger
joins rows with (chr(1)), rows long enough to take the window function's
path, and rows too long for a notification.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
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


MARKER_CHANNEL = "pgnotify_test_marker"


def notifications(conn: psycopg.Connection, timeout: float = 10.0) -> list[str]:
    """The payloads of what was committed before the call, for the channels ``conn``
    (in autocommit mode) listens on.

    Notifications arrive in commit order: once a marker ``conn`` sends itself now
    is in, everything committed earlier has arrived too, however slowly, so this
    also shows that something was *not* sent without waiting for a fixed time.
    """
    marker = uuid.uuid4().hex
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(MARKER_CHANNEL)))
    conn.execute("SELECT pg_notify(%s, %s)", [MARKER_CHANNEL, marker])
    payloads = []
    for notify in conn.notifies(timeout=timeout):
        if (notify.channel, notify.payload) == (MARKER_CHANNEL, marker):
            return payloads
        payloads.append(notify.payload)
    raise AssertionError(f"the marker notification did not arrive within {timeout}s")


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


def insert_articles(conn, count: int, bodies: Callable[[int], str] = body) -> list[int]:
    """One statement inserting ``count`` articles with the bodies of ``bodies()``; their ids."""
    cursor = conn.execute(
        "INSERT INTO testapp_article (title, body)"
        " SELECT 't' || i, b FROM unnest(%s::text[]) WITH ORDINALITY AS u(b, i)"
        " RETURNING id",
        [[bodies(i) for i in range(count)]],
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


@pytest.mark.parametrize(
    ("count", "short"),
    [(100, False), (100, True), (30, True)],
    ids=["rows of every size", "short rows alone", "as many short rows as are joined"],
)
def test_a_statement_of_more_rows_than_are_joined_takes_the_window_function_alone(
    other_connection, listening, restore_triggers, monkeypatch, count, short
):
    (article,) = [d for d in get_declarations(["testapp.Article"]) if d.name == "default"]
    # Patched while the SQL is built alone: restore_triggers then installs every
    # declaration as it is, not as patched, for the tests that follow.
    with monkeypatch.context() as patched:
        patched.setattr(triggers, "_JOINED_ROWS", 30)
        built = build_trigger_sql(article)
    other_connection.execute(built.install)

    # Short rows alone would all be joined in a statement of fewer rows.
    kinds = (lambda i: f"short {i}") if short else body
    ids = insert_articles(other_connection, count, kinds)

    inserted = rows_of(notifications(listening), "insert")
    assert sorted(r[0] for r in inserted) == sorted(ids)
    bodies = dict(zip(ids, (kinds(i) for i in range(count)), strict=True))
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


def rows_of_lengths(template: list, lengths: list[int]) -> list[list]:
    """Rows like ``template``, whose third value is an empty string, with that string
    grown so that each row is one of ``lengths`` bytes of JSON text as the trigger
    renders it (ASCII only)."""
    empty = len(json.dumps(template, separators=(",", ":")))
    return [[*template[:2], "b" * (length - empty), *template[3:]] for length in lengths]


def insert_articles_with(conn, ids: list[int], bodies: list[str]) -> None:
    """One statement inserting articles of these ids and bodies, each titled ``t``."""
    conn.execute(
        "INSERT INTO testapp_article (id, title, body)"
        " SELECT id, 't', body FROM unnest(%s::int[], %s::text[]) AS u(id, body)",
        [ids, bodies],
    )


@pytest.mark.parametrize("event", ["insert", "update"])
def test_rows_of_about_the_joined_rows_limit_arrive_once_and_whole(
    other_connection, listening, event
):
    # Rows shorter than 512 bytes are joined into one string, longer ones go through
    # the window function: rows either side of the limit, and at it, as the longest.
    ids = list(range(10**7, 10**7 + 30))
    lengths = [512 - i % 4 for i in range(30)]
    inserted = rows_of_lengths([ids[0], "t", ""], lengths if event == "insert" else [100] * 30)
    insert_articles_with(other_connection, ids, [row[2] for row in inserted])
    expected = [[pk, *row[1:]] for pk, row in zip(ids, inserted, strict=True)]
    if event == "update":
        notifications(listening)
        # [pk, title, body, old title, old body, changed]: the body changed (bit 1), from
        # the same old body in every row.
        updated = rows_of_lengths([ids[0], "t", "", "t", inserted[0][2], 2], lengths)
        other_connection.execute(
            "UPDATE testapp_article AS a SET body = u.body"
            " FROM unnest(%s::int[], %s::text[]) AS u(id, body) WHERE a.id = u.id",
            [ids, [row[2] for row in updated]],
        )
        expected = [[pk, *row[1:]] for pk, row in zip(ids, updated, strict=True)]
    assert {len(json.dumps(r, separators=(",", ":"))) for r in expected} == {509, 510, 511, 512}

    received = rows_of(notifications(listening), event)

    assert sorted(received) == sorted(expected)


def test_a_bulk_write_gives_the_writer_its_planner_settings_back(other_connection, listening):
    # The bulk queries run without JIT, merge joins and nested loops, with more work_mem.
    mine = {"jit": "on", "work_mem": "1234kB", "enable_mergejoin": "on", "enable_nestloop": "on"}
    for name, value in mine.items():
        other_connection.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), value))

    def settings() -> dict[str, str]:
        return {
            name: other_connection.execute(
                sql.SQL("SHOW {}").format(sql.Identifier(name))
            ).fetchone()[0]
            for name in mine
        }

    with other_connection.transaction():
        insert_articles(other_connection, 100)
        assert settings() == mine
        other_connection.execute("UPDATE testapp_article SET title = title || '!'")
        assert settings() == mine
    assert settings() == mine
    messages = [json.loads(payload) for payload in notifications(listening)]
    assert sum(len(m["rows"]) for m in messages) == 200


@pytest.mark.parametrize("length", [700, 2000], ids=["under an eighth of the room", "under half"])
def test_rows_that_take_the_window_function_alone_fill_notifications_within_the_limit(
    other_connection, listening, length
):
    # Grouped by their running total of bytes: a group ends within the room, whatever
    # the rows' sizes add up to.
    count = 200
    ids = list(range(10**7, 10**7 + count))
    rows = rows_of_lengths([ids[0], "t", ""], [length] * count)
    insert_articles_with(other_connection, ids, [row[2] for row in rows])

    received = rows_of(notifications(listening), "insert")

    assert sorted(received) == [[pk, *row[1:]] for pk, row in zip(ids, rows, strict=True)]
