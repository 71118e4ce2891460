"""System checks: every declaration mistake, reported at ``manage.py check``.

Ids: E001 ``pgnotify`` is not a ``Notify``; E002 events; E003 ``fields``;
E004 ``when_changed``; E005 channel; E006 proxy model; E007 declaration names;
E008 ``durable`` or ``max_attempts``; E009 database is not PostgreSQL; E010
``PGNOTIFY`` setting; E011 composite primary key; E012 column names too
long for a notification; W002 ``when_changed``
without update; W003 unknown ``PGNOTIFY`` key. (W001, "durable not available
yet", is retired.)
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import connections, router

from .conf import DEFAULTS
from .declarations import Declaration, raw_declarations, resolve_model
from .triggers import rows_room


@checks.register("pgnotify")
def check_declarations(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate every model's declarations and the database they go to."""
    messages = check_settings()
    if not isinstance(getattr(settings, "PGNOTIFY", {}), dict):
        return messages  # declarations cannot be read until the setting is fixed
    if app_configs is None:
        models = apps.get_models()
    else:
        models = [m for config in app_configs for m in config.get_models()]
    for model in models:
        declarations, found = resolve_model(model, raw_declarations(model))
        messages.extend(found)
        if not declarations:
            continue
        messages.extend(_check_rows_room(declarations))
        for alias in connections:
            wrapper = connections[alias]
            if router.allow_migrate_model(alias, model) and wrapper.vendor != "postgresql":
                messages.append(
                    checks.Error(
                        f"{model._meta.label} declares pgnotify but database {alias!r} "
                        f"uses {wrapper.settings_dict['ENGINE']}; NOTIFY needs PostgreSQL.",
                        hint="Use django.db.backends.postgresql, or route the model elsewhere.",
                        obj=model,
                        id="pgnotify.E009",
                    )
                )
    return messages


#: The least room a notification must leave for rows once its header is written.
MIN_ROWS_ROOM = 1000


def _check_rows_room(declarations: list[Declaration]) -> list[checks.CheckMessage]:
    """A notification's header lists the column names; too many leave no room for rows."""
    messages: list[checks.CheckMessage] = []
    for declaration in declarations:
        if declaration.notify.durable:  # the event table has no size limit
            continue
        room = min(rows_room(declaration, event) for event in declaration.events)
        if room < MIN_ROWS_ROOM:
            messages.append(
                checks.Error(
                    f"{declaration.uri}: the names of its fields and when_changed columns "
                    f"leave {room} bytes of a notification for rows; at least "
                    f"{MIN_ROWS_ROOM} are needed.",
                    hint="Declare fewer fields, or use durable=True (no size limit).",
                    obj=declaration.model,
                    id="pgnotify.E012",
                )
            )
    return messages


def check_settings() -> list[checks.CheckMessage]:
    """Validate the shape of ``settings.PGNOTIFY``."""
    config = getattr(settings, "PGNOTIFY", {})
    if not isinstance(config, dict):
        return [checks.Error(f"PGNOTIFY must be a dict, got {config!r}.", id="pgnotify.E010")]
    messages: list[checks.CheckMessage] = [
        checks.Warning(
            f"PGNOTIFY has no setting {key!r}; it is ignored.",
            hint=f"Known settings: {', '.join(DEFAULTS)}.",
            id="pgnotify.W003",
        )
        for key in config
        if key not in DEFAULTS
    ]
    declared = config.get("MODELS", {})
    if not isinstance(declared, dict):
        messages.append(
            checks.Error(
                f'PGNOTIFY["MODELS"] must map "app_label.Model" to Notify(...), got {declared!r}.',
                id="pgnotify.E010",
            )
        )
        return messages
    messages.extend(
        checks.Error(
            f'PGNOTIFY["MODELS"] names {label!r}, which is not an installed model.',
            hint='Use "app_label.ModelName", e.g. "auth.User".',
            id="pgnotify.E010",
        )
        for label in declared
        if not _is_installed_model(label)
    )
    messages.extend(_check_values(config))
    return messages


# Numeric settings: (smallest allowed, whether that value itself is allowed, integer only).
_NUMBERS = {
    "POLL_INTERVAL": (0, False, False),
    "RECONNECT_DELAY_MIN": (0, False, False),
    "RECONNECT_DELAY_MAX": (0, False, False),
    "PROBE_INTERVAL": (0, False, False),
    "PROBE_TIMEOUT": (0, False, False),
    "QUEUE_SIZE": (1, True, True),
    "QUEUE_USAGE_WARNING": (0, True, False),
    "STATS_INTERVAL": (0, True, False),
    "DURABLE_POLL_INTERVAL": (0, False, False),
    "DURABLE_BATCH_SIZE": (1, True, True),
    "DURABLE_LEASE": (0, False, False),
    "DURABLE_MAX_ATTEMPTS": (1, True, True),
    "DURABLE_RETRY_DELAY_MIN": (0, True, False),
    "DURABLE_RETRY_DELAY_MAX": (0, False, False),
}

# Settings that are True or False.
_FLAGS = (
    "META_OPTION",
    "INSTALL_ON_MIGRATE",
    "IGNORE_OWN_CHANGES",
    "CHANNEL_ROW_GROUPS",
    "DURABLE_WAKEUP",
    "DURABLE_KEEP_DONE",
)


def _check_values(config: dict[str, Any]) -> list[checks.CheckMessage]:
    """Validate the numeric, boolean and alias settings (pgnotify.E010), naming the key."""
    messages: list[checks.CheckMessage] = [
        checks.Error(f'PGNOTIFY["{key}"] must be True or False, got {value!r}.', id="pgnotify.E010")
        for key in _FLAGS
        if not isinstance(value := config.get(key, DEFAULTS[key]), bool)
    ]
    for key, (low, inclusive, integer) in _NUMBERS.items():
        value = config.get(key, DEFAULTS[key])
        kinds = (int,) if integer else (int, float)
        number = isinstance(value, kinds) and not isinstance(value, bool)
        if not number or value < low or (value == low and not inclusive):
            what = "an integer" if integer else "a number"
            bound = f"at least {low}" if inclusive else f"greater than {low}"
            messages.append(
                checks.Error(
                    f'PGNOTIFY["{key}"] must be {what} {bound}, got {value!r}.',
                    id="pgnotify.E010",
                )
            )
    usage = config.get("QUEUE_USAGE_WARNING", DEFAULTS["QUEUE_USAGE_WARNING"])
    if isinstance(usage, (int, float)) and usage > 1:
        messages.append(
            checks.Error(
                f'PGNOTIFY["QUEUE_USAGE_WARNING"] is a fraction from 0 to 1, got {usage!r}.',
                id="pgnotify.E010",
            )
        )
    listen = config.get("LISTEN_DATABASES", {})
    if not isinstance(listen, dict) or not all(
        alias in connections and target in connections for alias, target in listen.items()
    ):
        messages.append(
            checks.Error(
                f'PGNOTIFY["LISTEN_DATABASES"] must map database aliases to database aliases '
                f"defined in DATABASES, got {listen!r}.",
                hint='E.g. {"default": "default_direct"}, where "default_direct" connects '
                "to PostgreSQL directly rather than through a transaction pool.",
                id="pgnotify.E010",
            )
        )
    layer = config.get("CHANNEL_LAYER")
    if layer is not None and layer not in getattr(settings, "CHANNEL_LAYERS", {}):
        messages.append(
            checks.Error(
                f'PGNOTIFY["CHANNEL_LAYER"] is {layer!r}, which is not in settings.CHANNEL_LAYERS.',
                hint='Name a configured channel layer (usually "default"), or None to forward '
                "nothing.",
                id="pgnotify.E010",
            )
        )
    return messages


def _is_installed_model(label: Any) -> bool:
    if not isinstance(label, str):
        return False
    try:
        apps.get_model(label)
    except (LookupError, ValueError):
        return False
    return True
