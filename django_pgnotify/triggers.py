"""The SQL builder: a declaration in, trigger SQL out. Pure: no database.

Each declaration gets one PL/pgSQL function and one ``AFTER ... FOR EACH ROW``
trigger per announced event (separate triggers so that the update trigger can
carry a ``WHEN`` clause: rows whose watched columns did not change never call
the function). Every name is quoted with ``psycopg.sql``; values embedded in
the function (channel, model label) are quoted literals.

Every trigger's ``WHEN`` clause also reads the transaction-local setting
``pgnotify.paused`` (one ``current_setting()`` per row, no query), so a
transaction can silence its own writes without DDL; the function adds the
``pgnotify.context`` setting to the payload as it is, unparsed, so a
malformed value set by hand can never fail the write.

The rendered SQL is hashed and the hash stored as a comment on the function
and each trigger, so the installer detects drift from the definition itself.
``TEMPLATE_VERSION`` changes whenever the rendered SQL of a release changes;
released templates are never edited in place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg import sql

from . import wire
from .conf import get_setting
from .declarations import Column, Declaration

#: Version of the SQL templates below; part of every stored hash.
TEMPLATE_VERSION = 2

#: Start of the comment that marks a trigger or function as ours.
MARKER = "django-pgnotify"

# PostgreSQL functions take at most 100 arguments: 50 key/value pairs.
_MAX_PAIRS = 50
_DOLLAR_TAG = "$pgnotify$"


@dataclass(frozen=True)
class TriggerSQL:
    """Everything needed to install, compare and remove one declaration."""

    declaration: Declaration
    uri: str
    table: sql.Composable
    function: sql.Composable
    triggers: dict[str, str]
    body: str
    checksum: str
    create_function: str
    create_triggers: tuple[str, ...]
    drop: str

    @property
    def comment(self) -> str:
        """The comment stored on the function and on each trigger."""
        return format_comment(self.uri, self.checksum)

    @property
    def install(self) -> str:
        """All statements that (re)create the declaration, in order."""
        return "\n".join((self.create_function, *self.create_triggers))


def format_comment(uri: str, checksum: str) -> str:
    """``django-pgnotify:<template version> <uri> <checksum>``."""
    return f"{MARKER}:{TEMPLATE_VERSION} {uri} {checksum}"


def parse_comment(comment: str | None) -> tuple[str, str] | None:
    """``(uri, checksum)`` from one of our comments, or ``None`` if not ours.

    The installer may append a fourth word to a trigger's comment (a hash of
    the trigger's catalogue state); it is not part of the rendered SQL.
    """
    if not comment or not comment.startswith(MARKER + ":"):
        return None
    parts = comment.split(" ")
    if len(parts) not in (3, 4):
        return None
    return parts[1], parts[2]


def table_identifier(declaration: Declaration) -> sql.Identifier:
    """The declaration's table, schema-qualified when the model names a schema."""
    schema, name = declaration.table
    return sql.Identifier(schema, name) if schema else sql.Identifier(name)


def build_trigger_sql(declaration: Declaration) -> TriggerSQL:
    """Render the function and triggers of one declaration."""
    schema = declaration.table.schema
    function = (
        sql.Identifier(schema, declaration.function)
        if schema
        else sql.Identifier(declaration.function)
    )
    table = table_identifier(declaration)
    body = _function_body(declaration)
    tag = _DOLLAR_TAG if _DOLLAR_TAG not in body else None
    quoted_body = sql.SQL(f"{tag}{body}{tag}") if tag else sql.Literal(body)

    create_function = sql.SQL(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {body};"
    ).format(function=function, body=quoted_body)
    create_triggers = []
    for event, name in declaration.triggers.items():
        if declaration.notify.durable:
            # One set-based INSERT per statement: a per-row INSERT would make bulk
            # writes several times slower. Updates are filtered in the function.
            when = _not_paused(declaration)
            level: sql.Composable = sql.SQL(" REFERENCING {} FOR EACH STATEMENT").format(
                sql.SQL(" ").join(
                    sql.SQL("{} TABLE AS {}").format(sql.SQL(kind), sql.Identifier(alias))
                    for kind, alias in _TRANSITION_TABLES[event]
                )
            )
        else:
            when = _when_clause(declaration, event)
            level = sql.SQL(" FOR EACH ROW")
        create_triggers.append(
            sql.SQL(
                "DROP TRIGGER IF EXISTS {name} ON {table};\n"
                "CREATE TRIGGER {name} AFTER {event} ON {table}{level}{when}"
                " EXECUTE FUNCTION {function}();"
            ).format(
                name=sql.Identifier(name),
                table=table,
                event=sql.SQL(event.upper()),
                level=level,
                when=sql.SQL(" WHEN ({})").format(when),
                function=function,
            )
        )
    unhashed = "\n".join([_render(create_function), *(_render(t) for t in create_triggers)])
    checksum = hashlib.sha256(f"{TEMPLATE_VERSION}\n{unhashed}".encode()).hexdigest()[:16]
    comment = sql.Literal(format_comment(declaration.uri, checksum))

    create_function_sql = _render(
        sql.SQL("{create}\nCOMMENT ON FUNCTION {function}() IS {comment};").format(
            create=create_function, function=function, comment=comment
        )
    )
    create_trigger_sql = tuple(
        _render(
            sql.SQL("{create}\nCOMMENT ON TRIGGER {name} ON {table} IS {comment};").format(
                create=create, name=sql.Identifier(name), table=table, comment=comment
            )
        )
        for create, name in zip(create_triggers, declaration.triggers.values(), strict=True)
    )
    return TriggerSQL(
        declaration=declaration,
        uri=declaration.uri,
        table=table,
        function=function,
        triggers=declaration.triggers,
        body=body,
        checksum=checksum,
        create_function=create_function_sql,
        create_triggers=create_trigger_sql,
        drop=build_drop_sql(table, function, declaration.triggers.values()),
    )


def build_drop_sql(table: sql.Composable, function: sql.Composable | None, triggers: object) -> str:
    """Statements that remove the given triggers of ``table`` and their function."""
    statements = [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {};").format(sql.Identifier(name), table)
        for name in triggers  # type: ignore[attr-defined]
    ]
    if function is not None:
        statements.append(sql.SQL("DROP FUNCTION IF EXISTS {}();").format(function))
    return "\n".join(_render(s) for s in statements)


def _render(composable: sql.Composable) -> str:
    return composable.as_string(None)


def _branches(declaration: Declaration) -> sql.Composable:
    return sql.SQL("").join(
        sql.SQL("  {keyword} TG_OP = {op} THEN\n    item := {row};\n").format(
            keyword=sql.SQL("IF" if index == 0 else "ELSIF"),
            op=sql.Literal(event.upper()),
            row=_row_object(declaration, event),
        )
        for index, event in enumerate(declaration.events)
    )


def _function_body(declaration: Declaration) -> str:
    if declaration.notify.durable:
        return _durable_body(declaration)
    branches = _branches(declaration)
    body = sql.SQL(
        "\nDECLARE\n  item json;\n  payload text;\nBEGIN\n{branches}  END IF;\n"
        "  payload := {full};\n"
        "  IF octet_length(payload) >= {limit} THEN\n"
        "    -- Too large for NOTIFY: send the pk alone, never fail the write.\n"
        "    payload := {pk_only};\n"
        "    IF octet_length(payload) >= {limit} THEN\n"
        "      payload := {no_pk};\n"
        "    END IF;\n"
        "  END IF;\n"
        "  PERFORM pg_notify({channel}, payload);\n"
        "  RETURN NULL;\nEND;\n"
    ).format(
        branches=branches,
        full=_payload(declaration, sql.SQL("item")),
        limit=sql.Literal(wire.PAYLOAD_LIMIT),
        pk_only=_payload(
            declaration,
            _pairs(
                [
                    (wire.PK, sql.SQL("item -> {}").format(sql.Literal(wire.PK))),
                    (wire.TRUNCATED, sql.SQL("true")),
                ]
            ),
        ),
        # The context is dropped last: a value set by hand may be of any size.
        no_pk=_payload(
            declaration,
            _pairs([(wire.PK, sql.SQL("NULL")), (wire.TRUNCATED, sql.SQL("true"))]),
            context=False,
        ),
        channel=sql.Literal(declaration.channel),
    )
    return _render(body)


# Transition tables of a durable declaration's statement-level triggers.
_NEW_ROWS, _OLD_ROWS = "pgnotify_new", "pgnotify_old"
_TRANSITION_TABLES = {
    "insert": (("NEW", _NEW_ROWS),),
    "update": (("OLD", _OLD_ROWS), ("NEW", _NEW_ROWS)),
    "delete": (("OLD", _OLD_ROWS),),
}


def _durable_body(declaration: Declaration) -> str:
    """Insert one event row per changed row, set-based, in the writing transaction.

    The row holds the wire format's row entry as jsonb and the message's other
    keys as columns (building one nested jsonb message per row would double the
    cost of a bulk write). The statement's rows come from its transition tables; an update's old and
    new rows are paired by primary key (an update that changes the primary key
    is not announced). No size limit applies (jsonb), so nothing is truncated.
    The wake-up notification is constant, so PostgreSQL folds those of one
    transaction into one; ``PGNOTIFY["DURABLE_WAKEUP"] = False`` leaves it out
    (listeners then poll). The context is stored unparsed, as in the wire
    format, so a malformed value never fails the write.
    """
    new, old = sql.Identifier(_NEW_ROWS), sql.Identifier(_OLD_ROWS)
    pk = sql.Identifier(declaration.pk.column)
    sources = {
        "insert": sql.SQL("{} AS n").format(new),
        "update": sql.SQL("{new} AS n JOIN {old} AS o ON o.{pk} = n.{pk} WHERE {changed}").format(
            new=new, old=old, pk=pk, changed=_update_filter(declaration, "o", "n")
        ),
        "delete": sql.SQL("{} AS o").format(old),
    }
    branches = sql.SQL("").join(
        sql.SQL(
            "  {keyword} TG_OP = {op} THEN\n"
            "    INSERT INTO {table}"
            " (declaration, model, action, xid, changed_at, context, payload, pid)\n"
            "    SELECT {uri}, {label}, {action}, xid, changed_at, ctx, {row}, writer"
            " FROM {source};\n"
        ).format(
            keyword=sql.SQL("IF" if index == 0 else "ELSIF"),
            op=sql.Literal(event.upper()),
            table=sql.Identifier(wire.EVENT_TABLE),
            uri=sql.Literal(declaration.uri),
            label=sql.Literal(declaration.label),
            action=sql.Literal(event),
            row=_row_object(declaration, event, old="o", new="n", function="jsonb_build_object"),
            source=sources[event],
        )
        for index, event in enumerate(declaration.events)
    )
    wakeup: sql.Composable = sql.SQL("")
    if get_setting("DURABLE_WAKEUP"):
        wakeup = sql.SQL("  IF FOUND THEN\n    PERFORM pg_notify({}, '');\n  END IF;\n").format(
            sql.Literal(wire.DURABLE_CHANNEL)
        )
    body = sql.SQL(
        "\nDECLARE\n"
        "  xid bigint := txid_current();\n"
        "  changed_at timestamptz := clock_timestamp();\n"
        "  writer integer := pg_backend_pid();\n"
        "  ctx text := coalesce(current_setting({context}, true), '');\n"
        "BEGIN\n{branches}  END IF;\n{wakeup}  RETURN NULL;\nEND;\n"
    ).format(
        context=sql.Literal(wire.CONTEXT_SETTING),
        branches=branches,
        wakeup=wakeup,
    )
    return _render(body)


def _update_filter(declaration: Declaration, old: str, new: str) -> sql.Composable:
    """The update condition of the row triggers' ``WHEN``, on other row names."""
    if not declaration.when_changed:
        # The function behind *<>; "alias.*" as its argument is the whole row,
        # where a bare alias could be taken for a column of that name.
        return sql.SQL("record_image_ne({}.*, {}.*)").format(
            sql.Identifier(old), sql.Identifier(new)
        )
    return sql.SQL("({})").format(
        sql.SQL(" OR ").join(
            sql.SQL("{old}.{col} IS DISTINCT FROM {new}.{col}").format(
                old=sql.Identifier(old), new=sql.Identifier(new), col=sql.Identifier(c.column)
            )
            for c in declaration.when_changed
        )
    )


def _payload(declaration: Declaration, row: sql.Composable, context: bool = True) -> sql.Composable:
    pairs = [
        (wire.VERSION_KEY, sql.Literal(wire.VERSION)),
        (wire.MODEL, sql.Literal(declaration.label)),
        (wire.ACTION, sql.SQL("lower(TG_OP)")),
        (wire.XID, sql.SQL("txid_current()")),
        (wire.TIMESTAMP, sql.SQL("extract(epoch FROM clock_timestamp())")),
        (wire.ROWS, sql.SQL("json_build_array({})").format(row)),
    ]
    if context:
        # Sent as a JSON string, not parsed here: a cast of a malformed value
        # would fail the write. The decoder parses it.
        pairs.append(
            (
                wire.CONTEXT,
                sql.SQL("nullif(current_setting({}, true), '')").format(
                    sql.Literal(wire.CONTEXT_SETTING)
                ),
            )
        )
    return sql.SQL("{}::text").format(_pairs(pairs))


def _row_object(
    declaration: Declaration,
    event: str,
    old: str = "OLD",
    new: str = "NEW",
    function: str = "json_build_object",
) -> sql.Composable:
    record = old if event == "delete" else new
    pairs: list[tuple[str, sql.Composable]] = [(wire.PK, _value(record, declaration.pk))]
    if declaration.fields:
        pairs.append((wire.FIELDS, _object(record, declaration.fields, function)))
    if event == "update":
        if declaration.fields:
            pairs.append((wire.OLD, _object(old, declaration.fields, function)))
        pairs.append((wire.CHANGED, _changed(declaration.watched, old, new)))
    return _pairs(pairs, function)


def _object(
    record: str, columns: tuple[Column, ...], function: str = "json_build_object"
) -> sql.Composable:
    """A JSON object of ``columns`` read from ``record``, keyed by column name."""
    pairs = [(c.column, _value(record, c)) for c in columns]
    if len(pairs) <= _MAX_PAIRS:
        return _pairs(pairs, function)
    chunks = [pairs[i : i + _MAX_PAIRS] for i in range(0, len(pairs), _MAX_PAIRS)]
    return sql.SQL("({})").format(
        sql.SQL(" || ").join(_pairs(chunk, "jsonb_build_object") for chunk in chunks)
    )


def _pairs(
    pairs: list[tuple[str, sql.Composable]], function: str = "json_build_object"
) -> sql.Composable:
    args = sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(key), value) for key, value in pairs
    )
    return sql.SQL("{}({})").format(sql.SQL(function), args)


def _value(record: str, column: Column) -> sql.Composable:
    """How a column's value is rendered, so the decoder can read it back exactly."""
    ref = sql.SQL("{}.{}").format(sql.SQL(record), sql.Identifier(column.column))
    if column.internal_type == "DateTimeField":
        # The writer's session time zone must not leak into the payload.
        return sql.SQL("({} AT TIME ZONE 'UTC')").format(ref)
    if column.internal_type == "DurationField":
        # IntervalStyle is per session too; seconds are unambiguous.
        return sql.SQL("extract(epoch FROM {})").format(ref)
    return ref


def _changed(columns: tuple[Column, ...], old: str = "OLD", new: str = "NEW") -> sql.Composable:
    if not columns:
        return sql.SQL("json_build_array()")
    cases = sql.SQL(", ").join(
        sql.SQL("CASE WHEN {old}.{col} IS DISTINCT FROM {new}.{col} THEN {name} END").format(
            old=sql.SQL(old),
            new=sql.SQL(new),
            col=sql.Identifier(c.column),
            name=sql.Literal(c.column),
        )
        for c in columns
    )
    return sql.SQL("to_json(array_remove(ARRAY[{}]::text[], NULL))").format(cases)


def _when_clause(declaration: Declaration, event: str) -> sql.Composable:
    not_paused = _not_paused(declaration)
    if event != "update":
        return not_paused
    if not declaration.when_changed:
        # An UPDATE that changes nothing announces nothing. Comparing the rows'
        # binary images works for every column type, even those without "="
        # (json, xml, point), and names no column.
        changed: sql.Composable = sql.SQL("OLD *<> NEW")
    else:
        changed = sql.SQL("({})").format(
            sql.SQL(" OR ").join(
                sql.SQL("OLD.{col} IS DISTINCT FROM NEW.{col}").format(col=sql.Identifier(c.column))
                for c in declaration.when_changed
            )
        )
    # Column comparisons first: they filter most rows of a bulk UPDATE.
    return sql.SQL("{} AND {}").format(changed, not_paused)


def _not_paused(declaration: Declaration) -> sql.Composable:
    """True unless ``pgnotify.paused`` is ``on`` or lists this model.

    Not paused (unset or empty) costs one ``current_setting()`` and a
    comparison; the list is only looked at while something is paused.
    """
    setting = sql.SQL("current_setting({}, true)").format(sql.Literal(wire.PAUSED_SETTING))
    return sql.SQL(
        "(coalesce({setting}, '') = '' OR ({setting} <> {all} AND strpos(',' || "
        "replace(lower({setting}), ' ', '') || ',', {label}) = 0))"
    ).format(
        setting=setting,
        all=sql.Literal(wire.PAUSED_ALL),
        label=sql.Literal(f",{declaration.label},"),
    )
