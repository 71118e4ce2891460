"""RowChangeConsumer and the forwarder, in one process: Channels' in-memory layer, or channels_redis
where batching is what is tested (``REDIS_URL``, else an embedded Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import math
import uuid
from collections import Counter
from contextlib import suppress
from decimal import Decimal
from typing import Any
from unittest.mock import ANY

import pytest

pytest.importorskip("channels", reason="the channels extra is not installed")

from channels.auth import UserLazyObject
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser, Permission, User

from django_pgnotify import Notify, RowChange, channels_bridge, context
from django_pgnotify.channels_bridge import (
    BATCH,
    CHECKPOINT,
    RESYNC,
    ROW_CHANGED,
    ChannelLayerForwarder,
    ChannelsDispatcher,
    json_safe,
)
from django_pgnotify.consumers import RowChangeConsumer
from tests.testapp.models import Measurement, Order, Price, Reading, Shift, Tag

TIMEOUT = 10


class FakeUser:
    """A logged-in user with exactly the given permissions (no database needed)."""

    is_authenticated = True

    def __init__(self, *perms: str) -> None:
        self.perms = set(perms)

    def has_perm(self, perm: str) -> bool:
        return perm in self.perms


VIEWER = FakeUser("testapp.view_order", "testapp.view_tag")


@pytest.fixture(autouse=True)
def in_memory_layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": True}


def order_change(pk: int, status: str = "paid", action: str = "update") -> RowChange:
    return RowChange(
        model=Order,
        action=action,
        pk=pk,
        fields={"status": status, "total": Decimal("19.90")},
        old={"status": "new", "total": Decimal("19.90")} if action == "update" else None,
        changed=frozenset({"status"}) if action == "update" else frozenset(),
        xid=7,
        context={"actor": "user:1"},
    )


async def connect(user: Any, consumer: Any = RowChangeConsumer) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(consumer.as_asgi(), "/ws/pgnotify/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect(TIMEOUT)
    assert connected
    return communicator


async def ask(communicator: WebsocketCommunicator, request: Any) -> dict[str, Any]:
    await communicator.send_json_to(request)
    return await communicator.receive_json_from(TIMEOUT)


async def forward(dispatcher: ChannelsDispatcher, *events: RowChange) -> None:
    await dispatcher.send_async(events)
    await sent(dispatcher.forwarder)


async def sent(forwarder: ChannelLayerForwarder) -> None:
    """Wait until ``forwarder`` sent everything into the layer; consumers read it next."""
    while forwarder.backlog:
        await asyncio.sleep(0.01)


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_permitted_user_receives_events_in_order_after_the_acknowledgement():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        assert await ask(client, {"subscribe": "testapp.order", "id": 1}) == {
            "type": "subscribed",
            "model": "testapp.order",
            "id": 1,
        }
        await forward(dispatcher, order_change(1), order_change(2, "shipped"))
        first = await client.receive_json_from(TIMEOUT)
        second = await client.receive_json_from(TIMEOUT)
        assert first == {
            "type": "row_changed",
            "model": "testapp.order",
            "action": "update",
            "pk": 1,
            "fields": {"status": "paid", "total": "19.90"},
            "old": {"status": "new", "total": "19.90"},
            "changed": ["status"],
            "truncated": False,
            "context": {"actor": "user:1"},
            "xid": 7,
            "timestamp": None,
            "durable": False,
            "event_id": None,
            "seq": 1,
            "stream": dispatcher.forwarder.stream,
        }
        assert (second["pk"], second["seq"], second["fields"]["status"]) == (2, 2, "shipped")
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


@pytest.mark.parametrize("user", [AnonymousUser(), FakeUser(), FakeUser("testapp.view_tag")])
def test_users_without_the_view_permission_are_refused_and_receive_nothing(user):
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(user)
        for request in ({"subscribe": "testapp.order"}, {"subscribe": "testapp.order", "pk": 1}):
            answer = await ask(client, request)
            assert answer["type"] == "error" and answer["code"] == "forbidden"
        await forward(dispatcher, order_change(1))
        assert await client.receive_nothing(0.3)
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


def test_a_row_subscription_receives_only_that_row():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        answer = await ask(client, {"subscribe": "testapp.order", "pk": "2"})
        assert answer == {"type": "subscribed", "model": "testapp.order", "pk": "2"}
        await forward(dispatcher, order_change(1), order_change(2), order_change(3))
        event = await client.receive_json_from(TIMEOUT)
        assert (event["pk"], event["seq"]) == (2, 2)
        assert await client.receive_nothing(0.2)
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


def test_model_and_row_subscriptions_together_deliver_each_event_once():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        await ask(client, {"subscribe": "testapp.order"})
        await forward(dispatcher, order_change(1), order_change(2))
        received = [await client.receive_json_from(TIMEOUT) for _ in range(2)]
        assert [e["pk"] for e in received] == [1, 2]
        assert await client.receive_nothing(0.2)
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"subscribe": "testapp.nothing"}, "unknown_model"),
        ({"subscribe": "nolabel"}, "malformed"),
        ({"subscribe": 5}, "malformed"),
        ({"subscribe": "testapp.supplier"}, "not_notifying"),
        ({"subscribe": "auth.group"}, "not_notifying"),
        ({"subscribe": "testapp.order", "pk": "not-a-number"}, "invalid_pk"),
        ({"subscribe": "testapp.order", "pk": [1]}, "invalid_pk"),
        # A char pk: JSON's escape of a lone surrogate is no text a row can have.
        ({"subscribe": "testapp.tag", "pk": "\ud800"}, "invalid_pk"),
        ({"hello": "there"}, "malformed"),
        ([1, 2], "malformed"),
    ],
)
def test_bad_requests_get_an_error_frame_and_the_connection_stays_usable(request_, code):
    async def scenario() -> None:
        client = await connect(VIEWER)
        answer = await ask(client, request_)
        assert answer["type"] == "error" and answer["code"] == code, answer
        assert (await ask(client, {"subscribe": "testapp.tag"}))["type"] == "subscribed"
        await client.disconnect()

    run(scenario)


@pytest.mark.parametrize(
    ("label", "pk"),
    [
        ("testapp.price", "1E+999999999"),  # past max_digits, and a billion digits written out
        ("testapp.shift", "0001-01-01T00:00:00+01:00"),  # no value in the project's zone
        ("testapp.shift", "9999-12-31T23:59:59-01:00"),
        ("testapp.order", 10**30),  # past a BigAutoField's 64 bits
        ("testapp.order", "-9223372036854775809"),
    ],
    ids=[
        "decimal-exponent",
        "datetime-year-1",
        "datetime-year-9999",
        "integer-past-bigint",
        "text-past-bigint",
    ],
)
def test_a_pk_no_row_can_have_is_an_invalid_pk_and_the_connection_stays_usable(settings, label, pk):
    settings.USE_TZ = False  # naive datetimes: an aware pk is moved to TIME_ZONE

    async def scenario() -> None:
        client = await connect(FakeUser(f"testapp.view_{label.split('.')[1]}"))
        answer = await ask(client, {"subscribe": label, "pk": pk})
        assert (answer["type"], answer["code"]) == ("error", "invalid_pk"), answer
        field = {"testapp.price": "amount", "testapp.shift": "starts_at"}.get(label, "id")
        assert f"{pk!r} is not a valid pk of {label} (field {field}): " in answer["message"]
        assert (await ask(client, {"subscribe": label}))["type"] == "subscribed"
        await client.disconnect()

    run(scenario)


def test_an_integer_pk_past_its_columns_range_is_refused_naming_the_range():
    from django.core.exceptions import ValidationError
    from django.db import models
    from django.test.utils import isolate_apps

    from django_pgnotify.consumers import _pk_value

    with isolate_apps("tests.testapp"):

        class Counter32(models.Model):  # an AutoField: a PostgreSQL integer
            id = models.AutoField(primary_key=True)

            class Meta:
                app_label = "testapp"

        assert _pk_value(Counter32, "2147483647") == 2**31 - 1
        for pk in (2**31, -(2**31) - 1, "10000000000"):
            with pytest.raises(ValidationError, match="AutoField holds integers from -2147"):
                _pk_value(Counter32, pk)
    assert _pk_value(Order, 2**63 - 1) == 2**63 - 1  # a BigAutoField


def test_an_integer_pk_is_checked_against_its_columns_range_not_its_fields_class():
    """A field of Django's integer classes whose column is wider (``db_type()``
    overridden: the ``bigserial`` AutoField of old projects) holds pks past its
    class's range: they are the rows' and are followed as any other."""
    from django.core.exceptions import ValidationError
    from django.db import models
    from django.test.utils import isolate_apps

    from django_pgnotify.consumers import _pk_value

    class BigSerialField(models.AutoField):
        def db_type(self, connection):
            return "bigserial"

    class BigintField(models.IntegerField):
        def db_type(self, connection):
            return "bigint"

    with isolate_apps("tests.testapp"):

        class LegacyCounter(models.Model):
            id = BigSerialField(primary_key=True)

            class Meta:
                app_label = "testapp"

        class Ledger(models.Model):
            number = BigintField(primary_key=True)

            class Meta:
                app_label = "testapp"

        assert _pk_value(LegacyCounter, "10000000000") == 10**10
        assert _pk_value(Ledger, 2**63 - 1) == 2**63 - 1
        with pytest.raises(ValidationError):
            _pk_value(Ledger, 2**63)


def test_a_model_declared_in_the_settings_later_can_be_subscribed_to_at_once(settings):
    # What a model declares is kept between subscribe messages, and forgotten
    # when PGNOTIFY changes.
    async def subscribe() -> dict[str, Any]:
        client = await connect(FakeUser("testapp.view_supplier"))
        try:
            return await ask(client, {"subscribe": "testapp.supplier"})
        finally:
            await client.disconnect()

    before = settings.PGNOTIFY
    assert asyncio.run(subscribe())["code"] == "not_notifying"
    settings.PGNOTIFY = {**before, "MODELS": {"testapp.Supplier": Notify()}}
    assert asyncio.run(subscribe())["type"] == "subscribed"
    settings.PGNOTIFY = before
    assert asyncio.run(subscribe())["code"] == "not_notifying"


def test_not_json_binary_and_oversized_messages_get_error_frames():
    async def scenario() -> None:
        client = await connect(VIEWER)
        await client.send_to(text_data="{not json")
        assert (await client.receive_json_from(TIMEOUT))["code"] == "malformed"
        await client.send_to(text_data="[" * 3000)  # within the size limit, too deep to parse
        assert (await client.receive_json_from(TIMEOUT))["code"] == "malformed"
        await client.send_to(bytes_data=b"\x00\x01")
        assert (await client.receive_json_from(TIMEOUT))["code"] == "malformed"
        await client.send_to(text_data='{"subscribe": "' + "x" * 10_000 + '"}')
        assert (await client.receive_json_from(TIMEOUT))["code"] == "too_large"
        assert (await ask(client, {"subscribe": "testapp.order"}))["type"] == "subscribed"
        await client.disconnect()

    run(scenario)


def test_unsubscribe_stops_the_events():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        assert (await ask(client, {"unsubscribe": "testapp.order"}))["type"] == "unsubscribed"
        await ask(client, {"subscribe": "testapp.tag"})
        await forward(dispatcher, order_change(1), RowChange(model=Tag, action="insert", pk="t"))
        assert (await client.receive_json_from(TIMEOUT))["model"] == "testapp.tag"
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


class OwnOrdersConsumer(RowChangeConsumer):
    """Row-level rules: only orders with an even pk, and never their totals."""

    async def filter_event(self, model, event):
        if event["pk"] % 2:
            return None
        return {**event, "fields": {"status": event["fields"]["status"]}, "old": None}


def test_filter_event_drops_and_transforms_events():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER, OwnOrdersConsumer)
        await ask(client, {"subscribe": "testapp.order"})
        await forward(dispatcher, order_change(1), order_change(2))
        event = await client.receive_json_from(TIMEOUT)
        assert (event["pk"], event["fields"], event["old"]) == (2, {"status": "paid"}, None)
        assert await client.receive_nothing(0.2)
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


def test_a_permission_revoked_during_a_connection_counts_at_its_next_subscription(
    transactional_db,
):
    user = User.objects.create_user("revoked")
    view_order = Permission.objects.get(codename="view_order")
    user.user_permissions.add(view_order)
    # As AuthMiddlewareStack puts it in the scope: loaded once, for the whole connection.
    connected = UserLazyObject()
    connected._wrapped = User.objects.get(pk=user.pk)

    async def answer(client: WebsocketCommunicator, request: dict[str, Any]) -> str:
        frame = await ask(client, request)
        return str(frame.get("code", frame["type"]))

    async def scenario() -> None:
        client = await connect(connected)
        assert await answer(client, {"subscribe": "testapp.order", "pk": 1}) == "subscribed"
        await database_sync_to_async(user.user_permissions.remove)(view_order)
        assert await answer(client, {"subscribe": "testapp.order"}) == "forbidden"
        await database_sync_to_async(user.user_permissions.add)(view_order)
        assert await answer(client, {"subscribe": "testapp.order"}) == "subscribed"
        await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_active=False)
        assert await answer(client, {"subscribe": "testapp.order", "pk": 2}) == "forbidden"
        await database_sync_to_async(User.objects.filter(pk=user.pk).delete)()
        assert await answer(client, {"subscribe": "testapp.order", "pk": 3}) == "forbidden"
        await client.disconnect()

    run(scenario)


def test_subscribing_again_when_the_permission_was_revoked_ends_that_subscription():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        user = FakeUser("testapp.view_order")
        client = await connect(user)
        await ask(client, {"subscribe": "testapp.order"})
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        await forward(dispatcher, order_change(2))
        assert (await client.receive_json_from(TIMEOUT))["pk"] == 2
        user.perms.clear()  # revoked: the next (re)subscription is refused
        answer = await ask(client, {"subscribe": "testapp.order", "id": 7})
        assert (answer["type"], answer["code"], answer["id"]) == ("error", "forbidden", 7)
        # The model's subscription ended; the row's, another one, goes on until renewed.
        await forward(dispatcher, order_change(2), order_change(1))
        assert [f["pk"] for f in await frames_of_changes(client)] == [1]
        answer = await ask(client, {"subscribe": "testapp.order", "pk": "1"})
        assert (answer["type"], answer["code"]) == ("error", "forbidden")
        await forward(dispatcher, order_change(1))
        assert await client.receive_nothing(0.3)
        # Allowed again: a subscription as any other.
        user.perms.add("testapp.view_order")
        assert (await ask(client, {"subscribe": "testapp.order"}))["type"] == "subscribed"
        await forward(dispatcher, order_change(3))
        assert [f["pk"] for f in await frames_of_changes(client)] == [3]
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


async def frames_of_changes(client: WebsocketCommunicator) -> list[dict[str, Any]]:
    received = []
    while not await client.receive_nothing(0.2):
        received.append(await client.receive_json_from(TIMEOUT))
    assert all(f["type"] == "row_changed" for f in received), received
    return received


class EveryoneMayFollowTags(RowChangeConsumer):
    async def has_permission(self, model, pk):
        return model is Tag or await super().has_permission(model, pk)


def test_the_permission_hook_can_be_overridden():
    async def scenario() -> None:
        client = await connect(AnonymousUser(), EveryoneMayFollowTags)
        assert (await ask(client, {"subscribe": "testapp.tag"}))["type"] == "subscribed"
        assert (await ask(client, {"subscribe": "testapp.order"}))["code"] == "forbidden"
        await client.disconnect()

    run(scenario)


def test_subscribers_get_resync_after_a_listener_reconnect():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        model_client = await connect(VIEWER)
        row_client = await connect(VIEWER)
        await ask(model_client, {"subscribe": "testapp.order"})
        await ask(row_client, {"subscribe": "testapp.order", "pk": 5})

        class Listener:
            pass

        listener = Listener()
        listener.dispatcher = dispatcher  # type: ignore[attr-defined]
        from django_pgnotify.signals import listener_reconnected

        await listener_reconnected.asend(sender=listener, using="default", downtime=1.5)
        for client in (model_client, row_client):
            frame = await client.receive_json_from(TIMEOUT)
            assert frame["type"] == "resync"
            assert (frame["model"], frame["reason"], frame["downtime"]) == (
                "testapp.order",
                "reconnected",
                1.5,
            )
            assert await client.receive_nothing(0.1)
            await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


class StartedListener:
    """What the listener signals are sent by: a listener with its dispatcher."""

    def __init__(self, dispatcher: ChannelsDispatcher) -> None:
        self.dispatcher = dispatcher


def test_subscribers_get_resync_when_a_listener_starts(caplog):
    # A deploy: changes committed while no listener listened were never seen.
    caplog.set_level(logging.INFO, "django_pgnotify.channels")

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order", "testapp.tag"])
        model_client = await connect(VIEWER)
        row_client = await connect(VIEWER)
        await ask(model_client, {"subscribe": "testapp.order"})
        await ask(row_client, {"subscribe": "testapp.order", "pk": 5})
        from django_pgnotify.signals import listener_started

        listener = StartedListener(dispatcher)
        await listener_started.asend(sender=listener, using="default", backend_pid=1)
        await sent(dispatcher.forwarder)
        for client in (model_client, row_client):
            frame = await client.receive_json_from(TIMEOUT)
            assert (frame["type"], frame["model"], frame["reason"]) == (
                "resync",
                "testapp.order",
                "started",
            )
            assert frame["stream"] == dispatcher.forwarder.stream
            assert await client.receive_nothing(0.1)
            await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert "pgnotify: sent resync (started) to the subscribers of 2 model(s)" in messages


def test_a_listener_forwarding_to_the_in_memory_layer_warns_unless_its_consumers_share_the_process(
    caplog,
):
    async def start(in_process: bool) -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"], in_process=in_process)
        from django_pgnotify.signals import listener_started

        listener = StartedListener(dispatcher)
        await listener_started.asend(sender=listener, using="default", backend_pid=1)
        await dispatcher.forwarder.drain()

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    asyncio.run(start(in_process=True))  # with_listener: the ASGI server's own process
    assert warnings() == []
    asyncio.run(start(in_process=False))  # pgnotify_listen: a process of its own
    [warning] = warnings()
    assert "channel layer 'default' is Channels' in-memory layer" in warning
    assert "with_listener" in warning and "channels_redis" in warning


class FlakyLayer:
    """A channel layer whose group_send fails a number of times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[tuple[str, dict]] = []

    async def group_send(self, group: str, message: dict) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Redis is gone")
        self.batches.append((group, message))

    @property
    def sent(self) -> list[tuple[str, dict]]:
        """The messages sent, out of their batches, with their groups."""
        return [
            (group, message)
            for group, batch in self.batches
            for message in (batch["messages"] if batch["type"] == BATCH else [batch])
        ]


def test_forwarding_failures_are_logged_counted_retried_and_recovered(settings, caplog):
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "RECONNECT_DELAY_MIN": 0.01,
        "RECONNECT_DELAY_MAX": 0.02,
        "CHANNEL_ROW_GROUPS": False,
    }
    caplog.set_level(logging.INFO, "django_pgnotify.channels")

    async def scenario() -> None:
        stats: Counter[str] = Counter()
        forwarder = ChannelLayerForwarder("default", stats=stats)
        layer = forwarder.layer = FlakyLayer(failures=3)  # type: ignore[assignment]
        forwarder.submit([order_change(1), order_change(2)])
        await sent(forwarder)
        assert [(g, m["pk"], m["seq"]) for g, m in layer.sent] == [
            ("pgnotify.testapp.order", 1, 1),
            ("pgnotify.testapp.order", 2, 2),
        ]
        assert (stats["forward_errors"], stats["forwarded"]) == (3, 2)
        await forwarder.drain()

    run(scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "cannot forward testapp.order update" in m and "Redis is gone" in m for m in messages
    )
    assert any("works again" in m for m in messages)


def test_messages_dropped_while_the_layer_is_down_are_followed_by_a_resync(settings):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "RECONNECT_DELAY_MIN": 0.01}

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default", row_groups=False, queue_size=2)
        layer = forwarder.layer = FlakyLayer(failures=1)  # type: ignore[assignment]
        forwarder.submit([order_change(pk) for pk in range(1, 5)])  # 1 and 2 are dropped
        await sent(forwarder)
        kinds = [(m["type"], m.get("seq")) for _, m in layer.sent]
        assert kinds[:2] == [("pgnotify.row_changed", 3), ("pgnotify.row_changed", 4)]
        assert ("pgnotify.resync", 4) in kinds  # with the last seq before it: what it covers
        assert forwarder.stats["forward_dropped"] == 2
        await forwarder.drain()

    run(scenario)


def test_a_full_queue_is_logged_and_a_recovery_counts_only_what_its_outage_dropped(
    settings, caplog
):
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "RECONNECT_DELAY_MIN": 0.01,
        "RECONNECT_DELAY_MAX": 0.02,
    }

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default", row_groups=False, queue_size=2)
        layer = forwarder.layer = FlakyLayer(failures=0)  # type: ignore[assignment]
        forwarder.submit([order_change(pk) for pk in range(1, 6)])  # a burst: 1 to 3 dropped
        await sent(forwarder)
        layer.failures = 2  # then an outage, which drops nothing
        forwarder.submit([order_change(6)])
        await sent(forwarder)
        assert [m["seq"] for _, m in layer.sent if m["type"] == "pgnotify.row_changed"] == [
            4,
            5,
            6,
        ]
        assert forwarder.stats["forward_dropped"] == 3
        await forwarder.drain()

    run(scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Once per burst, not once per message dropped.
    assert [w for w in warnings if "full" in w] == [
        "pgnotify: the queue for channel layer 'default' is full (2 messages): dropping the "
        "oldest, their models' subscribers get a resync (1 dropped so far)"
    ]
    [recovered] = [w for w in warnings if "works again" in w]
    assert recovered.endswith("(0 message(s) dropped meanwhile)"), recovered


class MsgpackLayer(FlakyLayer):
    """Serializes each batch with msgpack first, as channels_redis does."""

    async def group_send(self, group: str, message: dict) -> None:
        import msgpack

        msgpack.packb(message, use_bin_type=True)
        await super().group_send(group, message)


def test_a_batch_the_layer_cannot_serialize_is_dropped_and_resynced_not_retried_forever(
    settings, monkeypatch, caplog
):
    pytest.importorskip("msgpack")
    settings.PGNOTIFY = {
        **settings.PGNOTIFY,
        "RECONNECT_DELAY_MIN": 0.01,
        "RECONNECT_DELAY_MAX": 0.02,
        "CHANNEL_ROW_GROUPS": False,
    }
    # json_safe keeps lone surrogates out; the forwarder must not depend on that alone.
    monkeypatch.setattr(channels_bridge, "valid_text", lambda text: text)

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default")
        layer = forwarder.layer = MsgpackLayer(failures=0)  # type: ignore[assignment]
        odd = dataclasses.replace(order_change(1), context={"reason": "\ud800"})
        forwarder.submit([odd])
        await asyncio.wait_for(sent(forwarder), 5)
        forwarder.submit([order_change(2)])
        await asyncio.wait_for(sent(forwarder), 5)
        assert [(group, m["type"], m.get("pk"), m.get("reason")) for group, m in layer.sent] == [
            ("pgnotify.testapp.order", "pgnotify.resync", None, "dropped"),
            ("pgnotify.testapp.order.resync", "pgnotify.resync", None, "dropped"),
            ("pgnotify.testapp.order", "pgnotify.row_changed", 2, None),
        ]
        stats = forwarder.stats
        assert (stats["forward_dropped"], stats["forwarded"], stats["forward_errors"]) == (1, 1, 0)
        await forwarder.drain()

    run(scenario)
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "cannot carry testapp.order update pk=1 (group pgnotify.testapp.order)" in error
    assert "surrogates not allowed" in error


def test_messages_not_sent_when_the_drain_at_stop_times_out_are_logged_and_counted(
    settings, caplog
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "RECONNECT_DELAY_MIN": 0.01}

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default", row_groups=False)
        layer = forwarder.layer = FlakyLayer(failures=10**9)  # type: ignore[assignment]
        forwarder.submit([order_change(1), order_change(2)])
        await forwarder.drain(timeout=0.2)
        assert layer.sent == []
        assert forwarder.stats["forward_dropped"] == 2

    run(scenario)
    assert any(
        "2 message(s) for channel layer 'default' not sent at stop" in r.getMessage()
        for r in caplog.records
    )


async def deaf_to_one_cancellation() -> None:
    """What a task does when ``asyncio.wait_for()`` (before Python 3.12) drops a
    cancellation that arrives as the work it waits for ends: it goes on."""
    with suppress(asyncio.CancelledError):
        await asyncio.sleep(60)
    await asyncio.sleep(60)


def test_a_drain_ends_when_the_forwarder_drops_a_cancellation(settings):
    """The forwarder's send is in wait_for(): a cancellation dropped there left it
    retrying with backoff, and the listener's stop waiting for it."""

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default", row_groups=False)
        forwarder._task = asyncio.ensure_future(deaf_to_one_cancellation())
        await asyncio.sleep(0)  # it waits in its first sleep
        await forwarder.drain(timeout=0)
        assert forwarder._task is None

    run(scenario)


def test_events_that_do_not_wait_are_sent_at_once_one_per_batch(settings):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": False}

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default")
        layer = forwarder.layer = FlakyLayer(failures=0)  # type: ignore[assignment]
        for pk in (1, 2):
            forwarder.submit([order_change(pk)])
            await sent(forwarder)
        forwarder.submit([order_change(3), order_change(4)])  # both waiting: one batch
        await sent(forwarder)
        assert [[m["pk"] for m in batch["messages"]] for _, batch in layer.batches] == [
            [1],
            [2],
            [3, 4],
        ]
        assert {batch["type"] for _, batch in layer.batches} == {BATCH}
        await forwarder.drain()

    run(scenario)


class SmallConsumer(RowChangeConsumer):
    max_subscriptions = 2


def test_a_connection_has_a_limited_number_of_subscriptions():
    async def scenario() -> None:
        client = await connect(VIEWER, SmallConsumer)
        for pk in (1, 2):
            assert (await ask(client, {"subscribe": "testapp.order", "pk": pk}))["type"] == (
                "subscribed"
            )
        assert (await ask(client, {"subscribe": "testapp.order", "pk": 3}))["code"] == "too_many"
        await client.disconnect()

    run(scenario)


def test_subscribing_again_to_a_subscription_at_the_limit_is_answered_subscribed():
    async def scenario() -> None:
        client = await connect(VIEWER, SmallConsumer)
        for request in ({"subscribe": "testapp.order"}, {"subscribe": "testapp.order", "pk": 1}):
            assert (await ask(client, request))["type"] == "subscribed"
        # A page that resubscribes what it follows adds nothing: "1" is pk 1.
        for request in ({"subscribe": "testapp.order"}, {"subscribe": "testapp.order", "pk": "1"}):
            assert (await ask(client, request))["type"] == "subscribed", request
        assert (await ask(client, {"subscribe": "testapp.order", "pk": 2}))["code"] == "too_many"
        await client.disconnect()

    run(scenario)


def test_the_checks_report_a_channel_layer_that_is_not_configured(settings):
    from django_pgnotify.checks import check_settings

    settings.PGNOTIFY = {"CHANNEL_LAYER": "nope", "CHANNEL_ROW_GROUPS": "yes"}
    messages = [m.msg for m in check_settings() if m.id == "pgnotify.E010"]
    assert any("'nope', which is not in settings.CHANNEL_LAYERS" in m for m in messages)
    assert "PGNOTIFY[\"CHANNEL_ROW_GROUPS\"] must be True or False, got 'yes'." in messages
    settings.PGNOTIFY = {"CHANNEL_LAYER": "default", "CHANNEL_ROW_GROUPS": True}
    assert not [m for m in check_settings() if m.id == "pgnotify.E010"]


def test_events_of_interleaved_rows_and_models_reach_every_subscriber_once_in_order():
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order", "testapp.tag"])
        rows_and_tags = await connect(VIEWER)  # two rows and another model
        for request in (
            {"subscribe": "testapp.order", "pk": 1},
            {"subscribe": "testapp.order", "pk": 2},
            {"subscribe": "testapp.tag"},
        ):
            await ask(rows_and_tags, request)
        model_and_row = await connect(VIEWER)
        await ask(model_and_row, {"subscribe": "testapp.order", "pk": 1})
        await ask(model_and_row, {"subscribe": "testapp.order"})
        tag = RowChange(model=Tag, action="insert", pk="t")
        changes = [order_change(1), order_change(2), tag, order_change(1, "shipped")]
        changes += [order_change(3), order_change(2, "shipped")]
        await forward(dispatcher, *changes)  # all waiting at once: batched

        def frames_of(pks: list[Any]) -> list[Any]:
            return [(c.label, c.pk, c.fields.get("status")) for c in changes if c.pk in pks]

        for client, pks in ((rows_and_tags, [1, 2, "t"]), (model_and_row, [1, 2, 3])):
            wanted = frames_of(pks)
            received = [await client.receive_json_from(TIMEOUT) for _ in wanted]
            assert [(f["model"], f["pk"], f["fields"].get("status")) for f in received] == wanted
            assert await client.receive_nothing(0.2)
            await client.disconnect()
        assert dispatcher.stats["forwarded"] == len(changes)
        await dispatcher.forwarder.drain()

    run(scenario)


# Messages the channel layer loses on their way to a consumer


class Losing:
    """The forwarder's layer, losing the batches ``lose(group, messages)`` picks, as a
    channel layer does (without a word) to a channel over its capacity."""

    def __init__(self, layer: Any, lose: Any) -> None:
        self.layer = layer
        self.lose = lose

    async def group_send(self, group: str, message: dict) -> None:
        if not self.lose(group, message["messages"]):
            await self.layer.group_send(group, message)


def losing(dispatcher: ChannelsDispatcher, lose: Any) -> None:
    forwarder = dispatcher.forwarder
    forwarder.layer = Losing(forwarder.layer, lose)  # type: ignore[assignment]


def seqs(*wanted: int) -> Any:
    """A ``lose`` for the batches holding a change of one of these seqs."""
    return lambda group, messages: any(
        m.get("seq") in wanted for m in messages if m["type"] == ROW_CHANGED
    )


def checkpoints(*wanted: int) -> Any:
    """A ``lose`` for the batches holding a checkpoint of one of these numbers."""
    return lambda group, messages: any(
        m.get("n") in wanted for m in messages if m["type"] == CHECKPOINT
    )


def to(group: str, lose: Any) -> Any:
    """``lose``, for the batches to ``group`` only."""
    return lambda g, messages: g == group and lose(g, messages)


async def checked(forwarder: ChannelLayerForwarder) -> None:
    """Wait until ``forwarder`` sent its checkpoints too (``CHECKPOINT_DELAY`` after the last)."""
    while forwarder._unchecked or forwarder.backlog:
        await asyncio.sleep(0.01)


async def frames(client: WebsocketCommunicator) -> list[tuple[Any, ...]]:
    """What ``client`` was sent until it is quiet: (type, pk, seq) of changes, (type, pk,
    reason) of resyncs (pk None: the whole model)."""
    received = []
    while not await client.receive_nothing(0.2):
        frame = await client.receive_json_from(TIMEOUT)
        if frame["type"] == "row_changed":
            assert "prev" not in frame, frame  # the consumer's business, not the client's
            assert "last_age" not in frame, frame
            received.append(("row_changed", frame["pk"], frame["seq"]))
        else:
            assert "seq" not in frame, frame
            received.append((frame["type"], frame.get("pk"), frame.get("reason")))
    return received


@pytest.fixture
def gaps(monkeypatch) -> Counter[str]:
    """The consumers' count of gaps, from zero, and their warning not yet logged."""
    from django_pgnotify import consumers

    monkeypatch.setattr(consumers, "stats", Counter())
    monkeypatch.setattr(consumers, "_gap_warned", -math.inf)
    return consumers.stats


@pytest.fixture
def checkpoint_delay(monkeypatch) -> None:
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.05)


def test_a_change_lost_on_its_way_to_a_row_follower_is_resynced_before_the_next_one(
    gaps, caplog, monkeypatch
):
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)  # this is prev's doing

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        losing(dispatcher, to("pgnotify.testapp.order.row.1", seqs(2, 5)))
        rows, model = await connect(VIEWER), await connect(VIEWER)
        await ask(rows, {"subscribe": "testapp.order", "pk": "1"})
        await ask(model, {"subscribe": "testapp.order"})
        pks = [1, 1, 1, 2, 1, 1]  # seqs 1 to 6: the row's 2 and 5 are lost
        for pk in pks:
            await forward(dispatcher, order_change(pk))
        assert await frames(rows) == [
            ("row_changed", 1, 1),
            ("resync", "1", "gap"),  # the pk as the client sent it
            ("row_changed", 1, 3),
            ("resync", "1", "gap"),  # not for 4: another row's
            ("row_changed", 1, 6),
        ]
        # Lost to the row group only: the model's follower has everything.
        assert await frames(model) == [("row_changed", pk, seq) for seq, pk in enumerate(pks, 1)]
        await rows.disconnect()
        await model.disconnect()
        await dispatcher.forwarder.drain()

    with caplog.at_level(logging.WARNING, "django_pgnotify.consumers"):
        run(scenario)
    assert gaps["gaps"] == 2
    [warning] = [r.getMessage() for r in caplog.records]  # once a minute at most
    assert "lost messages of testapp.order to a consumer" in warning
    assert "its capacity (100)" in warning, warning


def test_the_last_changes_of_followed_rows_lost_are_resynced_by_the_checkpoint_after_them(
    gaps, checkpoint_delay
):
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER)
        for pk in (1, 2, 3):
            await ask(client, {"subscribe": "testapp.order", "pk": pk})
        losing(dispatcher, seqs(4))
        for pk in (1, 2, 3, 1):  # row 1's last change is lost: no change of it follows
            await forward(dispatcher, order_change(pk))
        await checked(forwarder)
        assert await frames(client) == [
            *[("row_changed", pk, pk) for pk in (1, 2, 3)],
            ("resync", 1, "gap"),
        ]
        losing(dispatcher, seqs(5, 6))  # two rows at once: one resync for the model
        for pk in (2, 3, 1):
            await forward(dispatcher, order_change(pk))
        await checked(forwarder)
        assert await frames(client) == [("row_changed", 1, 7), ("resync", None, "gap")]
        # Only the checkpoints after a quiet spell count: once it was sent, nothing more.
        await forward(dispatcher, order_change(3))
        await checked(forwarder)
        assert await frames(client) == [("row_changed", 3, 8)]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 2


def test_a_checkpoint_lost_makes_the_next_one_resync_every_followed_row(gaps, checkpoint_delay):
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER)
        for pk in (1, 2):
            await ask(client, {"subscribe": "testapp.order", "pk": pk})
        # A change and the checkpoint that named it: the next checkpoint cannot name it.
        losing(dispatcher, lambda g, m: seqs(1)(g, m) or checkpoints(1)(g, m))
        await forward(dispatcher, order_change(1))
        await checked(forwarder)
        await forward(dispatcher, order_change(2))
        await checked(forwarder)
        # The first checkpoint it gets: the one before was sent after it subscribed.
        assert await frames(client) == [("row_changed", 2, 2), ("resync", None, "gap")]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 0  # it might have been sent as the consumer joined: not counted


def test_a_model_follower_gets_a_resync_for_a_gap_in_seq_and_for_its_last_changes_lost(
    gaps, checkpoint_delay
):
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        losing(dispatcher, seqs(2, 4))
        for pk in (1, 2, 3, 4):
            await forward(dispatcher, order_change(pk))
        await checked(forwarder)
        assert await frames(client) == [
            ("row_changed", 1, 1),
            ("resync", None, "gap"),  # before the change after the gap
            ("row_changed", 3, 3),
            ("resync", None, "gap"),  # the checkpoint's seq is 4
        ]
        # A subscription after changes were sent: its first seq is 5, not a gap.
        later = await connect(VIEWER)
        await ask(later, {"subscribe": "testapp.order"})
        losing(dispatcher, lambda group, messages: False)
        for pk in (5, 6):
            await forward(dispatcher, order_change(pk))
        await checked(forwarder)
        for each in (client, later):
            assert await frames(each) == [("row_changed", 5, 5), ("row_changed", 6, 6)]
            await each.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 2


def test_events_filter_event_drops_are_not_gaps(gaps, checkpoint_delay):
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        model = await connect(VIEWER, OwnOrdersConsumer)  # odd pks dropped
        rows = await connect(VIEWER, OwnOrdersConsumer)
        await ask(model, {"subscribe": "testapp.order"})
        for pk in (1, 2):
            await ask(rows, {"subscribe": "testapp.order", "pk": pk})
        for pk in (1, 2, 1, 2, 3, 4):
            await forward(dispatcher, order_change(pk))
        await checked(dispatcher.forwarder)
        assert await frames(model) == [
            ("row_changed", pk, seq) for seq, pk in [(2, 2), (4, 2), (6, 4)]
        ]
        assert await frames(rows) == [("row_changed", 2, 2), ("row_changed", 2, 4)]
        for client in (model, rows):
            await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 0


def test_a_restarted_listener_and_two_listeners_at_once_are_not_gaps(gaps, checkpoint_delay):
    from django_pgnotify.signals import listener_started

    async def scenario() -> None:
        old = ChannelsDispatcher("default", ["testapp.order"])
        model, rows = await connect(VIEWER), await connect(VIEWER)
        await ask(model, {"subscribe": "testapp.order"})
        await ask(rows, {"subscribe": "testapp.order", "pk": 1})
        for _ in range(3):
            await forward(old, order_change(1))
        # A deploy: the new listener's seqs start again at 1, in a stream of its own...
        new = ChannelsDispatcher("default", ["testapp.order"])
        await listener_started.asend(sender=StartedListener(new), using="default", backend_pid=1)
        await sent(new.forwarder)
        # ...and the old one still forwards for a moment: both streams interleave.
        for dispatcher in (new, old, new, old, new):
            await forward(dispatcher, order_change(1))
        await checked(old.forwarder)
        await checked(new.forwarder)
        wanted = [("row_changed", 1, seq) for seq in (1, 2, 3)] + [("resync", None, "started")]
        wanted += [("row_changed", 1, seq) for seq in (1, 4, 2, 5, 3)]
        for client in (model, rows):
            assert await frames(client) == wanted
            await client.disconnect()
        for dispatcher in (old, new):
            await dispatcher.forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 0


def test_a_new_listeners_resync_lost_is_found_at_its_first_checkpoint(gaps, checkpoint_delay):
    """Changes committed while no listener listened are only told by that resync."""
    from django_pgnotify.signals import listener_started

    async def scenario() -> None:
        old = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        await forward(old, order_change(1))
        await checked(old.forwarder)
        new = ChannelsDispatcher("default", ["testapp.order"])
        losing(new, lambda group, messages: messages[0]["type"] == RESYNC)
        await listener_started.asend(sender=StartedListener(new), using="default", backend_pid=1)
        await forward(new, order_change(1))
        await checked(new.forwarder)
        assert await frames(client) == [
            ("row_changed", 1, 1),
            ("row_changed", 1, 1),  # the new listener's first
            ("resync", None, "gap"),
        ]
        await client.disconnect()
        for dispatcher in (old, new):
            await dispatcher.forwarder.drain()

    run(scenario)


def test_changes_sent_before_a_subscription_are_not_gaps_once_a_checkpoint_named_them(
    gaps, caplog, monkeypatch, checkpoint_delay
):
    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER)
        await forward(dispatcher, order_change(1))  # before the subscription
        await checked(forwarder)
        # Not within its delivery time after the checkpoint was sent, which may have been
        # lost as far as the consumer can tell (it would resync).
        assert await frames(client) == []
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        await forward(dispatcher, order_change(1))
        await checked(forwarder)
        # The first checkpoint it gets is the second: the first was sent before it joined.
        assert await frames(client) == [("row_changed", 1, 2)]
        # Changed while it was not followed: not a gap either.
        await ask(client, {"subscribe": "testapp.order", "pk": 2})  # still gets checkpoints
        await ask(client, {"unsubscribe": "testapp.order", "pk": 1})
        await forward(dispatcher, order_change(1))
        await checked(forwarder)
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        await forward(dispatcher, order_change(1))
        await checked(forwarder)
        assert await frames(client) == [("row_changed", 1, 4)]
        # A change just before the subscription, not named by a checkpoint yet: the next
        # change names it, and says it was sent longer ago than the subscription.
        monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)
        await forward(dispatcher, order_change(3))
        assert await frames(client) == []
        await ask(client, {"subscribe": "testapp.order", "pk": 3})
        await forward(dispatcher, order_change(3))
        assert await frames(client) == [("row_changed", 3, 6)]
        # The first change after a subscription lost is a gap. It is not counted: the
        # consumer cannot tell it from one sent as it joined (it might have arrived late).
        await ask(client, {"subscribe": "testapp.order", "pk": 5})
        losing(dispatcher, seqs(7))
        for _ in range(2):
            await forward(dispatcher, order_change(5))
        assert await frames(client) == [("resync", 5, "gap"), ("row_changed", 5, 8)]
        await client.disconnect()
        await forwarder.drain()

    with caplog.at_level(logging.WARNING, "django_pgnotify.consumers"):
        run(scenario)
    assert gaps["gaps"] == 0
    assert caplog.records == []


class HoldingRows:
    """The forwarder's layer, holding its row groups' batches until ``release`` is set, as
    when a consumer joins a model group between a round's model batch and its row batches."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.release = asyncio.Event()
        self.model_sent = asyncio.Event()

    async def group_send(self, group: str, message: dict) -> None:
        if ".row." in group:
            await self.release.wait()
        await self.layer.group_send(group, message)
        if group == "pgnotify.testapp.order":
            self.model_sent.set()


def test_following_the_model_as_a_rounds_row_batches_arrive_is_not_a_gap(gaps, checkpoint_delay):
    """A client following rows 1 and 3 subscribes to the model after a round's model batch
    was sent, before its row batches: changes 1 and 3 arrive through the row groups, and
    change 2 (another row's) was sent before the subscription, so it is no gap."""

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        layer = HoldingRows(forwarder.layer)
        forwarder.layer = layer  # type: ignore[assignment]
        client = await connect(VIEWER)
        for pk in (1, 3):
            await ask(client, {"subscribe": "testapp.order", "pk": pk})
        await dispatcher.send_async([order_change(pk) for pk in (1, 2, 3)])
        await asyncio.wait_for(layer.model_sent.wait(), TIMEOUT)
        await ask(client, {"subscribe": "testapp.order"})
        layer.release.set()
        await checked(forwarder)
        await forward(dispatcher, order_change(4), order_change(1))
        await checked(forwarder)
        assert await frames(client) == [
            ("row_changed", 1, 1),
            ("row_changed", 3, 3),
            ("row_changed", 4, 4),
            ("row_changed", 1, 5),
        ]
        # Checking starts from the model's own messages: one lost is still found.
        losing(dispatcher, to("pgnotify.testapp.order", seqs(6)))
        await forward(dispatcher, order_change(2))
        await forward(dispatcher, order_change(4))
        await checked(forwarder)
        assert await frames(client) == [("resync", None, "gap"), ("row_changed", 4, 7)]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 1


class BusyConsumer(RowChangeConsumer):
    """A consumer that takes its time over its first event: its channel fills meanwhile."""

    gate: asyncio.Event

    async def filter_event(self, model, event):
        await self.gate.wait()
        return event


def test_following_the_model_with_row_batches_and_a_checkpoint_in_the_channel_is_not_a_gap(
    gaps, checkpoint_delay
):
    """Rounds sent while the consumer was busy reach it through the row and resync groups
    only, after its subscription to the model: neither their changes nor the checkpoint
    among them tell where the model's own messages start."""

    async def scenario() -> None:
        BusyConsumer.gate = asyncio.Event()
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER, BusyConsumer)
        for pk in (1, 3):
            await ask(client, {"subscribe": "testapp.order", "pk": pk})
        await forward(dispatcher, order_change(1))  # the consumer is busy with it
        await forward(dispatcher, order_change(1), order_change(2), order_change(3))
        await checked(forwarder)  # a checkpoint (seq 4) waits in the channel too
        await forward(dispatcher, order_change(2), order_change(3))
        await client.send_json_to({"subscribe": "testapp.order"})
        BusyConsumer.gate.set()
        assert await frames(client) == [
            ("row_changed", 1, 1),
            ("subscribed", None, None),
            ("row_changed", 1, 2),
            ("row_changed", 3, 4),
            ("row_changed", 3, 6),
        ]
        await forward(dispatcher, order_change(4))
        await checked(forwarder)
        assert await frames(client) == [("row_changed", 4, 7)]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 0


def test_following_a_row_again_while_changes_of_the_first_time_are_on_their_way_is_no_gap(
    gaps, monkeypatch
):
    """Changes sent before a subscription are none of its business, even when one sent
    before it (to the subscription before, still in the consumer's channel) arrived."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)  # this is prev's doing

    async def scenario() -> None:
        BusyConsumer.gate = asyncio.Event()
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER, BusyConsumer)
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        for _ in range(3):  # the consumer is busy with the first; two wait in its channel
            await forward(dispatcher, order_change(1))
        await client.send_json_to({"unsubscribe": "testapp.order", "pk": 1})
        losing(dispatcher, seqs(4))  # sent before it follows the row again: not for it
        await forward(dispatcher, order_change(1))
        await client.send_json_to({"subscribe": "testapp.order", "pk": 1})
        # Later: the ages the listener measures tell 4 from one sent after the subscription.
        await asyncio.sleep(0.5)
        BusyConsumer.gate.set()
        # Channels takes a client message, then a channel message, in turn: the change 3
        # of the first subscription is handled after the second one began.
        assert await frames(client) == [
            ("row_changed", 1, 1),
            ("unsubscribed", 1, None),
            ("subscribed", 1, None),
            ("row_changed", 1, 3),
        ]
        losing(dispatcher, lambda group, messages: False)
        await forward(dispatcher, order_change(1))
        assert await frames(client) == [("row_changed", 1, 5)]
        # A change lost after it is still found.
        losing(dispatcher, seqs(6))
        for _ in range(2):
            await forward(dispatcher, order_change(1))
        assert await frames(client) == [("resync", 1, "gap"), ("row_changed", 1, 7)]
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 1


@pytest.fixture(params=["in-memory", "redis"])
def layer(request) -> str:
    """Channels' in-memory layer, then channels_redis (``REDIS_URL``, else an embedded one)."""
    if request.param == "redis":
        request.getfixturevalue("redis_layer")
    return request.param


async def follow_again_with_changes_on_their_way(
    dispatcher: ChannelsDispatcher, client: WebsocketCommunicator, request: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """Follow, unsubscribe and follow again (``request``) while changes 2 and 3 of the first
    subscription wait in the busy consumer's channel, and change 4 is sent in between."""
    BusyConsumer.gate = asyncio.Event()
    await ask(client, request)
    pks = [request.get("pk", pk) for pk in (1, 2, 3, 4)]
    for pk in pks[:3]:  # the consumer is busy with the first; two wait in its channel
        await forward(dispatcher, order_change(pk))
    pk = request.get("pk")
    unsubscribe = {"unsubscribe": request["subscribe"]} | ({} if pk is None else {"pk": pk})
    await client.send_json_to(unsubscribe)
    losing(dispatcher, seqs(4))  # sent before it follows again: not for it
    await forward(dispatcher, order_change(pks[3]))
    await client.send_json_to(request)
    # Later: the ages the listener measures tell 4 from one sent after the subscription.
    await asyncio.sleep(0.5)
    BusyConsumer.gate.set()
    received = await frames(client)
    losing(dispatcher, lambda group, messages: False)
    assert received[:3] == [
        ("row_changed", pks[0], 1),
        ("unsubscribed", pk, None),
        ("subscribed", pk, None),
    ]
    return received[3:]


def test_following_the_model_again_while_changes_of_the_first_time_are_on_their_way_is_no_gap(
    gaps, monkeypatch, layer
):
    """The changes sent between two subscriptions to the model are none of the second's
    business. A change of the first still in the channel is delivered (nothing tells it
    from a new one as it arrives), so the client, which reloaded before it, reloads again:
    it may be older than what the client has. Neither is a gap."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)  # this is seq's doing

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER, BusyConsumer)
        request = {"subscribe": "testapp.order"}
        # Channels takes a client message, then a channel message, in turn: 3 (and with
        # Redis, 2 as well when it comes late) is handled after the second subscription.
        assert await follow_again_with_changes_on_their_way(dispatcher, client, request) in (
            [("row_changed", 3, 3)],
            [("row_changed", 2, 2), ("row_changed", 3, 3)],
        )
        await forward(dispatcher, order_change(5))
        assert await frames(client) == [("resync", None, "gap"), ("row_changed", 5, 5)]
        assert gaps["gaps"] == 0
        # A change lost after it is still found, and counted.
        losing(dispatcher, seqs(6))
        for pk in (6, 7):
            await forward(dispatcher, order_change(pk))
        assert await frames(client) == [("resync", None, "gap"), ("row_changed", 7, 7)]
        await client.disconnect()
        await dispatcher.forwarder.drain()
        if layer == "redis":
            await close_layer()

    run(scenario)
    assert gaps["gaps"] == 1


class BusyOwnOrdersConsumer(BusyConsumer):
    """Busy over its first event, and sends its client only orders with an even pk."""

    async def filter_event(self, model, event):
        event = await super().filter_event(model, event)
        return None if event["pk"] % 2 else event


@pytest.mark.parametrize("next_", ["change", "checkpoint"])
def test_following_the_model_again_is_not_reloaded_when_nothing_of_the_first_time_was_sent(
    gaps, monkeypatch, layer, next_
):
    """The changes of the first subscription still in the channel are filtered out: the
    client reloaded after everything it was sent, and the changes sent in between are not
    its business. Nothing to reload, whether a change or a checkpoint comes next."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER, BusyOwnOrdersConsumer)
        BusyConsumer.gate = asyncio.Event()
        await ask(client, {"subscribe": "testapp.order"})
        for pk in (2, 1, 3):  # the busy one is shown; 1 and 3 wait, and are filtered out
            await forward(dispatcher, order_change(pk))
        await client.send_json_to({"unsubscribe": "testapp.order"})
        losing(dispatcher, seqs(4))
        await forward(dispatcher, order_change(4))
        await client.send_json_to({"subscribe": "testapp.order"})
        await asyncio.sleep(0.5)
        BusyConsumer.gate.set()
        assert await frames(client) == [
            ("row_changed", 2, 1),
            ("unsubscribed", None, None),
            ("subscribed", None, None),
        ]
        losing(dispatcher, lambda group, messages: False)
        if next_ == "change":
            await forward(dispatcher, order_change(6))
            assert await frames(client) == [("row_changed", 6, 5)]
        else:  # the checkpoint after 4, sent after the subscription
            monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.05)
            assert forwarder._wake is not None
            forwarder._wake.set()  # it waited for the delay of before
            await checked(forwarder)
            assert await frames(client) == []
        await client.disconnect()
        await forwarder.drain()
        if layer == "redis":
            await close_layer()

    run(scenario)
    assert gaps["gaps"] == 0


@pytest.mark.parametrize("request_", [{}, {"pk": 1}], ids=["model", "row"])
def test_a_change_of_the_first_time_followed_again_is_reloaded_when_a_checkpoint_names_a_later_one(
    gaps, monkeypatch, request_
):
    """Change 3 of the first subscription reached the client after its reload, which had 4
    (sent in between, to nobody): only the checkpoint after 4 tells, and the client reloads
    what 3 may have made older. No gap: nothing was lost."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER, BusyConsumer)
        request = {"subscribe": "testapp.order", **request_}
        pk = request_.get("pk", 3)
        assert await follow_again_with_changes_on_their_way(dispatcher, client, request) == [
            ("row_changed", pk, 3)
        ]
        monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.05)
        assert forwarder._wake is not None
        forwarder._wake.set()  # it waited for the delay of before
        await checked(forwarder)
        assert await frames(client) == [("resync", request_.get("pk"), "gap")]
        # The changes after it are checked as ever.
        await forward(dispatcher, order_change(pk))
        losing(dispatcher, seqs(6))
        for _ in range(2):
            await forward(dispatcher, order_change(pk))
        assert await frames(client) == [
            ("row_changed", pk, 5),
            ("resync", request_.get("pk"), "gap"),
            ("row_changed", pk, 7),
        ]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 1


def test_a_jump_in_seq_is_checked_against_the_age_of_the_change_before_it_when_it_has_one(gaps):
    """What an earlier listener sends has no ``last_age``: a jump is a gap, as it was. One
    whose change before it was sent before the subscription is not; the client reloads
    only when it was sent a change since (which was, then, of a subscription before)."""
    from channels.layers import get_channel_layer

    from django_pgnotify.channels_bridge import event_message

    async def scenario() -> None:
        layer: Any = get_channel_layer()
        client = await connect(VIEWER, OwnOrdersConsumer)  # odd pks filtered out
        await ask(client, {"subscribe": "testapp.order"})

        async def send(seq: int, pk: int, **stamps: Any) -> None:
            message = {**event_message(order_change(pk), seq, "s"), **stamps}
            await layer.group_send("pgnotify.testapp.order", {"type": BATCH, "messages": [message]})

        await send(1, 1)  # filtered out: the client was sent nothing
        await send(3, 2, last_age=3600.0)  # 2 was sent an hour ago, before the subscription
        await send(5, 4)  # an earlier listener's: a gap
        await send(7, 6, last_age=0.0)  # 6 was sent with it: a gap
        assert await frames(client) == [
            ("row_changed", 2, 3),
            ("resync", None, "gap"),
            ("row_changed", 4, 5),
            ("resync", None, "gap"),
            ("row_changed", 6, 7),
        ]
        assert gaps["gaps"] == 2
        # A change the client was sent, then a jump from before the subscription: it was
        # of a subscription before, and may be older than what the client reloaded.
        await ask(client, {"unsubscribe": "testapp.order"})
        await ask(client, {"subscribe": "testapp.order"})
        await send(8, 8)
        await send(10, 10, last_age=3600.0)
        assert await frames(client) == [
            ("row_changed", 8, 8),
            ("resync", None, "gap"),
            ("row_changed", 10, 10),
        ]
        await client.disconnect()

    run(scenario)
    assert gaps["gaps"] == 2


def test_changes_and_checkpoints_say_how_long_before_them_the_models_last_change_was_sent(
    settings, checkpoint_delay
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": False}

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default")
        layer = forwarder.layer = FlakyLayer(failures=0)  # type: ignore[assignment]
        forwarder.submit([order_change(1)])
        await sent(forwarder)
        forwarder.submit([order_change(2), order_change(3)])  # one round
        await checked(forwarder)
        sent_ = [m for _, m in layer.sent]
        assert [(m["type"], m.get("seq"), m.get("again")) for m in sent_] == [
            (ROW_CHANGED, 1, None),
            (ROW_CHANGED, 2, None),
            (ROW_CHANGED, 3, None),
            (CHECKPOINT, 3, None),
            (CHECKPOINT, 3, None),
            (CHECKPOINT, 3, True),
        ]
        first, second, third, *checks = sent_
        assert "last_age" not in first  # none before it
        assert second["last_age"] >= 0.0  # seconds between the rounds, at least
        assert third["last_age"] == 0.0  # the same round
        ages = [c["last_age"] for c in checks]
        assert all(age >= 0.0 for age in ages)
        assert ages[2] >= ages[1]  # sent again: older by the time since, at least
        await forwarder.drain()

    run(scenario)


@pytest.mark.parametrize(
    "rows",
    [["not", "a", "dict"], {"row.1": 3}, {"row.1": [3]}, {"row.1": "3, 0.1"}],
    ids=["list", "number", "one-item", "text"],
)
def test_a_checkpoint_of_another_shape_is_skipped_and_the_socket_stays_open(gaps, rows):
    """Of a newer listener, say: as a message type the consumer does not know."""
    from channels.layers import get_channel_layer

    from django_pgnotify import groups

    async def scenario() -> None:
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        checkpoint = {"type": "pgnotify.checkpoint", "model": "testapp.order"}
        checkpoint.update(stream="s", n=1, seq=3, since=0.5, rows=rows)
        await get_channel_layer().group_send(
            groups.row_group("testapp.order", 1),
            {"type": "pgnotify.batch", "messages": [checkpoint]},
        )
        assert await ask(client, {"subscribe": "testapp.order", "pk": 2}) == {
            "type": "subscribed",
            "model": "testapp.order",
            "pk": 2,
        }
        await client.disconnect()

    run(scenario)


def test_a_resync_covers_the_changes_before_it(gaps, checkpoint_delay):
    """What the listener's resync makes the client reload is no gap later."""
    from django_pgnotify.signals import listener_reconnected

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        model, rows = await connect(VIEWER), await connect(VIEWER)
        await ask(model, {"subscribe": "testapp.order"})
        await ask(rows, {"subscribe": "testapp.order", "pk": 1})
        await forward(dispatcher, order_change(1))
        losing(dispatcher, seqs(2))
        await forward(dispatcher, order_change(1))  # lost while the listener reconnects
        await listener_reconnected.asend(
            sender=StartedListener(dispatcher), using="default", downtime=1.0
        )
        await sent(forwarder)
        await forward(dispatcher, order_change(1))
        await checked(forwarder)
        for client in (model, rows):
            assert await frames(client) == [
                ("row_changed", 1, 1),
                ("resync", None, "reconnected"),
                ("row_changed", 1, 3),
            ]
            await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 0


def test_row_changes_name_their_rows_previous_one_and_checkpoints_follow_them(
    settings, monkeypatch
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": True}
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.05)
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_ROWS", 2)

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default")
        layer = forwarder.layer = FlakyLayer(failures=0)  # type: ignore[assignment]
        # Rows 1 and 2: two rows, a checkpoint; rows 3, 3 and 4: another.
        forwarder.submit([order_change(pk) for pk in (1, 2, 3, 3, 4)])
        await checked(forwarder)

        def short(message: dict[str, Any]) -> Any:
            if message["type"] == CHECKPOINT:
                return f"checkpoint {message['n']}"
            return (message["seq"], message["prev"])  # prev: the row's previous change

        batches = [
            (group.removeprefix("pgnotify.testapp.order"), [short(m) for m in batch["messages"]])
            for group, batch in layer.batches
        ]
        assert batches == [
            ("", [(1, None), (2, None), "checkpoint 1", (3, None), (4, 3), (5, None)]),
            (".row.1", [(1, None)]),
            (".row.2", [(2, None)]),
            (".resync", ["checkpoint 1"]),  # after the changes it names, before the next
            (".row.3", [(3, None), (4, 3)]),
            (".row.4", [(5, None)]),
            ("", ["checkpoint 2"]),  # a second one waits for a round of its own
            (".resync", ["checkpoint 2"]),
            ("", ["checkpoint 3"]),  # and once the model is quiet, one naming nothing
            (".resync", ["checkpoint 3"]),
            ("", ["checkpoint 3"]),  # and that one again, for a consumer that lost it
            (".resync", ["checkpoint 3"]),
        ]
        sent = [batch["messages"][0] for group, batch in layer.batches if "resync" in group]
        # Each row's last seq, and the seconds since it was sent, at least: 0 in the same
        # round, the time between the rounds otherwise.
        assert [(c["seq"], c["rows"], c["stream"]) for c in sent] == [
            (2, {"row.1": [1, 0.0], "row.2": [2, 0.0]}, forwarder.stream),
            (5, {"row.3": [4, ANY], "row.4": [5, ANY]}, forwarder.stream),
            (5, {}, forwarder.stream),
            (5, {}, forwarder.stream),
        ]
        assert [c.get("again") for c in sent] == [None, None, None, True]
        assert sent[1]["rows"]["row.3"][1] >= 0
        # The seconds since the previous one was sent, at least; none before the first.
        assert sent[0]["since"] is None
        assert sent[1]["since"] >= 0 and sent[2]["since"] >= 0
        # A change with a previous one says how long before it that was sent, at least.
        [fourth] = [m for g, m in layer.sent if g.endswith("row.3") and m["seq"] == 4]
        assert fourth["prev_age"] == 0.0  # the same round
        await forwarder.drain()

    run(scenario)


def test_a_model_changed_once_gets_one_checkpoint_twice_and_without_row_groups_only_its_group(
    settings, checkpoint_delay
):
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": False}

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default")
        layer = forwarder.layer = FlakyLayer(failures=0)  # type: ignore[assignment]
        forwarder.submit([order_change(1)])
        await checked(forwarder)
        assert [(g, m["type"], m.get("n"), m.get("again")) for g, m in layer.sent] == [
            ("pgnotify.testapp.order", ROW_CHANGED, None, None),
            ("pgnotify.testapp.order", CHECKPOINT, 1, None),
            ("pgnotify.testapp.order", CHECKPOINT, 1, True),  # the same, later
        ]
        assert layer.sent[1][1]["rows"] == layer.sent[2][1]["rows"] == {}
        assert forwarder.stats["forwarded"] == 1
        # Nothing more while the model stays quiet.
        assert forwarder._checkpoints_due() is None and not forwarder.backlog
        await forwarder.drain()

    run(scenario)


class SlowLayer(FlakyLayer):
    """A layer whose sends of ``slow`` groups take ``seconds``, as a round of sends to many
    groups on a loaded machine does: the changes go out long after they were queued."""

    def __init__(self, slow: str, seconds: float) -> None:
        super().__init__(failures=0)
        self.slow, self.seconds = slow, seconds

    async def group_send(self, group: str, message: dict) -> None:
        if group == self.slow:
            await asyncio.sleep(self.seconds)
        await super().group_send(group, message)


def test_the_quiet_checkpoint_follows_the_sending_of_the_last_change_not_its_queueing(
    monkeypatch,
):
    """A checkpoint sent right after the changes reaches a consumer's channel while it is
    still full of them, and is dropped with them: it waits CHECKPOINT_DELAY from their
    sending, which the ages it carries (lower bounds the forwarder measured) tell."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.2)

    async def scenario() -> None:
        forwarder = ChannelLayerForwarder("default")
        # The row's batch takes longer than CHECKPOINT_DELAY to send.
        layer = SlowLayer("pgnotify.testapp.order.row.1", 0.4)
        forwarder.layer = layer  # type: ignore[assignment]
        forwarder.submit([order_change(1)])
        await checked(forwarder)
        checkpoints = [m for g, m in layer.sent if g.endswith(".resync")]
        for checkpoint in checkpoints:
            [seq, age] = checkpoint["rows"]["row.1"]
            assert seq == 1 and age >= 0.2 - 0.001, checkpoint  # ms rounded down
        assert [(c["n"], c.get("again")) for c in checkpoints] == [(1, None), (1, True)]
        # The one sent again says its change and the last checkpoint are older still.
        assert checkpoints[1]["rows"]["row.1"][1] >= checkpoints[0]["rows"]["row.1"][1] + 0.199
        await forwarder.drain()

    run(scenario)


class StalledLayer(FlakyLayer):
    """A layer whose sends hang while ``stalled``: a loop that ends meanwhile takes the
    messages being sent with it."""

    def __init__(self) -> None:
        super().__init__(failures=0)
        self.stalled = True

    async def group_send(self, group: str, message: dict) -> None:
        if self.stalled:
            await asyncio.Event().wait()  # until its loop ends
        await super().group_send(group, message)


def test_a_change_lost_with_a_loop_that_ended_as_it_was_sent_is_named_by_a_checkpoint(
    checkpoint_delay,
):
    """A forwarder used from another event loop, the one it sent from having ended as it
    sent, sends from the new one; the change the old loop took with it never reached
    the layer, and is never sent: a checkpoint still names it, so that its row's
    followers find the gap, and the model is checked no more after."""
    forwarder = ChannelLayerForwarder("default")
    layer = forwarder.layer = StalledLayer()  # type: ignore[assignment]

    async def first_loop() -> None:
        forwarder.submit([order_change(1)])
        while not forwarder._sending:  # taken off the queue, being sent
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(first_loop(), 30))  # its end cancels the forwarder's task

    async def next_loop() -> None:
        layer.stalled = False
        forwarder.submit([RowChange(model=Tag, action="insert", pk="t")])

        async def order_checkpoint() -> dict[str, Any]:
            while True:
                for _, message in layer.sent:
                    if message["type"] == CHECKPOINT and message["model"] == "testapp.order":
                        return message
                await asyncio.sleep(0.01)

        checkpoint = await asyncio.wait_for(order_checkpoint(), 5)
        assert checkpoint["seq"] == 1 and checkpoint["rows"]["row.1"][0] == 1
        await asyncio.wait_for(checked(forwarder), 5)
        await forwarder.drain()

    asyncio.run(asyncio.wait_for(next_loop(), 30))


def test_a_quiet_checkpoint_lost_behind_a_full_channel_is_sent_again(gaps, checkpoint_delay):
    """The change lost last and the checkpoint after it, to a row follower and a model
    follower: the same checkpoint, sent again, tells them."""

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        rows, model = await connect(VIEWER), await connect(VIEWER)
        for pk in (1, 2):
            await ask(rows, {"subscribe": "testapp.order", "pk": pk})
        await ask(model, {"subscribe": "testapp.order"})
        await forward(dispatcher, order_change(1), order_change(2))
        await checked(forwarder)
        assert await frames(rows) == [("row_changed", 1, 1), ("row_changed", 2, 2)]
        assert await frames(model) == [("row_changed", 1, 1), ("row_changed", 2, 2)]
        lost = {"again": False}

        def full(group: str, messages: list[dict[str, Any]]) -> bool:
            # The change, and the first sending of the checkpoint after it.
            if seqs(3)(group, messages):
                return True
            if checkpoints(2)(group, messages) and not messages[0].get("again"):
                lost["again"] = True
                return True
            return False

        losing(dispatcher, full)
        await forward(dispatcher, order_change(1))
        await checked(forwarder)
        assert lost["again"]  # the checkpoint was lost before it went again
        assert await frames(rows) == [("resync", 1, "gap")]
        assert await frames(model) == [("resync", None, "gap")]
        for client in (rows, model):
            await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 2


# With channels_redis: what batching is for


@pytest.fixture
def redis_layer(settings) -> str:
    """channels_redis as the default layer, with a prefix of its own; the prefix."""
    pytest.importorskip("channels_redis", reason="the channels extra is not installed")
    from django_pgnotify.embedded_redis import redis_channel_layer, redis_url

    try:
        url = redis_url()
    except RuntimeError as exc:  # no REDIS_URL and no redis-server to start
        pytest.skip(str(exc))
    prefix = f"pgnotify-test-{uuid.uuid4().hex[:8]}"
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(url, prefix=prefix)}
    return prefix


async def close_layer() -> None:
    from channels.layers import get_channel_layer

    layer: Any = get_channel_layer()
    await layer.flush()
    await layer.close_pools()


class SlowConsumer(RowChangeConsumer):
    """Takes 2 ms per event, as a consumer with real row-level rules might."""

    async def filter_event(self, model, event):
        await asyncio.sleep(0.002)
        return event


def test_a_burst_reaches_a_slow_consumer_complete_in_order_one_frame_per_event(redis_layer):
    # One message per event would be 300 messages; channels_redis keeps at most
    # 100 (its capacity) waiting for a consumer and drops the rest.
    count = 300

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER, SlowConsumer)
        await ask(client, {"subscribe": "testapp.order"})
        for pk in range(1, count + 1):  # as a busy listener hands them over
            await dispatcher.send_async([order_change(pk, action="insert")])
        await sent(dispatcher.forwarder)
        frames = [await client.receive_json_from(TIMEOUT) for _ in range(count)]
        assert [(f["type"], f["pk"], f["seq"]) for f in frames] == [
            ("row_changed", pk, pk) for pk in range(1, count + 1)
        ]
        assert await client.receive_nothing(0.2)
        stats = dispatcher.stats
        assert (stats["forwarded"], stats["forward_dropped"], stats["forward_errors"]) == (
            count,
            0,
            0,
        )
        # One message per batch and group: the model's, and each row's (row groups are on).
        model_batches = stats["forward_batches"] - count
        assert 1 <= model_batches < count / 3, stats
        await client.disconnect()
        await dispatcher.forwarder.drain()
        await close_layer()

    run(scenario)


def test_the_consumer_still_takes_single_messages_of_an_earlier_listener(redis_layer):
    from channels.layers import get_channel_layer

    from django_pgnotify.channels_bridge import event_message, resync_message

    async def scenario() -> None:
        layer: Any = get_channel_layer()
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        await layer.group_send("pgnotify.testapp.order", event_message(order_change(7), 1, "old"))
        await layer.group_send(
            "pgnotify.testapp.order", resync_message("testapp.order", "reconnected", "old")
        )
        await layer.group_send(
            "pgnotify.testapp.order",
            {"type": BATCH, "messages": [event_message(order_change(8), 2, "old")]},
        )
        frames = [await client.receive_json_from(TIMEOUT) for _ in range(3)]
        assert [(f["type"], f.get("pk")) for f in frames] == [
            ("row_changed", 7),
            ("resync", None),
            ("row_changed", 8),
        ]
        await client.disconnect()
        await close_layer()

    run(scenario)


def test_values_past_64_bits_and_non_finite_floats_cross_redis_as_strict_json(redis_layer):
    """msgpack, which channels_redis sends with, refuses integers past 64 bits, and
    a browser's JSON.parse refuses NaN and Infinity: both arrive as strings."""
    from channels.layers import get_channel_layer

    from django_pgnotify.channels_bridge import event_message

    huge = {"status": 10**30, "total": float("inf"), "note": [float("nan"), -float("inf")]}
    change = dataclasses.replace(order_change(9), fields=huge)

    async def scenario() -> str:
        layer: Any = get_channel_layer()
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        await layer.group_send("pgnotify.testapp.order", event_message(change, 1, "s"))
        frame = await client.receive_from(TIMEOUT)
        await client.disconnect()
        await close_layer()
        return frame

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    frame = json.loads(asyncio.run(asyncio.wait_for(scenario(), 30)), parse_constant=refuse)
    assert frame["fields"] == {
        "status": str(10**30),
        "total": "Infinity",
        "note": ["NaN", "-Infinity"],
    }


def redis_group_members(prefix: str, group: str) -> int:
    """How many channels channels_redis's core layer keeps in ``group``."""
    import redis

    from django_pgnotify.embedded_redis import redis_url

    with redis.Redis.from_url(redis_url()) as client:
        return int(client.zcard(f"{prefix}:group:{group}"))


class FailingFilterConsumer(RowChangeConsumer):
    """A row-level rule with a bug: the consumer ends with its exception."""

    async def filter_event(self, model, event):
        raise RuntimeError("a bug in a row-level rule")


def test_a_consumer_that_ends_with_an_exception_leaves_its_groups(redis_layer):
    groups = ["pgnotify.testapp.order", "pgnotify.testapp.order.row.1"]
    groups.append("pgnotify.testapp.order.resync")

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER, FailingFilterConsumer)
        await ask(client, {"subscribe": "testapp.order"})
        await ask(client, {"subscribe": "testapp.order", "pk": 1})
        assert [redis_group_members(redis_layer, g) for g in groups] == [1, 1, 1]
        await forward(dispatcher, order_change(1))
        # Channels does not call disconnect() for a handler that raised.
        with pytest.raises(RuntimeError, match="a bug in a row-level rule"):
            await client.receive_from(TIMEOUT)
        # Else every batch would still be pushed to the dead channel for a day.
        assert [redis_group_members(redis_layer, g) for g in groups] == [0, 0, 0]
        await dispatcher.forwarder.drain()
        await close_layer()

    run(scenario)


def test_disconnecting_leaves_every_group_even_when_leaving_one_fails(monkeypatch, caplog):
    from channels.layers import get_channel_layer

    async def scenario() -> None:
        layer: Any = get_channel_layer()
        discard = layer.group_discard
        failed: list[str] = []

        async def failing_once(group: str, channel: str) -> None:
            if not failed:
                failed.append(group)
                raise ConnectionError("Redis is gone")
            await discard(group, channel)

        monkeypatch.setattr(layer, "group_discard", failing_once)
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        await ask(client, {"subscribe": "testapp.tag"})
        await client.disconnect()
        left = {"pgnotify.testapp.order", "pgnotify.testapp.tag"} - set(failed)
        assert [group for group in left if layer.groups.get(group)] == []

    run(scenario)
    assert any("could not leave 1 group(s)" in r.getMessage() for r in caplog.records)


def test_a_quiet_subscription_outlives_the_layers_group_expiry(settings):
    """channels_redis forgets group members older than ``group_expiry`` (a day by
    default; 2 s here): a page left open, with nothing to show, must not go deaf."""
    from django_pgnotify.embedded_redis import redis_channel_layer, redis_url

    try:
        url = redis_url()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    layer = redis_channel_layer(url, prefix=f"pgnotify-test-{uuid.uuid4().hex[:8]}")
    layer["CONFIG"]["group_expiry"] = 2
    settings.CHANNEL_LAYERS = {"default": layer}

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        model_client = await connect(VIEWER)
        row_client = await connect(VIEWER)
        await ask(model_client, {"subscribe": "testapp.order"})
        await ask(row_client, {"subscribe": "testapp.order", "pk": 1})
        # Nothing at all for longer than group_expiry, to either client.
        assert await model_client.receive_nothing(3.5)
        assert await row_client.receive_nothing(0.1)
        await forward(dispatcher, order_change(1))
        for client in (model_client, row_client):
            assert (await client.receive_json_from(TIMEOUT))["pk"] == 1
            await client.disconnect()
        await dispatcher.forwarder.drain()
        await close_layer()

    run(scenario)


def test_decimals_in_arrays_reach_a_websocket_as_strings_of_every_digit_as_decimals_do(changes):
    long = Decimal("12345678901234567890.1234567890")
    Measurement.objects.create(readings=[long, None], grid=[[Decimal("1.5")], [None]])
    Order.objects.create(total=Decimal("19.90"))
    events = changes.wait(2)
    labels = ["testapp.measurement", "testapp.order"]

    async def scenario() -> list[str]:
        dispatcher = ChannelsDispatcher("default", labels)
        client = await connect(FakeUser("testapp.view_measurement", "testapp.view_order"))
        for label in labels:
            await ask(client, {"subscribe": label})
        await forward(dispatcher, *events)
        frames = [await client.receive_from(TIMEOUT) for _ in events]
        await client.disconnect()
        await dispatcher.forwarder.drain()
        return frames

    measured, ordered = (json.loads(f) for f in asyncio.run(asyncio.wait_for(scenario(), 30)))
    assert measured["fields"] == {
        "readings": [str(long), None],
        "grid": [["1.5000000000"], [None]],
        "label": "",
    }
    assert ordered["fields"]["total"] == "19.90"


# Row subscriptions by the pk as a client spells it, with changes from the database


class EveryoneMayFollow(RowChangeConsumer):
    async def has_permission(self, model, pk):
        return True


ROW_PKS = {
    # model: (the followed row's pk, its neighbour's, a second followed row's)
    Shift: (
        datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.timezone.utc),
        datetime.datetime(2024, 3, 1, 12, 0, 1, tzinfo=datetime.timezone.utc),
        datetime.datetime(2024, 3, 2, 0, 0, tzinfo=datetime.timezone.utc),
    ),
    Price: (Decimal("1.50"), Decimal("1.51"), Decimal("2.00")),
    Reading: (
        uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"),
        uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a13"),
    ),
    Tag: ("one", "one ", "two"),
}


@pytest.mark.parametrize(
    ("model", "followed", "second"),
    [
        (Shift, "2024-03-01T13:00:00+01:00", "2024-03-02T00:00:00Z"),  # the same instants
        (Shift, "2024-03-01T12:00:00Z", "2024-03-02 01:00:00"),  # naive: TIME_ZONE's
        (Price, "1.5", 2),
        (Price, "1.50", "2.0"),
        (Reading, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc999c0b4ef8bb6d6bb9bd380a13"),
        (Tag, "one", "two"),
        (Order, None, None),  # pks as strings, their own numbers
    ],
    ids=["datetime-offset", "datetime-utc", "decimal-short", "decimal-long", "uuid", "str", "int"],
)
def test_a_row_subscription_by_pk_receives_that_rows_changes_whatever_the_pk_type(
    changes, model, followed, second
):
    label = model._meta.label_lower
    pks = list(ROW_PKS.get(model, ()))
    if model is Order:
        pks = [Order.objects.create().pk for _ in range(2)]
    else:
        model.objects.bulk_create([model(pk=pk) for pk in pks[:2]])
    model.objects.filter(pk__in=pks[:2]).delete()
    if model is Order:
        pks.append(Order.objects.create().pk)
        followed, second = str(pks[0]), str(pks[2])
    else:
        model.objects.create(pk=pks[2])
    events = changes.wait(5)
    assert [(e.action, e.pk) for e in events] == [
        ("insert", pks[0]),
        ("insert", pks[1]),
        ("delete", pks[0]),
        ("delete", pks[1]),
        ("insert", pks[2]),
    ]

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", [label])
        client = await connect(VIEWER, EveryoneMayFollow)
        for pk in (followed, second):
            answer = await ask(client, {"subscribe": label, "pk": pk})
            assert answer == {"type": "subscribed", "model": label, "pk": pk}
        await forward(dispatcher, *events)
        frames = [await client.receive_json_from(TIMEOUT) for _ in range(3)]
        # In order, and the neighbour's changes (before the second row's) left out.
        assert [(f["action"], f["pk"]) for f in frames] == [
            ("insert", json_safe(pks[0])),
            ("delete", json_safe(pks[0])),
            ("insert", json_safe(pks[2])),
        ]
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


def test_decimals_are_forwarded_with_their_digits_as_stored_and_no_exponent():
    assert json_safe(Decimal("0.0000000123")) == "0.0000000123"
    assert json_safe([Decimal("19.90"), Decimal("-0.000")]) == ["19.90", "-0.000"]
    assert json_safe(Decimal("NaN")) == "NaN"
    # Only a JSON field's decoder makes these: they stay short.
    assert json_safe(Decimal("1e999999999")) == "1E+999999999"
    assert json_safe(Decimal("1e-999999999")) == "1E-999999999"


# Values a browser could not read, or msgpack could not carry


def test_integers_a_browser_cannot_hold_exactly_are_sent_as_strings_wherever_they_are():
    safe = 2**53 - 1  # Number.MAX_SAFE_INTEGER
    assert json_safe([safe, -safe, 0, True]) == [safe, -safe, 0, True]
    assert json_safe([safe + 1, -safe - 1, 2**64]) == [str(safe + 1), str(-safe - 1), str(2**64)]
    assert json_safe({"ids": {"a": [2**60]}}) == {"ids": {"a": [str(2**60)]}}


def test_lone_surrogates_in_strings_and_keys_are_replaced_and_other_text_is_kept():
    value = {"why\udc80": ["a\ud800b", "Adélaïde 😀", "plain"], "ok": "ü"}
    assert json_safe(value) == {
        "why\ufffd": ["a\ufffdb", "Adélaïde 😀", "plain"],
        "ok": "ü",
    }


def test_bigint_values_past_2_53_reach_a_websocket_as_strings_and_the_row_keeps_its_group(changes):
    big = 2**53 + 1  # a snowflake-style id: a browser would read 9007199254740992
    order = Order.objects.create(id=big)
    Reading.objects.create(order=order, count=-big, ratio=None)
    events = changes.wait(2)

    async def scenario() -> list[str]:
        dispatcher = ChannelsDispatcher("default", ["testapp.order", "testapp.reading"])
        client = await connect(VIEWER, EveryoneMayFollow)
        # The row's group is named from the pk, as before: the string names the row.
        answer = await ask(client, {"subscribe": "testapp.order", "pk": str(big)})
        assert answer["type"] == "subscribed"
        await ask(client, {"subscribe": "testapp.reading"})
        await forward(dispatcher, *events)
        frames = [await client.receive_from(TIMEOUT) for _ in events]
        await client.disconnect()
        await dispatcher.forwarder.drain()
        return frames

    ordered, reading = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert f'"pk": "{big}"' in ordered
    fields = json.loads(reading)["fields"]
    assert (fields["order_id"], fields["count"]) == (str(big), str(-big))


def test_a_lone_surrogate_in_a_context_reaches_a_websocket_as_the_replacement_character(
    changes, redis_layer, other_connection
):
    # Another client's context, as docs/audit.md shows it: JSON text, and \ud800 is
    # valid JSON syntax. msgpack (channels_redis) cannot carry what it decodes to.
    with other_connection.transaction():
        other_connection.execute(
            "SELECT set_config('pgnotify.context', %s, true)", ['{"reason": "x\\ud800"}']
        )
        other_connection.execute(
            "INSERT INTO testapp_order (status, total, note) VALUES ('new', 1, '')"
        )
    Order.objects.create()
    events = changes.wait(2)
    assert events[0].context == {"reason": "x\ud800"}  # as the client wrote it

    async def scenario() -> list[dict[str, Any]]:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        await forward(dispatcher, *events)
        frames = [await client.receive_json_from(TIMEOUT) for _ in events]
        await client.disconnect()
        await dispatcher.forwarder.drain()
        await close_layer()
        return frames

    frames = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [(f["pk"], f["context"]) for f in frames] == [
        (events[0].pk, {"reason": "x\ufffd"}),
        (events[1].pk, None),  # the change after it is not held up
    ]


def test_a_context_value_with_a_lone_surrogate_is_sent_with_the_replacement_character(changes):
    # As os.fsdecode() makes from a file name that is not UTF-8.
    with context(reason="file-\udcff.txt", actor="user:1"):
        Order.objects.create()
    (event,) = changes.wait(1)
    assert event.context == {"reason": "file-\ufffd.txt", "actor": "user:1"}


class RenewalHangsLayer(InMemoryChannelLayer):
    """An in-memory layer whose adds of a member already added never return once
    ``hang`` is set, as a layer whose server stopped answering would."""

    hang = False
    hung = 0  # adds that never returned

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.added: set[tuple[str, str]] = set()

    async def group_add(self, group: str, channel: str) -> None:
        if self.hang and (group, channel) in self.added:
            RenewalHangsLayer.hung += 1
            await asyncio.Event().wait()
        self.added.add((group, channel))
        await super().group_add(group, channel)


def test_a_renewal_the_layer_never_answers_does_not_hold_up_subscriptions(
    settings, monkeypatch, caplog
):
    from django_pgnotify import consumers

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "tests.test_consumer.RenewalHangsLayer",
            "CONFIG": {"group_expiry": 0.4},  # a renewal every 0.1 s
        }
    }
    monkeypatch.setattr(consumers, "LEAVE_TIMEOUT", 0.5)
    monkeypatch.setattr(RenewalHangsLayer, "hang", False)
    monkeypatch.setattr(RenewalHangsLayer, "hung", 0)

    async def scenario() -> None:
        client = await connect(VIEWER)
        assert (await ask(client, {"subscribe": "testapp.order"}))["type"] == "subscribed"
        RenewalHangsLayer.hang = True  # the next renewal hangs, holding the group lock
        while not RenewalHangsLayer.hung:
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="django_pgnotify"):
            answer = await ask(client, {"subscribe": "testapp.tag"})
            assert answer["type"] == "subscribed", answer
        RenewalHangsLayer.hang = False
        await client.disconnect()

    run(scenario)
    assert any("could not renew" in r.getMessage() for r in caplog.records)


# A stalled channel layer, with a real ASGI server

STALLED_SETTINGS = """
from tests.settings_channels import *  # noqa: F403
from tests.settings_channels import CHANNEL_LAYERS

# No read timeout (redis-py before 6, or one configured so): a stalled Redis never answers.
_config = CHANNEL_LAYERS["default"]["CONFIG"]
_config["hosts"] = [{**host, "socket_timeout": None} for host in _config["hosts"]]
"""

STALLED_ASGI = """
from tests.channels_asgi import application  # noqa: F401

from django_pgnotify import consumers

consumers.LEAVE_TIMEOUT = 1.0
"""


def test_a_subscription_in_flight_when_redis_stalls_does_not_keep_the_server_from_exiting(
    transactional_db, tmp_path
):
    """The socket closed while its consumer waited for Redis to join a group: Channels
    handles the disconnect only after that, so without a bound the consumer, and the
    ASGI server with it ("Waiting for background tasks to complete"), waited forever."""
    pytest.importorskip("channels_redis", reason="the channels extra is not installed")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed")
    import signal
    import subprocess
    import sys

    from django.contrib.auth.models import Permission, User
    from websockets.asyncio.client import connect as ws_connect

    from django_pgnotify.embedded_redis import EmbeddedRedis, find_redis_server
    from tests import conftest
    from tests.test_channels import free_port, session_cookie

    try:
        find_redis_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    viewer = User.objects.create_user("viewer", password="secret")
    viewer.user_permissions.add(Permission.objects.get(codename="view_order"))
    (tmp_path / "stalled_settings.py").write_text(STALLED_SETTINGS)
    (tmp_path / "stalled_asgi.py").write_text(STALLED_ASGI)
    redis = EmbeddedRedis()
    redis.start()
    server = None
    try:
        env = conftest.django_env(
            DJANGO_SETTINGS_MODULE="stalled_settings",
            DATABASE_URL=conftest.test_database_url(),
            REDIS_URL=redis.url,
            PGNOTIFY_TEST_REDIS_PREFIX=f"pgnotify-test-{uuid.uuid4().hex[:8]}",
        )
        env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
        port = free_port()
        server = conftest.ManagedProcess(
            [sys.executable, "-m", "uvicorn", "stalled_asgi:application", "--port", str(port)],
            env,
        )
        server.wait_for(r"Uvicorn running on", timeout=TIMEOUT, stream="err")
        headers = {"Cookie": session_cookie(viewer)}

        async def scenario() -> None:
            url = f"ws://127.0.0.1:{port}/ws/pgnotify/"
            async with ws_connect(url, additional_headers=headers) as ws:
                await ws.send(json.dumps({"subscribe": "testapp.order"}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                assert answer["type"] == "subscribed"
                assert redis.process is not None
                redis.process.send_signal(signal.SIGSTOP)
                # Read before the close frame: the consumer handles it, then waits on Redis.
                await ws.send(json.dumps({"subscribe": "testapp.order", "pk": 1}))

        asyncio.run(asyncio.wait_for(scenario(), 30))
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("the ASGI server did not exit within 10s of SIGTERM")
        server.wait_for(r"Finished server process", timeout=TIMEOUT, stream="err")
    finally:
        if server is not None:
            server.process.kill()
            server.process.wait(10)
        if redis.process is not None:
            redis.process.send_signal(signal.SIGCONT)
        redis.close()
