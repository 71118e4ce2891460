"""Shared fixtures: a real PostgreSQL with triggers installed, listeners, subprocesses."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection, models
from django.test.utils import isolate_apps
from psycopg import sql
from psycopg.conninfo import make_conninfo

from django_pgnotify import Notify, RowChange
from django_pgnotify.connection import connection_params
from django_pgnotify.declarations import Declaration, resolve_model
from django_pgnotify.installation import install_triggers, prune_triggers
from django_pgnotify.testing import CapturedChanges
from django_pgnotify.triggers import TriggerSQL, build_trigger_sql

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """The test database, migrated, with every declaration's triggers installed."""
    with django_db_blocker.unblock():
        call_command("pgnotify_install", verbosity=0)
    yield


@pytest.fixture
def changes(row_changes: CapturedChanges) -> CapturedChanges:
    """A real listener running in this process for the duration of the test.

    The ``row_changes`` fixture of ``django_pgnotify.pytest_plugin`` (enabled
    with ``-p`` in pyproject.toml), as users enable it.
    """
    return row_changes


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def assert_pickles(error: Exception) -> None:
    """``error`` reaches a parent process (``multiprocessing``, a task queue) as raised."""
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.args, copy.__dict__) == (type(error), error.args, error.__dict__)


def orders_beside_a_failing_receiver(
    changes: CapturedChanges, failing: Callable[..., Any]
) -> tuple[list[Any], list[Any]]:
    """Create two orders while ``failing`` and, after it, a receiver of the same kind
    (sync or async) that records pks are connected; return (pks it received, pks created)."""
    import asyncio

    from django_pgnotify import row_changed
    from tests.testapp.models import Order

    received: list[Any] = []

    def working(sender: Any, event: RowChange, **kwargs: Any) -> None:
        received.append(event.pk)

    async def working_async(sender: Any, event: RowChange, **kwargs: Any) -> None:
        received.append(event.pk)

    recorder = working_async if asyncio.iscoroutinefunction(failing) else working
    row_changed.connect(failing, sender=Order, weak=False)
    row_changed.connect(recorder, sender=Order, weak=False)
    try:
        created = [Order.objects.create().pk, Order.objects.create().pk]
        changes_before_marker(changes)
    finally:
        row_changed.disconnect(failing, sender=Order)
        row_changed.disconnect(recorder, sender=Order)
    return received, created


def order_rolled_back_to_a_savepoint_last() -> None:
    """Write an order after a SAVEPOINT and roll back to it, as the caller's block's
    last statement. Raw SQL, as ``transaction.savepoint()`` runs (Django 6.1
    deprecates that function, and 5.2 has no successor to it)."""
    from tests.testapp.models import Order

    with connection.cursor() as cursor:
        cursor.execute("SAVEPOINT manual")
    Order.objects.create(status="rolled back")
    with connection.cursor() as cursor:
        cursor.execute("ROLLBACK TO SAVEPOINT manual")


def wide_row_updated(changes: CapturedChanges) -> tuple[Any, RowChange]:
    """Create a ``Reading`` (it declares every field, so its update rows have 16
    values or more and are rendered by ``json_build_array``), update its ratio
    from 0.5 to 0.75, its flag and its data; return its pk and the update's event."""
    from tests.testapp.models import Reading

    reading = Reading.objects.create(ratio=0.5, count=1, data={"v": 1})
    changes.wait_for(lambda e: e.model is Reading)
    changes.clear()
    Reading.objects.filter(pk=reading.pk).update(ratio=0.75, flag=True, data={"v": 2})
    return reading.pk, changes.wait_for(lambda e: e.model is Reading and e.action == "update")


def order_moved_to_a_new_pk(changes: CapturedChanges, shift: int, **values: Any) -> RowChange:
    """Create an order with status ``new``, then update its pk by ``shift`` (and set
    ``values``) in one statement; return the update's event."""
    from tests.testapp.models import Order

    order = Order.objects.create(status="new")
    changes.wait(1)
    changes.clear()
    Order.objects.filter(pk=order.pk).update(id=order.pk + shift, **values)
    (event,) = changes.wait(1)
    assert (event.action, event.pk) == ("update", order.pk + shift)
    return event


def changes_before_marker(
    changes: CapturedChanges, timeout: float = 5.0, undecodable: int = 0
) -> list[RowChange]:
    """Commit a marker change and return the changes that arrived before it.

    Notifications arrive in commit order, so once the marker is in, anything
    committed earlier that was announced at all has arrived too: this is how
    a test shows that something was *not* sent without sleeping. Asserts that
    the listener skipped ``undecodable`` payloads (none, unless the test sent
    some): a message it could not read would otherwise pass for one not sent.
    """
    from tests.testapp.models import Tag

    name = f"marker-{uuid.uuid4().hex[:8]}"
    Tag.objects.create(name=name)
    marker = changes.wait_for(lambda e: e.model is Tag and e.pk == name, timeout)
    assert changes.stats["undecodable"] == undecodable, dict(changes.stats)
    return list(changes[: changes.index(marker)])


@pytest.fixture
def restore_triggers(transactional_db) -> Iterator[None]:
    """Bring the committed triggers back to the declarations after the test."""
    yield
    install_triggers()
    prune_triggers()


def install_redeclared(declaration: Declaration, **options: Any) -> TriggerSQL:
    """Install ``declaration``'s triggers as if its ``Notify`` had ``options`` too
    (``level="row"``, ``old=False``...); ``restore_triggers`` puts them back."""
    current = {slot: getattr(declaration.notify, slot) for slot in Notify.__slots__}
    changed = dataclasses.replace(declaration, notify=Notify(**{**current, **options}))
    if "when_changed" in options:  # the resolved columns follow the option
        changed = dataclasses.replace(changed, when_changed=())
        assert not options["when_changed"], "only clearing when_changed is supported"
    built = build_trigger_sql(changed, connection.pg_version)
    with connection.cursor() as cursor:
        cursor.execute(built.install)
    return built


def test_database_url(alias: str = "default", **overrides: str) -> str:
    """A libpq conninfo string for the test database, for child processes."""
    params = connection_params(alias)
    params.pop("client_encoding", None)
    params.update(overrides)
    return make_conninfo(**{k: v for k, v in params.items() if v not in (None, "")})


def django_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_manage(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run ``python -m django <args>`` against the test database and wait for it.

    What it wrote is printed too, for pytest to show in a failing test's report.
    """
    result = subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=env or django_env(DATABASE_URL=test_database_url()),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"--- manage.py {' '.join(args)} (exit {result.returncode})")
    print(result.stdout, result.stderr, sep="", end="")
    return result


class ManagedProcess:
    """A child process whose output lines can be awaited with a timeout."""

    #: The processes started during the current test (``_processes_reported``).
    started: ClassVar[list[ManagedProcess]] = []

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.args = args
        ManagedProcess.started.append(self)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        self._cursors: dict[str | None, int] = {}
        self._matched: set[int] = set()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("out", self.process.stdout), ("err", self.process.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float = 15, stream: str | None = None) -> str:
        """Return the first new line matching ``pattern``; fail after ``timeout``.

        "New" is counted per stream: stdout and stderr are read independently,
        so a line of one that arrived while a test waited on the other is
        still found by the next wait on its own stream. A line returned once is
        never returned again.
        """
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        index = self._cursors.get(stream, 0)
        while True:
            while index < len(self.seen):
                name, line = self.seen[index]
                index += 1
                if index - 1 in self._matched:
                    continue
                if (stream is None or name == stream) and regex.search(line):
                    self._matched.add(index - 1)
                    self._cursors[stream] = index
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cursors[stream] = index
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s; saw {self.seen}"
                )
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"process did not stop within {timeout}s after {sig!r}") from None

    def output(self, stream: str | None = None) -> list[str]:
        """Every line the process wrote (after it exited), in order of reading."""
        self._read_all(5)
        return [line for name, line in self.seen if stream is None or name == stream]

    def _read_all(self, timeout: float) -> None:
        """Move the lines read so far to ``seen``, once the readers have ended (each
        waited for up to ``timeout`` seconds)."""
        for reader in self._readers:
            reader.join(timeout)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def report(self) -> str:
        """Its command line and every line it wrote so far, without waiting for a
        process still running (one a wider fixture keeps)."""
        status = self.process.poll()
        self._read_all(0 if status is None else 2)
        command = " ".join([Path(self.args[0]).name, *self.args[1:]])
        ended = "still running" if status is None else f"exit {status}"
        return "\n".join([f"--- {command} ({ended})", *(line for _, line in self.seen)])


@pytest.fixture(autouse=True)
def _processes_reported() -> Iterator[None]:
    """Print what each process a test started wrote, at its end: pytest shows it in a
    failing test's report. A fixture that stops its processes does so before this."""
    first = len(ManagedProcess.started)
    yield
    for managed in ManagedProcess.started[first:]:
        print(managed.report())
    del ManagedProcess.started[first:]


def delivers_after_reconnecting(listener: ManagedProcess, timeout: float = 15) -> None:
    """Wait until the ``pgnotify_listen -v 2`` process ``listener`` says it reconnected,
    then until an order created now is printed: it delivers again."""
    from tests.testapp.models import Order

    listener.wait_for(r"reconnected to", stream="err", timeout=timeout)
    order = Order.objects.create(status="after the reconnect")
    listener.wait_for(rf"^testapp\.order insert pk={order.pk} ", stream="out")


@pytest.fixture
def listener_process(transactional_db) -> Iterator[Callable[..., ManagedProcess]]:
    """Start ``manage.py pgnotify_listen -v 2`` as a real process, ready to receive."""
    started: list[ManagedProcess] = []

    def start(*args: str, ready: bool = True, **env: str) -> ManagedProcess:
        managed = ManagedProcess(
            [sys.executable, "-m", "django", "pgnotify_listen", "-v", "2", *args],
            django_env(DATABASE_URL=test_database_url(), **env),
        )
        started.append(managed)
        if ready:
            managed.wait_for(r"listening on", stream="err")
        return managed

    yield start
    for managed in started:
        managed.kill()  # what it wrote is in a failing test's report (_processes_reported)


@pytest.fixture
def other_connection(transactional_db) -> Iterator[psycopg.Connection]:
    """A plain psycopg connection, as a client that is not Django would use."""
    with psycopg.connect(test_database_url(), autocommit=True) as conn:
        yield conn


@contextlib.contextmanager
def role_with_connection_limit(
    admin: psycopg.Connection,
) -> Iterator[tuple[str, Callable[[int], None]]]:
    """A login role (not a superuser: a connection limit does not hold for those) that may
    open two connections at a time on ``admin``'s server; yields its name and what sets
    that limit. Its sessions are ended and the role dropped on the way out."""
    role = f"pgnotify_limited_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 2").format(sql.Identifier(role)))

    def limit(connections: int) -> None:
        admin.execute(
            sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(
                sql.Identifier(role), sql.Literal(connections)
            )
        )

    try:
        yield role, limit
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def probes_refused(other_connection: psycopg.Connection) -> Iterator[Callable[[], None]]:
    """Refuse the probe sessions' NOTIFY (application_name ``... probe``) until the
    function yielded is called: the queue has room again for the sessions that start then."""
    dbname = connection.settings_dict["NAME"]
    other_connection.execute("CREATE SCHEMA pgnotify_refusing")
    other_connection.execute("GRANT USAGE ON SCHEMA pgnotify_refusing TO PUBLIC")

    def lift() -> None:
        other_connection.execute(
            sql.SQL("ALTER DATABASE {} RESET search_path").format(sql.Identifier(dbname))
        )

    try:
        other_connection.execute(
            """
            CREATE FUNCTION pgnotify_refusing.pg_notify(channel text, payload text)
            RETURNS void LANGUAGE plpgsql AS $$
            BEGIN
                IF current_setting('application_name') LIKE '% probe' THEN
                    RAISE EXCEPTION 'too many notifications in the NOTIFY queue'
                        USING ERRCODE = 'program_limit_exceeded';
                END IF;
                PERFORM pg_catalog.pg_notify(channel, payload);
            END $$
            """
        )
        other_connection.execute(
            sql.SQL(
                "ALTER DATABASE {} SET search_path = pgnotify_refusing, pg_catalog, public"
            ).format(sql.Identifier(dbname))
        )
        yield lift
    finally:
        lift()
        other_connection.execute("DROP SCHEMA pgnotify_refusing CASCADE")


@pytest.fixture
def empty_database_url(other_connection: psycopg.Connection) -> Iterator[str]:
    """A database on the test server that nobody has migrated; dropped afterwards."""
    name = f"pgnotify_empty_{uuid.uuid4().hex[:8]}"
    other_connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield test_database_url(dbname=name)
    finally:
        other_connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


__all__ = [
    "ROOT",
    "ManagedProcess",
    "changes_before_marker",
    "connection",
    "django_env",
    "run_manage",
    "test_database_url",
    "wait_until",
]


@pytest.fixture(scope="module")
def own_server() -> Iterator[dict]:
    """A PostgreSQL server of its own, migrated (triggers included), that a test may
    stop and start without disturbing the rest of the suite."""
    from django_pgnotify.embedded import EmbeddedPostgres

    postgres = EmbeddedPostgres()
    try:
        env = django_env(DATABASE_URL=postgres.url)
        migrated = run_manage("migrate", "-v", "0", env=env, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        yield {"server": postgres.server, "url": postgres.url, "env": env}
    finally:
        postgres.close()


def install_stray_declaration(
    model_name: str,
    name: str,
    *,
    table: str = "testapp_tag",
    events: tuple[str, ...] = ("insert",),
) -> TriggerSQL:
    """Install on ``table`` (by default the Tag table) the triggers of a declaration the
    project does not have.

    This is what a removed or renamed model, or a declaration since renamed, leaves
    behind: triggers of ours that no current declaration asks for.
    """
    with isolate_apps("tests.testapp"):
        meta = type("Meta", (), {"app_label": "testapp", "db_table": table})
        model = type(
            model_name,
            (models.Model,),
            {
                "__module__": __name__,
                "name": models.CharField(max_length=50, primary_key=True),
                "Meta": meta,
            },
        )
        (found,), _ = resolve_model(model, Notify(name=name, events=list(events)))
    built = build_trigger_sql(found, connection.pg_version)
    with connection.cursor() as cursor:
        cursor.execute(built.install)
    return built


@pytest.fixture
def job_names(transactional_db) -> Iterator[list[str]]:
    """The names of the durable jobs a receiver was called for, in order."""
    from django_pgnotify import row_changed
    from tests.durableapp.models import Job

    names: list[str] = []

    def record(sender, event, **kwargs) -> None:
        names.append(event.fields["name"])

    row_changed.connect(record, sender=Job, weak=False, dispatch_uid="test_durable_job_names")
    yield names
    row_changed.disconnect(sender=Job, dispatch_uid="test_durable_job_names")
