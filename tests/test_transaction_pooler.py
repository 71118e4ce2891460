"""The listener behind a real PgBouncer: refused in transaction pooling, working in session
pooling.

Through a transaction pooler a NOTIFY the listener sends on its own connection comes back
(it runs on the server session that ran LISTEN, and PostgreSQL delivers a session's own
notifications), while no other session's notification ever does: only a probe sent from
another session tells the two apart. Each PgBouncer test starts a PgBouncer of its own in
front of the test database's server; without a ``pgbouncer`` executable they are skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from django_pgnotify.connection import connection_params
from tests.conftest import ManagedProcess, delivers_after_reconnecting, django_env, run_manage
from tests.conftest import test_database_url as database_url
from tests.testapp.models import Order, Tag

LISTENER_ARGS = ["pgnotify_listen", "-v", "2", "--settings", "tests.settings_listener"]
# PROBE_TIMEOUT is 2 s in tests.settings_listener: a refusal comes within seconds.
REFUSAL_WITHIN = 30


def pgbouncer_executable() -> str:
    """PgBouncer's executable (``PGNOTIFY_PGBOUNCER``, on ``PATH``, or Debian's), or skip."""
    for candidate in (os.environ.get("PGNOTIFY_PGBOUNCER"), "pgbouncer", "/usr/sbin/pgbouncer"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.skip("no PgBouncer found (apt-get install pgbouncer, or set PGNOTIFY_PGBOUNCER)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_as() -> str | None:
    """The user to run PgBouncer as: it refuses to run as root.

    Over a Unix socket, the owner of its directory, who can reach it (an embedded
    server's is its data directory, no one else's); else nobody.
    """
    if os.geteuid() != 0:
        return None
    host = str(connection_params("default").get("host") or "")
    if host.startswith("/"):
        owner = Path(host).owner()
        if owner != "root":
            return owner
    return "nobody"


def _quoted(value: str) -> str:
    """A value for a PgBouncer connection string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Bouncer:
    """A PgBouncer process in front of the test database's server, on a port of its own."""

    def __init__(self, executable: str, directory: Path, pool_mode: str) -> None:
        params = connection_params("default")
        self.target = " ".join(
            f"{key}={_quoted(str(params[key]))}"
            for key in ("host", "port", "user", "password")
            if params.get(key) not in (None, "")
        )
        directory.mkdir()
        self.executable, self.ini, self.port = executable, directory / "pgbouncer.ini", free_port()
        self.process = self._start(pool_mode)

    def _start(self, pool_mode: str) -> ManagedProcess:
        self.ini.write_text(
            "[databases]\n"
            f"* = {self.target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"  # the user given in [databases] logs in
            f"pool_mode = {pool_mode}\n"
        )
        user = run_as()
        args = [self.executable] if user is None else [self.executable, "-u", user]
        process = ManagedProcess([*args, str(self.ini)], dict(os.environ))  # read as root
        process.wait_for(r"process up", stream="err")
        return process

    def restart(self, pool_mode: str) -> None:
        """Stop, closing every connection through it, and start again in ``pool_mode``."""
        self.process.stop()
        self.process = self._start(pool_mode)

    def url(self) -> str:
        return database_url(host="127.0.0.1", port=str(self.port))

    def close(self) -> None:
        self.process.stop()


@pytest.fixture
def pgbouncer(transactional_db, tmp_path) -> Iterator[Callable[[str], Bouncer]]:
    """Start a PgBouncer in the given pool mode; stopped after the test."""
    executable = pgbouncer_executable()
    started: list[Bouncer] = []

    def start(pool_mode: str) -> Bouncer:
        started.append(Bouncer(executable, tmp_path / str(len(started)), pool_mode))
        return started[-1]

    try:
        yield start
    finally:
        for bouncer in started:
            bouncer.close()


def start_listener(url: str) -> ManagedProcess:
    return ManagedProcess(
        [sys.executable, "-m", "django", *LISTENER_ARGS], django_env(DATABASE_URL=url)
    )


def test_a_listener_behind_a_transaction_pooling_pgbouncer_refuses_to_run(pgbouncer):
    bouncer = pgbouncer("transaction")
    listener = start_listener(bouncer.url())
    try:
        status = listener.process.wait(REFUSAL_WITHIN)
    except Exception:
        listener.kill()
        raise AssertionError(
            f"the listener still runs through a transaction pooler; saw {listener.output()}"
        ) from None

    stderr = "\n".join(listener.output("err"))
    assert status == 1, stderr
    assert "from another session) did not come back" in stderr
    assert "A connection pooler sits between the listener and PostgreSQL" in stderr
    assert "PgBouncer with pool_mode = transaction" in stderr
    assert 'PGNOTIFY["LISTEN_DATABASES"]' in stderr
    assert "listening on" not in stderr
    assert "Traceback" not in stderr
    # The server session it was lent no longer listens, nor bears the listener's name.
    # In a transaction, this client is lent the pool's one server session, the listener's.
    with psycopg.connect(bouncer.url()) as client:
        received: list[psycopg.Notify] = []
        client.add_notify_handler(received.append)
        client.execute("SELECT 1")
        Tag.objects.create(name="after the refusal", colour="red")
        client.commit()  # what the session was sent meanwhile arrives before the answer
        assert received == []
    report = run_manage("pgnotify_status", "--database", "default", *LISTENER_ARGS[3:])
    assert "no listener is connected" in report.stdout, report.stdout


def test_a_listener_behind_a_session_pooling_pgbouncer_receives_committed_changes(pgbouncer):
    bouncer = pgbouncer("session")
    listener = start_listener(bouncer.url())
    try:
        listener.wait_for(r"listening on", stream="err")
        direct = Order.objects.create(status="direct")
        with psycopg.connect(bouncer.url(), autocommit=True) as writer:  # and through the pool
            writer.execute("INSERT INTO testapp_tag (name, colour) VALUES ('pooled', 'red')")

        listener.wait_for(rf"^testapp\.order insert pk={direct.pk} ", stream="out")
        listener.wait_for(r"^testapp\.tag insert pk='pooled'$", stream="out")
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_a_reconnect_through_a_pool_turned_transaction_pooling_is_refused_and_retried(pgbouncer):
    """Delivery from another session is proved at each connect, not only the first."""
    bouncer = pgbouncer("session")
    listener = start_listener(bouncer.url())
    try:
        listener.wait_for(r"listening on", stream="err")
        bouncer.restart("transaction")

        listener.wait_for(r"lost the listening connection", stream="err")
        line = listener.wait_for(r"from another session\) did not come back", stream="err")
        assert "A connection pooler sits between" in line and "retrying in" in line
        bouncer.restart("session")
        delivers_after_reconnecting(listener, timeout=20)
        assert listener.stop() == 0
    finally:
        listener.kill()


@pytest.fixture
def one_connection_role(other_connection) -> Iterator[str]:
    """A login role (not a superuser: a connection limit does not hold for those) that
    may open one connection at a time."""
    role = f"pgnotify_one_{uuid.uuid4().hex[:8]}"
    other_connection.execute(
        sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1").format(sql.Identifier(role))
    )
    try:
        yield role
    finally:
        other_connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_listener_that_cannot_open_the_probes_connection_retries_saying_why(
    one_connection_role, other_connection
):
    """Delivery from other sessions unproved, it does not listen; it retries as after a
    failed connect, and starts once the second connection opens."""
    env = django_env(DATABASE_URL=database_url(user=one_connection_role))
    listener = ManagedProcess([sys.executable, "-m", "django", *LISTENER_ARGS, "testapp.Tag"], env)
    try:
        line = listener.wait_for(r"cannot connect to", stream="err")
        assert "cannot send the start-up self-probe from a second connection" in line
        assert "too many connections for role" in line and "retrying in" in line
        other_connection.execute(
            sql.SQL("ALTER ROLE {} CONNECTION LIMIT 2").format(sql.Identifier(one_connection_role))
        )
        listener.wait_for(r"listening on", stream="err")
        Tag.objects.create(name="proved", colour="red")

        listener.wait_for(r"^testapp\.tag insert pk='proved'$", stream="out")
        assert listener.stop() == 0
    finally:
        listener.kill()
