"""Shared fixtures: a real PostgreSQL with triggers installed, listeners, subprocesses."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from psycopg.conninfo import make_conninfo

from django_pgnotify.connection import connection_params
from django_pgnotify.testing import CapturedChanges, capture_row_changes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """The test database, migrated, with every declaration's triggers installed."""
    with django_db_blocker.unblock():
        call_command("pgnotify_install", verbosity=0)
    yield


@pytest.fixture
def changes(transactional_db) -> Iterator[CapturedChanges]:
    """A real listener running in this process for the duration of the test."""
    with capture_row_changes() as captured:
        yield captured


def test_database_url(alias: str = "default") -> str:
    """A libpq conninfo string for the test database, for child processes."""
    params = connection_params(alias)
    params.pop("client_encoding", None)
    return make_conninfo(**{k: v for k, v in params.items() if v not in (None, "")})


def django_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_manage(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run ``python -m django <args>`` against the test database and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=env or django_env(DATABASE_URL=test_database_url()),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ManagedProcess:
    """A child process whose output lines can be awaited with a timeout."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float = 15, stream: str | None = None) -> str:
        """Return the first new line matching ``pattern``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s; saw {self.seen}"
                )
            try:
                name, line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append((name, line))
            if (stream is None or name == stream) and regex.search(line):
                return line

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"process did not stop within {timeout}s after {sig!r}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def listener_process(transactional_db) -> Iterator[callable]:
    """Start ``manage.py pgnotify_listen -v 2`` as a real process, ready to receive."""
    started: list[ManagedProcess] = []

    def start(*args: str, ready: bool = True) -> ManagedProcess:
        managed = ManagedProcess(
            [sys.executable, "-m", "django", "pgnotify_listen", "-v", "2", *args],
            django_env(DATABASE_URL=test_database_url()),
        )
        started.append(managed)
        if ready:
            managed.wait_for(r"listening on", stream="err")
        return managed

    yield start
    for managed in started:
        managed.kill()


@pytest.fixture
def other_connection(transactional_db):
    """A plain psycopg connection, as a client that is not Django would use."""
    import psycopg

    with psycopg.connect(test_database_url(), autocommit=True) as conn:
        yield conn


__all__ = ["ROOT", "ManagedProcess", "connection", "django_env", "run_manage", "test_database_url"]
