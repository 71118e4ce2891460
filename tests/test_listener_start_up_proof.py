"""The start-up proof of delivery, when PostgreSQL's notification queue was full at connect.

The listener listens all the same and sends that proof (a probe from a second session)
again, in place of its next probes, until it comes back. Here the queue is not filled:
``pg_notify`` is shadowed (the database's ``search_path``) by one that refuses the probe
sessions' as a full queue does, and passes every other on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.conftest import (
    ManagedProcess,
    delivers_after_reconnecting,
    django_env,
    role_with_connection_limit,
)
from tests.conftest import test_database_url as database_url
from tests.test_listener_resilience import Proxy
from tests.testapp.models import Tag

LISTENER_ARGS = ["pgnotify_listen", "-v", "2", "--settings", "tests.settings_listener"]
#: What the listener logs when it drops its connection, or opens another.
RECONNECTING = ("lost the listening connection", "cannot connect", "reconnected to")


@pytest.fixture
def limited_role(
    other_connection: psycopg.Connection,
) -> Iterator[tuple[str, Callable[[int], None]]]:
    """A login role that may open two connections at a time; its name and what sets that limit."""
    with role_with_connection_limit(other_connection) as made:
        yield made


@pytest.fixture
def proxies(transactional_db) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(**kwargs: object) -> Proxy:
        made.append(Proxy(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for each in made:
        each.close()


def start_listener(url: str, *selectors: str) -> ManagedProcess:
    return ManagedProcess(
        [sys.executable, "-m", "django", *LISTENER_ARGS, *selectors], django_env(DATABASE_URL=url)
    )


def started_owing_the_proof(listener: ManagedProcess) -> None:
    listener.wait_for(r"start-up self-probe could not be sent", stream="err")
    listener.wait_for(r"listening on", stream="err")


def test_a_proof_that_cannot_be_sent_again_leaves_the_listening_connection_in_place(
    probes_refused, limited_role
):
    """While the proof is owed, a second connection that cannot be opened (connection
    slots used up) is said once; the listener listens on, on the connection that works,
    probes that connection instead, and sends the proof once a second connection opens."""
    role, limit = limited_role
    listener = start_listener(database_url(user=role), "testapp.Tag")
    try:
        started_owing_the_proof(listener)
        limit(1)  # the listening connection's slot only

        line = listener.wait_for(r"cannot send the start-up self-probe again", stream="err")
        assert "too many connections for role" in line
        assert "trying again at the next probe" in line
        Tag.objects.create(name="while unproved", colour="red")
        listener.wait_for(r"^testapp\.tag insert pk='while unproved'$", stream="out")
        listener.wait_for(r"stats .*connected=True", stream="err")

        limit(2)
        probes_refused()
        listener.wait_for(r"start-up self-probe came back", stream="err")
        assert listener.stop() == 0
    finally:
        listener.kill()
    errors = listener.output("err")
    assert not [line for line in errors if any(said in line for said in RECONNECTING)]
    assert len([line for line in errors if "self-probe again" in line]) == 1
    (stopped,) = [line for line in errors if "listener stopped" in line]
    assert " reconnects=0," in stopped


def test_a_proof_sent_again_that_is_lost_on_a_direct_connection_does_not_blame_a_pooler(
    probes_refused, proxies
):
    """Its probe went once the queue had room: the listening session reads the queue in
    order, so the probe comes after what filled it, and no probe went on its connection
    meanwhile. The reconnect proves delivery afresh."""
    cut = proxies()
    listener = start_listener(cut.url())
    try:
        started_owing_the_proof(listener)
        cut.drop_notifications = True  # as a connection that stopped delivering
        probes_refused()

        line = listener.wait_for(r"lost the listening connection", stream="err")
        assert "sent again once PostgreSQL's notification queue had room for it" in line
        assert "No connection pooler was seen" in line
        assert "pooling proxy" not in line
        cut.drop_notifications = False
        delivers_after_reconnecting(listener, timeout=20)
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_a_proof_sent_again_that_is_lost_through_a_pooler_names_it_as_the_first_does(
    probes_refused, proxies
):
    """The connection's backend pid is not its server session's: a pooler, named with
    both pids, and the server session it lent left (``UNLISTEN *``), as when the first
    proof is lost."""
    cut = proxies(backend_pid=4_000_000)
    listener = start_listener(cut.url())
    try:
        started_owing_the_proof(listener)
        cut.drop_notifications = True  # a transaction pooler delivers others' to no one
        probes_refused()

        line = listener.wait_for(r"lost the listening connection", stream="err")
        assert "sent again once PostgreSQL's notification queue had room for it" in line
        assert "A connection pooler sits between the listener and PostgreSQL" in line
        assert "backend pid 4000000 is not its server session's" in line
        assert 'PGNOTIFY["LISTEN_DATABASES"]' in line
        assert listener.stop() == 0
    finally:
        listener.kill()
    first = next(sent for sent in cut.sent if b"LISTEN " in sent)  # the connection that lost it
    assert b"UNLISTEN *; RESET application_name" in first
