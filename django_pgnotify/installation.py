"""Installing triggers: compare declarations with a database, apply, prune.

Plain functions that the ``pgnotify_install`` command calls and that tests
and deploy scripts can call directly. Each works on one database alias and
runs in one transaction, serialised by an advisory lock, so concurrent
deploys cannot interleave.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from psycopg import sql

from . import triggers as trigger_sql
from .declarations import Declaration, get_declarations

logger = logging.getLogger("django_pgnotify.installation")

INSTALLED = "installed"
MISSING = "missing"
OUTDATED = "outdated"
UNKNOWN = "unknown"
NO_TABLE = "no table"

_LOCK_KEY = "django-pgnotify installation"

_OURS = """
SELECT t.tgrelid, t.tgname, obj_description(t.oid, 'pg_trigger'),
       format('%%I.%%I', n.nspname, c.relname), p.oid::oid,
       format('%%I.%%I', pn.nspname, p.proname)
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE NOT t.tgisinternal AND obj_description(t.oid, 'pg_trigger') LIKE %s
"""

_ORPHAN_FUNCTIONS = """
SELECT p.oid::oid, format('%%I.%%I', n.nspname, p.proname), obj_description(p.oid, 'pg_proc')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE obj_description(p.oid, 'pg_proc') LIKE %s
  AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgfoid = p.oid)
"""


@dataclass(frozen=True)
class TriggerState:
    """How one declaration (or one trigger nobody declares) stands in a database."""

    uri: str
    status: str
    table: str
    detail: str = ""
    sql: trigger_sql.TriggerSQL | None = None
    drop_sql: str = ""

    def __str__(self) -> str:
        text = f"{self.uri} on {self.table}: {self.status}"
        return f"{text} ({self.detail})" if self.detail else text


def declarations_for(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[Declaration]:
    """Declarations whose models the router migrates to ``using``."""
    return [d for d in get_declarations(selectors) if router.allow_migrate_model(using, d.model)]


def inspect_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Compare declarations with what is installed in ``using``.

    Returns one state per declaration (installed, missing, outdated, or no
    table yet) and one per trigger or function of ours that no selected
    declaration asks for (unknown). With selectors, unknown ones are reported
    only for the selected apps and models.
    """
    selectors = list(selectors)
    with connections[using].cursor() as cursor:
        return _inspect(cursor, declarations_for(selectors, using), selectors)


def install_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Create or update the triggers of every selected declaration.

    Idempotent: declarations already installed are not touched. Returns the
    states of those that were created or updated.

    Raises:
        TableMissing: A declared model's table does not exist (run ``migrate``).
    """
    selectors = list(selectors)
    changed = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        states = _inspect(cursor, declarations_for(selectors, using), selectors)
        missing_tables = [s for s in states if s.status == NO_TABLE]
        if missing_tables:
            raise TableMissing(missing_tables)
        stale = {s.uri: s for s in states if s.status == UNKNOWN}
        for state in states:
            built = state.sql
            if built is None or state.status == INSTALLED:
                continue
            cursor.execute(built.create_function)
            # Triggers left by an earlier version of this declaration (an event removed).
            if state.uri in stale:
                cursor.execute(stale.pop(state.uri).drop_sql)
            for create in built.create_triggers:
                cursor.execute(create)
            logger.info(
                "pgnotify: %s %s on %s",
                "updated" if state.status == OUTDATED else "installed",
                state.uri,
                state.table,
            )
            changed.append(state)
    return changed


def prune_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Drop triggers and functions of ours that no declaration asks for any more."""
    selectors = list(selectors)
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        unknown = [
            s
            for s in _inspect(cursor, declarations_for(selectors, using), selectors)
            if s.status == UNKNOWN
        ]
        for state in unknown:
            cursor.execute(state.drop_sql)
            logger.info("pgnotify: pruned %s on %s", state.uri, state.table)
    return unknown


def uninstall_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Drop every trigger and function of ours (within the selection)."""
    selectors = list(selectors)
    removed = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        for state in _inspect(cursor, declarations_for(selectors, using), selectors):
            if state.status in (MISSING, NO_TABLE):
                continue
            cursor.execute(state.sql.drop if state.sql is not None else state.drop_sql)
            logger.info("pgnotify: removed %s on %s", state.uri, state.table)
            removed.append(state)
    return removed


class TableMissing(Exception):
    """Triggers were asked for on tables that do not exist yet."""

    def __init__(self, states: list[TriggerState]) -> None:
        self.states = states
        names = ", ".join(f"{s.table} ({s.uri})" for s in states)
        super().__init__(f"table(s) {names} do not exist; run manage.py migrate first")


def _inspect(cursor, declarations: list[Declaration], selectors: list[str]) -> list[TriggerState]:
    cursor.execute(_OURS, [trigger_sql.MARKER + ":%"])
    installed = {(relid, name): rest for relid, name, *rest in cursor.fetchall()}
    expected_triggers: set[tuple[int, str]] = set()
    expected_functions: set[int] = set()
    states = []
    for declaration in declarations:
        built = trigger_sql.build_trigger_sql(declaration)
        table = built.table.as_string(None)
        cursor.execute(
            "SELECT to_regclass(%s)::oid, f::oid, (SELECT prosrc FROM pg_proc WHERE oid = f),"
            " obj_description(f, 'pg_proc') FROM to_regprocedure(%s) AS f",
            [table, built.function.as_string(None) + "()"],
        )
        relid, function_oid, body, function_comment = cursor.fetchone()
        if relid is None:
            states.append(TriggerState(built.uri, NO_TABLE, table, sql=built))
            continue
        if function_oid is not None:
            expected_functions.add(function_oid)
        keys = [(relid, name) for name in built.triggers.values()]
        expected_triggers.update(keys)
        problems = []
        if body is None:
            problems.append("function missing")
        elif body != built.body or function_comment != built.comment:
            problems.append("function differs")
        for relid_name in keys:
            row = installed.get(relid_name)
            if row is None:
                problems.append(f"trigger {relid_name[1]} missing")
            elif row[0] != built.comment:
                problems.append(f"trigger {relid_name[1]} differs")
        if not problems:
            states.append(TriggerState(built.uri, INSTALLED, table, sql=built))
        elif body is None and not any(k in installed for k in keys):
            states.append(TriggerState(built.uri, MISSING, table, sql=built))
        else:
            states.append(TriggerState(built.uri, OUTDATED, table, "; ".join(problems), built))

    # Ours in the database, but asked for by no selected declaration.
    stale: dict[str, list[tuple[str, str, int]]] = {}
    for key, (comment, table, function_oid, function) in installed.items():
        parsed = trigger_sql.parse_comment(comment)
        if key in expected_triggers or parsed is None or not _selected(parsed[0], selectors):
            continue
        stale.setdefault(parsed[0], []).append((key[1], table, function_oid, function))
    for uri, rows in stale.items():
        drops = [f"DROP TRIGGER IF EXISTS {_ident(name)} ON {table};" for name, table, _, _ in rows]
        drops += sorted(
            {
                f"DROP FUNCTION IF EXISTS {function}();"
                for _, _, oid, function in rows
                if oid not in expected_functions
            }
        )
        names = ", ".join(name for name, _, _, _ in rows)
        states.append(
            TriggerState(uri, UNKNOWN, rows[0][1], f"triggers {names}", drop_sql="\n".join(drops))
        )

    cursor.execute(_ORPHAN_FUNCTIONS, [trigger_sql.MARKER + ":%"])
    for oid, function, comment in cursor.fetchall():
        parsed = trigger_sql.parse_comment(comment)
        if parsed is None or oid in expected_functions or not _selected(parsed[0], selectors):
            continue
        states.append(
            TriggerState(
                parsed[0],
                UNKNOWN,
                "-",
                f"function {function} has no trigger",
                drop_sql=f"DROP FUNCTION IF EXISTS {function}();",
            )
        )
    return states


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _selected(uri: str, selectors: list[str]) -> bool:
    if not selectors:
        return True
    label = uri.split(":", 1)[0].lower()
    app_label = label.split(".", 1)[0]
    return any(s.lower() in (label, app_label) for s in selectors)
