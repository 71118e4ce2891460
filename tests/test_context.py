"""``context()``, the ``pgnotify.context`` setting and the audit middleware.

Who made a change and why travels with every event of that transaction, and
of no other.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import User
from django.core.exceptions import SynchronousOnlyOperation
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.test import AsyncClient, Client, override_settings
from django.test.utils import CaptureQueriesContext

from django_pgnotify import context, paused
from tests.conftest import changes_before_marker, order_rolled_back_to_a_savepoint_last
from tests.testapp.models import Order, Tag

AUDITED = {
    "ROOT_URLCONF": "tests.audit_urls",
    "MIDDLEWARE": [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django_pgnotify.middleware.AuditContextMiddleware",
    ],
    "SESSION_ENGINE": "django.contrib.sessions.backends.signed_cookies",
}


def test_context_arrives_on_that_transactions_events_only_including_raw_sql(changes):
    with context(actor="user:42", reason="refund"), transaction.atomic():
        order = Order.objects.create(status="new")
        with connection.cursor() as cursor:
            cursor.execute("UPDATE testapp_order SET status = 'refunded' WHERE id = %s", [order.pk])
    Order.objects.filter(pk=order.pk).update(status="closed")  # next transaction, same connection

    inserted, updated, closed = changes.wait(3)

    assert inserted.context == updated.context == {"actor": "user:42", "reason": "refund"}
    assert (inserted.action, updated.fields["status"]) == ("insert", "refunded")
    assert inserted.xid == updated.xid
    assert closed.fields["status"] == "closed" and closed.context is None
    assert closed.pid == inserted.pid  # the very same connection


def test_writes_in_autocommit_mode_carry_the_context_and_reads_stay_outside(changes):
    with context(actor="cron:nightly", request_id="r-1"):
        assert Order.objects.count() >= 0  # a read: no transaction needed
        first = Order.objects.create(status="a")
        second = Order.objects.create(status="b")

    a, b = changes.wait(2)

    assert (a.pk, b.pk) == (first.pk, second.pk)
    assert a.context == b.context == {"actor": "cron:nightly", "request_id": "r-1"}
    assert a.xid != b.xid  # each autocommit write stays its own transaction


def test_nested_contexts_merge_and_leaving_one_restores_the_outer(changes):
    with transaction.atomic(), context(actor="user:1", reason="import"):
        Order.objects.create(status="outer")
        with pytest.raises(RuntimeError), context(reason="fix", ticket=7):
            Order.objects.create(status="inner")
            raise RuntimeError("leave the inner block")
        Order.objects.create(status="outer again")
        # Still in the transaction, after the block: no context any more.
    Order.objects.create(status="none")

    events = changes.wait(4)

    assert [(e.fields["status"], e.context) for e in events] == [
        ("outer", {"actor": "user:1", "reason": "import"}),
        ("inner", {"actor": "user:1", "reason": "fix", "ticket": 7}),
        ("outer again", {"actor": "user:1", "reason": "import"}),
        ("none", None),
    ]


def test_leaving_the_block_inside_a_transaction_clears_the_context_for_the_rest(changes):
    with transaction.atomic():
        with context(actor="user:5"):
            Order.objects.create(status="with")
        Order.objects.create(status="without")

    first, second = changes.wait(2)

    assert (first.context, second.context) == ({"actor": "user:5"}, None)
    assert first.xid == second.xid


def test_a_savepoint_rolled_back_last_in_the_block_does_not_keep_the_context_after_it(
    changes,
):
    with transaction.atomic():
        with context(actor="user:5"):
            Order.objects.create(status="with")
            order_rolled_back_to_a_savepoint_last()
        Order.objects.create(status="without")

    first, second = changes.wait(2)

    assert [e.fields["status"] for e in (first, second)] == ["with", "without"]
    assert (first.context, second.context) == ({"actor": "user:5"}, None)


@pytest.mark.parametrize("inner", ["context", "paused"])
def test_a_block_left_inside_a_failed_savepoint_fails_nothing_after_its_rollback(changes, inner):
    Tag.objects.create(name="taken")
    with context(actor="user:6"), transaction.atomic():
        Order.objects.create(status="before")
        block = context(reason="inner") if inner == "context" else paused(Tag)
        with pytest.raises(IntegrityError), transaction.atomic(), block:
            Tag.objects.create(name="taken")  # the transaction fails here
        Order.objects.create(status="after")

    *_, before, after = changes.wait(3)

    assert [e.fields["status"] for e in (before, after)] == ["before", "after"]
    assert before.context == after.context == {"actor": "user:6"}


def test_a_procedure_that_commits_runs_in_autocommit_mode_as_it_is(changes):
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE PROCEDURE pgnotify_test_batch() LANGUAGE plpgsql AS $$ BEGIN"
            " INSERT INTO testapp_order (status, total, note) VALUES ('one', 0, '');"
            " COMMIT;"
            " INSERT INTO testapp_order (status, total, note) VALUES ('two', 0, ''); END $$"
        )
        try:
            with context(actor="batch"):
                cursor.execute("CALL pgnotify_test_batch()")
                cursor.execute("DO $$ BEGIN COMMIT; END $$")
                Order.objects.create(status="three")
        finally:
            cursor.execute("DROP PROCEDURE pgnotify_test_batch()")

    one, two, three = changes.wait(3)

    assert [e.fields["status"] for e in (one, two, three)] == ["one", "two", "three"]
    # Not covered: a value set for the session could reach other clients through a pooler.
    assert (one.context, two.context, three.context) == (None, None, {"actor": "batch"})


def test_other_connections_never_see_the_context(changes, other_connection):
    with context(actor="user:9"), transaction.atomic():
        Order.objects.create(status="mine")
        other_connection.execute(
            "INSERT INTO testapp_order (status, total, note) VALUES ('theirs', 0, '')"
        )

    theirs, mine = changes.wait(2)  # theirs committed first

    assert (theirs.fields["status"], theirs.context) == ("theirs", None)
    assert (mine.fields["status"], mine.context) == ("mine", {"actor": "user:9"})


def test_non_django_writers_set_the_context_for_one_transaction(changes, other_connection):
    with other_connection.transaction():
        other_connection.execute(
            "SELECT set_config('pgnotify.context',"
            " json_build_object('actor', 'billing-service', 'amount', 12.5)::text, true)"
        )
        other_connection.execute(
            "INSERT INTO testapp_order (status, total, note) VALUES ('billed', 0, '')"
        )
    other_connection.execute(
        "INSERT INTO testapp_order (status, total, note) VALUES ('after', 0, '')"
    )

    billed, after = changes.wait(2)

    assert billed.context == {"actor": "billing-service", "amount": 12.5}
    assert after.context is None


def test_a_malformed_context_set_by_hand_never_fails_the_write(changes, other_connection):
    with other_connection.transaction():
        other_connection.execute("SET LOCAL pgnotify.context = 'not json {'")
        other_connection.execute(
            "INSERT INTO testapp_order (status, total, note) VALUES ('still sent', 1.5, '')"
        )

    (event,) = changes.wait(1)

    assert event.fields == {"status": "still sent", "total": Decimal("1.50")}
    assert event.context is None


def test_a_context_set_by_hand_too_large_for_the_message_is_left_out(changes, other_connection):
    # context() refuses this; a writer that sets the setting itself still writes.
    large = '{"note": "' + "x" * 3000 + '"}'
    with other_connection.transaction():
        other_connection.execute("SELECT set_config('pgnotify.context', %s, true)", (large,))
        other_connection.execute(
            "INSERT INTO testapp_order (status, total, note) VALUES ('sent without', 1.5, '')"
        )

    (event,) = changes.wait(1)

    assert event.fields["status"] == "sent without"
    assert event.context is None


def test_a_context_that_is_too_large_or_not_json_is_refused_before_any_write():
    with pytest.raises(ValueError, match="limit"), context(note="x" * 2000):
        pass
    with pytest.raises(TypeError), context(thing=object()):
        pass


@override_settings(**AUDITED)
def test_the_middleware_records_the_user_and_the_request_id(changes):
    user = User.objects.create(username="alice")
    client = Client()
    client.force_login(user)

    client.post("/orders/", {"status": "from web"}, headers={"X-Request-ID": "req-abc.1"})
    client.post("/orders/", {"status": "bad header"}, headers={"X-Request-ID": "bad id!"})
    Order.objects.create(status="outside")

    events = [e for e in changes_before_marker(changes) if e.model is Order]
    web, bad_header, outside = events
    assert web.context == {"actor": f"user:{user.pk}", "request_id": "req-abc.1"}
    assert web.fields["status"] == "from web"
    # Client input that is not a plain short id is replaced by a new one.
    assert bad_header.context["actor"] == f"user:{user.pk}"
    assert bad_header.context["request_id"] != "bad id!"
    assert len(bad_header.context["request_id"]) == 32
    assert outside.context is None


@override_settings(**AUDITED)
def test_the_middleware_covers_the_writes_of_async_views_under_asgi(changes):
    """Django runs the (sync) middleware in the thread where an async view's ORM calls
    run, so their writes carry the context too."""
    user = User.objects.create(username="carol")
    client = AsyncClient()
    client.force_login(user)

    response = async_to_sync(client.post)(
        "/async/orders/", {"status": "async"}, headers={"X-Request-ID": "req-async"}
    )

    (event,) = [e for e in changes_before_marker(changes) if e.model is Order]
    assert response.status_code == 201
    assert (event.fields["status"], event.context) == (
        "async",
        {"actor": f"user:{user.pk}", "request_id": "req-async"},
    )


@override_settings(**AUDITED)
def test_a_user_who_logs_in_during_the_request_is_the_actor_of_what_follows(changes):
    user = User.objects.create(username="dave")

    response = Client().post("/orders/login/", {"username": "dave"})

    before, after = [e for e in changes_before_marker(changes) if e.model is Order]
    assert response.status_code == 201
    assert (before.fields["status"], "actor" in before.context) == ("before login", False)
    assert (after.fields["status"], after.context["actor"]) == ("after login", f"user:{user.pk}")
    assert after.context["request_id"] == before.context["request_id"]


@override_settings(**AUDITED)
def test_the_middleware_leaves_the_actor_out_for_anonymous_requests(changes):
    response = Client().post("/orders/", {"status": "anon"})

    (event,) = [e for e in changes_before_marker(changes) if e.model is Order]
    assert response.status_code == 201
    assert event.context == {"request_id": response["X-Request-ID"]}


def test_pgnotify_run_gives_a_commands_writes_a_context(changes, tmp_path):
    fixture = tmp_path / "orders.json"
    fixture.write_text(
        '[{"model": "testapp.order", "pk": 990002, "fields": {"status": "loaded"}}]',
        encoding="utf-8",
    )

    call_command(
        "pgnotify_run", "--context", "reason=import", "loaddata", str(fixture), verbosity=0
    )

    (event,) = changes.wait(1)
    assert (event.pk, event.context) == (990002, {"reason": "import"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "testapp.Order", "check"], "--only narrows --paused"),
        (["--context", "no-equals-sign", "check"], "KEY=VALUE"),
        (["--paused", "--only", "testapp.Nothing", "check"], "Nothing"),
    ],
)
def test_pgnotify_run_refuses_options_it_cannot_apply(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("pgnotify_run", *args)


@override_settings(**AUDITED)
def test_the_middleware_looks_the_user_up_only_when_a_request_writes(transactional_db):
    user = User.objects.create(username="bob")
    client = Client()
    client.force_login(user)

    with CaptureQueriesContext(connection) as reading:
        client.get("/orders/count/")
    with CaptureQueriesContext(connection) as writing:
        client.post("/orders/", {"status": "written"})

    def user_queries(captured):
        return [q["sql"] for q in captured.captured_queries if '"auth_user"' in q["sql"]]

    assert user_queries(reading) == []
    assert len(user_queries(writing)) == 1


def test_a_transaction_that_starts_with_a_server_side_cursor_read_carries_the_context(changes):
    # QuerySet.iterator() reads through a named (server-side) cursor first.
    Order.objects.create(status="existing")
    changes.wait(1)
    with context(actor="user:3"), transaction.atomic():
        assert [o.status for o in Order.objects.iterator(chunk_size=10)] == ["existing"]
        Order.objects.create(status="after the read")

    event = changes.wait_for(lambda e: e.fields.get("status") == "after the read")
    assert event.context == {"actor": "user:3"}


def test_context_entered_in_async_code_is_refused_and_works_in_a_sync_function(changes):
    # In async code the ORM's writes run in another thread, on another connection:
    # a block entered there would cover none of them.
    def write() -> None:
        with context(actor="user:8"):
            Order.objects.create(status="from async")

    async def handler() -> None:
        refused = pytest.raises(SynchronousOnlyOperation, match=r"context\(\).*sync_to_async")
        with refused, context(actor="user:8"):
            await Order.objects.acreate(status="never written")
        await sync_to_async(write)()

    async_to_sync(handler)()

    (event,) = changes.wait(1)
    assert (event.fields["status"], event.context) == ("from async", {"actor": "user:8"})


def test_an_inner_context_too_large_with_the_outer_one_is_refused_when_entered(changes):
    with context(actor="user:1", note="a" * 600):
        with pytest.raises(ValueError, match="enclosing"), context(reason="b" * 600):
            pass
        with context(reason="fits"):
            Order.objects.create(status="merged")

    (event,) = changes.wait(1)
    assert event.context == {"actor": "user:1", "note": "a" * 600, "reason": "fits"}
