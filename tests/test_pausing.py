"""``paused()`` and the ``pgnotify.paused`` setting: writes that announce nothing.

A real listener receives what the triggers send; ``changes_before_marker``
shows what did not arrive without sleeping.
"""

from __future__ import annotations

import psycopg
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.core.management import call_command
from django.db import connection, transaction

from django_pgnotify import paused
from django_pgnotify.declarations import get_declarations
from tests.conftest import (
    changes_before_marker,
    install_redeclared,
    order_rolled_back_to_a_savepoint_last,
)
from tests.testapp.models import Order, OrderProxy, Tag


def insert_order(conn: psycopg.Connection, status: str) -> int:
    return conn.execute(
        "INSERT INTO testapp_order (status, total, note) VALUES (%s, 0, '') RETURNING id",
        [status],
    ).fetchone()[0]


def announced(changes) -> list[tuple[str, str]]:
    """``(model label, status or pk)`` of everything that arrived before a marker."""
    return [
        (e.label, e.fields.get("status", e.pk) if e.fields else e.pk)
        for e in changes_before_marker(changes)
    ]


def test_paused_writes_send_nothing_while_another_connections_writes_arrive(
    changes, other_connection
):
    with paused():
        Order.objects.create(status="quiet autocommit")
        with transaction.atomic():
            Order.objects.create(status="quiet atomic")
            insert_order(other_connection, "loud other conn")
        with connection.cursor() as cursor:  # raw SQL through Django
            cursor.execute("UPDATE testapp_order SET status = 'quiet raw' WHERE status <> ''")

    (event,) = changes_before_marker(changes)
    assert event.fields["status"] == "loud other conn"
    assert event.pid == other_connection.info.backend_pid


def test_paused_spans_several_transactions_of_the_block_and_only_the_block(changes):
    with paused():
        for status in ("quiet 1", "quiet 2"):
            with transaction.atomic():
                Order.objects.create(status=status)
    Order.objects.create(status="loud after")

    assert announced(changes) == [("testapp.order", "loud after")]


def test_paused_with_models_pauses_only_those(changes):
    with paused(OrderProxy, using="default"):  # a proxy pauses its concrete model
        Order.objects.create(status="quiet")
        Tag.objects.create(name="loud-tag")
    with paused("testapp.Tag"):
        Order.objects.create(status="loud")
        Tag.objects.create(name="quiet-tag")

    assert announced(changes) == [("testapp.tag", "loud-tag"), ("testapp.order", "loud")]


def test_nested_pauses_add_up_and_leaving_one_restores_the_enclosing_state(changes):
    with transaction.atomic():
        with paused(Tag):
            with paused(Order):
                Order.objects.create(status="quiet inner")
                Tag.objects.create(name="quiet-inner")
            Order.objects.create(status="loud between")
            Tag.objects.create(name="quiet-outer")
        # Same transaction, after the block: nothing is paused any more.
        Order.objects.create(status="loud after")
        Tag.objects.create(name="loud-after")

    assert announced(changes) == [
        ("testapp.order", "loud between"),
        ("testapp.order", "loud after"),
        ("testapp.tag", "loud-after"),
    ]


def test_an_exception_leaving_a_nested_pause_restores_the_enclosing_state(changes):
    with transaction.atomic(), paused(Tag):
        with pytest.raises(RuntimeError), paused():
            Order.objects.create(status="quiet inner")
            raise RuntimeError("leave the block")
        Order.objects.create(status="loud after raise")
        Tag.objects.create(name="quiet-tag")
        try:
            with transaction.atomic(), paused():  # a savepoint rolled back
                Order.objects.create(status="rolled back")
                raise RuntimeError("roll back the savepoint")
        except RuntimeError:
            pass
        Order.objects.create(status="loud after rollback")

    assert announced(changes) == [
        ("testapp.order", "loud after raise"),
        ("testapp.order", "loud after rollback"),
    ]


def test_a_savepoint_rolled_back_last_in_the_block_does_not_keep_the_pause_after_it(changes):
    with transaction.atomic():
        with paused():
            Order.objects.create(status="quiet")
            order_rolled_back_to_a_savepoint_last()
        Order.objects.create(status="loud after")

    assert announced(changes) == [("testapp.order", "loud after")]


def test_non_django_writers_pause_with_the_transaction_local_setting(changes, other_connection):
    with other_connection.transaction():
        other_connection.execute("SELECT set_config('pgnotify.paused', 'on', true)")
        insert_order(other_connection, "quiet all")
    with other_connection.transaction():
        other_connection.execute("SET LOCAL pgnotify.paused = 'testapp.tag, testapp.order'")
        insert_order(other_connection, "quiet listed")
    with other_connection.transaction():
        other_connection.execute("SET LOCAL pgnotify.paused = 'testapp.tag'")
        insert_order(other_connection, "loud not listed")
    insert_order(other_connection, "loud next")

    assert announced(changes) == [
        ("testapp.order", "loud not listed"),
        ("testapp.order", "loud next"),
    ]


@pytest.mark.parametrize("level", ["statement", "row"])
def test_on_pauses_in_any_case_and_with_spaces_around_it(
    changes, other_connection, restore_triggers, level
):
    """As the model labels of a list are compared: ``SET LOCAL pgnotify.paused = 'ON'``
    by hand pauses every model, as ``'on'`` does."""
    (declaration,) = [d for d in get_declarations() if d.model is Order]
    install_redeclared(declaration, level=level)
    for value in ["ON", " On ", "on  "]:
        with other_connection.transaction():
            other_connection.execute("SELECT set_config('pgnotify.paused', %s, true)", [value])
            insert_order(other_connection, f"quiet {value!r}")
    with other_connection.transaction():
        other_connection.execute("SET LOCAL pgnotify.paused = 'ONE'")
        insert_order(other_connection, "loud")

    assert announced(changes) == [("testapp.order", "loud")]


def test_pgnotify_run_paused_runs_a_command_without_announcing_its_writes(changes, tmp_path):
    fixture = tmp_path / "orders.json"
    fixture.write_text(
        '[{"model": "testapp.order", "pk": 990001, "fields": {"status": "loaded"}}]',
        encoding="utf-8",
    )

    call_command("pgnotify_run", "--paused", "loaddata", str(fixture), verbosity=0)

    assert Order.objects.filter(pk=990001, status="loaded").exists()
    assert announced(changes) == []


def test_a_transaction_that_starts_with_a_server_side_cursor_read_is_paused_too(changes):
    # QuerySet.iterator() reads through a named (server-side) cursor; the pause set
    # before it must really run, not be declared as a cursor of its own.
    Order.objects.create(status="existing")
    changes_before_marker(changes)
    changes.clear()
    with paused(), transaction.atomic():
        for order in Order.objects.filter(status="existing").iterator(chunk_size=10):
            order.status = "quiet backfill"
            order.save()

    assert announced(changes) == []


def test_paused_entered_in_async_code_is_refused_and_works_in_a_sync_function(changes):
    # In async code the ORM's writes run in another thread, on another connection:
    # a block entered there would pause none of them.
    def write() -> None:
        with paused(Order):
            Order.objects.create(status="quiet from async")

    async def handler() -> None:
        refused = pytest.raises(SynchronousOnlyOperation, match=r"paused\(\).*sync_to_async")
        with refused, paused(Order):
            await Order.objects.acreate(status="never written")
        await sync_to_async(write)()

    async_to_sync(handler)()

    assert announced(changes) == []
