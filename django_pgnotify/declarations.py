"""Declarations: what each model announces, resolved against its fields.

``Notify`` objects hold what the user wrote. This module turns them, for one
model, into ``Declaration`` objects that name real columns, and reports every
mistake as a Django check message naming the model and option at fault. The
system checks and everything that needs declarations share this one path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.core import checks
from django.core.exceptions import FieldDoesNotExist, FieldError, ImproperlyConfigured
from django.db import connections, models

from . import naming, wire
from .conf import get_setting
from .meta import META_OPTION
from .notify import ALL_FIELDS, EVENTS, LEVELS, ROW, Notify

_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Column:
    """A model field as it is stored: field name, column, the Django internal
    type of its values (for a foreign key, that of the field it points to),
    whether PostgreSQL compares its values with ``=`` and finds only the same
    value equal (``json``, ``xml`` and ``point`` columns, for instance, have no
    ``=``; ``citext`` and nondeterministic collations find ``'a'`` and ``'A'``
    equal), for an array (``ArrayField``, nested or not) the internal type of its
    innermost elements, and whether the trigger sends its elements' texts (see
    ``json_texts_type``)."""

    field: str
    column: str
    internal_type: str
    comparable: bool = True
    element_type: str | None = None
    element_texts: bool = False


@dataclass(frozen=True)
class Declaration:
    """One validated ``Notify`` of one model, in terms of table and columns."""

    model: type[models.Model]
    notify: Notify
    name: str
    label: str
    table: naming.TableName
    channel: str
    events: tuple[str, ...]
    pk: Column
    fields: tuple[Column, ...]
    when_changed: tuple[Column, ...]

    @property
    def uri(self) -> str:
        """``app_label.Model:name``, as used in commands and messages."""
        return naming.uri(self.model._meta.label, self.name)

    @property
    def function(self) -> str:
        """Name of the trigger function (in the table's schema)."""
        return naming.function_name(self.table, self.name)

    @property
    def triggers(self) -> dict[str, str]:
        """Trigger name for each announced event."""
        return {event: naming.trigger_name(self.name, event) for event in self.events}

    @property
    def row_level(self) -> bool:
        """Whether the triggers fire once per row (``Notify(level="row")``)."""
        return self.notify.level == ROW

    @property
    def sends_old(self) -> bool:
        """Whether updates carry old values and changed fields (``Notify(old=...)``)."""
        return self.notify.old is not False

    def pairs_rows(self, event: str) -> bool:
        """Whether ``event``'s rows are rendered from old and new rows together:
        updates, unless the declaration sends new values alone. Else they are laid
        out as an insert's (or, for a delete, its old row's) are."""
        return event == "update" and self.sends_old

    @property
    def watched(self) -> tuple[Column, ...]:
        """Columns compared on update to report ``changed``: fields and when_changed."""
        seen = dict.fromkeys(self.fields + self.when_changed)
        return tuple(seen)


def raw_declarations(model: type[models.Model]) -> Any:
    """What the project declared for ``model``: settings first, then ``Meta``."""
    configured = get_setting("MODELS")
    if isinstance(configured, dict):
        for label, value in configured.items():
            if settings_label(label) == model._meta.label_lower:
                return value
    return getattr(model._meta, META_OPTION, None)


def settings_label(label: Any) -> str | None:
    """A ``PGNOTIFY["MODELS"]`` key as the ``label_lower`` of the model it names
    (keys are case-insensitive); ``None`` if it is not a string."""
    return label.lower() if isinstance(label, str) else None


def resolve_model(
    model: type[models.Model], raw: Any
) -> tuple[list[Declaration], list[checks.CheckMessage]]:
    """Validate what ``model`` declares and build its declarations.

    Returns the declarations that are valid and a check message for each
    mistake, so that the checks can report all of them at once.
    """
    if raw is None:
        return [], []
    opts = model._meta
    label = opts.label
    notifies = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    errors: list[checks.CheckMessage] = []

    bad = [n for n in notifies if not isinstance(n, Notify)]
    if bad or not notifies:
        return [], [
            checks.Error(
                f"{label}: pgnotify must be a Notify(...) or a list of them, got {raw!r}.",
                # An empty list most likely means to declare nothing (a child of a model
                # whose Meta declares): None does that.
                hint="pgnotify = None declares nothing (also where Meta inherits a declaration)."
                if not notifies
                else "from django_pgnotify import Notify; pgnotify = Notify(fields=[...])",
                obj=model,
                id="pgnotify.E001",
            )
        ]
    if opts.proxy:
        concrete = opts.concrete_model
        if raw == raw_declarations(concrete) or (  # type: ignore[arg-type]
            # Inherited through Meta from the concrete model's, which settings replace.
            raw is getattr(opts, META_OPTION, None)
            and raw == getattr(concrete._meta, META_OPTION, None)  # type: ignore[union-attr]
        ):
            return [], []  # the concrete model announces it
        return [], [
            checks.Error(
                f"{label} is a proxy model; it shares the table of "
                f"{opts.concrete_model._meta.label} and cannot declare pgnotify.",  # type: ignore[union-attr]
                hint=f"Declare it on {opts.concrete_model._meta.label}; its events are "  # type: ignore[union-attr]
                "sent with that model as the sender.",
                obj=model,
                id="pgnotify.E006",
            )
        ]

    if opts.pk.column is None:
        # The wire format and the triggers send one pk column per row.
        columns = ", ".join(getattr(opts.pk, "field_names", ()))
        return [], [
            checks.Error(
                f"{label} has a composite primary key ({columns}); pgnotify can only "
                "announce rows of a model whose primary key is a single column.",
                hint="Remove pgnotify from this model.",
                obj=model,
                id="pgnotify.E011",
            )
        ]

    try:
        pk = _column(opts.pk)
    except _UNREADABLE as exc:
        return [], [
            checks.Error(
                f"{label}: its primary key {opts.pk.name!r} is a relation whose column type "
                f"cannot be read: {exc}",
                hint="Point the relation at an installed model (see Django's own checks).",
                obj=model,
                id="pgnotify.E003",
            )
        ]

    names = _declaration_names(notifies)
    for index, name in enumerate(names):
        if names.count(name) > 1 or not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            problem = "another declaration's too" if names.count(name) > 1 else "not valid"
            errors.append(
                checks.Error(
                    f"{label}: declaration #{index + 1} has name {name!r} ({problem}); each "
                    "Notify of a model needs a distinct name of letters, digits and "
                    "underscores.",
                    hint='Notify(..., name="status")',
                    obj=model,
                    id="pgnotify.E007",
                )
            )

    declarations = []
    for notify, name in zip(notifies, names, strict=True):
        found, messages = _resolve_one(model, notify, name, pk)
        errors.extend(messages)
        if found is not None:
            declarations.append(found)
    if any(e.is_serious() for e in errors):
        return [], errors
    return declarations, errors


def _declaration_names(notifies: list[Notify]) -> list[Any]:
    if len(notifies) == 1 and notifies[0].name is None:
        return [naming.DEFAULT_NAME]
    return [n.name if n.name is not None else f"notify{i + 1}" for i, n in enumerate(notifies)]


def _resolve_one(
    model: type[models.Model], notify: Notify, name: str, pk: Column
) -> tuple[Declaration | None, list[checks.CheckMessage]]:
    opts = model._meta
    where = f"{naming.uri(opts.label, str(name))}"
    errors: list[checks.CheckMessage] = []

    def error(msg: str, id: str, hint: str | None = None) -> None:
        errors.append(checks.Error(f"{where}: {msg}", hint=hint, obj=model, id=id))

    def warning(msg: str, id: str, hint: str | None = None) -> None:
        errors.append(checks.Warning(f"{where}: {msg}", hint=hint, obj=model, id=id))

    events = notify.events
    if isinstance(events, str) or not isinstance(events, tuple) or not events:
        error(
            f"events must be a non-empty list of {', '.join(EVENTS)}; got {events!r}.",
            "pgnotify.E002",
        )
        events = ()
    else:
        unknown = [e for e in events if e not in EVENTS]
        if unknown:
            error(
                f"unknown event(s) {', '.join(map(repr, unknown))}.",
                "pgnotify.E002",
                hint=f"Use any of {', '.join(EVENTS)}.",
            )
        events = tuple(e for e in EVENTS if e in events)

    if notify.fields == ALL_FIELDS:
        fields = _columns(
            model,
            tuple(
                f.name
                for f in opts.local_concrete_fields
                if not f.primary_key and f.column and not _virtual(f)
            ),
            "fields",
            "pgnotify.E003",
            error,
            warning,
        )
    else:
        fields = _columns(model, notify.fields, "fields", "pgnotify.E003", error, warning)
        if any(column.field == pk.field for column in fields):
            # A warning: it works, and receivers may read it from event.fields.
            errors.append(
                checks.Warning(
                    f"{where}: fields names the primary key, {pk.field!r}, which every "
                    "change carries anyway (event.pk): it is sent twice.",
                    hint=f"Leave {pk.field!r} out of fields and read event.pk.",
                    obj=model,
                    id="pgnotify.W008",
                )
            )
    when_changed = _columns(
        model, notify.when_changed, "when_changed", "pgnotify.E004", error, warning
    )
    if when_changed and "update" not in events:
        errors.append(
            checks.Warning(
                f"{where}: when_changed has no effect because 'update' is not in events.",
                obj=model,
                id="pgnotify.W002",
            )
        )

    if not isinstance(notify.old, bool):
        error(f"old must be True or False, got {notify.old!r}.", "pgnotify.E015")
    elif not notify.old and when_changed:
        error(
            "when_changed compares an update's old and new values, which old=False leaves unread.",
            "pgnotify.E015",
            hint="Drop when_changed, or old=False.",
        )
    elif not notify.old and "update" not in events:
        errors.append(
            checks.Warning(
                f"{where}: old=False has no effect because 'update' is not in events.",
                obj=model,
                id="pgnotify.W002",
            )
        )

    channel = notify.channel
    if channel is None:
        channel = naming.default_channel(opts.app_label, opts.model_name)  # type: ignore[arg-type]
    elif not isinstance(channel, str) or not channel or "\0" in channel:
        error(f"channel must be a non-empty string, got {channel!r}.", "pgnotify.E005")
    elif not _encodes(channel):
        error(f"channel {channel!r} is not valid Unicode text.", "pgnotify.E005")
    elif len(channel.encode()) > naming.MAX_IDENTIFIER_BYTES:
        error(
            f"channel {channel!r} is {len(channel.encode())} bytes; PostgreSQL "
            f"channel names are identifiers of at most {naming.MAX_IDENTIFIER_BYTES} bytes.",
            "pgnotify.E005",
        )
    elif channel == wire.DURABLE_CHANNEL:
        # The listener takes every notification on it for a durable wake-up.
        error(
            f"channel {channel!r} is the channel of durable declarations' wake-ups; "
            "a listener would take the changes sent on it for wake-ups and drop them.",
            "pgnotify.E005",
            hint="Choose another channel name, or leave the default.",
        )

    if not isinstance(notify.durable, bool):
        error(f"durable must be True or False, got {notify.durable!r}.", "pgnotify.E008")
    elif notify.durable and notify.channel is not None:
        errors.append(
            checks.Warning(
                f"{where}: channel has no effect because the declaration is durable: its "
                "changes are stored in the event table, not sent on a channel.",
                hint="Drop channel, or durable=True.",
                obj=model,
                id="pgnotify.W002",
            )
        )
    max_attempts = notify.max_attempts
    if max_attempts is not None and (type(max_attempts) is not int or max_attempts < 1):
        error(
            f"max_attempts must be a positive integer, got {max_attempts!r}.",
            "pgnotify.E008",
            hint="E.g. max_attempts=5: dispatches of an event before it becomes a dead "
            'letter. Without it, PGNOTIFY["DURABLE_MAX_ATTEMPTS"] applies.',
        )
    if max_attempts is not None and notify.durable is False:
        # Likely a forgotten durable=True: the user expects retries that never come.
        error(
            "max_attempts applies to durable declarations only: a live one (durable=False, "
            "the default) sends each change once, with no attempts to count.",
            "pgnotify.E008",
            hint="Add durable=True to store changes and retry them, or drop max_attempts.",
        )

    if notify.level not in LEVELS:
        error(
            f"level must be one of {', '.join(map(repr, LEVELS))}, got {notify.level!r}.",
            "pgnotify.E013",
        )
    elif notify.level == ROW and notify.durable is True:
        error(
            "level='row' is for live declarations; a durable one stores a statement's "
            "changes in one query, which a row-level trigger cannot do.",
            "pgnotify.E013",
            hint="Leave level at its default, 'statement', or drop durable=True.",
        )

    if any(e.is_serious() for e in errors):
        return None, errors
    declaration = Declaration(
        model=model,
        notify=notify,
        name=name,
        label=opts.label_lower,
        table=naming.parse_db_table(opts.db_table),
        channel=channel,
        events=events,
        pk=pk,
        fields=fields,
        when_changed=when_changed,
    )
    errors.extend(_check_room(declaration, where))
    if any(e.is_serious() for e in errors):
        return None, errors
    return declaration, errors


def _check_room(declaration: Declaration, where: str) -> list[checks.CheckMessage]:
    """A notification's header lists the column names; too many leave no room for rows.

    Checked here rather than in the system checks alone, so that a declaration
    that would fail its table's writes is refused even with the checks skipped.
    """
    from . import triggers  # it renders declarations: imported when one is built

    if declaration.notify.durable:  # the event table has no size limit
        return []
    room = triggers.least_rows_room(declaration)
    hint = "Declare fewer fields, or use durable=True (no size limit)."
    if room < triggers.MIN_ROWS_ROOM:
        return [
            checks.Error(
                f"{where}: the names of its fields and when_changed columns leave {room} "
                f"bytes of a notification for rows; at least {triggers.MIN_ROWS_ROOM} are "
                "needed.",
                hint=hint,
                obj=declaration.model,
                id="pgnotify.E012",
            )
        ]
    limit = triggers.context_limit(declaration)
    if limit < triggers.CONTEXT_MAX:
        return [
            checks.Warning(
                f"{where}: the names of its fields and when_changed columns leave {room} "
                f"bytes of a notification for rows; a context() longer than {limit} bytes "
                "as JSON text is left out of its notifications.",
                hint=hint,
                obj=declaration.model,
                id="pgnotify.W004",
            )
        ]
    return []


def _columns(model, names, option, id, error, warning) -> tuple[Column, ...]:
    """The columns ``names`` name, each once: a field named twice (as ``"owner"`` and
    ``"owner_id"``, say) is a warning (pgnotify.W010), since it works as declared."""
    if isinstance(names, str) or not isinstance(names, tuple):
        lower_case = option == "fields" and isinstance(names, str) and names.lower() == "__all__"
        hint = ' ("__all__" is written in lower case)' if lower_case else ""
        error(f"{option} must be a list of field names, got {names!r}{hint}.", id)
        return ()
    columns = []
    named: dict[str, str] = {}  # field name: the name it was first given by
    for name in names:
        if name == "pk":  # Django's alias, which names no column (as in Meta.indexes)
            pk = model._meta.pk.name
            error(
                f"{option} names 'pk', which is not a field of {model._meta.label}; its "
                f"primary key is {pk!r}.",
                id,
                hint="The primary key is always sent, as event.pk: leave 'pk' out of fields."
                if option == "fields"
                else f"Name the primary key by its field name, {pk!r}.",
            )
            continue
        try:
            field = model._meta.get_field(name) if isinstance(name, str) else None
        except FieldDoesNotExist:
            field = None
        if field is None:
            error(
                f"{option} names {name!r}, which is not a field of {model._meta.label}.",
                id,
                hint=f"Fields: {', '.join(f.name for f in model._meta.concrete_fields)}.",
            )
        elif field not in model._meta.concrete_fields:
            error(f"{option} names {name!r}, which has no column of its own.", id)
        elif field.model is not model and field not in model._meta.local_concrete_fields:
            error(
                f"{option} names {name!r}, which {model._meta.label} inherits from "
                f"{field.model._meta.label}; it lives in that model's table.",
                id,
                hint=f"Declare it on {field.model._meta.label}."
                + (
                    f" {model._meta.label} takes this declaration from an abstract "
                    "ancestor's Meta, as Django gives a model without a Meta of its own; "
                    "give it a Meta of its own to declare nothing."
                    if _declared_by_an_abstract_ancestor(model)
                    else ""
                ),
            )
        elif _virtual(field):
            error(
                f"{option} names {name!r}, a virtual generated column "
                "(GeneratedField with db_persist=False).",
                id,
                hint="Virtual generated columns cannot be read by triggers; use "
                "db_persist=True or leave it out.",
            )
        elif field.name in named:
            first = named[field.name]
            warning(
                f"{option} names {name!r} twice."
                if name == first
                else f"{option} names {first!r} and {name!r}, one field.",
                "pgnotify.W010",
                hint=f"Name it once, as {field.name!r}; did you mean another field?",
            )
        else:
            named[field.name] = name
            try:
                columns.append(_column(field))
            except _UNREADABLE as exc:
                error(
                    f"{option} names {name!r}, a relation whose column type cannot be read: {exc}",
                    id,
                    hint="Point the relation at an installed model (see Django's own checks).",
                )
    return tuple(columns)


# What reading a relation's target raises while it points at a model that is not
# installed (a pending lazy reference), or at several columns.
_UNREADABLE = (ValueError, LookupError, FieldError)


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogates), as PostgreSQL needs."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _virtual(field: models.Field) -> bool:
    """Whether the field is a virtual generated column (``GeneratedField`` with
    ``db_persist=False``): PostgreSQL computes it when a query reads it, so a
    trigger's rows have no value for it (transition tables refuse it)."""
    return bool(getattr(field, "generated", False)) and getattr(field, "db_persist", None) is False


def _declared_by_an_abstract_ancestor(model: type[models.Model]) -> bool:
    declared = getattr(model._meta, META_OPTION, None)
    return declared is not None and any(
        getattr(base.__dict__.get("Meta"), META_OPTION, None) is declared
        for base in model.__mro__[1:]
    )


def _column(field: models.Field) -> Column:
    # A foreign key column holds the value of the field it points to, and the
    # trigger renders it by that type (a timestamptz pk must be sent in UTC).
    stored = stored_field(field)
    internal_type, element = rendering_types(stored)
    return Column(
        field=field.name,
        column=field.column,  # type: ignore[arg-type]
        internal_type=internal_type,
        comparable=_comparable(stored),
        element_type=element,
        element_texts=json_texts_type(stored) is not None,
    )


def stored_field(field: models.Field) -> models.Field:
    """The field whose type the column has: for a relation, the field it points to; for
    a ``GeneratedField``, its output field. The trigger renders and the decoder reads
    the column by it."""
    if getattr(field, "generated", False):
        field = field.output_field  # type: ignore[attr-defined]  # a GeneratedField's
    while field.is_relation and getattr(field, "target_field", None) is not None:
        field = field.target_field  # type: ignore[attr-defined]  # a relation's field
    return field


def innermost_field(field: models.Field) -> tuple[models.Field, int]:
    """An array field's innermost base field and how many ``ArrayField`` levels
    hold it (``ArrayField`` nests); the field itself and 0 if not an array."""
    depth = 0
    while field.get_internal_type() == "ArrayField" and hasattr(field, "base_field"):
        field, depth = field.base_field, depth + 1
    return field, depth


def json_texts_type(field: models.Field, connection: Any = None) -> str | None:
    """``jsonb`` or ``json``: the type of the elements of ``field``'s array column,
    which the trigger sends as their texts (``text[]``), unless they are a plain
    ``JSONField``'s; ``None`` for any other field (``connection`` as for ``column_type``).

    The ORM reads such a column (a custom field on ``jsonb[]``, an ``ArrayField`` of
    one on ``jsonb``) as psycopg loads it: the text of each ``jsonb`` element, as
    Django has ``jsonb`` loaded, each ``json`` one parsed from its text. ``to_json``
    would embed the values: the text ``'"1"'`` would arrive as ``'1'``, and a
    number's digits as a float holds them. A ``JSONField`` with a ``decoder`` or a
    ``from_db_value`` of its own reads the texts too, and may keep every digit
    (``1.10`` as ``Decimal("1.10")``); a plain one's elements stay embedded, as
    ``json.loads`` reads them alike.
    """
    if getattr(field, "generated", False):  # a GeneratedField: its column is its output's
        field = field.output_field  # type: ignore[attr-defined]
    element = _array_element(field)
    if isinstance(element, models.JSONField) and (element is field or plain_json(element)):
        return None
    base, array = column_type(element, connection)
    if base in _JSON_COLUMN_TYPES and (array or element is not field):
        return base
    return None


_JSON_COLUMN_TYPES = frozenset({"jsonb", "json"})


def plain_json(field: models.JSONField) -> bool:
    """Whether ``field`` reads its text as ``json.loads`` alone does: neither a
    ``decoder`` nor a ``from_db_value`` of its own."""
    return (
        type(field).from_db_value is models.JSONField.from_db_value
        and getattr(field, "decoder", None) is None
    )


def embeds_json(field: models.Field, connection: Any = None) -> bool:
    """Whether the trigger embeds the JSON values of ``field``'s column in the payload
    as they are: the elements of an ``ArrayField`` of a plain ``JSONField`` (see
    ``json_texts_type``), the value of a field
    other than a ``JSONField`` on a ``json`` column (``connection`` as for
    ``column_type``). Their integers may be past 64 bits, which the ORM reads
    with every digit."""
    if getattr(field, "generated", False):  # a GeneratedField: its column is its output's
        field = field.output_field  # type: ignore[attr-defined]
    if json_texts_type(field, connection) is not None:  # sent as texts
        return False
    element = _array_element(field)
    if column_type(element, connection)[0] not in _JSON_COLUMN_TYPES:
        return False
    # A JSONField's column, or one rendered as a JSONField's, is sent as its text.
    return element is not field or rendering_types(field)[0] != "JSONField"


def _array_element(field: models.Field) -> models.Field:
    """The innermost elements' field of an ``ArrayField`` or a subclass of one (whose
    internal type is its class name), as the ORM reads them; else ``field`` itself."""
    from django.contrib.postgres.fields import ArrayField

    while isinstance(field, ArrayField) or (
        field.get_internal_type() == "ArrayField" and hasattr(field, "base_field")
    ):
        field = field.base_field
    return field


def rendering_types(field: models.Field) -> tuple[str, str | None]:
    """The internal types the trigger renders ``field``'s column by: its own, and for
    an array that of its innermost elements (``None`` if not an array).

    The triggers know Django's own fields. A field of another internal type (a
    custom one, whose internal type is its class name, a subclass of a range
    field) is taken for the Django field of its column type, where that is a
    type whose JSON rendering depends on the writer's session or loses digits
    (``numeric``, ``timestamptz``, ``interval``, ranges of moments...): it is
    rendered as that field is, and the decoder, which reads such a field by its
    column type, reads it as the ORM does. Any other keeps its own (rendered by
    ``to_json``).
    """
    internal = field.get_internal_type()
    if internal == "ArrayField":
        innermost = innermost_field(field)[0]
        element = innermost.get_internal_type()
        if element not in DJANGO_INTERNAL_TYPES:
            element = _TYPES_BY_COLUMN_TYPE.get(column_type(innermost)[0] or "", element)
        return internal, element
    if internal in DJANGO_INTERNAL_TYPES:
        return internal, None
    base, array = column_type(field)
    rendered = _TYPES_BY_COLUMN_TYPE.get(base or "")
    if rendered is None:
        return internal, None
    return ("ArrayField", rendered) if array else (rendered, None)


# The internal types of Django's own fields (django.db.models and
# django.contrib.postgres), which the triggers render by; a subclass that does not
# override get_internal_type() has its class name instead.
DJANGO_INTERNAL_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "BigIntegerField",
        "BinaryField",
        "BooleanField",
        "CharField",
        "DateField",
        "DateTimeField",
        "DecimalField",
        "DurationField",
        "FileField",
        "FilePathField",
        "FloatField",
        "ForeignKey",
        "GenericIPAddressField",
        "IPAddressField",
        "IntegerField",
        "JSONField",
        "ManyToManyField",
        "OneToOneField",
        "PositiveBigIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "SlugField",
        "SmallAutoField",
        "SmallIntegerField",
        "TextField",
        "TimeField",
        "UUIDField",
        # django.contrib.postgres
        "ArrayField",
        "BigIntegerRangeField",
        "DateRangeField",
        "DateTimeRangeField",
        "DecimalRangeField",
        "HStoreField",
        "IntegerRangeField",
        "SearchQueryField",
        "SearchVectorField",
    }
)

# The Django field whose rendering a column type takes when its field's internal type
# is not one of Django's (see rendering_types). By the name column_type gives.
_TYPES_BY_COLUMN_TYPE = {
    "numeric": "DecimalField",
    "decimal": "DecimalField",
    "jsonb": "JSONField",
    "timestamp with time zone": "DateTimeField",
    "timestamptz": "DateTimeField",
    "interval": "DurationField",
    "daterange": "DateRangeField",
    "tstzrange": "DateTimeRangeField",
    "int4range": "IntegerRangeField",
    "int8range": "BigIntegerRangeField",
    "numrange": "DecimalRangeField",
    "date": "DateField",
    "time": "TimeField",
    "time without time zone": "TimeField",
    "uuid": "UUIDField",
    "bytea": "BinaryField",
    "double precision": "FloatField",
    "float8": "FloatField",
    # Rendered as a FloatField is, with extra_float_digits at 1 (the writer's may
    # round it): the shortest text of the real, which the ORM reads.
    "real": "FloatField",
    "float4": "FloatField",
    "smallint": "IntegerField",
    "int2": "IntegerField",
    "integer": "IntegerField",
    "int": "IntegerField",
    "int4": "IntegerField",
    "smallserial": "IntegerField",
    "serial2": "IntegerField",
    "serial": "IntegerField",
    "serial4": "IntegerField",
    "bigint": "BigIntegerField",
    "int8": "BigIntegerField",
    "bigserial": "BigIntegerField",
    "serial8": "BigIntegerField",
}

_TYPE_MODIFIERS = re.compile(r"\s*\([^)]*\)")
_ARRAY_DIMENSIONS = re.compile(r"(?:\s*\[\d*\])+$")
# An interval's fields (``interval day to second``): its values are intervals all the same.
_INTERVAL_FIELDS = re.compile(r"interval (?:year|month|day|hour|minute|second)(?: to \w+)?")


def column_type(field: models.Field, connection: Any = None) -> tuple[str | None, bool]:
    """``field``'s column type on PostgreSQL (``db_type()`` on ``connection``, else
    on the first PostgreSQL alias) without its modifiers and array dimensions, in
    lower case with single spaces (``interval`` for one with fields), and whether it
    is an array; ``None`` if none is found.

    A domain or a schema-qualified type name is what ``db_type()`` says, not the
    type it stands for.
    """
    connection = connection or _postgresql()
    if connection is None:
        return None, False
    try:
        # db_parameters(), not db_type(): a GeneratedField has its output field's.
        db_type = field.db_parameters(connection).get("type")
    except Exception:  # a custom field's own code: any failure means "not known"
        return None, False
    if not isinstance(db_type, str) or not db_type:
        return None, False
    name = " ".join(_TYPE_MODIFIERS.sub("", db_type).lower().split())
    base = _ARRAY_DIMENSIONS.sub("", name)
    array = base != name
    if _INTERVAL_FIELDS.fullmatch(base):
        base = "interval"
    return base, array


def _postgresql() -> Any:
    """The connection of the first PostgreSQL alias, whose ``db_type()`` a column
    type is read by; ``None`` if there is none."""
    return next(
        (connections[a] for a in connections if connections[a].vendor == "postgresql"), None
    )


def _comparable(field: models.Field) -> bool:
    """Whether the field's column type is one PostgreSQL compares with ``=``, and
    values it finds equal are the same value.

    Read from the column type the field creates on PostgreSQL; a type not
    known to have ``=``, or none found, is taken for one without. A column
    with a collation of its own may have a nondeterministic one, which finds
    ``'abc'`` and ``'ABC'`` equal, as ``citext`` does: an update from one to
    the other must still count as a change.
    """
    if getattr(innermost_field(field)[0], "db_collation", None):
        return False
    connection = _postgresql()
    try:
        db_type = field.db_type(connection) if connection is not None else None
    except Exception:  # a custom field's own code: any failure means "not known"
        return False
    if not isinstance(db_type, str):
        return False
    base = re.sub(r"\(.*?\)|\[\d*\]", "", db_type).lower()
    return " ".join(base.split()) in _COMPARABLE_TYPES


# Column types with an ``=`` operator (array types of them have one too).
_COMPARABLE_TYPES = frozenset(
    {
        "bigint",
        "bigserial",
        "boolean",
        "bpchar",
        "bytea",
        "char",
        "character",
        "character varying",
        "cidr",
        "date",
        "daterange",
        "double precision",
        "hstore",
        "inet",
        "int4range",
        "int8range",
        "integer",
        "interval",
        "jsonb",
        "macaddr",
        "numeric",
        "numrange",
        "real",
        "serial",
        "smallint",
        "smallserial",
        "text",
        "time",
        "timestamp",
        "timestamp with time zone",
        "timestamptz",
        "tsrange",
        "tstzrange",
        "tsvector",
        "uuid",
        "varchar",
    }
)


def get_declarations(selectors: Iterable[str] = ()) -> list[Declaration]:
    """All declarations of installed models, optionally narrowed.

    Args:
        selectors: App labels (``"shop"``) or model labels (``"shop.Order"``);
            empty means every app.

    Raises:
        ImproperlyConfigured: A declaration is invalid (``manage.py check``
            lists every such mistake) or a selector names nothing known.
    """
    wanted = _select_models(selectors)
    result = []
    for model in apps.get_models():
        if wanted is not None and model not in wanted:
            continue
        found, errors = resolve_model(model, raw_declarations(model))
        serious = [e for e in errors if e.is_serious()]
        if serious:
            raise ImproperlyConfigured(f"{serious[0].msg} ({serious[0].id})")
        result.extend(found)
    return result


def _select_models(selectors: Iterable[str]) -> set[type[models.Model]] | None:
    selectors = list(selectors)
    if not selectors:
        return None
    chosen: set[type[models.Model]] = set()
    for selector in selectors:
        try:
            if "." in selector:
                chosen.add(apps.get_model(selector))
            else:
                chosen.update(apps.get_app_config(selector).get_models())
        except (LookupError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"{selector!r} is neither an installed app label nor an app.Model label."
            ) from exc
    return chosen
