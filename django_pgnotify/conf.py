"""The ``PGNOTIFY`` settings dict, with its documented defaults."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

#: Every key ``settings.PGNOTIFY`` understands, with its default.
DEFAULTS: dict[str, Any] = {
    # Declarations for models whose Meta you cannot edit:
    # {"auth.User": Notify(fields=["username"])}. They replace a Meta declaration.
    "MODELS": {},
    # Accept ``pgnotify`` in models' ``class Meta`` (the one change made to Django).
    "META_OPTION": True,
    # Install or update the triggers of each migrated app at the end of migrate.
    "INSTALL_ON_MIGRATE": True,
    # How long the listener waits on its socket before it looks at its stop flag.
    "POLL_INTERVAL": 0.5,
    # application_name of the listener's connection, visible in pg_stat_activity.
    "APPLICATION_NAME": "pgnotify_listen",
}


def get_setting(name: str) -> Any:
    """Return ``settings.PGNOTIFY[name]``, or its default."""
    if name not in DEFAULTS:
        raise KeyError(f"PGNOTIFY has no setting {name!r}")
    config = getattr(settings, "PGNOTIFY", {})
    if not isinstance(config, dict):
        raise ImproperlyConfigured(f"PGNOTIFY must be a dict, got {config!r} (pgnotify.E010).")
    return config.get(name, DEFAULTS[name])
