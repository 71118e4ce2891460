"""Installing triggers: compare declarations with a database, apply, prune.

Plain functions that the ``pgnotify_install`` command calls and that tests
and deploy scripts can call directly. Each works on one database alias and
runs in one transaction, serialised by an advisory lock, so concurrent
deploys cannot interleave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from psycopg import sql

from . import triggers as trigger_sql
from .declarations import Declaration, get_declarations, raw_declarations, resolve_model

logger = logging.getLogger("django_pgnotify.installation")

INSTALLED = "installed"
MISSING = "missing"
OUTDATED = "outdated"
UNKNOWN = "unknown"
NO_TABLE = "no table"

_LOCK_KEY = "django-pgnotify installation"

# What a trigger does, as PostgreSQL prints it, and whether it is enabled.
# Hashed into its comment at install, so a trigger changed in place (CREATE OR
# REPLACE TRIGGER, ALTER TABLE DISABLE TRIGGER, a renamed column in its WHEN
# clause) no longer matches.
_TRIGGER_STATE = "left(md5(t.tgenabled::text || pg_get_triggerdef(t.oid)), 16)"

_OURS = f"""
SELECT t.tgrelid, t.tgname, obj_description(t.oid, 'pg_trigger'),
       format('%%I.%%I', n.nspname, c.relname), p.oid::oid,
       format('%%I.%%I', pn.nspname, p.proname), {_TRIGGER_STATE}
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
    """How one declaration (or one trigger nobody declares) stands in a database.

    ``drop_sql`` removes triggers and functions of ours under this URI that the
    declaration no longer asks for (for an unknown URI: all of them).
    """

    uri: str
    status: str
    table: str
    detail: str = ""
    sql: trigger_sql.TriggerSQL | None = None
    drop_sql: str = ""

    def __str__(self) -> str:
        text = f"{self.status}: {self.uri} on {self.table}"
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
    table yet) and one per URI of ours in the database that no selected
    declaration has (unknown). Triggers a declaration no longer asks for (an
    event removed) make it outdated. With selectors, unknown ones are reported
    only for the selected apps and models.
    """
    selectors = list(selectors)
    with connections[using].cursor() as cursor:
        return _inspect(cursor, declarations_for(selectors, using), selectors)


def install_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Create or update the triggers of every selected declaration.

    Idempotent: declarations already installed are not touched. Triggers of
    ours left by an earlier declaration of a model that still declares others
    (a renamed declaration) are dropped. Returns the states of what was
    created, updated or dropped.

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
        for state in states:
            if state.sql is not None and state.status != INSTALLED:
                _apply(cursor, state)
                changed.append(state)
        # A model's declaration renamed (or split in several) leaves the old
        # one's triggers firing beside the new: drop them with the install.
        declared = {s.uri.split(":", 1)[0] for s in states if s.sql is not None}
        for state in states:
            if state.status == UNKNOWN and state.uri.split(":", 1)[0] in declared:
                cursor.execute(state.drop_sql)
                logger.info("pgnotify: removed superseded %s on %s", state.uri, state.table)
                changed.append(state)
    return changed


def sync_triggers(using: str = DEFAULT_DB_ALIAS) -> list[TriggerState]:
    """Make ``using`` match the declarations of every installed app: what ``migrate`` runs.

    Like ``install_triggers`` followed by ``prune_triggers`` for the installed
    apps, in one transaction, but it never fails the caller for one model: a
    model whose table does not exist (yet, or any more) is skipped, and a
    model whose declaration is invalid (``manage.py check`` names the
    mistake) keeps what it has. Triggers of apps that are no longer installed
    are left to ``pgnotify_install --prune``: another project may share the
    database. Returns the states of what was created, updated or dropped.
    """
    declarations, invalid = _valid_declarations(using)
    app_labels = [config.label for config in apps.get_app_configs()]
    changed = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        for state in _inspect(cursor, declarations, app_labels):
            if state.status in (MISSING, OUTDATED) and state.sql is not None:
                _apply(cursor, state)
                changed.append(state)
            elif state.status == UNKNOWN and _model_label(state.uri) not in invalid:
                cursor.execute(state.drop_sql)
                logger.info("pgnotify: pruned %s on %s", state.uri, state.table)
                changed.append(state)
    return changed


def detach_triggers(affected: Callable[[str], bool], using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Drop our triggers on the tables of models for which ``affected(label)`` is true.

    ``label`` is the ``app_label.Model`` of the trigger's declaration URI. The
    functions stay (nothing calls them), so ``inspect_triggers`` reports the
    declarations outdated until ``install_triggers`` or ``sync_triggers``
    puts the triggers back. Returns ``"<uri> on <table>"`` for each declaration
    whose triggers were dropped.
    """
    dropped: dict[str, str] = {}
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        cursor.execute(_OURS, [trigger_sql.MARKER + ":%"])
        for _, name, comment, table, *_rest in cursor.fetchall():
            parsed = trigger_sql.parse_comment(comment)
            if parsed is None or not affected(parsed[0].split(":", 1)[0]):
                continue
            cursor.execute(f"DROP TRIGGER IF EXISTS {_ident(name)} ON {table}")
            dropped[parsed[0]] = table
    for uri, table in dropped.items():
        logger.info("pgnotify: dropped the triggers of %s on %s until migrate ends", uri, table)
    return [f"{uri} on {table}" for uri, table in dropped.items()]


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
            if state.drop_sql:  # leftovers first: they may use the declaration's function
                cursor.execute(state.drop_sql)
            if state.sql is not None:
                cursor.execute(state.sql.drop)
            logger.info("pgnotify: removed %s on %s", state.uri, state.table)
            removed.append(state)
    return removed


def _apply(cursor, state: TriggerState) -> None:
    """Create or rebuild one declaration's function and triggers."""
    built = state.sql
    assert built is not None
    cursor.execute(built.create_function)
    if state.drop_sql:  # left by an earlier version of this declaration
        cursor.execute(state.drop_sql)
    for create in built.create_triggers:
        cursor.execute(create)
    _seal(cursor, built)
    logger.info(
        "pgnotify: %s %s on %s",
        "updated" if state.status == OUTDATED else "installed",
        state.uri,
        state.table,
    )


def _valid_declarations(using: str) -> tuple[list[Declaration], set[str]]:
    """Declarations of every model migrated to ``using``, and the lower-case
    labels of models whose declaration is invalid (reported, not raised)."""
    declarations: list[Declaration] = []
    invalid: set[str] = set()
    for model in apps.get_models():
        found, errors = resolve_model(model, raw_declarations(model))
        serious = [e for e in errors if e.is_serious()]
        if serious:
            invalid.add(model._meta.label_lower)
            logger.error(
                "pgnotify: %s keeps its current triggers: %s (%s)",
                model._meta.label,
                serious[0].msg,
                serious[0].id,
            )
        elif router.allow_migrate_model(using, model):
            declarations.extend(found)
    return declarations, invalid


def _model_label(uri: str) -> str:
    return uri.split(":", 1)[0].lower()


def _seal(cursor, built: trigger_sql.TriggerSQL) -> None:
    """Append to each trigger's comment the hash of its state in the catalogue."""
    cursor.execute(
        f"SELECT t.tgname, {_TRIGGER_STATE} FROM pg_trigger t"
        " WHERE t.tgrelid = to_regclass(%s) AND t.tgname = ANY(%s)",
        [built.table.as_string(None), list(built.triggers.values())],
    )
    for name, state in cursor.fetchall():
        cursor.execute(
            sql.SQL("COMMENT ON TRIGGER {} ON {} IS {}")
            .format(sql.Identifier(name), built.table, sql.Literal(f"{built.comment} {state}"))
            .as_string(None)
        )


def _matches(comment: str, state: str, built: trigger_sql.TriggerSQL) -> bool:
    """Whether a trigger is the one ``built`` describes, unchanged since install.

    A trigger created from ``pgnotify_install --sql`` output carries no state
    hash; its comment alone is compared.
    """
    if comment == built.comment:
        return True
    base, _, sealed = comment.rpartition(" ")
    return base == built.comment and sealed == state


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
    server_version = cursor.connection.info.server_version
    for declaration in declarations:
        built = trigger_sql.build_trigger_sql(declaration, server_version)
        table = built.table.as_string(None)
        cursor.execute(
            "SELECT r::oid, f::oid, (SELECT prosrc FROM pg_proc WHERE oid = f),"
            " obj_description(f, 'pg_proc'),"
            " ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = r AND NOT tgisinternal)"
            " FROM to_regclass(%s) AS r, to_regprocedure(%s) AS f",
            [table, built.function.as_string(None) + "()"],
        )
        relid, function_oid, body, function_comment, on_table = cursor.fetchone()
        # What is installed is compared with ``reference``; a repair installs ``built``.
        reference = built
        if body is not None and (body, function_comment) != (built.body, built.comment):
            # ``--sql`` does not connect, so it prints SQL that every server runs:
            # triggers installed from it count as installed, and a repair
            # rebuilds them in this server's own form.
            portable = trigger_sql.build_trigger_sql(declaration)
            if (body, function_comment) == (portable.body, portable.comment):
                reference = portable
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
        elif body != reference.body or function_comment != reference.comment:
            problems.append("function differs")
        for relid_name in keys:
            row = installed.get(relid_name)
            if row is not None and not _matches(row[0], row[-1], reference):
                problems.append(f"trigger {relid_name[1]} differs")
            elif row is None and relid_name[1] in on_table:
                problems.append(f"trigger {relid_name[1]} lacks our comment")
            elif row is None:
                problems.append(f"trigger {relid_name[1]} missing")
        if not problems:
            states.append(TriggerState(built.uri, INSTALLED, table, sql=built))
        elif body is None and not any(name in on_table for name in built.triggers.values()):
            states.append(TriggerState(built.uri, MISSING, table, sql=built))
        else:
            states.append(TriggerState(built.uri, OUTDATED, table, "; ".join(problems), built))

    # Ours in the database, but asked for by no selected declaration, by URI.
    leftovers: dict[str, _Leftovers] = {}
    for key, (comment, table, function_oid, function, _) in installed.items():
        parsed = trigger_sql.parse_comment(comment)
        if key in expected_triggers or parsed is None or not _selected(parsed[0], selectors):
            continue
        found = leftovers.setdefault(parsed[0], _Leftovers())
        found.triggers.append((key[1], table))
        if function_oid not in expected_functions:
            found.functions.add(function)
    cursor.execute(_ORPHAN_FUNCTIONS, [trigger_sql.MARKER + ":%"])
    for oid, function, comment in cursor.fetchall():
        parsed = trigger_sql.parse_comment(comment)
        if parsed is None or oid in expected_functions or not _selected(parsed[0], selectors):
            continue
        leftovers.setdefault(parsed[0], _Leftovers()).functions.add(function)

    by_uri = {state.uri: index for index, state in enumerate(states)}
    for uri, found in leftovers.items():
        index = by_uri.get(uri)
        if index is not None and states[index].status != NO_TABLE:
            # Left by an earlier version of a declaration (an event removed, a
            # table renamed): installing or removing the declaration drops them.
            state = states[index]
            detail = "; ".join(filter(None, [state.detail, f"no longer declared: {found}"]))
            states[index] = replace(state, status=OUTDATED, detail=detail, drop_sql=found.drop)
        else:
            table = found.triggers[0][1] if found.triggers else "-"
            states.append(TriggerState(uri, UNKNOWN, table, str(found), drop_sql=found.drop))
    return states


@dataclass
class _Leftovers:
    """Triggers ``(name, table)`` and functions of ours that nothing declares."""

    triggers: list[tuple[str, str]] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        names = [f"trigger {name}" for name, _ in self.triggers]
        if not self.triggers:
            names += [f"function {function} has no trigger" for function in sorted(self.functions)]
        return ", ".join(names)

    @property
    def drop(self) -> str:
        # Functions last: a trigger depends on its function.
        statements = [f"DROP TRIGGER IF EXISTS {_ident(n)} ON {t};" for n, t in self.triggers]
        statements += [f"DROP FUNCTION IF EXISTS {f}();" for f in sorted(self.functions)]
        return "\n".join(statements)


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _selected(uri: str, selectors: list[str]) -> bool:
    if not selectors:
        return True
    label = uri.split(":", 1)[0].lower()
    app_label = label.split(".", 1)[0]
    return any(s.lower() in (label, app_label) for s in selectors)
