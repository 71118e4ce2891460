"""RowChangeConsumer and the forwarder, in one process, with Channels' in-memory layer."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("channels", reason="the channels extra is not installed")

from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from django_pgnotify import RowChange
from django_pgnotify.channels_bridge import ChannelLayerForwarder, ChannelsDispatcher
from django_pgnotify.consumers import RowChangeConsumer
from tests.testapp.models import Order, Tag

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
    while dispatcher.forwarder._pending:  # sent into the layer; consumers read it next
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


def test_not_json_binary_and_oversized_messages_get_error_frames():
    async def scenario() -> None:
        client = await connect(VIEWER)
        await client.send_to(text_data="{not json")
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


class FlakyLayer:
    """A channel layer whose group_send fails a number of times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[tuple[str, dict]] = []

    async def group_send(self, group: str, message: dict) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Redis is gone")
        self.sent.append((group, message))


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
        while forwarder._pending:
            await asyncio.sleep(0.01)
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
        while forwarder._pending:
            await asyncio.sleep(0.01)
        kinds = [(m["type"], m.get("seq")) for _, m in layer.sent]
        assert kinds[:2] == [("pgnotify.row_changed", 3), ("pgnotify.row_changed", 4)]
        assert ("pgnotify.resync", None) in kinds
        assert forwarder.stats["forward_dropped"] == 2
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


def test_the_checks_report_a_channel_layer_that_is_not_configured(settings):
    from django_pgnotify.checks import check_settings

    settings.PGNOTIFY = {"CHANNEL_LAYER": "nope", "CHANNEL_ROW_GROUPS": "yes"}
    messages = [m.msg for m in check_settings() if m.id == "pgnotify.E010"]
    assert any("'nope', which is not in settings.CHANNEL_LAYERS" in m for m in messages)
    assert "PGNOTIFY[\"CHANNEL_ROW_GROUPS\"] must be True or False, got 'yes'." in messages
    settings.PGNOTIFY = {"CHANNEL_LAYER": "default", "CHANNEL_ROW_GROUPS": True}
    assert not [m for m in check_settings() if m.id == "pgnotify.E010"]
