"""``django_pgnotify.testing`` and the ``row_changes`` fixture, used as the docs say."""

from __future__ import annotations

import re

import psycopg
import pytest
from django.test import TransactionTestCase

from django_pgnotify import row_changed
from django_pgnotify.dispatch import Dispatcher
from django_pgnotify.installation import NothingDeclared, uninstall_triggers
from django_pgnotify.testing import capture_row_changes
from tests.conftest import test_database_url as database_url
from tests.testapp.models import Order, Tag


class OrderNotificationTests(TransactionTestCase):
    """Django's own test runner style: TransactionTestCase commits for real."""

    def test_paying_an_order_announces_the_status_change(self):
        order = Order.objects.create(status="new", total="19.90")
        with capture_row_changes("testapp.Order") as changes:
            order.status = "paid"
            order.save()
            (event,) = changes.wait(1)
        self.assertEqual(event.action, "update")
        self.assertEqual(event.changed, {"status"})
        self.assertEqual((event.old["status"], event.fields["status"]), ("new", "paid"))


def test_row_changes_fixture_runs_a_real_listener_for_the_test(row_changes):
    order = Order.objects.create(status="new", total="5.00")
    order.status = "paid"
    order.save()

    inserted, updated = row_changes.wait(2)

    assert (inserted.action, updated.action) == ("insert", "update")
    assert updated.changed == {"status"}
    assert row_changes.listener.health.connected


def test_receivers_of_earlier_changes_have_finished_when_wait_returns(row_changes):
    finished = []

    async def slow_async_receiver(sender, event, **kwargs):
        import asyncio

        await asyncio.sleep(0.05)
        finished.append(event.pk)

    row_changed.connect(slow_async_receiver, sender=Order, weak=False)
    try:
        first = Order.objects.create()
        Tag.objects.create(name="after it")
        row_changes.wait_for(lambda e: e.model is Tag)
    finally:
        row_changed.disconnect(slow_async_receiver, sender=Order)

    assert finished == [first.pk]


def test_wait_fails_after_its_timeout_listing_what_arrived(row_changes):
    Tag.objects.create(name="only one")

    with pytest.raises(AssertionError, match=r"expected 2 row change\(s\) within 0.3s, got 1"):
        row_changes.wait(2, timeout=0.3)


def test_a_failed_wait_names_the_declarations_without_triggers(restore_triggers):
    """A test database made without the migrate hook has none: the wait said only
    that nothing arrived, where pgnotify_listen says what to run."""
    uninstall_triggers(["testapp.Tag"])

    with capture_row_changes("testapp.Tag", "testapp.Order") as changes:
        Tag.objects.create(name="never announced")
        with pytest.raises(AssertionError) as waited:
            changes.wait(1, timeout=0.3)
        with pytest.raises(AssertionError) as waited_for:
            changes.wait_for(lambda event: True, timeout=0.3)

    for failure in (waited, waited_for):
        message = str(failure.value)
        assert "in database 'default': missing: testapp.Tag:default on" in message
        assert "run manage.py pgnotify_install" in message
        assert "testapp.Order" not in message  # installed: not named


def test_a_failed_wait_with_every_trigger_installed_blames_nothing(row_changes):
    with pytest.raises(AssertionError) as waited:
        row_changes.wait(1, timeout=0.1)

    assert str(waited.value) == "expected 1 row change(s) within 0.1s, got 0: []"


@pytest.mark.django_db  # not transaction=True: the test runs in a transaction rolled back after
def test_a_plain_test_transaction_never_commits_so_nothing_is_announced():
    with capture_row_changes() as changes:
        Order.objects.create(status="never committed")
        # A change committed by another connection after it: anything the first
        # change had announced would arrive before this one.
        with psycopg.connect(database_url(), autocommit=True) as other:
            other.execute("INSERT INTO testapp_tag (name, colour) VALUES ('committed', 'red')")
        marker = changes.wait_for(lambda e: e.model is Tag)
        with psycopg.connect(database_url(), autocommit=True) as other:
            other.execute("DELETE FROM testapp_tag WHERE name = 'committed'")

    assert changes.index(marker) == 0


class BrokenDispatcher(Dispatcher):
    """Dispatching that ends the listener, as a bug in it would."""

    def send_sync(self, *args, **kwargs):
        raise RuntimeError("a bug in dispatching")


def test_a_wait_ends_as_soon_as_the_listener_fails_and_says_why(transactional_db):
    """Not after its timeout, with "got 0" and nothing about the cause."""
    with (
        pytest.raises(RuntimeError, match="the pgnotify listener failed"),
        capture_row_changes("testapp.Order", dispatcher=BrokenDispatcher()) as changes,
    ):
        Order.objects.create(status="never received")
        with pytest.raises(AssertionError, match="a bug in dispatching") as waited:
            changes.wait(1, timeout=60)
        with pytest.raises(AssertionError, match="a bug in dispatching"):
            changes.wait_for(lambda event: True, timeout=60)

    assert "the pgnotify listener failed" in str(waited.value)
    assert isinstance(waited.value.__cause__, RuntimeError)


def test_wait_for_asks_the_predicate_about_each_change_once_per_look():
    """As before waits ended on a listener's failure: a predicate that counts or
    collects what it is shown sees each change that arrived once."""
    from django_pgnotify import RowChange
    from django_pgnotify.testing import CapturedChanges

    changes = CapturedChanges()
    first, second = RowChange(model=Order, action="insert", pk=1), RowChange(Order, "insert", 2)
    changes.add(first)
    changes.add(second)
    shown = []

    def is_the_second(event):
        shown.append(event.pk)
        return event.pk == 2

    assert changes.wait_for(is_the_second, timeout=1) is second
    assert shown == [1, 2]


def test_selectors_that_name_only_models_declaring_nothing_are_refused(transactional_db):
    """As the commands refuse them: the listener would serve nothing, and wait() would
    time out with no hint."""
    with (
        pytest.raises(
            NothingDeclared,
            match=re.escape("No model in contenttypes.ContentType declares pgnotify for database"),
        ),
        capture_row_changes("contenttypes.ContentType"),
    ):
        pass
