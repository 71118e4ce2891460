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
    # {served alias: alias to LISTEN through}, e.g. a direct connection past PgBouncer.
    "LISTEN_DATABASES": {},
    # Reconnect delays in seconds: doubling from MIN up to MAX, with jitter.
    "RECONNECT_DELAY_MIN": 0.5,
    "RECONNECT_DELAY_MAX": 30.0,
    # Seconds between self-probes (a NOTIFY round trip that doubles as keepalive).
    "PROBE_INTERVAL": 15.0,
    # Seconds a probe (or any listener query) may take before the connection is dead.
    "PROBE_TIMEOUT": 5.0,
    # Notifications read but not yet dispatched, at most (backpressure beyond).
    "QUEUE_SIZE": 1_000,
    # Warn when pg_notification_queue_usage() exceeds this fraction.
    "QUEUE_USAGE_WARNING": 0.1,
    # Seconds between the listener's one-line statistics log records (0: never).
    "STATS_INTERVAL": 60.0,
    # Skip changes made by this process's own Django connections.
    "IGNORE_OWN_CHANGES": False,
    # The CHANNEL_LAYERS alias the listener forwards changes to (None: no forwarding).
    "CHANNEL_LAYER": None,
    # Also send each change to its row's Channels group (for per-row subscriptions).
    "CHANNEL_ROW_GROUPS": False,
    # Durable delivery (Notify(durable=True)), see docs/durable.md.
    # Send one wake-up NOTIFY per writing transaction; False: poll-only (no NOTIFY).
    "DURABLE_WAKEUP": True,
    # Seconds between looks for durable events when no wake-up arrives.
    "DURABLE_POLL_INTERVAL": 5.0,
    # Changes claimed per batch (whole event rows, at least one), and seconds a claim
    # (lease) lasts before others may take it.
    "DURABLE_BATCH_SIZE": 500,
    "DURABLE_LEASE": 60.0,
    # Attempts before an event becomes a dead letter (Notify(max_attempts=...) overrides).
    "DURABLE_MAX_ATTEMPTS": 5,
    # Retry delays in seconds: doubling from MIN up to MAX.
    "DURABLE_RETRY_DELAY_MIN": 1.0,
    "DURABLE_RETRY_DELAY_MAX": 300.0,
    # Keep handled events (status "done") for pgnotify_prune instead of deleting them.
    "DURABLE_KEEP_DONE": False,
}


def get_setting(name: str) -> Any:
    """Return ``settings.PGNOTIFY[name]``, or its default."""
    if name not in DEFAULTS:
        raise KeyError(f"PGNOTIFY has no setting {name!r}")
    config = getattr(settings, "PGNOTIFY", {})
    if not isinstance(config, dict):
        raise ImproperlyConfigured(f"PGNOTIFY must be a dict, got {config!r} (pgnotify.E010).")
    return config.get(name, DEFAULTS[name])
