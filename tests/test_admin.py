"""The durable events' admin: who may retry or discard what listeners could not deliver."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db.models.functions import Now
from django.test import Client

from django_pgnotify.models import DurableEvent
from tests.conftest import wait_until

CHANGELIST = "/admin/django_pgnotify/durableevent/"


def staff_client(*permissions: str) -> Client:
    user = User.objects.create_user("staff", password="secret", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_pgnotify", codename__in=permissions
        )
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def dead_letter(db) -> DurableEvent:
    return DurableEvent.objects.create(
        declaration="testapp.Order:default",
        model="testapp.order",
        action="insert",
        payload="[1]",
        status="dead",
        attempts=3,
    )


@pytest.mark.parametrize(
    ("permissions", "actions"),
    [
        (["view_durableevent"], []),
        (["view_durableevent", "change_durableevent"], ["retry"]),
        (["view_durableevent", "delete_durableevent"], ["discard"]),
    ],
)
def test_the_actions_offered_follow_the_users_permissions(dead_letter, permissions, actions):
    response = staff_client(*permissions).get(CHANGELIST)

    assert response.status_code == 200
    form = response.context["action_form"]  # None when no action is left
    offered = [name for name, _ in form.fields["action"].choices] if form else []
    assert [a for a in offered if a in ("retry", "discard")] == actions


def test_a_user_who_may_only_view_cannot_retry(dead_letter):
    client = staff_client("view_durableevent")

    client.post(CHANGELIST, {"action": "retry", "_selected_action": [dead_letter.pk]})

    dead_letter.refresh_from_db()
    assert (dead_letter.status, dead_letter.attempts) == ("dead", 3)


def test_a_user_who_may_change_retries(dead_letter):
    client = staff_client("view_durableevent", "change_durableevent")

    response = client.post(CHANGELIST, {"action": "retry", "_selected_action": [dead_letter.pk]})

    assert response.status_code == 302
    dead_letter.refresh_from_db()
    assert (dead_letter.status, dead_letter.attempts) == ("pending", 0)


def leased_event(lease: timedelta) -> DurableEvent:
    """A pending event a listener holds, its lease running out after ``lease``."""
    return DurableEvent.objects.create(
        declaration="testapp.Order:default",
        model="testapp.order",
        action="insert",
        payload="[2]",
        attempts=1,
        lease_owner="host:4242:abcd1234",
        lease_until=Now() + lease,
    )


def test_retry_leaves_a_row_a_listener_is_delivering_and_says_so(dead_letter):
    in_hand = leased_event(timedelta(minutes=5))
    client = staff_client("view_durableevent", "change_durableevent")

    response = client.post(
        CHANGELIST,
        {"action": "retry", "_selected_action": [dead_letter.pk, in_hand.pk]},
        follow=True,
    )

    in_hand.refresh_from_db()
    assert (in_hand.lease_owner, in_hand.attempts) == ("host:4242:abcd1234", 1)
    dead_letter.refresh_from_db()
    assert (dead_letter.status, dead_letter.attempts) == ("pending", 0)
    shown = [str(m) for m in response.context["messages"]]
    assert shown == [
        "1 event(s) will be delivered again.",
        "1 event(s) left as they are: a listener is delivering them now.",
    ]


def test_retry_counts_what_it_did_when_a_lease_runs_out_meanwhile(dead_letter, other_connection):
    """The lease of the row in hand ends while Retry runs: the row is counted once,
    as left or as retried, never as both."""
    from django.db import connection

    in_hand = leased_event(timedelta(seconds=1))
    in_hand.refresh_from_db()

    def lease_over() -> bool:
        query = "SELECT clock_timestamp() > %s"
        return other_connection.execute(query, [in_hand.lease_until]).fetchone()[0]

    def update_once_the_lease_is_over(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("UPDATE") and "pgnotify_event" in sql:
            wait_until(lease_over, timeout=10, what="the lease ran out")
        return execute(sql, params, many, context)

    client = staff_client("view_durableevent", "change_durableevent")
    with connection.execute_wrapper(update_once_the_lease_is_over):
        response = client.post(
            CHANGELIST,
            {"action": "retry", "_selected_action": [dead_letter.pk, in_hand.pk]},
            follow=True,
        )

    in_hand.refresh_from_db()
    retried = in_hand.lease_owner == ""
    shown = [str(m) for m in response.context["messages"]]
    if retried:
        assert shown == ["2 event(s) will be delivered again."]
    else:
        assert shown == [
            "1 event(s) will be delivered again.",
            "1 event(s) left as they are: a listener is delivering them now.",
        ]


def test_the_list_shows_who_holds_a_row_only_while_its_lease_runs(dead_letter):
    """A released row keeps its owner as a mark, and an expired lease holds nothing:
    neither is shown as held by that listener."""
    held = leased_event(timedelta(minutes=5))
    expired = leased_event(-timedelta(minutes=5))
    released = leased_event(timedelta(minutes=5))
    DurableEvent.objects.filter(pk=released.pk).update(lease_until=None)

    response = staff_client("view_durableevent").get(CHANGELIST)

    rows = {row.pk: row for row in response.context["cl"].result_list}
    admin = response.context["cl"].model_admin
    assert admin.held_by(rows[held.pk]) == "host:4242:abcd1234"
    assert admin.held_by(rows[expired.pk]) == "nobody (host:4242:abcd1234's lease expired)"
    assert admin.held_by(rows[released.pk]) == ""
    assert admin.held_by(rows[dead_letter.pk]) == ""
    assert "nobody (host:4242:abcd1234&#x27;s lease expired)" in response.content.decode()
