"""System checks: every declaration mistake, reported at ``manage.py check``.

Ids: E001 ``pgnotify`` is not a ``Notify``; E002 events; E003 ``fields``;
E004 ``when_changed``; E005 channel; E006 proxy model; E007 declaration names;
E008 ``durable`` or ``max_attempts``; E009 database is not PostgreSQL; E010
``PGNOTIFY`` setting; E011 composite primary key; E012 column names too
long for a notification; E013 ``level``; E014 two models' declarations on one
table under one name; E015 ``old``; W002 ``when_changed`` or ``old=False``
without update, or ``channel`` on a durable declaration; W003 unknown
``PGNOTIFY`` key; W004 column names leave a long context no room; W005 two
models' declarations on one table under one name, if the search path finds an
unqualified table in "public"; W006 a durable model migrates to a PostgreSQL
database the event table does not; W007 a ``Notify`` on the model's class body,
not in its ``class Meta``; W008 ``fields`` names the primary key; W009
``DURABLE_LEASE`` below twice ``PROBE_TIMEOUT``, with durable declarations; W010
a field named twice in ``fields`` or ``when_changed``. (W001,
"durable not available yet", is retired.) E012 and W004 come from
``resolve_model``, so the commands refuse such a declaration even with the
checks skipped.
"""

from __future__ import annotations

import difflib
import math
import threading
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.db import connections, router

from .conf import DEFAULTS, get_setting
from .declarations import Declaration, raw_declarations, resolve_model, settings_label
from .meta import META_OPTION
from .naming import TableName
from .notify import Notify
from .wire import EVENT_TABLE


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
    # Every model's, as a collision may be with a model outside app_configs.
    declared = {
        model: resolve_model(model, raw_declarations(model))
        for model in dict.fromkeys([*models, *apps.get_models()])
    }
    for model in models:
        declarations, found = declared[model]
        messages.extend(_check_misplaced(model))
        messages.extend(found)
        if not declarations:
            continue
        messages.extend(_check_shared_tables(declarations, declared))
        if any(declaration.notify.durable for declaration in declarations):
            messages.extend(_check_event_table(model))
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
    if any(d.notify.durable for model in models for d in declared[model][0]):
        messages.extend(_check_lease(getattr(settings, "PGNOTIFY", {})))
    return messages


def _check_lease(config: dict[str, Any]) -> list[checks.CheckMessage]:
    """A lease that may run out before it is renewed (pgnotify.W009): a listener renews it
    every third of ``DURABLE_LEASE``, with a query that may take ``PROBE_TIMEOUT``."""
    lease, timeout = (config.get(key, DEFAULTS[key]) for key in ("DURABLE_LEASE", "PROBE_TIMEOUT"))
    if not (_is_number(lease) and _is_number(timeout) and 0 < lease < 2 * timeout):
        return []  # fine, or not a number: pgnotify.E010 says so
    if _past_max("DURABLE_LEASE", lease) or _past_max("PROBE_TIMEOUT", timeout):
        return []  # pgnotify.E010 says so
    return [
        checks.Warning(
            f'PGNOTIFY["DURABLE_LEASE"] ({lease!r}) is less than twice PGNOTIFY["PROBE_TIMEOUT"] '
            f"({timeout!r}): a listener renews a lease every third of it, with a query that "
            "may take PROBE_TIMEOUT, so the lease may run out first, and another listener "
            "deliver the same changes again.",
            hint="Keep DURABLE_LEASE well above PROBE_TIMEOUT (the defaults are 60 and 5).",
            id="pgnotify.W009",
        )
    ]


def _closest_setting(key: Any) -> str:
    """W003's hint: the known setting ``key`` most likely misspells (in any case), then
    every known one."""
    known = f"Known settings: {', '.join(DEFAULTS)}."
    close = difflib.get_close_matches(str(key).upper(), DEFAULTS, n=1)
    return f"Did you mean {close[0]!r}? {known}" if close else known


def _check_misplaced(model: Any) -> list[checks.CheckMessage]:
    """A ``Notify`` written on the model's class body rather than in its ``class Meta``
    is a plain class attribute to Django: the model declares nothing, silently.

    Looks at the model and the classes it takes attributes from that are not
    models with a table of their own (abstract models, mixins), which report
    their own.
    """
    messages: list[checks.CheckMessage] = []
    seen: set[str] = set()
    declared = raw_declarations(model)
    declared = declared if isinstance(declared, (list, tuple)) else [declared]
    for klass in model.__mro__:
        meta = getattr(klass, "_meta", None)
        if klass is not model and meta is not None and not meta.abstract:
            continue  # a concrete ancestor: reported as its own model
        for name, value in vars(klass).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if name in seen or not any(
                isinstance(v, Notify) and not any(v is d for d in declared) for v in values
            ):
                continue  # none, or the very ones Meta (or settings) declare as well
            seen.add(name)
            where = "" if klass is model else f" (from {klass.__name__})"
            if get_setting("META_OPTION"):
                hint = f"Move it into the model's Meta: class Meta: {META_OPTION} = Notify(...)."
            else:
                hint = (
                    f'PGNOTIFY["META_OPTION"] is off: declare it in PGNOTIFY["MODELS"]'
                    f'["{model._meta.label}"] instead.'
                )
            messages.append(
                checks.Warning(
                    f"{model._meta.label} has {name} = Notify(...) as a class attribute{where}, "
                    "where it declares nothing: a declaration goes in the model's class Meta.",
                    hint=hint,
                    obj=model,
                    id="pgnotify.W007",
                )
            )
    return messages


def _check_shared_tables(
    declarations: list[Declaration],
    declared: dict[Any, tuple[list[Declaration], list[checks.CheckMessage]]],
) -> list[checks.CheckMessage]:
    """Two models on one table (an unmanaged twin, say) with a declaration of the same
    name would install the same trigger and function, each replacing the other's.

    A table named without a schema and the same name in "public" are one table
    when the search path finds it there, as it does by default: a warning, as
    only the database can tell (the installer refuses the pair if they are).
    """
    messages: list[checks.CheckMessage] = []
    for declaration in declarations:
        others = [
            (other, same)
            for model, (found, _) in declared.items()
            if model is not declaration.model
            for other in found
            if other.name == declaration.name
            and (same := _same_table(other.table, declaration.table)) is not False
            and _share_a_database(model, declaration.model)
        ]
        for other, same in others:
            table = ".".join(filter(None, declaration.table))
            if same:
                messages.append(
                    checks.Error(
                        f"{declaration.uri} and {other.uri} are declarations of the same name "
                        f"on table {table!r}: they would install the same trigger, each "
                        "replacing the other's.",
                        hint="Declare on one of the models only, or give one a distinct "
                        'Notify(name="...").',
                        obj=declaration.model,
                        id="pgnotify.E014",
                    )
                )
                continue
            other_table = ".".join(filter(None, other.table))
            messages.append(
                checks.Warning(
                    f"{declaration.uri} on table {table!r} and {other.uri} on table "
                    f"{other_table!r} are declarations of the same name: if the search path "
                    'finds the unqualified table in schema "public", as it does by default, '
                    "they are one table and would install the same triggers; pgnotify_install "
                    "and migrate then refuse both.",
                    hint="Write db_table the same way on both models, declare on one of them "
                    'only, or give one a distinct Notify(name="...").',
                    obj=declaration.model,
                    id="pgnotify.W005",
                )
            )
    return messages


def _same_table(first: TableName, second: TableName) -> bool | None:
    """Whether two tables are one; ``None`` for an unqualified name and the same
    name in "public", where the default search path (``"$user", public``) finds
    it unless the user's own schema has a table of that name."""
    if first == second:
        return True
    if first.name == second.name and {first.schema, second.schema} == {None, "public"}:
        return None
    return False


def _check_event_table(model: Any) -> list[checks.CheckMessage]:
    """A durable declaration's trigger writes to the event table in the model's own
    database: django_pgnotify's migrations must create it in each one the model goes to.

    A warning: the installer refuses the model's triggers where the table is not
    (installed, they would fail every write to its table), and two aliases may
    name one database (a pooled and a direct connection), only one of them
    migrating django_pgnotify. A database that is not PostgreSQL is E009's.
    """
    event_model = apps.get_model("django_pgnotify", "DurableEvent")
    return [
        checks.Warning(
            f"{model._meta.label} declares durable=True and migrates to database {alias!r}, "
            "but the database router does not migrate django_pgnotify there, whose migrations "
            f"create the event table {EVENT_TABLE!r} its triggers write to. This is fine if "
            f"{alias!r} shares its database with an alias where django_pgnotify is migrated "
            "(a pooled and a direct connection, say).",
            hint=f"Make the router's allow_migrate() allow app 'django_pgnotify' on {alias!r} "
            f"and run manage.py migrate django_pgnotify --database {alias}; or route "
            f"{model._meta.label} elsewhere; or, if {alias!r} shares its database with such "
            "an alias, add 'pgnotify.W006' to SILENCED_SYSTEM_CHECKS.",
            obj=model,
            id="pgnotify.W006",
        )
        for alias in connections
        if connections[alias].vendor == "postgresql"
        and router.allow_migrate_model(alias, model)
        and not router.allow_migrate_model(alias, event_model)
    ]


def _share_a_database(first: Any, second: Any) -> bool:
    return any(
        router.allow_migrate_model(alias, first) and router.allow_migrate_model(alias, second)
        for alias in connections
    )


def check_settings() -> list[checks.CheckMessage]:
    """Validate the shape of ``settings.PGNOTIFY``."""
    config = getattr(settings, "PGNOTIFY", {})
    if not isinstance(config, dict):
        return [checks.Error(f"PGNOTIFY must be a dict, got {config!r}.", id="pgnotify.E010")]
    messages: list[checks.CheckMessage] = [
        checks.Warning(
            f"PGNOTIFY has no setting {key!r}; it is ignored.",
            hint=_closest_setting(key),
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
    else:
        messages.extend(_check_model_labels(declared))
    messages.extend(_check_values(config))
    return messages


def _check_model_labels(declared: dict[Any, Any]) -> list[checks.CheckMessage]:
    """Each ``PGNOTIFY["MODELS"]`` key must name, once, a model whose declarations are
    read: an installed model with a table of its own (pgnotify.E010)."""
    messages: list[checks.CheckMessage] = []
    models = {
        model._meta.label_lower: model
        for model in apps.get_models(include_auto_created=True, include_swapped=True)
    }
    seen: dict[str, Any] = {}
    for label in declared:
        model = models.get(settings_label(label))  # type: ignore[arg-type]
        names = f'PGNOTIFY["MODELS"] names {label!r},'
        if model is None:
            message = f"{names} which is not an installed model."
            hint = 'Use "app_label.ModelName", e.g. "auth.User".'
        elif model._meta.swapped:
            message = (
                f"{names} which is swapped out for {model._meta.swapped!r} "
                f"(settings.{model._meta.swappable}): it has no table, and its declaration "
                "would never be installed."
            )
            hint = f"Declare the model that replaces it, {model._meta.swapped!r}."
        elif model._meta.auto_created:
            message = (
                f"{names} the table Django creates for a many-to-many field, whose "
                "declarations are not read."
            )
            hint = "Give the ManyToManyField a through model of your own and declare that model."
        elif model._meta.label_lower in seen:
            message = (
                f'PGNOTIFY["MODELS"] names {model._meta.label} twice, as '
                f"{seen[model._meta.label_lower]!r} and {label!r}: keys are "
                "case-insensitive, and only the first one is used."
            )
            hint = "Keep one key per model; give it a list of Notify(...) for several declarations."
        else:
            seen[model._meta.label_lower] = label
            continue
        messages.append(checks.Error(message, hint=hint, id="pgnotify.E010"))
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

# The most seconds ``DURABLE_LEASE`` and ``DURABLE_RETRY_DELAY_MAX`` may be: SQL adds
# them to now(). From the year 10000 (no datetime reaches it) to PostgreSQL's last
# timestamp, 294276-12-31 23:59:59.999999 UTC; about 284,277 years. Beyond it, now() plus
# the interval is "timestamp out of range"; and beyond 2**63 microseconds make_interval()
# itself fails ("interval out of range" on PostgreSQL 18) or wraps around to a negative
# interval (PostgreSQL 15).
_SQL_SECONDS_MAX = 8_970_915_715_199
# Why, for the hint of a value above it.
_IN_SQL = (
    "PostgreSQL adds it to the current time, and its timestamps end in the year 294276: a "
    'larger value fails {} with "timestamp out of range" or "interval out of range".'
)
# A delay before reconnecting is waited out by a thread, which cannot wait longer.
_THREAD_WAIT = (
    int(threading.TIMEOUT_MAX),
    "The listener waits it out in a thread, which cannot wait longer "
    "(threading.TIMEOUT_MAX): a larger delay fails its reconnect.",
)

# Seconds settings that pass the checks above but not where they are used, at any size:
# their largest value and why, said in the message's hint.
_SECONDS_MAX = {
    "DURABLE_LEASE": (_SQL_SECONDS_MAX, _IN_SQL.format("every claim of durable events")),
    # Retry delays never exceed it, whatever DURABLE_RETRY_DELAY_MIN is.
    "DURABLE_RETRY_DELAY_MAX": (
        _SQL_SECONDS_MAX,
        _IN_SQL.format("every retry of a durable event once its delay reaches the maximum"),
    ),
    # pgnotify_status bounds its queries by statement_timeout, in milliseconds.
    "PROBE_TIMEOUT": (
        2_147_483,
        "pgnotify_status gives it to PostgreSQL as statement_timeout, which holds at most "
        "2147483647 milliseconds, and to libpq as connect_timeout, an int: a larger value "
        "fails them.",
    ),
    "RECONNECT_DELAY_MIN": _THREAD_WAIT,
    "RECONNECT_DELAY_MAX": _THREAD_WAIT,
}

# Delays that double from the first setting of a pair up to the second.
_DELAY_RANGES = (
    ("RECONNECT_DELAY_MIN", "RECONNECT_DELAY_MAX"),
    ("DURABLE_RETRY_DELAY_MIN", "DURABLE_RETRY_DELAY_MAX"),
)

# Settings that are True or False.
_FLAGS = (
    "META_OPTION",
    "INSTALL_ON_MIGRATE",
    "IGNORE_OWN_CHANGES",
    "CHANNEL_ROW_GROUPS",
    "DURABLE_WAKEUP",
    "DURABLE_KEEP_DONE",
)


# PostgreSQL keeps 63 bytes of application_name; the durable connection appends " durable".
_APPLICATION_NAME_MAX = 63 - len(" durable")


def _check_values(config: dict[str, Any]) -> list[checks.CheckMessage]:
    """Validate the numeric, boolean and alias settings (pgnotify.E010), naming the key."""
    messages: list[checks.CheckMessage] = [
        checks.Error(f'PGNOTIFY["{key}"] must be True or False, got {value!r}.', id="pgnotify.E010")
        for key in _FLAGS
        if not isinstance(value := config.get(key, DEFAULTS[key]), bool)
    ]
    for key, (low, inclusive, integer) in _NUMBERS.items():
        value = config.get(key, DEFAULTS[key])
        if not _is_number(value, integer) or value < low or (value == low and not inclusive):
            what = "an integer" if integer else "a finite number"
            bound = f"at least {low}" if inclusive else f"greater than {low}"
            messages.append(
                checks.Error(
                    f'PGNOTIFY["{key}"] must be {what} {bound}, got {value!r}.',
                    id="pgnotify.E010",
                )
            )
    messages.extend(_check_delay_ranges(config))
    messages.extend(_check_seconds_max(config))
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
    name = config.get("APPLICATION_NAME", DEFAULTS["APPLICATION_NAME"])
    if not (
        isinstance(name, str)
        and name.isascii()
        and name.isprintable()
        and 0 < len(name) <= _APPLICATION_NAME_MAX
    ):
        messages.append(
            checks.Error(
                f'PGNOTIFY["APPLICATION_NAME"] must be printable ASCII of 1 to '
                f"{_APPLICATION_NAME_MAX} characters, got {name!r}.",
                hint="PostgreSQL cuts application_name to 63 bytes and replaces other "
                "characters, and the durable connection adds ' durable': pgnotify_status "
                "would not find the listener under the name it looks for.",
                id="pgnotify.E010",
            )
        )
    layer = config.get("CHANNEL_LAYER")
    if layer is not None and (
        not isinstance(layer, str) or layer not in getattr(settings, "CHANNEL_LAYERS", {})
    ):
        messages.append(
            checks.Error(
                f'PGNOTIFY["CHANNEL_LAYER"] is {layer!r}, which is not in settings.CHANNEL_LAYERS.',
                hint='Name a configured channel layer (usually "default"), or None to forward '
                "nothing.",
                id="pgnotify.E010",
            )
        )
    return messages


def _is_number(value: Any, integer: bool = False) -> bool:
    """A finite int (or float, unless ``integer``): not a bool, and not NaN, which
    compares false with every bound and would pass the range checks."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def _check_delay_ranges(config: dict[str, Any]) -> list[checks.CheckMessage]:
    """A pair of delay settings whose minimum is above its maximum (pgnotify.E010).

    Nothing would fail, the delays would silently differ from either setting: the
    reconnect delays would stay at the minimum, the retry delays at the maximum.
    Values that are not numbers are reported by ``_check_values`` alone.
    """
    messages: list[checks.CheckMessage] = []
    for low_key, high_key in _DELAY_RANGES:
        low, high = (config.get(key, DEFAULTS[key]) for key in (low_key, high_key))
        if _is_number(low) and _is_number(high) and low > high:
            shown = [
                f'PGNOTIFY["{key}"] ({value!r}{"" if key in config else ", the default"})'
                for key, value in ((low_key, low), (high_key, high))
            ]
            messages.append(
                checks.Error(
                    f"{shown[0]} is greater than {shown[1]}.",
                    hint=f"Delays double from {low_key} up to {high_key}: make {low_key} at "
                    f"most {high_key}.",
                    id="pgnotify.E010",
                )
            )
    return messages


def _check_seconds_max(config: dict[str, Any]) -> list[checks.CheckMessage]:
    """A number of seconds larger than where it is used can take (pgnotify.E010,
    ``_SECONDS_MAX``): it would pass here and fail at run time.

    Values that are not numbers are reported by ``_check_values`` alone.
    """
    return [
        checks.Error(
            f'PGNOTIFY["{key}"] must be at most {bound} seconds{_as_years(bound)}, got {value!r}.',
            hint=why,
            id="pgnotify.E010",
        )
        for key, (bound, why) in _SECONDS_MAX.items()
        if _past_max(key, value := config.get(key, DEFAULTS[key]))
    ]


def _past_max(key: str, value: Any) -> bool:
    """Whether ``value`` of ``key`` is a number past its bound in ``_SECONDS_MAX``."""
    return key in _SECONDS_MAX and _is_number(value) and value > _SECONDS_MAX[key][0]


def _as_years(seconds: int) -> str:
    """`` (about N years)`` for a bound of more than a year, else nothing."""
    years = seconds / (365.25 * 86400)
    return f" (about {round(years, -3 if years > 10_000 else 0):,.0f} years)" if years > 1 else ""
