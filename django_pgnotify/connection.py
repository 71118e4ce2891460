"""The listener's own connection, built from a Django database alias.

LISTEN is session state: it needs one dedicated, long-lived connection in
autocommit mode (a listener only receives between its transactions), never
Django's ORM connection or a pooled one.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connections

# Keys Django adds for its own cursors, not libpq connection parameters.
_DJANGO_ONLY = ("cursor_factory", "context", "prepare_threshold")


class NotPostgreSQL(Exception):
    """The alias points at a database django-pgnotify cannot work with."""


def connection_params(using: str) -> dict[str, Any]:
    """libpq connection parameters of the Django database ``using``."""
    wrapper = connections[using]
    if wrapper.vendor != "postgresql":
        raise NotPostgreSQL(
            f"database {using!r} uses {wrapper.settings_dict['ENGINE']}; "
            "django-pgnotify needs PostgreSQL (django.db.backends.postgresql)."
        )
    params = wrapper.get_connection_params()
    for key in _DJANGO_ONLY:
        params.pop(key, None)
    return params


def describe(params: dict[str, Any]) -> str:
    """Where a connection goes, for messages (never the password)."""
    host = params.get("host") or "local socket"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{params.get('user') or 'default user'}@{host}{port}/{params.get('dbname', '')}"


def connect(using: str, application_name: str) -> psycopg.Connection:
    """Open a dedicated autocommit connection for LISTEN."""
    # The listener's own name wins over one set in OPTIONS, so it can be told apart.
    params = {**connection_params(using), "application_name": application_name}
    return psycopg.connect(**params, autocommit=True)
