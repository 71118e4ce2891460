"""RowChangeConsumer and the forwarder: what ``last_age`` may and may not hide."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import pytest

pytest.importorskip("channels", reason="the channels extra is not installed")

from django_pgnotify import channels_bridge
from django_pgnotify.channels_bridge import (
    BATCH,
    RESYNC,
    ROW_CHANGED,
    ChannelLayerForwarder,
    ChannelsDispatcher,
)
from django_pgnotify.consumers import RowChangeConsumer
from tests.test_consumer import (  # noqa: F401 (in_memory_layer: a fixture)
    VIEWER,
    BusyConsumer,
    BusyOwnOrdersConsumer,
    ask,
    checked,
    connect,
    forward,
    frames,
    in_memory_layer,
    losing,
    order_change,
    run,
    sent,
    seqs,
)


@pytest.fixture
def gaps(monkeypatch) -> Counter[str]:
    """The consumers' count of gaps, from zero, and their warning not yet logged."""
    from django_pgnotify import consumers

    monkeypatch.setattr(consumers, "stats", Counter())
    monkeypatch.setattr(consumers, "_gap_warned", -math.inf)
    return consumers.stats


def test_a_change_after_changes_the_full_queue_dropped_and_a_lost_resync_is_a_gap(
    gaps, monkeypatch, settings
):
    """Changes dropped from the forwarder's full queue were never sent: the change after
    them cannot say they were sent before the subscription. With the ``resync`` sent in
    their place lost too, the client has missed them, which is a gap."""
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": False}
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        await forward(dispatcher, order_change(1))
        forwarder._changed["testapp.order"] -= 3600.0  # 1 was sent an hour ago
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order"})
        # The checkpoint naming 1, sent after the subscription: the consumer counts from it.
        monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.05)
        assert forwarder._wake is not None
        forwarder._wake.set()
        await checked(forwarder)
        assert await frames(client) == []
        # 2 is dropped from the full queue, and the resync sent in its place is lost.
        forwarder._queue_size = 1
        losing(dispatcher, lambda group, messages: any(m["type"] == RESYNC for m in messages))
        await forward(dispatcher, order_change(2), order_change(3))
        assert forwarder.stats["forward_dropped"] == 1
        await checked(forwarder)
        assert await frames(client) == [("resync", None, "gap"), ("row_changed", 3, 3)]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 1


class KeptConsumer(RowChangeConsumer):
    """Keeps its instances, to look at what they hold."""

    instances: list[RowChangeConsumer] = []

    async def connect(self) -> None:
        await super().connect()
        self.instances.append(self)


def test_rows_followed_and_left_one_after_the_other_are_not_kept_as_shown(monkeypatch):
    """A client paging through rows, following each for a while beside the model, makes
    the consumer remember only the rows it follows now: its memory stays bounded."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)
    monkeypatch.setattr(KeptConsumer, "instances", [])

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER, KeptConsumer)
        await ask(client, {"subscribe": "testapp.order"})
        for pk in range(1, 21):
            await ask(client, {"subscribe": "testapp.order", "pk": pk})
            await forward(dispatcher, order_change(pk))
            assert await frames(client) == [("row_changed", pk, pk)]
            await ask(client, {"unsubscribe": "testapp.order", "pk": pk})
        (consumer,) = KeptConsumer.instances
        (heard,) = consumer.heard["testapp.order"].values()
        assert heard.shown <= {None}
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)


class HeldLayer:
    """A channel layer that holds the batch of the change ``hold`` until ``release``."""

    def __init__(self, hold: int = 1) -> None:
        self.hold = hold
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.messages: list[dict[str, Any]] = []

    async def group_send(self, group: str, message: dict) -> None:
        assert message["type"] == BATCH
        changes = [m for m in message["messages"] if m["type"] == ROW_CHANGED]
        if any(m["seq"] == self.hold for m in changes):
            self.holding.set()
            await self.release.wait()
        self.messages += message["messages"]


def test_a_change_dropped_while_the_change_before_it_is_being_sent_leaves_no_last_age(
    monkeypatch, settings
):
    """2 and 3 are dropped from the full queue while 1 is being sent (3 for the resync
    that replaces them): 4 has nothing sent before it to measure from (the end of 1's
    round is not when 3 was sent: it never was)."""
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": False}
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)

    async def scenario() -> None:
        # Rounds half a second apart: 4's round starts well after 1's ended.
        forwarder = ChannelLayerForwarder("default", queue_size=2, min_interval=0.5)
        layer = forwarder.layer = HeldLayer()  # type: ignore[assignment]
        forwarder.submit([order_change(1)])
        await asyncio.wait_for(layer.holding.wait(), 10)
        forwarder.submit([order_change(2), order_change(3), order_change(4)])
        layer.release.set()
        await sent(forwarder)
        await sent(forwarder)  # and the resync that follows
        changes = {m["seq"]: m for m in layer.messages if m["type"] == ROW_CHANGED}
        assert sorted(changes) == [1, 4]
        assert changes[4]["last_age"] == 0.0
        assert {m["reason"] for m in layer.messages if m["type"] == RESYNC} == {"dropped"}
        await forwarder.drain()

    run(scenario)


def test_a_change_taken_by_the_sending_of_a_closed_event_loop_leaves_no_last_age(
    monkeypatch, settings
):
    """Change 2 was being sent when its event loop closed: it may never have been. Change
    3, sent on the next loop, cannot say 2 was sent when 1 was (an hour ago)."""
    settings.PGNOTIFY = {**settings.PGNOTIFY, "CHANNEL_ROW_GROUPS": False}
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)
    forwarder = ChannelLayerForwarder("default")

    async def first_loop() -> None:
        layer = forwarder.layer = HeldLayer(hold=2)  # type: ignore[assignment]
        forwarder.submit([order_change(1)])
        await sent(forwarder)
        forwarder._changed["testapp.order"] -= 3600.0  # 1 was sent an hour ago
        forwarder.submit([order_change(2)])
        await asyncio.wait_for(layer.holding.wait(), 10)  # then the loop closes

    async def second_loop() -> list[dict[str, Any]]:
        layer = forwarder.layer = HeldLayer(hold=0)  # type: ignore[assignment]
        forwarder.submit([order_change(3)])
        await sent(forwarder)
        await forwarder.drain()
        return layer.messages

    asyncio.run(first_loop())
    messages = asyncio.run(second_loop())
    (change,) = [m for m in messages if m["type"] == ROW_CHANGED]
    assert change["seq"] == 3
    assert change["last_age"] == 0.0


@pytest.mark.parametrize("first", ["row", "model"])
@pytest.mark.parametrize("next_", ["change", "checkpoint"])
def test_following_the_model_again_with_a_row_reloads_a_change_of_that_row_from_before(
    gaps, monkeypatch, first, next_
):
    """The client follows the model again, and row 2 with it. Change 4 (row 2's) of the
    model's subscription before, still in the channel, reaches it after both subscriptions;
    5 (row 2's too), sent in between to nobody, is in the client's reload, which 4 then
    overwrote. The next change or checkpoint tells it: the client reloads. No gap."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        forwarder = dispatcher.forwarder
        client = await connect(VIEWER, BusyOwnOrdersConsumer)  # odd pks filtered out
        BusyConsumer.gate = asyncio.Event()
        await ask(client, {"subscribe": "testapp.order"})
        # The busy one is shown; 2 and 3 (row 1's) and 4 (row 2's) wait in the channel.
        for pk in (2, 1, 1, 2):
            await forward(dispatcher, order_change(pk))
        await client.send_json_to({"unsubscribe": "testapp.order"})
        losing(dispatcher, seqs(5))  # sent before it follows again: not for it
        await forward(dispatcher, order_change(2))
        row = {"subscribe": "testapp.order", "pk": 2}
        requests = [row, {"subscribe": "testapp.order"}]
        if first == "model":
            requests.reverse()
        for request in requests:
            await client.send_json_to(request)
        # Later: the ages the listener measures tell 5 from one sent after the subscriptions.
        await asyncio.sleep(0.5)
        BusyConsumer.gate.set()
        # Channels takes a client message, then a channel message, in turn: 2 is handled
        # after the unsubscription, 3 after the first subscription, 4 after the second.
        assert await frames(client) == [
            ("row_changed", 2, 1),
            ("unsubscribed", None, None),
            *(("subscribed", request.get("pk"), None) for request in requests),
            ("row_changed", 2, 4),
        ]
        losing(dispatcher, lambda group, messages: False)
        if next_ == "change":  # of another row
            await forward(dispatcher, order_change(4))
            assert await frames(client) == [("resync", None, "gap"), ("row_changed", 4, 6)]
            last = 6
        else:  # the checkpoint after 5, sent after the subscriptions
            monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 0.05)
            assert forwarder._wake is not None
            forwarder._wake.set()  # it waited for the delay of before
            await checked(forwarder)
            # The model is checked from a change of another row (or 3, with the model
            # followed first): until then, the checkpoint checks row 2, and names its 5.
            assert await frames(client) == [("resync", 2 if first == "row" else None, "gap")]
            last = 5
        assert gaps["gaps"] == 0
        # A change lost after one of another row (which the model is checked from) is still
        # found, and counted.
        await forward(dispatcher, order_change(4))
        losing(dispatcher, seqs(last + 2))
        for pk in (6, 8):
            await forward(dispatcher, order_change(pk))
        assert await frames(client) == [
            ("row_changed", 4, last + 1),
            ("resync", None, "gap"),
            ("row_changed", 8, last + 3),
        ]
        await client.disconnect()
        await forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 1


def test_following_the_model_after_a_row_reloads_nothing_for_the_rows_changes_before(
    gaps, monkeypatch
):
    """The client reloads on ``subscribed``: what it was sent of a followed row before it
    followed the model is older than that reload, and the changes of other rows sent
    before it are not its business."""
    monkeypatch.setattr(channels_bridge, "CHECKPOINT_DELAY", 60.0)

    async def scenario() -> None:
        dispatcher = ChannelsDispatcher("default", ["testapp.order"])
        client = await connect(VIEWER)
        await ask(client, {"subscribe": "testapp.order", "pk": 2})
        await forward(dispatcher, order_change(2), order_change(5))
        assert await frames(client) == [("row_changed", 2, 1)]
        # Later: the ages the listener measures tell 2 from one sent after the subscription.
        await asyncio.sleep(0.5)
        await ask(client, {"subscribe": "testapp.order"})
        await forward(dispatcher, order_change(5))
        assert await frames(client) == [("row_changed", 5, 3)]
        await client.disconnect()
        await dispatcher.forwarder.drain()

    run(scenario)
    assert gaps["gaps"] == 0
