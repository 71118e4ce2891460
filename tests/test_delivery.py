"""Row changes travel from a real PostgreSQL to ``row_changed`` receivers.

Each test writes through Django or plain SQL, and a real listener running in
this process (the ``changes`` fixture) receives what the triggers announce.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.utils.timezone import now

from django_pgnotify import RowChange, row_changed
from django_pgnotify.channels_bridge import ChannelsDispatcher
from django_pgnotify.declarations import get_declarations
from django_pgnotify.dispatch import Dispatcher
from django_pgnotify.listener import Listener
from django_pgnotify.signals import listener_started
from django_pgnotify.testing import capture_row_changes
from tests.conftest import changes_before_marker, orders_beside_a_failing_receiver
from tests.conftest import test_database_url as database_url
from tests.test_listener_resilience import listener_thread
from tests.testapp.models import (
    Article,
    Customer,
    Legacy,
    Measurement,
    Order,
    OrderProxy,
    Place,
    Reading,
    Restaurant,
    Supplier,
    Tag,
    Weird,
)

ORDER_CHANNEL = "pgnotify_testapp_order"


def django_backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def insert_order(conn: psycopg.Connection, status: str, total: str = "0") -> int:
    row = conn.execute(
        "INSERT INTO testapp_order (status, total, note) VALUES (%s, %s, '') RETURNING id",
        [status, total],
    ).fetchone()
    return row[0]


# What a change carries


def test_insert_arrives_with_pk_fields_channel_pid_xid_and_timestamp(changes):
    before = now()
    order = Order.objects.create(status="new", total=Decimal("12.50"))
    after = now()

    (event,) = changes.wait(1)

    assert isinstance(event, RowChange)
    assert (event.model, event.action, event.pk) == (Order, "insert", order.pk)
    assert event.fields == {"status": "new", "total": Decimal("12.50")}
    assert event.old is None
    assert event.changed == frozenset()
    assert event.channel == ORDER_CHANNEL
    assert event.pid == django_backend_pid()
    assert isinstance(event.xid, int) and event.xid > 0
    slack = timedelta(milliseconds=100)
    assert before - slack <= event.timestamp <= after + slack
    assert event.timestamp.utcoffset() == timedelta(0)
    assert event.truncated is False


def test_update_arrives_with_new_values_old_values_and_changed_fields(changes):
    order = Order.objects.create(status="new", total="5.00")
    Order.objects.filter(pk=order.pk).update(status="paid", note="not watched")

    _, event = changes.wait(2)

    assert (event.model, event.action, event.pk) == (Order, "update", order.pk)
    assert event.fields == {"status": "paid", "total": Decimal("5.00")}
    assert event.old == {"status": "new", "total": Decimal("5.00")}
    assert event.changed == {"status"}
    assert event.channel == ORDER_CHANNEL
    assert event.pid == django_backend_pid()


def test_delete_arrives_with_the_values_the_row_had(changes):
    order = Order.objects.create(status="cancelled", total="3.10")
    pk = order.pk
    order.delete()

    _, event = changes.wait(2)

    assert (event.model, event.action, event.pk) == (Order, "delete", pk)
    assert event.fields == {"status": "cancelled", "total": Decimal("3.10")}
    assert event.old is None
    assert event.changed == frozenset()


def test_changes_of_one_transaction_share_its_xid_and_other_transactions_differ(changes):
    with transaction.atomic():
        Order.objects.create(status="first")
        Tag.objects.create(name="second")
        with connection.cursor() as cursor:
            cursor.execute("UPDATE testapp_order SET status = 'third' WHERE status = 'first'")
            cursor.execute("SELECT txid_current()")
            xid = cursor.fetchone()[0]
    Order.objects.create(status="next")

    first, second, third, following = changes.wait(4)

    assert [e.action for e in (first, second, third)] == ["insert", "insert", "update"]
    assert first.xid == second.xid == third.xid == xid
    assert xid > 0 and following.xid > xid


def test_raw_sql_from_another_client_is_announced_with_that_clients_pid(changes, other_connection):
    pk = insert_order(other_connection, "raw", "1.50")
    other_connection.execute("UPDATE testapp_order SET status = 'cooked' WHERE id = %s", [pk])
    other_connection.execute("DELETE FROM testapp_order WHERE id = %s", [pk])

    events = changes.wait(3)

    assert [(e.action, e.pk, e.fields["status"]) for e in events] == [
        ("insert", pk, "raw"),
        ("update", pk, "cooked"),
        ("delete", pk, "cooked"),
    ]
    assert {e.pid for e in events} == {other_connection.info.backend_pid}
    assert other_connection.info.backend_pid != django_backend_pid()


# What is sent, and when


def test_rolled_back_changes_send_nothing(changes):
    with pytest.raises(RuntimeError), transaction.atomic():
        Order.objects.create(status="never")
        raise RuntimeError("roll back")

    assert changes_before_marker(changes) == []


def test_changes_arrive_in_commit_order_across_interleaved_transactions(changes):
    url = database_url()
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        insert_order(a, "a1")
        insert_order(b, "b1")
        insert_order(a, "a2")
        b.commit()
        a.commit()

    events = changes.wait(3)

    assert [e.fields["status"] for e in events] == ["b1", "a1", "a2"]
    assert events[0].xid != events[1].xid == events[2].xid


def test_bulk_create_sends_one_insert_per_row(changes):
    orders = Order.objects.bulk_create([Order(status=f"bulk{i}") for i in range(3)])

    events = changes.wait(3)

    assert [(e.action, e.pk) for e in events] == [("insert", o.pk) for o in orders]
    assert len({e.xid for e in events}) == 1
    assert changes_before_marker(changes) == events


def test_queryset_update_sends_one_update_per_row(changes):
    orders = Order.objects.bulk_create([Order(status="new") for _ in range(3)])
    changes.wait(3)

    assert Order.objects.filter(status="new").update(status="shipped") == 3

    updates = changes_before_marker(changes)[3:]
    assert sorted(e.pk for e in updates) == sorted(o.pk for o in orders)
    assert {(e.action, e.fields["status"], e.old["status"]) for e in updates} == {
        ("update", "shipped", "new")
    }


def test_queryset_delete_sends_one_delete_per_row(changes):
    orders = Order.objects.bulk_create([Order(status="old") for _ in range(3)])
    changes.wait(3)

    Order.objects.filter(status="old").delete()

    deletes = changes_before_marker(changes)[3:]
    assert sorted(e.pk for e in deletes) == sorted(o.pk for o in orders)
    assert {e.action for e in deletes} == {"delete"}


def test_update_that_changes_nothing_sends_nothing(changes):
    tag = Tag.objects.create(name="steady", colour="red")
    changes.wait(1)

    tag.save()  # an UPDATE writing the same values
    Tag.objects.filter(pk="steady").update(colour="red")

    assert [e.action for e in changes_before_marker(changes)] == ["insert"]


def test_tables_with_columns_that_have_no_equality_operator_still_accept_updates(changes):
    legacy = Legacy.objects.create(doc='{"a": 1}', title="v1")
    changes.wait(1)

    Legacy.objects.filter(pk=legacy.pk).update(doc='{"a": 2}')
    Legacy.objects.filter(pk=legacy.pk).update(title="v2")
    Legacy.objects.filter(pk=legacy.pk).update(title="v2")  # changes nothing

    first, second = changes.wait(3)[1:]
    assert (first.action, first.changed) == ("update", frozenset())
    assert (second.fields, second.changed) == ({"title": "v2"}, frozenset({"title"}))
    assert len(changes_before_marker(changes)) == 3


def test_update_of_fields_outside_when_changed_sends_nothing(changes):
    order = Order.objects.create(status="new")
    changes.wait(1)

    Order.objects.filter(pk=order.pk).update(note="called the customer")

    assert [e.action for e in changes_before_marker(changes)] == ["insert"]


def test_update_of_a_when_changed_field_is_sent_with_it_in_changed(changes):
    order = Order.objects.create(status="new")
    changes.wait(1)

    Order.objects.filter(pk=order.pk).update(status="paid")

    _, event = changes.wait(2)
    assert event.action == "update"
    assert event.changed == {"status"}


def test_events_left_out_of_a_declaration_are_not_sent(changes):
    article = Article.objects.create(title="short-lived")  # declares insert and update
    changes.wait(1)

    article.delete()

    assert [e.action for e in changes_before_marker(changes)] == ["insert"]


def test_identical_changes_in_one_transaction_are_not_folded_into_one(changes):
    order = Order.objects.create(status="A")
    changes.wait(1)

    with transaction.atomic():
        for status in ("B", "A", "B"):
            Order.objects.filter(pk=order.pk).update(status=status)

    updates = changes_before_marker(changes)[1:]
    assert [(e.old["status"], e.fields["status"]) for e in updates] == [
        ("A", "B"),
        ("B", "A"),
        ("A", "B"),
    ]
    assert len({e.xid for e in updates}) == 1


# Rows too large for a notification


def test_row_over_the_payload_limit_is_written_and_arrives_truncated(changes):
    body = "x" * 100_000
    article = Article.objects.create(title="long read", body=body)
    Article.objects.filter(pk=article.pk).update(title="longer read")

    inserted, updated = changes.wait(2)

    for event in (inserted, updated):
        assert event.truncated is True
        assert event.pk == article.pk
        assert event.fields == {}
        assert event.old is None
    assert (inserted.action, updated.action) == ("insert", "update")
    fetched = updated.fetch()
    assert (fetched.title, fetched.body) == ("longer read", body)


def test_row_under_the_payload_limit_arrives_whole(changes):
    body = "é" * 3500  # 7000 bytes: the payload stays below 8000
    Article.objects.create(title="just fits", body=body)

    (event,) = changes.wait(1)

    assert event.truncated is False
    assert event.fields == {"title": "just fits", "body": body}


# Keys and values come back typed


def test_uuid_primary_key_and_field_values_arrive_as_python_types(changes):
    order = Order.objects.create()
    values = {
        "taken_at": datetime(2025, 3, 30, 0, 59, 59, 123456, tzinfo=timezone.utc),
        "day": date(2025, 3, 30),
        "at": time(23, 59, 58, 999999),
        "took": timedelta(days=2, seconds=3, microseconds=7),
        "amount": Decimal("12345678901234.123456"),
        "ratio": 0.25,
        "flag": True,
        "data": {"items": [1, "two", None], "nested": {"ok": True}},
        "blob": b"\x00\x01\xfe\xff",
        "token": uuid.uuid4(),
        "count": 2**40,
    }
    reading = Reading.objects.create(order=order, **values)

    event = changes.wait_for(lambda e: e.model is Reading)

    assert isinstance(event.pk, uuid.UUID)
    assert event.pk == reading.pk
    assert event.fields == {"order_id": order.pk, **values}
    assert {name: type(value) for name, value in event.fields.items()} == {
        "order_id": int,
        **{name: type(value) for name, value in values.items()},
    }


def test_datetimes_durations_and_bytes_do_not_depend_on_the_writers_session_settings(
    changes, other_connection
):
    other_connection.execute("SET TimeZone = 'America/New_York'")
    other_connection.execute("SET IntervalStyle = 'iso_8601'")
    other_connection.execute("SET bytea_output = 'escape'")  # b"cafe" would read as hex
    pk = uuid.uuid4()
    other_connection.execute(
        "INSERT INTO testapp_reading (id, taken_at, took, flag, blob)"
        " VALUES (%s, '2025-06-01 12:00:00+00', interval '-1 year -2 mons 1 day 2 hours',"
        " false, 'cafe')",
        [pk],
    )

    event = changes.wait_for(lambda e: e.model is Reading)

    assert event.pk == pk
    assert event.fields["taken_at"] == datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    # As the ORM reads it: a year of 365 days (extract(epoch) counts 365.25), a month of 30.
    assert event.fields["took"] == Reading.objects.get(pk=pk).took
    assert event.fields["took"] == timedelta(days=-365 - 60 + 1, hours=2)
    assert event.fields["blob"] == b"cafe"


def decimal_arrays(i: int) -> dict[str, Any]:
    """A ``Measurement``'s arrays: decimals of 30 digits, more than a float holds,
    in one dimension and two, with NULL elements; ``i`` varies the last digits."""
    long = Decimal(f"12345678901234567890.12345678{i:02}")
    return {
        "readings": [long, None, Decimal("-0.0000000001")],
        "grid": [[long, None], [Decimal("-98765432109876543210.0000000001"), Decimal(i)]],
    }


def stored_arrays(*pks: Any) -> dict[Any, dict[str, Any]]:
    """The declared fields of these ``Measurement`` rows as the ORM reads them, by pk."""
    rows = Measurement.objects.filter(pk__in=pks).values("pk", "readings", "grid", "label")
    return {row.pop("pk"): row for row in rows}


def test_decimals_in_arrays_arrive_with_every_digit_at_any_depth(changes):
    first = Measurement.objects.create(**decimal_arrays(0)).pk
    # More rows than the statement trigger's short path takes.
    more = Measurement.objects.bulk_create([Measurement(**decimal_arrays(i)) for i in range(1, 26)])
    pks = [first, *(m.pk for m in more)]
    stored = stored_arrays(*pks)
    Measurement.objects.filter(pk=first).delete()

    events = changes.wait(27)

    assert [(e.action, e.pk) for e in events] == [
        *(("insert", pk) for pk in pks),
        ("delete", first),
    ]
    assert stored[first]["readings"][0] == Decimal("12345678901234567890.1234567800")
    for event in events:
        # repr() tells Decimal("1.0000000000") from Decimal("1") and from 1.0.
        assert repr(event.fields) == repr(stored[event.pk])


def test_an_update_of_decimals_in_arrays_has_every_digit_in_new_and_old_values(changes):
    pk = Measurement.objects.create(**decimal_arrays(0)).pk
    changes.wait(1)
    changes.clear()
    before = stored_arrays(pk)[pk]

    Measurement.objects.filter(pk=pk).update(readings=decimal_arrays(1)["readings"])
    after = stored_arrays(pk)[pk]
    Measurement.objects.filter(pk=pk).update(label="calibrated")

    changed, labelled = changes.wait(2)
    assert changed.changed == frozenset({"readings"})
    assert repr(changed.fields) == repr(after)
    assert repr(changed.old) == repr(before)
    assert labelled.changed == frozenset({"label"})
    assert repr(labelled.old) == repr(after)


def test_string_primary_key_arrives_as_str(changes):
    Tag.objects.create(name="héllo wörld")

    (event,) = changes.wait(1)

    assert event.pk == "héllo wörld"
    assert event.fields == {}


def test_quoted_schema_table_column_and_channel_names_deliver(changes):
    weird = Weird.objects.create(label="it's $$ é")
    Weird.objects.filter(pk=weird.pk).update(label='"quoted"')

    inserted, updated = changes.wait(2)

    assert (inserted.model, inserted.action, inserted.pk) == (Weird, "insert", weird.pk)
    assert inserted.channel == 'Odd "Channel" %s é'
    assert inserted.fields == {"label": "it's $$ é"}
    assert updated.fields == {"label": '"quoted"'}
    assert updated.old == {"label": "it's $$ é"}
    assert updated.changed == {"label"}


# Models and their senders


def test_multi_table_child_sends_an_event_per_table_each_with_its_own_sender(changes):
    senders = []

    def record(sender, event, **kwargs):
        senders.append((sender, event.model, event.fields))

    row_changed.connect(record, sender=Place, weak=False)
    row_changed.connect(record, sender=Restaurant, weak=False)
    try:
        restaurant = Restaurant.objects.create(name="Chez Pierre", cuisine="french")
        events = changes_before_marker(changes)
    finally:
        row_changed.disconnect(record, sender=Place)
        row_changed.disconnect(record, sender=Restaurant)

    assert [(e.model, e.action, e.pk) for e in events] == [
        (Place, "insert", restaurant.pk),
        (Restaurant, "insert", restaurant.pk),
    ]
    assert senders == [
        (Place, Place, {"name": "Chez Pierre"}),
        (Restaurant, Restaurant, {"cuisine": "french"}),
    ]


def test_proxy_model_changes_are_sent_by_the_concrete_model(changes):
    proxy = OrderProxy.objects.create(status="via proxy")

    (event,) = changes.wait(1)

    assert (event.model, event.pk) == (Order, proxy.pk)


def test_abstract_parent_declaration_reaches_only_children_inheriting_its_meta(changes):
    Supplier.objects.create(name="supplier")
    customer = Customer.objects.create(name="customer")

    events = changes_before_marker(changes)

    assert [(e.model, e.pk, e.fields) for e in events] == [
        (Customer, customer.pk, {"name": "customer"})
    ]


def test_model_declared_in_settings_notifies(changes):
    user = User.objects.create_user("alice")

    event = changes.wait_for(lambda e: e.model is User)

    assert (event.action, event.pk, event.fields) == ("insert", user.pk, {"username": "alice"})
    assert event.channel == "pgnotify_auth_user"


# The listener keeps going


def test_failing_receiver_is_logged_counted_and_does_not_stop_delivery(changes, caplog):
    caplog.set_level(logging.ERROR, logger="django_pgnotify")

    def failing(sender, event, **kwargs):
        raise ValueError("receiver bug")

    received, (first, second) = orders_beside_a_failing_receiver(changes, failing)

    assert received == [first, second]
    assert changes.stats["receiver_errors"] == 2
    failures = [r for r in caplog.records if r.name == "django_pgnotify.dispatch"]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.ERROR]
    assert f"testapp.Order insert pk={first}" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], ValueError)
    assert "Traceback" in caplog.text and "ValueError: receiver bug" in caplog.text


def test_a_durable_change_keeps_the_error_of_its_first_failing_receiver():
    """What its row records (last_error) when several receivers fail on it; each
    failure is still counted."""

    def first(sender, event, **kwargs):
        raise ValueError("first")

    def second(sender, event, **kwargs):
        raise KeyError("second")

    dispatcher = Dispatcher()
    change = RowChange(model=Order, action="insert", pk=1, durable=True, event_id=7)
    row_changed.connect(first, sender=Order, weak=False)
    row_changed.connect(second, sender=Order, weak=False)
    try:
        dispatcher.send_sync([change])
    finally:
        row_changed.disconnect(first, sender=Order)
        row_changed.disconnect(second, sender=Order)

    errors = dispatcher.take_errors()
    assert list(errors) == [7]
    assert errors[7].endswith("first: ValueError: first")
    assert dispatcher.stats["receiver_errors"] == 2


async def async_cancelled(sender, event, **kwargs):
    raise asyncio.CancelledError  # e.g. awaiting a task of its own that was cancelled


def sync_cancelled(sender, event, **kwargs):
    raise asyncio.CancelledError  # e.g. through async_to_sync


@pytest.mark.parametrize(
    "cancelled",
    [
        pytest.param(
            async_cancelled,
            marks=pytest.mark.skipif(
                sys.version_info < (3, 11), reason="Python 3.10 cannot tell it from a cancellation"
            ),
        ),
        sync_cancelled,
    ],
    ids=["async", "sync"],
)
def test_receiver_raising_cancelled_error_is_a_receiver_error_not_a_stop(
    changes, caplog, cancelled
):
    caplog.set_level(logging.ERROR, logger="django_pgnotify")

    received, (first, second) = orders_beside_a_failing_receiver(changes, cancelled)

    assert received == [first, second]
    assert changes.stats["receiver_errors"] == 2
    failures = [r for r in caplog.records if r.name == "django_pgnotify.dispatch"]
    assert f"testapp.Order insert pk={first}" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], asyncio.CancelledError)


def test_cancelling_the_dispatch_still_cancels_it_in_an_async_receiver():
    async def scenario() -> tuple[bool, int]:
        entered = asyncio.Event()

        async def waiting(sender, event, **kwargs):
            entered.set()
            await asyncio.Event().wait()

        dispatcher = Dispatcher()
        row_changed.connect(waiting, sender=Order, weak=False)
        try:
            task = asyncio.ensure_future(
                dispatcher.send_async([RowChange(model=Order, action="insert", pk=1)])
            )
            await asyncio.wait_for(entered.wait(), 5)
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        finally:
            row_changed.disconnect(waiting, sender=Order)
        return task.cancelled(), dispatcher.stats["receiver_errors"]

    assert asyncio.run(scenario()) == (True, 0)


def test_the_lag_of_a_change_stamped_ahead_of_the_listeners_clock_is_zero_not_negative():
    """The database server's clock may run ahead of the listener's: a negative lag
    would read as a change dispatched before it was made."""
    dispatcher = Dispatcher()
    ahead = RowChange(model=Order, action="insert", pk=1, timestamp=now() + timedelta(seconds=5))

    dispatcher.send_sync([ahead])

    assert dispatcher.last_event_lag == 0.0


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("garbage", id="not-json"),
        pytest.param('{"v": 99, "model": "testapp.order"}', id="newer-version"),
        pytest.param(
            '{"v": 1, "model": "testapp.order", "action": "insert", "rows": [{"pk": 1, "fields": [1]}]}',  # noqa: E501
            id="wrong-shape",
        ),
    ],
)
def test_payload_that_is_not_ours_is_logged_counted_and_skipped(
    payload, changes, other_connection, caplog
):
    caplog.set_level(logging.WARNING, logger="django_pgnotify")
    other_connection.execute("SELECT pg_notify(%s, %s)", [ORDER_CHANNEL, payload])
    order = Order.objects.create(status="after")

    (event,) = changes_before_marker(changes, undecodable=1)

    assert event.pk == order.pk
    (warning,) = [r for r in caplog.records if r.name == "django_pgnotify.listener"]
    assert warning.levelno == logging.WARNING
    assert ORDER_CHANNEL in warning.getMessage()
    assert str(other_connection.info.backend_pid) in warning.getMessage()
    assert repr(payload)[:30] in warning.getMessage()


def test_changes_of_a_model_not_served_are_counted_and_reported_once(
    changes, other_connection, caplog
):
    caplog.set_level(logging.DEBUG, logger="django_pgnotify")
    payload = '{"v": 1, "model": "auth.group", "action": "insert", "rows": [{"pk": 1}]}'
    other_connection.execute("SELECT pg_notify(%s, %s)", [ORDER_CHANNEL, payload])
    other_connection.execute("SELECT pg_notify(%s, %s)", [ORDER_CHANNEL, payload + " "])
    order = Order.objects.create(status="after")

    (event,) = changes_before_marker(changes)

    assert event.pk == order.pk
    assert changes.stats["ignored"] == 2
    reports = [r for r in caplog.records if "auth.group" in r.getMessage()]
    assert [r.levelno for r in reports] == [logging.WARNING, logging.DEBUG]


# Reading the row back


def test_fetch_returns_the_current_row_and_none_after_delete(changes):
    order = Order.objects.create(status="new")
    (event,) = changes.wait(1)

    Order.objects.filter(pk=order.pk).update(status="paid")
    fetched = event.fetch()
    assert fetched == order
    assert fetched.status == "paid"

    order.delete()
    assert event.fetch() is None


# The listener's connection


def listener_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'pgnotify_listen' AND datname = current_database()"
        )
        return cursor.fetchone()[0]


def test_listener_uses_its_own_application_name_even_when_options_set_one(
    transactional_db, monkeypatch
):
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "application_name", "my-site")
    before = listener_connections()

    with capture_row_changes("testapp.Tag") as changes:
        assert listener_connections() == before + 1
        Tag.objects.create(name="named")
        (event,) = changes.wait(1)

    assert event.pk == "named"


# Statements of many rows


def test_a_bulk_write_arrives_as_one_row_change_per_row_in_a_few_notifications(changes):
    titles = [f"{'x' * 100}-{i}" for i in range(600)]  # about 70 KB of rows
    Article.objects.bulk_create([Article(title=title) for title in titles])

    events = changes.wait(600)

    assert [e.fields["title"] for e in events] == titles
    assert {e.action for e in events} == {"insert"}
    # One statement: its rows share notifications, each under 8000 bytes.
    assert 9 <= changes.stats["received"] < 30


def test_a_bulk_update_announces_only_the_rows_whose_watched_columns_changed(changes):
    orders = Order.objects.bulk_create([Order(status="new") for _ in range(30)])
    changes.wait(30)
    changes.clear()

    Order.objects.filter(pk__in=[o.pk for o in orders[:10]]).update(status="paid")
    Order.objects.filter(pk__in=[o.pk for o in orders]).update(note="ignored")

    events = changes_before_marker(changes)
    assert sorted(e.pk for e in events) == sorted(o.pk for o in orders[:10])
    assert all(e.changed == frozenset({"status"}) for e in events)
    assert all(e.old["status"] == "new" for e in events)


def test_an_update_that_changes_the_pk_is_announced_with_the_new_pk(changes):
    order = Order.objects.create(status="new")
    changes.wait(1)
    changes.clear()

    Order.objects.filter(pk=order.pk).update(id=order.pk + 100_000)

    (event,) = changes.wait(1)
    assert (event.action, event.pk) == ("update", order.pk + 100_000)
    assert event.old == {"status": None, "total": None}  # the old row is not known


# Models no receiver hears


def test_the_listener_warns_at_start_of_models_whose_changes_no_receiver_hears(
    transactional_db, caplog
):
    """A module of receivers that nothing imports leaves a model unheard: the
    listener says so rather than counting its changes as dispatched."""

    def on_order(sender, **kwargs):
        pass

    def on_anything(sender, **kwargs):
        pass

    def warnings_at_start(dispatcher: Dispatcher | None = None) -> list[str]:
        caplog.clear()
        declarations = get_declarations(["testapp.Order", "testapp.Legacy", "testapp.Tag"])
        listener = Listener(declarations, dispatcher=dispatcher)
        with listener_thread(listener):
            assert listener.ready.wait(10), "the listener did not start"
        return [
            r.getMessage() for r in caplog.records if "no row_changed receiver" in r.getMessage()
        ]

    caplog.set_level(logging.WARNING, logger="django_pgnotify.listener")
    row_changed.connect(on_order, sender=Order, weak=False)
    try:
        (warning,) = warnings_at_start()
        assert "for testapp.Legacy, testapp.Tag:" in warning
        assert "AppConfig.ready()" in warning
        # Forwarded to Channels groups, every change reaches someone.
        assert warnings_at_start(ChannelsDispatcher("default", ["testapp.legacy"])) == []

        row_changed.connect(on_anything, weak=False)  # every model's
        try:
            assert warnings_at_start() == []
        finally:
            row_changed.disconnect(on_anything)
    finally:
        row_changed.disconnect(on_order, sender=Order)


def test_receivers_that_a_listener_started_receiver_connects_are_heard(transactional_db, caplog):
    """A project may connect its receivers when the listener starts: the listener looks
    for unheard models once listener_started's receivers have run."""

    def on_order(sender, **kwargs):
        pass

    def connect_on_order(sender, **kwargs):
        row_changed.connect(on_order, sender=Order, weak=False)

    caplog.set_level(logging.WARNING, logger="django_pgnotify.listener")
    listener_started.connect(connect_on_order, weak=False)
    try:
        listener = Listener(get_declarations(["testapp.Order", "testapp.Tag"]))
        with listener_thread(listener):
            assert listener.ready.wait(10), "the listener did not start"
    finally:
        listener_started.disconnect(connect_on_order)
        row_changed.disconnect(on_order, sender=Order)

    (warning,) = [
        r.getMessage() for r in caplog.records if "no row_changed receiver" in r.getMessage()
    ]
    assert "connected for testapp.Tag: the listener" in warning
