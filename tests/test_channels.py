"""The Channels bridge with real processes: Uvicorn, pgnotify_listen, channels_redis.

A real WebSocket client (``websockets``) talks to a real ASGI server process;
the listener is a separate ``pgnotify_listen --channel-layer default`` process;
rows are changed by a plain psycopg connection. Redis is ``REDIS_URL`` when set,
else an embedded one; the Redis-down test always uses an embedded one it can
stop and start.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

pytest.importorskip("channels_redis", reason="the channels extra is not installed")
pytest.importorskip("websockets", reason="websockets is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")

from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.backends.signed_cookies import SessionStore
from django.utils.module_loading import import_string
from websockets.asyncio.client import connect

from django_pgnotify.embedded_redis import (
    LAYER_BACKENDS,
    EmbeddedRedis,
    find_redis_server,
    redis_host,
    redis_url,
)
from tests import conftest
from tests.conftest import ManagedProcess, django_env

TIMEOUT = 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["core", "pubsub"])
def channels_env(request, transactional_db) -> Iterator[dict[str, str]]:
    """Environment of the child processes: test database, Redis, a prefix of our own.

    Each test runs with both of channels_redis's layers.
    """
    try:
        url = redis_url()
    except RuntimeError as exc:  # no REDIS_URL and no redis-server to start
        pytest.skip(str(exc))
    env = django_env(
        DJANGO_SETTINGS_MODULE="tests.settings_channels",
        DATABASE_URL=conftest.test_database_url(),
        REDIS_URL=url,
        PGNOTIFY_TEST_REDIS_PREFIX=f"pgnotify-test-{uuid.uuid4().hex[:8]}",
        PGNOTIFY_TEST_CHANNEL_LAYER=request.param,
    )
    yield env
    forget_keys(url, env["PGNOTIFY_TEST_REDIS_PREFIX"])


def forget_keys(url: str, prefix: str) -> None:
    """Delete the keys under ``prefix``: the consumers of a server the test killed never
    left their groups, whose keys would stay in a shared Redis for a day."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def processes() -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for process in started:
        process.kill()


def start_listener(env: dict[str, str], processes: list[ManagedProcess]) -> ManagedProcess:
    listener = ManagedProcess(
        [
            sys.executable,
            "-m",
            "django",
            "pgnotify_listen",
            "-v",
            "2",
            "--channel-layer",
            "default",
        ],
        env,
    )
    processes.append(listener)
    listener.wait_for(r"listening on", timeout=TIMEOUT, stream="err")
    # Every page open before it listened is told to reload; a test's client connects
    # after that, so that its first frames are the ones it asks for.
    listener.wait_for(r"sent resync \(started\)", timeout=TIMEOUT, stream="err")
    return listener


def start_server(env: dict[str, str], processes: list[ManagedProcess]) -> str:
    """Start a Uvicorn process serving tests/channels_asgi.py; its WebSocket URL."""
    port = free_port()
    uvicorn = ManagedProcess(
        [sys.executable, "-m", "uvicorn", "tests.channels_asgi:application", "--port", str(port)],
        env,
    )
    processes.append(uvicorn)
    uvicorn.wait_for(r"Uvicorn running on", timeout=TIMEOUT, stream="err")
    return f"ws://127.0.0.1:{port}/ws/pgnotify/"


@pytest.fixture
def server(channels_env, processes) -> str:
    """A Uvicorn process serving tests/channels_asgi.py; its WebSocket URL."""
    return start_server(channels_env, processes)


def session_cookie(user: User) -> str:
    """A signed session cookie logging ``user`` in, as Django's login() would make it."""
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return f"sessionid={session.session_key}"


@pytest.fixture
def viewer(transactional_db) -> User:
    user = User.objects.create_user("viewer", password="secret")
    user.user_permissions.add(Permission.objects.get(codename="view_order"))
    return user


@pytest.fixture
def stranger(transactional_db) -> User:
    return User.objects.create_user("stranger", password="secret")


def insert_order(conn: psycopg.Connection, status: str = "new") -> int:
    row = conn.execute(
        "INSERT INTO testapp_order (status, total, note) VALUES (%s, 10, '') RETURNING id",
        [status],
    ).fetchone()
    assert row is not None
    return int(row[0])


async def ask(ws: Any, request: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(request))
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def next_event(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def nothing_more(ws: Any, seconds: float = 0.5) -> bool:
    try:
        frame = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return True
    raise AssertionError(f"unexpected frame {frame}")


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


async def next_messages(layer: Any, channel: str) -> list[dict[str, Any]]:
    """The messages of the next batch the listener sent to ``channel``."""
    batch = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
    assert batch["type"] == "pgnotify.batch", batch
    return list(batch["messages"])


def test_a_logged_in_viewer_receives_changes_in_commit_order(
    server, channels_env, processes, viewer, other_connection
):
    start_listener(channels_env, processes)

    async def scenario() -> None:
        async with connect(server, additional_headers={"Cookie": session_cookie(viewer)}) as ws:
            assert await ask(ws, {"subscribe": "testapp.order"}) == {
                "type": "subscribed",
                "model": "testapp.order",
            }
            first = insert_order(other_connection)
            second = insert_order(other_connection)
            other_connection.execute(
                "UPDATE testapp_order SET status = 'paid' WHERE id = %s", [first]
            )
            other_connection.execute("DELETE FROM testapp_order WHERE id = %s", [second])
            events = [await next_event(ws) for _ in range(4)]
            assert [(e["action"], e["pk"]) for e in events] == [
                ("insert", first),
                ("insert", second),
                ("update", first),
                ("delete", second),
            ]
            assert [e["seq"] for e in events] == [1, 2, 3, 4]
            assert events[2]["fields"] == {"status": "paid", "total": "10.00"}
            assert events[2]["changed"] == ["status"]

            # The listener loses its connection: subscribers are told to resync.
            other_connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pgnotify_listen_tests' AND datname = current_database()"
            )
            resync = await next_event(ws)
            assert (resync["type"], resync["reason"]) == ("resync", "reconnected")
            third = insert_order(other_connection)
            event = await next_event(ws)
            assert (event["pk"], event["seq"]) == (third, 5)

    run(scenario)


def test_anonymous_and_unpermitted_users_are_refused_and_receive_nothing(
    server, channels_env, processes, viewer, stranger, other_connection
):
    start_listener(channels_env, processes)
    existing = insert_order(other_connection)

    async def scenario() -> None:
        cookie = {"Cookie": session_cookie(stranger)}
        async with (
            connect(server) as anonymous,
            connect(server, additional_headers=cookie) as unpermitted,
            connect(server, additional_headers={"Cookie": session_cookie(viewer)}) as permitted,
        ):
            for ws in (anonymous, unpermitted):
                for request in (
                    {"subscribe": "testapp.order"},
                    {"subscribe": "testapp.order", "pk": existing},
                ):
                    answer = await ask(ws, request)
                    assert (answer["type"], answer["code"]) == ("error", "forbidden"), answer
            answer = await ask(permitted, {"subscribe": "testapp.supplier"})
            assert answer["code"] == "not_notifying"
            assert (await ask(permitted, {"subscribe": "testapp.order", "pk": existing}))[
                "type"
            ] == "subscribed"

            other_connection.execute(
                "UPDATE testapp_order SET status = 'paid' WHERE id = %s", [existing]
            )
            event = await next_event(permitted)
            assert (event["action"], event["pk"]) == ("update", existing)
            # Delivered to the row group: the refused clients got nothing meanwhile.
            await nothing_more(anonymous)
            await nothing_more(unpermitted)

    run(scenario)


def test_forwarding_survives_redis_going_away_and_resumes(
    channels_env, processes, other_connection
):
    backend = import_string(LAYER_BACKENDS[channels_env["PGNOTIFY_TEST_CHANNEL_LAYER"]])

    async def close(layer: Any) -> None:
        # The core layer keeps connection pools; the pub/sub one closes on flush.
        await (layer.close_pools() if hasattr(layer, "close_pools") else layer.flush())

    try:
        find_redis_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    redis = EmbeddedRedis()
    redis.start()
    try:
        prefix = channels_env["PGNOTIFY_TEST_REDIS_PREFIX"]
        env = {**channels_env, "REDIS_URL": redis.url}
        listener = start_listener(env, processes)

        async def scenario() -> None:
            layer = backend(hosts=[redis_host(redis.url)], prefix=prefix)
            channel = await layer.new_channel()
            await layer.group_add("pgnotify.testapp.order", channel)
            first = insert_order(other_connection)
            [message] = await next_messages(layer, channel)
            assert (message["type"], message["pk"]) == ("pgnotify.row_changed", first)
            await close(layer)

            redis.stop()
            during = insert_order(other_connection)
            # Signals are still dispatched (-v 2 prints each event)...
            listener.wait_for(rf"testapp\.order insert pk={during}\b", TIMEOUT, stream="out")
            # ...and the failure is logged.
            listener.wait_for(r"cannot forward testapp\.order", TIMEOUT, stream="err")

            redis.start()
            listener.wait_for(r"works again", TIMEOUT, stream="err")
            layer = backend(hosts=[redis_host(redis.url)], prefix=prefix)
            channel = await layer.new_channel()
            await layer.group_add("pgnotify.testapp.order", channel)  # Redis kept nothing
            after = insert_order(other_connection)
            received: list[dict[str, Any]] = []
            while not any(m.get("pk") == after for m in received):
                received += await next_messages(layer, channel)
            assert received[-1]["seq"] == 3  # the message of the outage was sent before it
            await close(layer)

        run(scenario)
    finally:
        redis.close()


def test_an_unknown_channel_layer_is_a_clear_error(transactional_db):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="Channel layer 'nope' is not configured"):
        call_command("pgnotify_listen", "--channel-layer", "nope", verbosity=0)


def test_row_subscriptions_to_datetime_and_decimal_pks_receive_those_rows(
    server, channels_env, processes, other_connection
):
    user = User.objects.create_user("row viewer", password="secret")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_shift", "view_price"]))
    start_listener(channels_env, processes)

    async def scenario() -> None:
        async with connect(server, additional_headers={"Cookie": session_cookie(user)}) as ws:
            # As a browser spells them: another offset, no trailing zero.
            for request in (
                {"subscribe": "testapp.shift", "pk": "2024-03-01T13:00:00+01:00"},
                {"subscribe": "testapp.price", "pk": "1.5"},
            ):
                assert (await ask(ws, request))["type"] == "subscribed"
            # Each row's neighbour first: what arrives before the row's own change would be it.
            for starts_at in ("2024-03-01 12:00:01+00", "2024-03-01 12:00:00+00"):
                other_connection.execute(
                    "INSERT INTO testapp_shift (starts_at, name) VALUES (%s, '')", [starts_at]
                )
            for amount in ("1.51", "1.50"):
                other_connection.execute(
                    "INSERT INTO testapp_price (amount, label) VALUES (%s, '')", [amount]
                )
            events = [await next_event(ws) for _ in range(2)]
            assert [(e["model"], e["action"], e["pk"]) for e in events] == [
                ("testapp.shift", "insert", "2024-03-01T12:00:00+00:00"),
                ("testapp.price", "insert", "1.50"),
            ]

    run(scenario)


def test_a_context_with_a_lone_surrogate_escape_does_not_stop_forwarding(
    server, channels_env, processes, viewer, other_connection
):
    start_listener(channels_env, processes)

    async def scenario() -> None:
        async with connect(server, additional_headers={"Cookie": session_cookie(viewer)}) as ws:
            assert (await ask(ws, {"subscribe": "testapp.order"}))["type"] == "subscribed"
            # Another client's context, as docs/audit.md shows it: JSON text, and
            # \ud800 is valid JSON syntax (for a lone surrogate, which msgpack refuses).
            with other_connection.transaction():
                other_connection.execute(
                    "SELECT set_config('pgnotify.context', %s, true)", ['{"reason":"\\ud800"}']
                )
                odd = insert_order(other_connection)
            normal = insert_order(other_connection)
            events = [await next_event(ws) for _ in range(2)]
            assert [(e["pk"], e["context"]) for e in events] == [
                (odd, {"reason": "\ufffd"}),
                (normal, None),
            ]

    run(scenario)


def test_a_row_subscription_with_a_lone_surrogate_pk_is_an_invalid_pk_on_an_open_connection(
    server, channels_env, processes
):
    user = User.objects.create_user("tagger", password="secret")
    user.user_permissions.add(Permission.objects.get(codename="view_tag"))

    async def scenario() -> None:
        async with connect(server, additional_headers={"Cookie": session_cookie(user)}) as ws:
            # Valid JSON text (ASCII only) whose escape decodes to a lone surrogate.
            await ws.send('{"subscribe": "testapp.tag", "pk": "\\ud800", "id": 1}')
            answer = await next_event(ws)
            assert (answer["type"], answer["code"], answer["id"]) == ("error", "invalid_pk", 1)
            assert (await ask(ws, {"subscribe": "testapp.tag"}))["type"] == "subscribed"

    run(scenario)


def test_changes_committed_while_the_listener_restarts_are_followed_by_a_resync(
    server, channels_env, processes, viewer, other_connection
):
    first_listener = start_listener(channels_env, processes)

    async def scenario() -> None:
        async with connect(server, additional_headers={"Cookie": session_cookie(viewer)}) as ws:
            assert (await ask(ws, {"subscribe": "testapp.order"}))["type"] == "subscribed"
            before = insert_order(other_connection)
            event = await next_event(ws)
            assert event["pk"] == before
            assert first_listener.stop() == 0  # a deploy: SIGTERM, then a new listener
            insert_order(other_connection)  # committed while none listens: never sent
            start_listener(channels_env, processes)
            after = insert_order(other_connection)
            resync, then = await next_event(ws), await next_event(ws)
            assert (resync["type"], resync["model"], resync["reason"]) == (
                "resync",
                "testapp.order",
                "started",
            )
            assert resync["stream"] != event["stream"]
            assert (then["pk"], then["seq"], then["stream"]) == (after, 1, resync["stream"])

    run(scenario)


def test_a_bigint_pk_past_2_53_reaches_a_browser_as_the_row_it_names(
    server, channels_env, processes, viewer, other_connection
):
    start_listener(channels_env, processes)
    big = 2**53 + 1  # a BIGINT (BigAutoField) pk, as snowflake-style ids are

    async def scenario() -> list[str]:
        cookie = {"Cookie": session_cookie(viewer)}
        async with (
            connect(server, additional_headers=cookie) as model,
            connect(server, additional_headers=cookie) as row,
        ):
            assert (await ask(model, {"subscribe": "testapp.order"}))["type"] == "subscribed"
            # The pk as a browser keeps it: a string. Its row's group is named as before.
            answer = await ask(row, {"subscribe": "testapp.order", "pk": str(big)})
            assert answer["type"] == "subscribed"
            other_connection.execute(
                "INSERT INTO testapp_order (id, status, total, note) VALUES (%s, 'new', 1, '')",
                [big],
            )
            return [await asyncio.wait_for(ws.recv(), TIMEOUT) for ws in (model, row)]

    frames = asyncio.run(asyncio.wait_for(scenario(), 60))
    node = shutil.which("node")
    for frame in frames:
        if node is None:  # what JSON.parse would see: a string, not a number
            assert f'"pk": "{big}"' in frame, frame
            continue
        seen = subprocess.run(
            [node, "-e", "process.stdout.write(String(JSON.parse(process.argv[1]).pk))", frame],
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout
        assert seen == str(big), f"a browser reads pk {seen}; the row is {big}"


def test_a_listener_of_its_own_forwarding_to_the_in_memory_layer_warns_that_no_client_can_see(
    processes, transactional_db
):
    env = django_env(
        DJANGO_SETTINGS_MODULE="tests.settings_inmemory_layer",
        DATABASE_URL=conftest.test_database_url(),
    )
    listener = ManagedProcess([sys.executable, "-m", "django", "pgnotify_listen", "-v", "2"], env)
    processes.append(listener)
    warning = listener.wait_for(r"in-memory layer", timeout=TIMEOUT, stream="err")
    assert "WARNING" in warning and "with_listener" in warning and "channels_redis" in warning


SMALL_CAPACITY_SETTINGS = """
from tests.settings_channels import *  # noqa: F403
from tests.settings_channels import CHANNEL_LAYERS

# A tenth of the default: every round of 100 row messages overflows a consumer's channel,
# however fast the consumer reads it (at half, one that kept up lost nothing).
CHANNEL_LAYERS["default"]["CONFIG"]["capacity"] = 10
"""


@pytest.mark.parametrize("channels_env", ["core"], indirect=True)  # the layer with a capacity
def test_a_client_following_many_rows_that_change_together_gets_every_change_or_a_resync(
    channels_env, processes, viewer, other_connection, tmp_path
):
    """A batch reaches a consumer as one message per row group it is in: 100 followed rows
    changed together are 100 messages, and channels_redis drops those past a channel's
    capacity. Every change a row missed must be followed by a resync for it."""
    (tmp_path / "small_capacity_settings.py").write_text(SMALL_CAPACITY_SETTINGS)
    env = {
        **channels_env,
        "DJANGO_SETTINGS_MODULE": "small_capacity_settings",
        "PYTHONPATH": f"{tmp_path}:{channels_env['PYTHONPATH']}",
    }
    server = start_server(env, processes)
    rows = [insert_order(other_connection) for _ in range(100)]  # before any listener
    start_listener(env, processes)
    updates = 10

    async def scenario() -> dict[int, list[int | None]]:
        # Per row, in order of arrival: the update a change frame is of, None for a resync.
        seen: dict[int, list[int | None]] = {pk: [] for pk in rows}
        async with connect(server, additional_headers={"Cookie": session_cookie(viewer)}) as ws:
            for pk in rows:
                assert (await ask(ws, {"subscribe": "testapp.order", "pk": pk}))["type"] == (
                    "subscribed"
                )
            for update in range(updates):
                other_connection.execute(
                    "UPDATE testapp_order SET status = %s WHERE id = ANY(%s)",
                    [f"s{update}", rows],
                )
            # No further change: the checkpoints after the quiet spell (CHECKPOINT_DELAY,
            # 1 s, after the last change was sent, and again 1 s after that one was) tell
            # of the last changes lost, even when the first of them is lost too.
            await receive_until_quiet(ws, seen)
        return seen

    async def receive_until_quiet(ws: Any, seen: dict[int, list[int | None]]) -> None:
        while True:
            try:
                # Nothing for 5 s: nothing more comes.
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            except asyncio.TimeoutError:
                return
            if frame["type"] == "row_changed":
                seen[frame["pk"]].append(int(frame["fields"]["status"][1:]))
            else:
                assert (frame["type"], frame["reason"]) == ("resync", "gap"), frame
                for pk in [frame["pk"]] if "pk" in frame else rows:
                    seen[pk].append(None)

    seen = asyncio.run(asyncio.wait_for(scenario(), 120))
    silent: dict[int, list[int]] = {}  # row: updates missed with no resync after the one before
    for pk, timeline in seen.items():
        changes = [u for u in timeline if u is not None]
        assert changes == sorted(changes), (pk, timeline)  # in order
        for update in set(range(updates)) - set(changes):
            before = max(
                (i for i, u in enumerate(timeline) if u is not None and u < update), default=-1
            )
            if None not in timeline[before + 1 :]:
                silent.setdefault(pk, []).append(update)
    arrived = sum(len([u for u in t if u is not None]) for t in seen.values())
    assert not silent, (
        f"{len(silent)} of {len(rows)} rows missed changes without a resync after them "
        f"({arrived} of {len(rows) * updates} changes arrived): {silent}"
    )
    assert arrived < len(rows) * updates  # the scenario lost changes: the check was exercised
