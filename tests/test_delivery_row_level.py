"""``Notify(level="row")``: row-level triggers deliver the same row changes.

Every live declaration of the test project is installed at row level for
these tests, and the delivery tests that hold for both levels run again
against it (imported below), with a real listener in this process. The tests
defined here cover where the row level differs (one notification per row; an
update that changes the pk) and paths of its own (wide rows, pause, context).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import transaction

from django_pgnotify import context, paused
from django_pgnotify.declarations import get_declarations
from tests.conftest import (
    changes_before_marker,
    install_redeclared,
    order_moved_to_a_new_pk,
    wide_row_updated,
)
from tests.test_context import (  # noqa: F401  (run again here, at row level)
    test_a_context_set_by_hand_too_large_for_the_message_is_left_out,
)
from tests.test_delivery import (  # noqa: F401  (run again here, at row level)
    test_a_bulk_update_announces_only_the_rows_whose_watched_columns_changed,
    test_abstract_parent_declaration_reaches_only_children_inheriting_its_meta,
    test_an_update_of_decimals_in_arrays_has_every_digit_in_new_and_old_values,
    test_bulk_create_sends_one_insert_per_row,
    test_changes_arrive_in_commit_order_across_interleaved_transactions,
    test_changes_of_one_transaction_share_its_xid_and_other_transactions_differ,
    test_datetimes_durations_and_bytes_do_not_depend_on_the_writers_session_settings,
    test_decimals_in_arrays_arrive_with_every_digit_at_any_depth,
    test_delete_arrives_with_the_values_the_row_had,
    test_events_left_out_of_a_declaration_are_not_sent,
    test_identical_changes_in_one_transaction_are_not_folded_into_one,
    test_insert_arrives_with_pk_fields_channel_pid_xid_and_timestamp,
    test_model_declared_in_settings_notifies,
    test_multi_table_child_sends_an_event_per_table_each_with_its_own_sender,
    test_proxy_model_changes_are_sent_by_the_concrete_model,
    test_queryset_delete_sends_one_delete_per_row,
    test_queryset_update_sends_one_update_per_row,
    test_quoted_schema_table_column_and_channel_names_deliver,
    test_raw_sql_from_another_client_is_announced_with_that_clients_pid,
    test_rolled_back_changes_send_nothing,
    test_row_over_the_payload_limit_is_written_and_arrives_truncated,
    test_row_under_the_payload_limit_arrives_whole,
    test_string_primary_key_arrives_as_str,
    test_tables_with_columns_that_have_no_equality_operator_still_accept_updates,
    test_update_arrives_with_new_values_old_values_and_changed_fields,
    test_update_of_a_when_changed_field_is_sent_with_it_in_changed,
    test_update_of_fields_outside_when_changed_sends_nothing,
    test_update_that_changes_nothing_sends_nothing,
    test_uuid_primary_key_and_field_values_arrive_as_python_types,
)
from tests.testapp.models import Article, Order


@pytest.fixture(autouse=True)
def row_level_triggers(restore_triggers) -> Iterator[None]:
    """Every live declaration installed with ``level="row"``; restored afterwards."""
    for declaration in get_declarations():
        if not declaration.notify.durable:
            built = install_redeclared(declaration, level="row")
            for statement in built.create_triggers:
                assert " FOR EACH ROW " in statement
    yield


def test_a_bulk_write_arrives_as_one_notification_per_row(changes):
    titles = [f"{'x' * 100}-{i}" for i in range(60)]
    Article.objects.bulk_create([Article(title=title) for title in titles])

    events = changes.wait(60)

    assert [e.fields["title"] for e in events] == titles
    assert changes.stats["received"] == 60


def test_an_update_that_changes_the_pk_carries_the_old_values(changes):
    event = order_moved_to_a_new_pk(changes, 100_000, status="moved")

    assert event.old["status"] == "new"
    assert event.changed == frozenset({"status"})


def test_an_update_that_changes_only_the_pk_is_announced_despite_when_changed(changes):
    # As with statement triggers, which cannot pair such a row with its old one.
    event = order_moved_to_a_new_pk(changes, 200_000)

    assert event.changed == frozenset()
    assert event.old["status"] == "new"


def test_a_wide_row_update_carries_its_old_values_and_changed_fields(changes):
    pk, event = wide_row_updated(changes)

    assert event.pk == pk
    assert (event.fields["ratio"], event.old["ratio"]) == (0.75, 0.5)
    assert (event.fields["data"], event.old["data"]) == ({"v": 2}, {"v": 1})
    assert event.changed == frozenset({"ratio", "flag", "data"})


def test_paused_writes_send_nothing_and_the_context_travels(changes):
    with transaction.atomic(), paused("testapp.Order"):
        Order.objects.create(status="quiet")
    with transaction.atomic(), context(request_id="r-1"):
        Order.objects.create(status="heard")

    events = changes_before_marker(changes)

    assert [(e.fields["status"], e.context) for e in events] == [("heard", {"request_id": "r-1"})]
