"""``Notify(old=False)``: updates arrive with their new values alone.

Every live declaration of the test project is installed with ``old=False`` (and
without ``when_changed``, which needs the old rows) at both trigger levels, and
the delivery tests that do not look at an update's old values run again against
it (imported below), with a real listener in this process. The tests defined
here cover what ``old=False`` changes: an update's event has no ``old`` and no
``changed``, every row an ``UPDATE`` writes is announced, and the update
trigger keeps no old rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from django.db import connection

from django_pgnotify.declarations import get_declarations
from tests.conftest import (
    changes_before_marker,
    install_redeclared,
    order_moved_to_a_new_pk,
    wide_row_updated,
)
from tests.test_delivery import (  # noqa: F401  (run again here, with old=False)
    test_bulk_create_sends_one_insert_per_row,
    test_changes_arrive_in_commit_order_across_interleaved_transactions,
    test_changes_of_one_transaction_share_its_xid_and_other_transactions_differ,
    test_datetimes_durations_and_bytes_do_not_depend_on_the_writers_session_settings,
    test_decimals_in_arrays_arrive_with_every_digit_at_any_depth,
    test_delete_arrives_with_the_values_the_row_had,
    test_events_left_out_of_a_declaration_are_not_sent,
    test_insert_arrives_with_pk_fields_channel_pid_xid_and_timestamp,
    test_queryset_delete_sends_one_delete_per_row,
    test_rolled_back_changes_send_nothing,
    test_row_over_the_payload_limit_is_written_and_arrives_truncated,
    test_row_under_the_payload_limit_arrives_whole,
    test_string_primary_key_arrives_as_str,
    test_uuid_primary_key_and_field_values_arrive_as_python_types,
)
from tests.testapp.models import Article, Order


@pytest.fixture(autouse=True, params=["statement", "row"])
def new_values_only(request, restore_triggers) -> Iterator[str]:
    """Every live declaration installed with ``old=False`` at the level of the
    parameter; restored afterwards."""
    for declaration in get_declarations():
        if not declaration.notify.durable:
            install_redeclared(declaration, old=False, when_changed=(), level=request.param)
    yield request.param


def test_an_update_arrives_with_its_new_values_and_no_old_values(changes):
    order = Order.objects.create(status="new", total="5.00")
    Order.objects.filter(pk=order.pk).update(status="paid", note="not declared")

    _, event = changes.wait(2)

    assert (event.model, event.action, event.pk) == (Order, "update", order.pk)
    assert event.fields == {"status": "paid", "total": Decimal("5.00")}
    assert event.old is None
    assert event.changed == frozenset()
    assert event.truncated is False


def test_every_row_an_update_writes_is_announced_even_unchanged(changes):
    # Nothing compares old and new rows: an UPDATE that leaves a row as it was
    # still wrote it, as a row trigger without a WHEN clause sees it.
    order = Order.objects.create(status="new")
    changes.wait(1)
    changes.clear()

    order.save()

    (event,) = changes_before_marker(changes)
    assert (event.action, event.pk, event.fields["status"]) == ("update", order.pk, "new")


def test_a_bulk_update_arrives_as_one_event_per_row_with_new_values(changes):
    orders = Order.objects.bulk_create([Order(status="new", total=i) for i in range(300)])
    changes.wait(300)
    changes.clear()

    Order.objects.filter(pk__in=[o.pk for o in orders]).update(status="paid")

    events = changes.wait(300)
    assert sorted(e.pk for e in events) == sorted(o.pk for o in orders)
    assert {(e.action, e.fields["status"]) for e in events} == {("update", "paid")}
    assert {e.pk: e.fields["total"] for e in events} == {o.pk: Decimal(o.total) for o in orders}
    assert all(e.old is None and e.changed == frozenset() for e in events)


def test_an_update_of_long_rows_arrives_whole_and_a_too_long_one_truncated(changes):
    # Rows of 512 bytes or more take the statement trigger's grouping query.
    articles = Article.objects.bulk_create(
        [Article(title=f"t{i}", body="x" * 3000) for i in range(25)]
        + [Article(title="huge", body="y" * 9000)]
    )
    changes.wait(26)
    changes.clear()

    Article.objects.filter(pk__in=[a.pk for a in articles]).update(title="renamed")

    events = {e.pk: e for e in changes.wait(26)}
    huge = events.pop(articles[-1].pk)
    assert (huge.action, huge.truncated, huge.fields, huge.old) == ("update", True, {}, None)
    assert {(e.fields["title"], len(e.fields["body"])) for e in events.values()} == {
        ("renamed", 3000)
    }


def test_a_row_too_long_to_send_with_its_old_values_arrives_whole(changes):
    # 5000 bytes twice (new and old) would not fit a notification; once does.
    article = Article.objects.create(title="draft", body="z" * 5000)
    changes.wait(1)
    changes.clear()

    Article.objects.filter(pk=article.pk).update(title="published")

    (event,) = changes.wait(1)
    assert (event.truncated, event.fields["title"], len(event.fields["body"])) == (
        False,
        "published",
        5000,
    )


def test_a_wide_row_update_arrives_with_every_new_value(changes):
    pk, event = wide_row_updated(changes)

    assert event.pk == pk
    assert (event.fields["ratio"], event.fields["flag"], event.fields["data"]) == (
        0.75,
        True,
        {"v": 2},
    )
    assert (event.old, event.changed) == (None, frozenset())


def test_an_update_that_changes_the_pk_is_announced_under_the_new_pk(changes):
    event = order_moved_to_a_new_pk(changes, 300_000)

    assert (event.old, event.changed) == (None, frozenset())


def test_the_update_trigger_keeps_no_old_rows(new_values_only):
    (declaration,) = [d for d in get_declarations(["testapp.Order"])]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgname, tgoldtable, tgnewtable FROM pg_trigger"
            " WHERE tgrelid = 'testapp_order'::regclass AND NOT tgisinternal ORDER BY tgname"
        )
        triggers = cursor.fetchall()
    if new_values_only == "row":
        assert {(old, new) for _, old, new in triggers} == {(None, None)}
    else:
        assert triggers == [
            ("pgnotify_delete", "pgnotify_old", None),
            ("pgnotify_insert", None, "pgnotify_new"),
            ("pgnotify_update", None, "pgnotify_new"),
        ]
    assert declaration.notify.old is True  # the project's own declaration is unchanged
