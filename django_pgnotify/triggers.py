"""The SQL builder: a declaration in, trigger SQL out. Pure: no database.

Each declaration gets one PL/pgSQL function and one ``AFTER ... FOR EACH
STATEMENT`` trigger per announced event, with transition tables: the function
reads the statement's rows in one set-based query and sends them in as few
notifications as the 8000-byte limit allows (version 2 of the wire format: one
array per row). Transition tables allow one event per trigger, hence one
trigger per event. ``Notify(level="row")`` makes them ``FOR EACH ROW``
triggers instead, whose function sends its row alone: no transition tables
and no query, so a single-row write costs about half as much extra, but a
bulk write calls the function and ``pg_notify()`` once per row, which makes
it two to three times slower than without the trigger.

An update's old and new rows are paired by primary key (by position, for the
rare statement that changed a row twice); rows whose watched columns did not
change are left out in the same query. With ``old=False`` an
update's trigger keeps its new rows alone and renders them as an insert's.
Every name is quoted with ``psycopg.sql``; values embedded in the function
(channel, model label, column names) are quoted literals.

Every function first reads the transaction-local setting ``pgnotify.paused``
(one ``current_setting()`` per call, no query), so a transaction can
silence its own writes without DDL; the function adds the
``pgnotify.context`` setting to the payload as it is, unparsed, so a malformed
value set by hand can never fail the write.

On a partitioned table, every partition gets the same statement triggers
(``partitions``): PostgreSQL fires a statement trigger only for statements
that name its own table. The installer reads the partitions from the
catalogue; SQL written without a database gives them their triggers with a
``DO`` block that reads them when it runs (``build_partition_triggers_sql``).

The rendered SQL is hashed and the hash stored as a comment on the function
and each trigger, so the installer detects drift from the definition itself.
``TEMPLATE_VERSION`` changes whenever the rendered SQL of declarations in
general changes; a change confined to one field type or option changes only
the hashes of the declarations it touches, which is enough to rebuild them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from psycopg import sql

from . import wire
from .conf import get_setting
from .declarations import Column, Declaration

#: Version of the SQL templates below; part of every stored hash.
TEMPLATE_VERSION = 14

#: ``server_version_num`` of the first PostgreSQL with ``JSON_SCALAR()``. It looks up
#: how to render its argument's type once per query, where ``to_json()`` does so for
#: every value: a bulk write's rows render about a fifth faster.
JSON_SCALAR_SINCE = 170000

#: Start of the comment that marks a trigger or function as ours.
MARKER = "django-pgnotify"

# PostgreSQL functions take at most 100 arguments.
_MAX_ARGS = 100
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
    #: Removing it: triggers first, as a trigger depends on the function it calls
    #: (and the installer may drop other functions between the two).
    drop_triggers: str
    drop_function: str
    #: The partitions that get the statement triggers too (``partitions`` of
    #: ``build_trigger_sql``), schema-qualified; their triggers come after the
    #: table's in ``create_triggers`` and ``drop_triggers``.
    partitions: tuple[sql.Identifier, ...] = ()

    @property
    def comment(self) -> str:
        """The comment stored on the function and on each trigger."""
        return format_comment(self.uri, self.checksum)

    @property
    def drop(self) -> str:
        """All statements that remove the declaration, in order."""
        return "\n".join((self.drop_triggers, self.drop_function))

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


def function_identifier(declaration: Declaration) -> sql.Identifier:
    """The declaration's trigger function, in its table's schema."""
    schema = declaration.table.schema
    return (
        sql.Identifier(schema, declaration.function)
        if schema
        else sql.Identifier(declaration.function)
    )


def build_trigger_sql(
    declaration: Declaration,
    server_version: int | None = None,
    foreign_key_actions: bool | None = None,
    partitions: Sequence[tuple[str, str]] = (),
) -> TriggerSQL:
    """Render the function and triggers of one declaration.

    ``server_version`` (``server_version_num`` of the database, as psycopg's
    ``connection.info.server_version``) lets the SQL use what that server
    offers; ``None`` renders SQL that every supported server runs.
    ``foreign_key_actions`` says whether the table has a foreign key whose
    action updates its rows, which alone make a statement change a row twice
    (``_PAIRED_BY_POSITION``): ``False`` leaves out the search for such a
    statement, ``None`` (not known) makes the function look the keys up when
    an update has two rows or more. The installer passes what its database
    has, so the checksums it compares are those of the SQL it would install.

    ``partitions`` are ``(schema, name)`` of the partitions of a partitioned
    table (at every level of the tree): PostgreSQL fires a statement trigger
    only for statements that name its own table, so each of them gets the
    same statement triggers, calling the same function. They are left out of
    the checksum, so a partition attached later leaves the declaration's hash
    as it is and the installer names the partition that lacks them. Ignored
    for ``level="row"``: PostgreSQL clones row triggers onto every partition.
    """
    function = function_identifier(declaration)
    table = table_identifier(declaration)
    scalar = "JSON_SCALAR" if (server_version or 0) >= JSON_SCALAR_SINCE else "to_json"
    # Only a durable body depends on DURABLE_WAKEUP: a live one is cached once.
    wakeup = bool(get_setting("DURABLE_WAKEUP")) if declaration.notify.durable else False
    body = _function_body(declaration, scalar, foreign_key_actions, wakeup)
    tag = _DOLLAR_TAG if _DOLLAR_TAG not in body else None
    quoted_body = sql.SQL(f"{tag}{body}{tag}") if tag else sql.Literal(body)

    create_function = sql.SQL(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {body};"
    ).format(function=function, body=quoted_body)
    tables = [table]
    parts: tuple[sql.Identifier, ...] = ()
    if not declaration.row_level:
        parts = tuple(sql.Identifier(*partition) for partition in partitions)
        tables += parts
    # The table's triggers alone: a partition's are the same but for the table.
    table_triggers = (
        _render(_create_trigger(declaration, event, table, function))
        for event in declaration.triggers
    )
    unhashed = "\n".join([_render(create_function), *table_triggers])
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
                create=_create_trigger(declaration, event, on, function),
                name=sql.Identifier(name),
                table=on,
                comment=comment,
            )
        )
        for on in tables
        for event, name in declaration.triggers.items()
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
        drop_triggers="\n".join(
            build_drop_sql(on, None, declaration.triggers.values()) for on in tables
        ),
        drop_function=build_drop_sql(table, function, ()),
        partitions=parts,
    )


def build_partition_triggers_sql(built: TriggerSQL) -> str:
    """A ``DO`` block that gives each partition its table has when it runs the
    statement triggers of ``built`` ("" for ``level="row"``, which needs none).

    For SQL written without a database, which cannot know the partitions
    (``pgnotify_install --sql`` when it cannot connect, or before ``migrate``
    has made the table): the block reads them from ``pg_partition_tree()``,
    every level below the table, foreign tables aside as the installer leaves
    them. Its triggers carry the declaration's comment, so they count as
    installed.
    """
    declaration = built.declaration
    if declaration.row_level or not declaration.triggers:
        return ""
    # The partition, for format(): no identifier can hold a NUL, so no name collides.
    placeholder = sql.SQL("\x00")
    comment = sql.Literal(built.comment)
    statements = "\n".join(
        _render(
            sql.SQL("{create}\nCOMMENT ON TRIGGER {name} ON {table} IS {comment};").format(
                create=_create_trigger(declaration, event, placeholder, built.function),
                name=sql.Identifier(name),
                table=placeholder,
                comment=comment,
            )
        )
        for event, name in declaration.triggers.items()
    )
    template = statements.replace("%", "%%").replace("\x00", "%1$s")
    body = _render(
        sql.SQL(
            "\nDECLARE\n"
            "  part regclass;\n"
            "BEGIN\n"
            "  FOR part IN SELECT t.relid FROM pg_partition_tree(to_regclass({table})) AS t\n"
            "      JOIN pg_class c ON c.oid = t.relid\n"
            "      WHERE t.level > 0 AND c.relkind IN ('r', 'p') LOOP\n"
            "    EXECUTE format({template}, part);\n"
            "  END LOOP;\n"
            "END;\n"
        ).format(table=sql.Literal(_render(built.table)), template=sql.Literal(template))
    )
    tag = _DOLLAR_TAG if _DOLLAR_TAG not in body else None
    quoted = sql.SQL(f"{tag}{body}{tag}") if tag else sql.Literal(body)
    return _render(sql.SQL("DO {};").format(quoted))


def _create_trigger(
    declaration: Declaration, event: str, table: sql.Composable, function: sql.Composable
) -> sql.Composable:
    """(Re)create the trigger of ``event`` on ``table``, the declaration's or a partition's."""
    # A statement's rows are read from its transition tables; an update's
    # unchanged rows, and paused writes, are left out by the function.
    level: sql.Composable = sql.SQL(" FOR EACH ROW")
    if not declaration.row_level:
        level = sql.SQL(" REFERENCING {} FOR EACH STATEMENT").format(
            sql.SQL(" ").join(
                sql.SQL("{} TABLE AS {}").format(sql.SQL(kind), sql.Identifier(alias))
                for kind, alias in _transition_tables(declaration, event)
            )
        )
    return sql.SQL(
        "DROP TRIGGER IF EXISTS {name} ON {table};\n"
        "CREATE TRIGGER {name} AFTER {event} ON {table}{level}"
        " EXECUTE FUNCTION {function}();"
    ).format(
        name=sql.Identifier(declaration.triggers[event]),
        table=table,
        event=sql.SQL(event.upper()),
        level=level,
        function=function,
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


@functools.lru_cache(maxsize=256)
def _function_body(
    declaration: Declaration, scalar: str, foreign_key_actions: bool | None, wakeup: bool
) -> str:
    """``scalar`` names the function that renders one value as JSON (see ``_json_text``);
    ``foreign_key_actions`` is ``build_trigger_sql``'s; ``wakeup`` is ``DURABLE_WAKEUP``
    (``False`` for a live declaration, whose body does not read it).

    Cached, as a function of its arguments alone: each inspection of a database
    (``migrate``, ``pgnotify_install``, ``pgnotify_status``) builds the SQL of
    every declaration, and rendering the bodies is most of its Python time.
    """
    if declaration.notify.durable:
        return _durable_body(declaration, scalar, foreign_key_actions, wakeup)
    if declaration.row_level:
        return _row_body(declaration, scalar)
    return _live_body(declaration, scalar, foreign_key_actions)


# The longest payload sent: PostgreSQL refuses 8000 bytes and more.
_PAYLOAD_MAX = wire.PAYLOAD_LIMIT - 1
# Room kept for the xid and ts. A context longer than CONTEXT_MAX (set by hand,
# past ``context()``'s limit) is left out, so that rows always keep most of the room.
_XID_TS_MAX = 64
#: The longest context a live notification holds, in bytes as a JSON key and string.
CONTEXT_MAX = 2200
#: The least room a notification leaves for rows once its header and context are
#: written: the system checks reject a declaration whose header leaves less, and
#: a context is left out where it would (see ``context_limit``).
MIN_ROWS_ROOM = 1000
# Statements of up to this many rows that fit one notification take the short
# path: one small query, no window function, no sort.
_SMALL_STATEMENT = 20
# Bulk statements of up to _JOINED_ROWS rows send their rows shorter than
# _JOINED_ROW bytes from one string (see _live_body), which holds at most
# _JOINED_ROWS * _JOINED_ROW bytes (256 MB) twice; the rest go through the
# window function.
_JOINED_ROWS = 500_000
_JOINED_ROW = 512
# For the bulk query alone: sorting and hashing a 100,000-row statement in memory
# rather than on disk halves the trigger's cost.
_BULK_WORK_MEM = "64MB"
# Every byte but the separator of the joined rows, chr(1), for rtrim().
_NOT_SEPARATOR = "\\x" + "".join(f"{i:02x}" for i in range(256) if i != 1)


# What a live statement trigger does with its rows once ``counted`` is set (see
# _live_body): the short path's message (``batch``) sent if it fits, else the bulk path.
_SENDING = sql.SQL(
    "{small_query}"
    "    -- An IF rather than PERFORM: PL/pgSQL evaluates it without the executor. AND stops\n"
    "    -- at false, not at NULL: batch IS NOT NULL (only the short path sets it) goes first.\n"
    "    IF batch IS NOT NULL AND octet_length(batch) <= {payload_max}"
    " AND pg_notify({channel}, batch) IS NOT NULL THEN\n"
    "    ELSIF counted > {small} OR batch IS NOT NULL THEN\n"
    "      room := {base} - coalesce(octet_length(ctx), 0);\n"
    "      saved := ARRAY[current_setting('jit'), current_setting('work_mem'),"
    " current_setting('enable_mergejoin'), current_setting('enable_nestloop')];\n"
    "      PERFORM set_config('jit', 'off', true),"
    " set_config('work_mem', {work_mem}, true),"
    " set_config('enable_mergejoin', 'off', true),"
    " set_config('enable_nestloop', 'off', true);\n"
    "      joinable := least({joinable}, room);\n"
    "      SELECT string_agg(r, chr(1)) FILTER (WHERE octet_length(r) < joinable),"
    " count(*), count(r) FILTER (WHERE octet_length(r) >= joinable){unsure}"
    " INTO batch, counted, larger\n"
    "        FROM (SELECT {joined_row} AS r FROM {joined_source} LIMIT {first})"
    " AS rendered;\n"
    "      IF counted > {joined_rows} THEN\n"
    "        batch := NULL;\n"
    "        joinable := 0;\n"
    "      END IF;\n"
    "      bytes := convert_to(batch, current_setting('server_encoding'));\n"
    "      batch := NULL;\n"
    "      size := coalesce(octet_length(bytes), 0);\n"
    "      pos := 0;\n"
    "      WHILE pos < size LOOP\n"
    "        IF size - pos < room THEN\n"
    "          cut := size - pos + 1;\n"
    "        ELSE\n"
    "          cut := octet_length(rtrim(substring(bytes FROM pos + 1 FOR room),"
    " {others}));\n"
    "        END IF;\n"
    "        IF pg_notify({channel}, {head} || replace(convert_from(substring(bytes"
    " FROM pos + 1 FOR cut - 1), current_setting('server_encoding')), chr(1), ',')"
    " || ']}}') IS NULL THEN END IF;\n"
    "        pos := pos + cut;\n"
    "      END LOOP;\n"
    "      bytes := NULL;\n"
    "      IF counted > {joined_rows} OR larger > 0 THEN\n"
    "        short := room / 8;\n"
    "        half := room / 2;\n"
    "        PERFORM pg_notify({channel}, {head} || string_agg(r, ','{by_total}) || ']}}')\n"
    "        FROM (SELECT r, total, {chunk} AS chunk\n"
    "          FROM (SELECT r, sum(octet_length(r) + 1)"
    " OVER ({in_order}ROWS UNBOUNDED PRECEDING) AS total{segment}\n"
    "            FROM (SELECT CASE WHEN octet_length(r) < room THEN r"
    " WHEN octet_length(json_build_array(key)::text) < room"
    " THEN json_build_array(key)::text ELSE '[null]' END AS r{kept}\n"
    "              FROM (SELECT {row} AS r, {key} AS key{joined}{numbered} FROM {source}"
    " OFFSET 0) AS rendered WHERE octet_length(r) >= joinable{unjoined}) AS sized)"
    " AS totalled) AS grouped\n"
    "        GROUP BY chunk ORDER BY min(total);\n"
    "      END IF;\n"
    "      PERFORM set_config('jit', saved[1], true),"
    " set_config('work_mem', saved[2], true),"
    " set_config('enable_mergejoin', saved[3], true),"
    " set_config('enable_nestloop', saved[4], true);\n"
    "    END IF;\n"
)


def _live_body(declaration: Declaration, scalar: str, foreign_key_actions: bool | None) -> str:
    """Send the statement's rows, as many per notification as fit.

    Most statements write a row or a few: the first query renders at most
    ``_SMALL_STATEMENT + 1`` rows, and if that is all and they fit, they go
    in one notification. A larger statement's rows are rendered in one
    set-based query that joins them into one string, separated by
    ``chr(1)`` (JSON text cannot hold that byte); a loop cuts it at the last
    separator within the room (``rtrim`` of every other byte, on ``bytea``
    so that positions are bytes). That costs one aggregate step per row and
    a few steps per notification, where a window function and a GROUP BY
    cost more than rendering the rows, and fills notifications nearly full.
    To bound the string's memory only rows under ``_JOINED_ROW`` bytes, of
    statements of at most ``_JOINED_ROWS`` rows, are joined; the others go
    through a second query, grouped by their running total of bytes (see
    the 8000-byte guard in docs/triggers.md), where a row that does not fit
    is sent as its pk alone (or ``[null]``). For these queries alone, and
    restored after them, JIT, merge joins and nested loops are turned off
    and ``work_mem`` raised: the planner cannot know a transition table's
    size, so it guesses a join of billions of rows, and compiling, sorting
    and spilling to disk took longer than the query itself. A statement that
    changed a row twice joins none: its rows all go through the second query,
    sent in the order of the changes, each notification holding consecutive
    rows (``_IN_CHANGE_ORDER``), so that a row's
    last version arrives last; with ``old=False`` too, whose new rows alone
    hold both versions.
    """
    new, old = sql.Identifier(_NEW_ROWS), sql.Identifier(_OLD_ROWS)
    pk = sql.Identifier(declaration.pk.column)
    changed = _live_update_filter(declaration)
    shortcut = bool(declaration.watched) and not declaration.when_changed
    sources = {
        "insert": sql.SQL("{} AS n").format(new),
        # A left join, so that an update that changes the pk is announced (its
        # old values are then null).
        "update": sql.SQL(
            "{new} AS n LEFT JOIN {old} AS o ON o.{pk} = n.{pk} WHERE o.{pk} IS NULL OR {changed}"
        ).format(new=new, old=old, pk=pk, changed=changed),
        "delete": sql.SQL("{} AS o").format(old),
    }
    # The joined rows' query reads at most one row more than it joins, and
    # counts them: an update's rows are filtered in the aggregate, not the join.
    joined_sources = {
        **sources,
        "update": sql.SQL("{new} AS n LEFT JOIN {old} AS o ON o.{pk} = n.{pk}").format(
            new=new, old=old, pk=pk
        ),
    }
    if not declaration.sends_old:  # an update's new rows alone, as an insert's
        sources["update"] = joined_sources["update"] = sources["insert"]
    # Whether an update looks for a row changed twice (see _by_need): with
    # old=False too, whose new rows then hold two versions of it, to send in order.
    looks = foreign_key_actions is not False and "update" in declaration.events
    branches = []
    for index, event in enumerate(declaration.events):
        record = "o" if event == "delete" else "n"
        paired = declaration.pairs_rows(event)
        looks_twice = event == "update" and looks  # for a row the statement changed twice
        row = _row_text(declaration, event, record, scalar)
        joined_row = row
        unsure: sql.Composable = sql.SQL("")
        joined: sql.Composable = sql.SQL("")
        unjoined: sql.Composable = sql.SQL("")
        if paired:
            # With record_image_ne in a query, its join's hash table holds whole old
            # rows: the first query compares the watched columns only, and leaves
            # the rows where none changed to the second query.
            first_filter = sql.SQL("o.{} IS NULL OR {}").format(
                pk, _any_changed(declaration.watched) if shortcut else changed
            )
            joined_row = sql.SQL("CASE WHEN {} THEN {} END").format(first_filter, row)
            if shortcut:
                unsure = sql.SQL(" + count(*) FILTER (WHERE r IS NULL)")
                joined = sql.SQL(", {} AS joined").format(first_filter)
                unjoined = sql.SQL(" OR NOT joined")
        base = rows_room(declaration, event)
        head = _head(declaration, event)
        parts = {
            "row": row,
            "joined_row": joined_row,
            "unsure": unsure,
            "joined": joined,
            "unjoined": unjoined,
            "small": sql.Literal(_SMALL_STATEMENT),
            "joined_rows": sql.Literal(_JOINED_ROWS),
            "first": sql.Literal(_JOINED_ROWS + 1),
            "joinable": sql.Literal(_JOINED_ROW),
            "others": sql.SQL("{}::bytea").format(sql.Literal(_NOT_SEPARATOR)),
            "work_mem": sql.Literal(_BULK_WORK_MEM),
            "channel": sql.Literal(declaration.channel),
            "head": head,
            "base": sql.Literal(base),
            "payload_max": sql.Literal(_PAYLOAD_MAX),
            "key": _value(record, declaration.pk),
        }
        # A single row by json_build_array: set up in each transaction, it is one function
        # where the concatenation of _row_text is a dozen, which a single-row write pays in
        # full. It looks up how to render each value as it runs instead, which only a bulk
        # write's rows would pay for many times. The values are the same; the text has a
        # space after each comma.
        short_row = _row_array(declaration, event, record)
        message = functools.partial(_short_message, declaration, event)

        sent: sql.Composable = _SENDING.format(
            source=sources[event],
            joined_source=joined_sources[event],
            small_query=_small_statement_query(paired, short_row, row, sources[event], message),
            **parts,
            **_AS_READ,
        )
        if looks_twice:
            # The same, for a statement that changed a row twice: sent in the order of
            # the changes, every row by the window function (joinable 0). Joined, a
            # row's short version would go out before a longer one that came first,
            # and the last one sent must be the row as it is now. Paired by position;
            # with old=False nothing is paired: such a row is in the new rows twice.
            if paired:
                source = sql.SQL("{} WHERE {}").format(_PAIRED_BY_POSITION, changed)
                joined_source = _PAIRED_BY_POSITION
            else:
                source = joined_source = _NUMBERED_NEW
            by_position = _SENDING.format(
                source=source,
                joined_source=joined_source,
                small_query=_small_statement_query(
                    True, short_row, row, source, message, _IN_POSITION_ORDER
                ),
                **{**parts, "joinable": sql.Literal(0)},
                **_IN_CHANGE_ORDER,
            )
            sent = _by_need(declaration, foreign_key_actions is None, sent, by_position)
        # Counted first, whichever query renders the rows.
        counted = _OLD_ROWS if record == "o" else _NEW_ROWS
        sent = sql.SQL("{}{}").format(_counting_query(counted), sent)
        branches.append(
            sql.SQL("  {keyword} TG_OP = {op} THEN\n{sent}").format(
                keyword=sql.SQL("IF" if index == 0 else "ELSIF"),
                op=sql.Literal(event.upper()),
                sent=sent,
            )
        )
    return _live_function(
        declaration,
        "  batch text;\n"
        "  counted bigint;\n"
        "  room integer;\n"
        "  saved text[];\n"
        "  joinable integer;\n"
        "  larger bigint;\n"
        "  bytes bytea;\n"
        "  size integer;\n"
        "  pos integer;\n"
        "  cut integer;\n"
        "  short integer;\n"
        "  half integer;\n" + ("  twice boolean;\n" if looks else ""),
        branches,
    )


def _live_function(
    declaration: Declaration, variables: str, branches: Sequence[sql.Composable]
) -> str:
    """A live function's body: ``ctx`` and ``variables`` declared, the pause check
    and the context's rendering first, then ``branches`` (one ``IF TG_OP`` per event)."""
    body = sql.SQL(
        "\nDECLARE\n"
        "{ctx}"
        "{variables}"
        "{digits}"
        "BEGIN\n"
        "{paused}"
        "{context}"
        "{exact}"
        "{branches}  END IF;\n"
        "{restore}"
        "  RETURN NULL;\nEND;\n"
    ).format(
        ctx=_CONTEXT_DECLARATION,
        variables=sql.SQL(variables),
        digits=_DIGITS_DECLARATION if _renders_floats(declaration) else sql.SQL(""),
        paused=_pause_check(declaration),
        context=_context_rendering(declaration),
        # A row-level function sets them in each branch, past its early return.
        exact=_exact_floats(declaration) if not declaration.row_level else sql.SQL(""),
        branches=sql.SQL("").join(branches),
        restore=_restored_floats(declaration),
    )
    return _render(body)


def _renders_floats(declaration: Declaration) -> bool:
    """Whether the declaration sends ``double precision`` values (scalars or arrays)."""
    return any(
        "FloatField" in (column.internal_type, column.element_type)
        for column in (declaration.pk, *declaration.fields)
    )


# ``extra_float_digits`` below 1 (a writer's session may set it: 0 gives 15
# significant digits) makes PostgreSQL print floats rounded: 0.1 + 0.2 as 0.3,
# the largest double as "Infinity". A function that sends floats sets it to 1
# (the shortest text that reads back exactly) for its own rendering alone, and
# gives the writer's value back. The check is one current_setting() while the
# setting is right; a function SET clause would cost every call more.
_DIGITS_DECLARATION = sql.SQL("  digits text;\n")


def _exact_floats(declaration: Declaration, indent: str = "  ") -> sql.Composable:
    """Set ``extra_float_digits`` to 1 if the writer's is lower, keeping it in ``digits``."""
    if not _renders_floats(declaration):
        return sql.SQL("")
    return sql.SQL(
        "{i}IF current_setting('extra_float_digits')::integer < 1 THEN\n"
        "{i}  digits := current_setting('extra_float_digits');\n"
        "{i}  PERFORM set_config('extra_float_digits', '1', true);\n"
        "{i}END IF;\n"
    ).format(i=sql.SQL(indent))


def _restored_floats(declaration: Declaration) -> sql.Composable:
    """Give the writer's ``extra_float_digits`` back, if ``_exact_floats`` changed it."""
    if not _renders_floats(declaration):
        return sql.SQL("")
    return sql.SQL(
        "  IF digits IS NOT NULL THEN\n"
        "    PERFORM set_config('extra_float_digits', digits, true);\n"
        "  END IF;\n"
    )


# The ``ctx`` variable: the setting as it is, then, only when it is set, the
# context as a JSON key and string, left out (NULL) past ``context_limit`` bytes.
# Without a context, ''/NULL count as no bytes and add nothing to the message.
# PL/pgSQL prepares each expression again in every transaction, so the
# rendering is nested where a transaction without a context never reaches it.
_CONTEXT_DECLARATION = sql.SQL("  ctx text := current_setting({}, true);\n").format(
    sql.Literal(wire.CONTEXT_SETTING)
)


def _context_rendering(declaration: Declaration) -> sql.Composable:
    return sql.SQL(
        "  IF ctx <> '' THEN\n"
        "    ctx := {key} || to_json(ctx);\n"
        "    IF octet_length(ctx) > {limit} THEN\n"
        "      ctx := NULL;\n"
        "    END IF;\n"
        "  END IF;\n"
    ).format(key=sql.Literal(f',"{wire.CONTEXT}":'), limit=sql.Literal(context_limit(declaration)))


def context_limit(declaration: Declaration) -> int:
    """The longest context, in bytes as a JSON key and string, a live notification holds.

    ``CONTEXT_MAX``, less where the header leaves so little room that a longer
    context would leave rows less than ``MIN_ROWS_ROOM`` bytes (or none at all:
    ``pg_notify`` would then fail the write). A longer one is left out.
    """
    return max(0, min(CONTEXT_MAX, least_rows_room(declaration) - MIN_ROWS_ROOM))


def _head(declaration: Declaration, event: str) -> sql.Composable:
    """The message up to its rows: constant text, and the xid, ts and context (``ctx``)."""
    start, rest = _header(declaration, event)
    return sql.SQL(
        "{start} || txid_current() || {ts} || extract(epoch FROM clock_timestamp())"
        " || coalesce(ctx, '') || {rest}"
    ).format(
        start=sql.Literal(start),
        ts=sql.Literal(f',"{wire.TIMESTAMP}":'),
        rest=sql.Literal(rest),
    )


def _short_message(declaration: Declaration, event: str, rows: sql.Composable) -> sql.Composable:
    """A whole message whose rows (JSON arrays joined by commas) are ``rows``:
    ``_head``'s text in one ``format()`` call.

    A short message is built once per statement, so what counts is setting the
    expression up in each transaction: one function call where the
    concatenation is nine, which costs about 2 µs less. ``format()`` writes a
    NULL as nothing, as ``coalesce(ctx, '')`` does.
    """
    start, rest = _header(declaration, event)
    text = f',"{wire.TIMESTAMP}":'
    template = "%s".join(part.replace("%", "%%") for part in (start, text, "", rest, "]}"))
    return sql.SQL(
        "format({}, txid_current(), extract(epoch FROM clock_timestamp()), ctx, {})"
    ).format(sql.Literal(template), rows)


def _row_body(declaration: Declaration, scalar: str) -> str:
    """Send the row in a notification of its own (``Notify(level="row")``).

    A row-level trigger fills no transition tables and runs no query: each
    statement of the function is a PL/pgSQL expression, which halves what the
    trigger costs a single-row write. A bulk write pays a function call and a
    notification per row. ``n`` and ``o`` alias ``NEW`` and ``OLD``, so rows
    render as in the statement triggers, by concatenation: ``format()`` and
    ``json_build_array``, which a statement trigger's single row takes, set up
    for less in a transaction but cost each row of a bulk write more. A row
    whose message would be 8000 bytes or more is sent as its pk alone (or
    ``[null]``), as a statement trigger's short path does. Updates
    are filtered as in the statement triggers, but ``OLD`` is at hand: one
    that changes the pk is always announced, with its own old values and the
    fields that really changed (see docs/declaring.md, ``level``).
    """
    branches = []
    for index, event in enumerate(declaration.events):
        record = "o" if event == "delete" else "n"
        skip: sql.Composable = sql.SQL("")
        if declaration.pairs_rows(event):
            # Like the statement triggers, which announce an update to a new pk
            # whatever when_changed says, having no old row to compare it with.
            changed: sql.Composable = sql.SQL("record_image_ne(o, n)")
            if declaration.when_changed:
                changed = sql.SQL("(o.{pk} IS DISTINCT FROM n.{pk} OR {filter})").format(
                    pk=sql.Identifier(declaration.pk.column), filter=_update_filter(declaration)
                )
            skip = sql.SQL("    IF NOT {} THEN\n      RETURN NULL;\n    END IF;\n").format(changed)
        key = sql.SQL("json_build_array({})::text").format(_value(record, declaration.pk))
        branches.append(
            sql.SQL(
                "  {keyword} TG_OP = {op} THEN\n"
                "{skip}"
                "{exact}"
                "    r := {head} || {row} || ']}}';\n"
                "    IF octet_length(r) > {payload_max} THEN\n"
                "      r := {head} || CASE WHEN octet_length({key})"
                " + coalesce(octet_length(ctx), 0) < {base}"
                " THEN {key} ELSE '[null]' END || ']}}';\n"
                "    END IF;\n"
                "    IF pg_notify({channel}, r) IS NULL THEN END IF;\n"
            ).format(
                keyword=sql.SQL("IF" if index == 0 else "ELSIF"),
                op=sql.Literal(event.upper()),
                skip=skip,
                exact=_exact_floats(declaration, indent="    "),
                head=_head(declaration, event),
                row=_row_text(declaration, event, record, scalar),
                payload_max=sql.Literal(_PAYLOAD_MAX),
                key=key,
                base=sql.Literal(rows_room(declaration, event)),
                channel=sql.Literal(declaration.channel),
            )
        )
    return _live_function(
        declaration, "  n ALIAS FOR NEW;\n  o ALIAS FOR OLD;\n  r text;\n", branches
    )


def _live_update_filter(declaration: Declaration) -> sql.Composable:
    """``_update_filter``, with the watched columns compared first when it is the whole row.

    ``record_image_ne`` builds both rows as records, which costs more than the
    rest of an update's query; it is only needed when no watched column changed.
    """
    changed = _update_filter(declaration)
    if declaration.when_changed or not declaration.watched:
        return changed
    return sql.SQL("{} OR {}").format(_any_changed(declaration.watched), changed)


def _any_changed(columns: tuple[Column, ...]) -> sql.Composable:
    """True when any of ``columns`` differs between the old row ``o`` and the new ``n``."""
    return sql.SQL(" OR ").join(_differs(c) for c in columns)


def _differs(column: Column) -> sql.Composable:
    """True when ``column`` differs between the old row ``o`` and the new ``n``.

    ``IS DISTINCT FROM`` needs an ``=`` operator, which some column types lack
    (``json``, ``xml``, ``point``, custom types): comparing one would fail
    every update of the table. Those compare by their stored bytes, as ``*<>``
    compares rows; the others by value (``1.0`` and ``1.00`` are equal).
    """
    col = sql.Identifier(column.column)
    if column.comparable:
        return sql.SQL('"o".{col} IS DISTINCT FROM "n".{col}').format(col=col)
    return sql.SQL('record_image_ne(ROW("o".{col}), ROW("n".{col}))').format(col=col)


def _header(declaration: Declaration, event: str) -> tuple[str, str]:
    """The message's fixed JSON before the xid, and after the ts and context."""
    opening = _json_items({wire.VERSION_KEY: wire.VERSION, wire.MODEL: declaration.label})
    start = "{" + opening[1:] + _json_items({wire.ACTION: event}) + f',"{wire.XID}":'
    header: dict[str, object] = {wire.FIELDS: [c.column for c in declaration.fields]}
    header.update(_update_layout(declaration, event))
    return start, _json_items(header) + f',"{wire.ROWS}":['


def rows_room(declaration: Declaration, event: str) -> int:
    """Bytes a notification of ``event`` leaves for its rows, before any context.

    The fixed parts of the header (model label, column names) and room for the
    xid and ts come off PostgreSQL's limit; the system checks reject a
    declaration whose column names leave too little.
    """
    start, rest = _header(declaration, event)
    return _PAYLOAD_MAX - len((start + rest + "]}").encode()) - _XID_TS_MAX


def least_rows_room(declaration: Declaration) -> int:
    """``rows_room`` of the declaration's event whose header is longest."""
    return min(rows_room(declaration, event) for event in declaration.events)


def _small_statement_query(
    paired: bool,
    one: sql.Composable,
    row: sql.Composable,
    source: sql.Composable,
    message: Callable[[sql.Composable], sql.Composable],
    order: sql.Composable | None = None,
) -> sql.Composable:
    """Set ``batch`` to the whole message of the rows written, if they are few
    (``counted``, set first by ``_counting_query``, up to one past the short
    path's limit); ``message`` makes it of the rows' text.

    A single row is rendered as ``one`` (``_row_array``) by a query without an
    aggregate (setting one up costs more than the counting query); a few as
    ``row`` (``_row_text``), joined by ``string_agg``: rendering a few rows
    ``_row_array``'s way costs more than it saves. Counted first, an update's
    ``paired`` rows, which come from a join, are rendered only if they are
    few: with a ``LIMIT`` the planner picks a nested loop, quadratic in a
    bulk update. Those whose watched columns did not change are left out, and
    with them the message if none did. ``order`` (an ``ORDER BY`` within the
    aggregate) is for rows paired by position. The message is built in the
    query that reads the rows: a PL/pgSQL statement of its own costs a
    single-row write more.
    """
    if paired:
        rows = sql.SQL("string_agg({row}, ','{order})").format(row=row, order=order or sql.SQL(""))
        few: sql.Composable = sql.SQL(
            "CASE WHEN {rows} IS NOT NULL THEN {message} END INTO batch FROM {source}"
        ).format(rows=rows, message=message(rows), source=source)
    else:
        few = sql.SQL("{} INTO batch FROM (SELECT {} AS r FROM {}) AS first_rows").format(
            message(sql.SQL("string_agg(r, ',')")), row, source
        )
    return sql.SQL(
        "    IF counted = 1 THEN\n"
        "      SELECT {one} INTO batch FROM {source};\n"
        "    ELSIF counted BETWEEN 2 AND {small} THEN\n"
        "      SELECT {few};\n"
        "    END IF;\n"
    ).format(one=message(one), source=source, small=sql.Literal(_SMALL_STATEMENT), few=few)


def _counting_query(rows: str | None = None) -> sql.Composable:
    """Set ``counted`` to the rows of transition table ``rows`` (the new rows by
    default), up to one past the short path's limit.

    Read by ``PERFORM`` and counted by ``GET DIAGNOSTICS``: the executor sets up
    no aggregate, which costs a single-row statement about 4 µs less than
    ``count(*)``.
    """
    return sql.SQL(
        "    PERFORM FROM {rows} LIMIT {limit};\n    GET DIAGNOSTICS counted = ROW_COUNT;\n"
    ).format(rows=sql.Identifier(rows or _NEW_ROWS), limit=sql.Literal(_SMALL_STATEMENT + 1))


def _by_need(
    declaration: Declaration,
    unknown_keys: bool,
    by_pk: sql.Composable,
    by_position: sql.Composable,
) -> sql.Composable:
    """An update's statements once ``counted`` is set: ``by_pk``, or ``by_position``
    for a statement that changed a row twice (``_PAIRED_BY_POSITION``).

    Only the actions of foreign keys declared in the database make one, and
    only in a statement of two rows or more, so the nested ``IF`` keeps a
    single-row update from any query, and a table without such keys gets no
    search at all (the callers leave it out); one not known to have them
    (``unknown_keys``) looks them up in ``pg_constraint`` first.
    """
    repeated = sql.SQL(
        "EXISTS (SELECT FROM {new} AS n GROUP BY n.{pk} HAVING count(*) > 1)"
    ).format(new=sql.Identifier(_NEW_ROWS), pk=sql.Identifier(declaration.pk.column))
    if unknown_keys:
        repeated = sql.SQL("{} AND {}").format(_HAS_FOREIGN_KEY_ACTIONS, repeated)
    return sql.SQL(
        "    twice := false;\n"
        "    IF counted > 1 THEN\n"
        "      twice := {repeated};\n"
        "    END IF;\n"
        "    IF twice THEN\n{by_position}    ELSE\n{by_pk}    END IF;\n"
    ).format(repeated=repeated, by_position=_indented(by_position), by_pk=_indented(by_pk))


#: Whether the trigger's table has a foreign key whose action updates its rows
#: (``ON DELETE SET NULL`` or ``SET DEFAULT``, ``ON UPDATE`` but ``RESTRICT`` and
#: ``NO ACTION``), as a condition of ``pg_constraint`` on ``conrelid``.
FOREIGN_KEY_ACTIONS = (
    "contype = 'f' AND (confdeltype IN ('n', 'd') OR confupdtype IN ('c', 'n', 'd'))"
)
_HAS_FOREIGN_KEY_ACTIONS = sql.SQL(
    "EXISTS (SELECT FROM pg_catalog.pg_constraint WHERE conrelid = TG_RELID AND "
    + FOREIGN_KEY_ACTIONS
    + ")"
)


# Transition tables of the statement-level triggers.
_NEW_ROWS, _OLD_ROWS = "pgnotify_new", "pgnotify_old"

#: The column ``_PAIRED_BY_POSITION`` numbers rows in, beside the table's.
POSITION = "pgnotify_position"

# An update's new rows ``n``, numbered in the order of the changes (see below):
# an ``old=False`` update's, which reads no old rows, and one side of the pairing.
_NUMBERED_NEW = sql.SQL("(SELECT row_number() OVER () AS {}, * FROM {}) AS n").format(
    sql.Identifier(POSITION), sql.Identifier(_NEW_ROWS)
)

# An update's old rows ``o`` and new rows ``n``, paired by their position.
#
# A row changed twice by one statement (two ``ON DELETE SET NULL`` foreign
# keys of the row that reference the same deleted row, or an ``ON UPDATE
# CASCADE`` one beside the statement's own change) has two old and two new
# versions in the transition tables, and a join by primary key would pair
# each with each. PostgreSQL appends each change's old and new row to the two
# tables together, so their positions pair them as row-level triggers see
# them. Each row is numbered in a column ``pgnotify_position`` beside the
# table's (a column of that name would make the join's reference to it
# ambiguous); the row type is never named, so the writer's ``search_path``
# plays no part. Pairing by position costs about twice what the primary key
# join does, hence only for such statements.
_PAIRED_BY_POSITION = sql.SQL("{new} JOIN {old} ON o.{position} = n.{position}").format(
    new=_NUMBERED_NEW,
    old=sql.SQL("(SELECT row_number() OVER () AS {}, * FROM {}) AS o").format(
        sql.Identifier(POSITION), sql.Identifier(_OLD_ROWS)
    ),
    position=sql.Identifier(POSITION),
)


# The placeholders of the window queries (_SENDING's second query, _DURABLE_INSERT),
# for rows sent as the join reads them, or in the order of the changes.
#
# Paired by position, a statement's rows go in that order, explicitly: a hash join that
# spills to disk in batches, or a sort to group them, returns rows in another order,
# and a row changed twice must arrive as it is now last. ``by_total`` orders a live
# notification's rows, ``by_position`` a durable event row's.
#
# ``chunk`` (and ``segment``) group _SENDING's rows into notifications. As read, by
# size: short rows (under room / 8) several to a chunk, medium ones (under room / 2)
# two, long ones alone; each class's chunks are cut by the running total, so a chunk
# may hold rows with rows of another class between them. In the order of the changes,
# a chunk must hold consecutive rows: a row of room / 8 or more is sent alone, and
# starts a ``segment``, whose short rows after it are grouped by the running total;
# chunks then go out in the order of their first row, each row after the one before.
_AS_READ: dict[str, sql.Composable] = {
    "numbered": sql.SQL(""),
    "kept": sql.SQL(""),
    "in_order": sql.SQL(""),
    "by_total": sql.SQL(""),
    "by_position": sql.SQL(""),
    "chunk": sql.SQL(
        "CASE WHEN octet_length(r) < short THEN total / (room - short) * 3"
        " WHEN octet_length(r) < half THEN total / (room - half) * 3 + 1"
        " ELSE total * 3 + 2 END"
    ),
    "segment": sql.SQL(""),
}
_IN_CHANGE_ORDER: dict[str, sql.Composable] = {
    "numbered": sql.SQL(", n.{}").format(sql.Identifier(POSITION)),
    "kept": sql.SQL(", {}").format(sql.Identifier(POSITION)),
    "in_order": sql.SQL("ORDER BY {} ").format(sql.Identifier(POSITION)),
    "by_total": sql.SQL(" ORDER BY total"),
    "by_position": sql.SQL(" ORDER BY {}").format(sql.Identifier(POSITION)),
    "chunk": sql.SQL(
        "CASE WHEN octet_length(r) < short THEN ROW(segment, total / (room - short))"
        " ELSE ROW(-1::bigint, total) END"
    ),
    "segment": sql.SQL(
        ", count(*) FILTER (WHERE octet_length(r) >= short)"
        " OVER (ORDER BY {} ROWS UNBOUNDED PRECEDING) AS segment"
    ).format(sql.Identifier(POSITION)),
}
# The short path's ``string_agg`` in the order of the changes.
_IN_POSITION_ORDER = sql.SQL(" ORDER BY n.{}").format(sql.Identifier(POSITION))


def _indented(composable: sql.Composable) -> sql.Composable:
    """``composable``'s lines, two spaces further in, to nest them in an ``IF``."""
    lines = _render(composable).splitlines(keepends=True)
    return sql.SQL("".join("  " + line if line.strip() else line for line in lines))


def _json_items(items: dict[str, object]) -> str:
    """``,"key":value`` for each item: JSON text to append to an open object."""
    return "".join(
        f",{json.dumps(key)}:{json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"
        for key, value in items.items()
    )


def _row_array(declaration: Declaration, event: str, record: str) -> sql.Composable:
    """The version 2 row: pk and values, plus old values and the changed mask on update."""
    values = [_value(record, declaration.pk), *(_value(record, c) for c in declaration.fields)]
    if declaration.pairs_rows(event):
        values += [_value("o", c) for c in declaration.fields]
        values.append(_changed_mask(declaration.watched))
    # json_build_array takes at most 100 arguments.
    chunks = [values[i : i + _MAX_ARGS] for i in range(0, len(values), _MAX_ARGS)]
    if len(chunks) == 1:
        return sql.SQL("json_build_array({})").format(sql.SQL(", ").join(values))
    return sql.SQL("({})").format(
        sql.SQL(" || ").join(
            sql.SQL("jsonb_build_array({})").format(sql.SQL(", ").join(chunk)) for chunk in chunks
        )
    )


def _row_text(declaration: Declaration, event: str, record: str, scalar: str) -> sql.Composable:
    """``_row_array`` as JSON text, built by concatenation when the row has few values.

    ``json_build_array`` looks up how to render each argument on every call;
    ``to_json`` of one value costs less, and a ``::text`` cast of an integer
    less still. Concatenation copies the row so far at each value, so wide
    rows keep ``json_build_array``.
    """
    values = [(record, declaration.pk), *((record, c) for c in declaration.fields)]
    paired = declaration.pairs_rows(event)
    if paired:
        values += [("o", c) for c in declaration.fields]
    if len(values) >= _CONCAT_MAX:
        return sql.SQL("{}::text").format(_row_array(declaration, event, record))
    items = [
        _json_text(name, column, nullable=i > 0, scalar=scalar)
        for i, (name, column) in enumerate(values)
    ]
    if paired:
        mask = scalar + "({})::text" if len(declaration.watched) > _MASK_BITS else "{}::text"
        items.append(sql.SQL(mask).format(_changed_mask(declaration.watched)))
    return sql.SQL("('[' || {} || ']')").format(sql.SQL(" || ',' || ").join(items))


# Rows of this many values or more are rendered by json_build_array (see _row_text).
_CONCAT_MAX = 16
# Rendered by a plain ::text cast: PostgreSQL prints them as JSON numbers.
_INTEGER_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
    }
)


def _json_text(record: str, column: Column, nullable: bool, scalar: str) -> sql.Composable:
    """One value as JSON text, as ``json_build_array`` renders it; ``null`` for NULL.

    ``scalar`` is ``to_json`` or, where the server has it, ``JSON_SCALAR``:
    both render through the same function, so the text is the same.
    """
    value = _value(record, column)
    if column.internal_type in _INTEGER_TYPES:
        text = sql.SQL("{}::text").format(value)
    else:
        text = sql.SQL(scalar + "({})::text").format(value)
    return sql.SQL("coalesce({}, 'null')").format(text) if nullable else text


def _changed_mask(columns: tuple[Column, ...]) -> sql.Composable:
    """Bit ``i`` set when ``columns[i]`` changed.

    Beyond 62 columns the sum is numeric, sent as a string of digits: a JSON
    number past 64 bits would reach a reader that parses floats rounded.
    """
    if not columns:
        return sql.SQL("0")
    return sql.SQL("({}){}").format(
        sql.SQL(" + ").join(
            sql.SQL("CASE WHEN {differs} THEN {bit} ELSE 0 END").format(
                differs=_differs(c),
                bit=sql.SQL(str(1 << i) if i < 62 else f"{1 << i}::numeric"),
            )
            for i, c in enumerate(columns)
        ),
        sql.SQL("::text" if len(columns) > _MASK_BITS else ""),
    )


# Watched columns whose changed mask is a JSON number (a bigint); more send a string.
_MASK_BITS = 62


def _transition_tables(declaration: Declaration, event: str) -> tuple[tuple[str, str], ...]:
    """(kind, alias) of each transition table the trigger of ``event`` keeps.

    Only what the function reads: PostgreSQL copies every row a statement writes
    into each table, so an update with ``old=False`` keeps the new rows alone.
    """
    if declaration.pairs_rows(event):
        return (("OLD", _OLD_ROWS), ("NEW", _NEW_ROWS))
    return (("OLD", _OLD_ROWS),) if event == "delete" else (("NEW", _NEW_ROWS),)


# A durable event row holds the changes whose running total of bytes falls in one
# _DURABLE_ROW_BYTES span, each counted as at least _DURABLE_ROW_WEIGHT bytes: at
# most wire.DURABLE_ID_STEP changes, and a 64 kB payload plus the last row's bytes.
_DURABLE_ROW_BYTES = 65_536
_DURABLE_ROW_WEIGHT = _DURABLE_ROW_BYTES // wire.DURABLE_ID_STEP


# One durable branch's insert: the statement's changes from {source}, in runs.
_DURABLE_INSERT = sql.SQL(
    "    INSERT INTO {table}"
    " (declaration, model, action, xid, changed_at, context, layout, payload, pid, size)\n"
    "    SELECT {uri}, {label}, {action}, xid, changed_at, ctx, {layout},"
    " string_agg(r, ','{by_position}), writer, count(*)\n"
    "      FROM (SELECT r{kept}, sum(greatest(octet_length(r) + 1, {weight}))"
    " OVER ({in_order}ROWS UNBOUNDED PRECEDING) / {span} AS run\n"
    "        FROM (SELECT {row} AS r{numbered} FROM {source} OFFSET 0) AS rendered)"
    " AS totalled\n"
    "      GROUP BY run ORDER BY run;\n"
)


def _durable_body(
    declaration: Declaration, scalar: str, foreign_key_actions: bool | None, wakeup: bool
) -> str:
    """Insert the statement's changes into the event table, set-based, in the writing
    transaction: one event row per run of up to ``wire.DURABLE_ID_STEP`` changes.

    Each change is the wire format's version 2 row array as JSON text, built as
    the live triggers build it (``_row_text``; nested ``jsonb_build_object``
    calls per row cost more than the rest of the insert, and a jsonb column
    would parse it again); a run's arrays are joined with commas into one
    ``payload``, its length in ``size``. The message's other keys are columns,
    with the arrays' layout stored as a constant beside them. One event row per
    change cost more than the table written (a heap tuple and two index entries
    each): a run of them is one of each. Runs are cut by a running total of
    bytes, so a row stays near 64 kB whatever the changes' size. The
    statement's rows come from its transition tables; an update's old and new
    rows are paired by primary key with a left join, as the live triggers pair
    them (an update that changes the primary key is stored under its new pk,
    its old values null; see ``_PAIRED_BY_POSITION`` for the exception), unless
    ``old=False``: then its new rows are stored as an insert's. No size limit
    applies, so nothing is truncated.
    The wake-up notification is constant, so PostgreSQL folds those of one
    transaction into one; ``PGNOTIFY["DURABLE_WAKEUP"] = False`` leaves it out
    (listeners then poll). The context is stored unparsed, as in the wire
    format, so a malformed value never fails the write.
    """
    new, old = sql.Identifier(_NEW_ROWS), sql.Identifier(_OLD_ROWS)
    pk = sql.Identifier(declaration.pk.column)
    sources = {
        "insert": sql.SQL("{} AS n").format(new),
        # A left join, as the live triggers': an update that changes the pk is
        # stored with its old values null.
        "update": sql.SQL(
            "{new} AS n LEFT JOIN {old} AS o ON o.{pk} = n.{pk} WHERE o.{pk} IS NULL OR {changed}"
        ).format(new=new, old=old, pk=pk, changed=_update_filter(declaration)),
        "delete": sql.SQL("{} AS o").format(old),
    }
    if not declaration.sends_old:  # an update's new rows alone, as an insert's
        sources["update"] = sources["insert"]
    # Whether an update looks for a row changed twice (see _by_need).
    looks = foreign_key_actions is not False and declaration.pairs_rows("update")
    branches = []
    for index, event in enumerate(declaration.events):
        parts = {
            "table": sql.Identifier(wire.EVENT_TABLE),
            "uri": sql.Literal(declaration.uri),
            "label": sql.Literal(declaration.label),
            "action": sql.Literal(event),
            "layout": sql.Literal(_durable_layout(declaration, event)),
            "row": _row_text(declaration, event, "o" if event == "delete" else "n", scalar),
            "weight": sql.Literal(_DURABLE_ROW_WEIGHT),
            "span": sql.Literal(_DURABLE_ROW_BYTES),
        }
        inserting = _DURABLE_INSERT.format(source=sources[event], **parts, **_AS_READ)
        if declaration.pairs_rows(event) and looks:
            by_position = _DURABLE_INSERT.format(
                source=sql.SQL("{} WHERE {}").format(
                    _PAIRED_BY_POSITION, _update_filter(declaration)
                ),
                **parts,
                **_IN_CHANGE_ORDER,
            )
            inserting = sql.SQL("{}{}").format(
                _counting_query(),
                _by_need(declaration, foreign_key_actions is None, inserting, by_position),
            )
        branches.append(
            sql.SQL("  {keyword} TG_OP = {op} THEN\n{inserting}").format(
                keyword=sql.SQL("IF" if index == 0 else "ELSIF"),
                op=sql.Literal(event.upper()),
                inserting=inserting,
            )
        )
    wake_up: sql.Composable = sql.SQL("")
    if wakeup:
        wake_up = sql.SQL("  IF FOUND THEN\n    PERFORM pg_notify({}, '');\n  END IF;\n").format(
            sql.Literal(wire.DURABLE_CHANNEL)
        )
    body = sql.SQL(
        "\nDECLARE\n"
        "  xid bigint := txid_current();\n"
        "  changed_at timestamptz := clock_timestamp();\n"
        "  writer integer := pg_backend_pid();\n"
        "  ctx text := coalesce(current_setting({context}, true), '');\n"
        "{looking}"
        "{digits}"
        "BEGIN\n{paused}{exact}{branches}  END IF;\n{wakeup}{restore}  RETURN NULL;\nEND;\n"
    ).format(
        context=sql.Literal(wire.CONTEXT_SETTING),
        looking=sql.SQL("  counted bigint;\n  twice boolean;\n" if looks else ""),
        digits=_DIGITS_DECLARATION if _renders_floats(declaration) else sql.SQL(""),
        paused=_pause_check(declaration),
        exact=_exact_floats(declaration),
        branches=sql.SQL("").join(branches),
        restore=_restored_floats(declaration),
        wakeup=wake_up,
    )
    return _render(body)


def _update_filter(declaration: Declaration) -> sql.Composable:
    """When an update of the old row ``o`` to the new ``n`` is announced."""
    if not declaration.when_changed:
        # The function behind *<>; "alias.*" as its argument is the whole row,
        # where a bare alias could be taken for a column of that name.
        return sql.SQL('record_image_ne("o".*, "n".*)')
    return sql.SQL("({})").format(_any_changed(declaration.when_changed))


def _durable_layout(declaration: Declaration, event: str) -> str:
    """The version 2 message keys that describe ``_row_array``'s layout, as JSON text."""
    layout: dict[str, object] = {wire.FIELDS: [c.column for c in declaration.fields]}
    layout.update(_update_layout(declaration, event))
    return json.dumps(layout, separators=(",", ":"))[1:-1]


def _update_layout(declaration: Declaration, event: str) -> dict[str, object]:
    """The message keys an update adds to ``fields``: ``watched``, or ``"old": false``
    when its rows are its new rows alone."""
    if declaration.pairs_rows(event):
        return {wire.WATCHED: [c.column for c in declaration.watched]}
    return {wire.OLD_VALUES: False} if event == "update" else {}


def _value(record: str, column: Column) -> sql.Composable:
    """How a column's value is rendered, so the decoder can read it back exactly."""
    ref = sql.SQL("{}.{}").format(sql.SQL(record), sql.Identifier(column.column))
    if column.internal_type == "DateTimeField":
        # The writer's session time zone must not leak into the payload.
        return sql.SQL("({} AT TIME ZONE 'UTC')").format(ref)
    if column.internal_type == "DurationField":
        # IntervalStyle is per session too; seconds are unambiguous. As text, like
        # numeric, so that every digit survives a reader that parses JSON numbers
        # as floats. extract(epoch) counts a year as 365.25 days, where psycopg (and
        # so the ORM) counts 365, as for intervals written outside Django: the
        # quarter days of its years are taken off again.
        return sql.SQL("(extract(epoch FROM {0}) - 21600 * extract(year FROM {0}))::text").format(
            ref
        )
    if column.internal_type in _AS_TEXT:
        return sql.SQL("{}::text").format(ref)
    if column.internal_type in _MOMENT_RANGES:
        # A range's text renders its bounds in the writer's DateStyle, which may put
        # the day first or name a zone by an abbreviation: the same text, its bounds
        # rendered by to_json (ISO 8601, with the offset) instead.
        return sql.SQL(
            "CASE WHEN {0} IS NULL THEN NULL WHEN isempty({0}) THEN 'empty' ELSE"
            " CASE WHEN lower_inc({0}) THEN '[' ELSE '(' END"
            " || coalesce(to_json(lower({0}))::text, '') || ','"
            " || coalesce(to_json(upper({0}))::text, '')"
            " || CASE WHEN upper_inc({0}) THEN ']' ELSE ')' END END"
        ).format(ref)
    if column.element_type == "DecimalField" or column.element_texts:
        # numeric arrays too, element by element: text[] keeps the dimensions and
        # the NULL elements, and its JSON holds strings where numeric[]'s holds numbers.
        # So are json and jsonb arrays other than a plain JSONField's: the ORM reads
        # their elements as psycopg loads them from their texts, which to_json would
        # embed (see declarations.json_texts_type).
        return sql.SQL("{}::text[]").format(ref)
    if column.internal_type == "BinaryField":
        # bytea_output is per session too: 'escape' would send another text.
        return sql.SQL("({} || encode({}, 'hex'))").format(sql.Literal("\\x"), ref)
    return ref


# Sent as JSON strings: numeric keeps every digit, and a JSON column its text, which
# the decoder reads with the field's own decoder as the ORM does.
_AS_TEXT = frozenset({"DecimalField", "JSONField"})
_MOMENT_RANGES = frozenset({"DateRangeField", "DateTimeRangeField"})


def _pause_check(declaration: Declaration) -> sql.Composable:
    """The function's first statement: return at once while ``pgnotify.paused`` is
    ``on`` (in any case, spaces around it ignored, as the labels of a list are
    compared) or lists this model.

    In the function rather than a trigger ``WHEN`` clause: PostgreSQL reads
    and compiles a statement trigger's ``WHEN`` again for every statement,
    which cost about 20 µs of a single-row write, where this costs one
    ``current_setting()`` and a comparison while nothing is paused. The list
    is looked at in a nested ``IF``: PL/pgSQL prepares an expression again in
    each transaction it runs in, so one that is never reached costs nothing.
    """
    setting = sql.SQL("current_setting({}, true)").format(sql.Literal(wire.PAUSED_SETTING))
    return sql.SQL(
        "  IF {setting} <> '' THEN\n"
        "    IF lower(btrim({setting})) = {all} OR strpos(',' || "
        "replace(lower({setting}), ' ', '') || ',', {label}) > 0 THEN\n"
        "      RETURN NULL;\n"
        "    END IF;\n"
        "  END IF;\n"
    ).format(
        setting=setting,
        all=sql.Literal(wire.PAUSED_ALL),
        label=sql.Literal(f",{declaration.label},"),
    )
