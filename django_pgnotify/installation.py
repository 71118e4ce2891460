"""Installing triggers: compare declarations with a database, apply, prune.

Plain functions that the ``pgnotify_install`` command calls and that tests
and deploy scripts can call directly. Each works on one database alias and
runs in one transaction, serialised by an advisory lock, so concurrent
deploys cannot interleave.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.db.migrations.recorder import MigrationRecorder
from psycopg import sql

from . import triggers as trigger_sql
from . import wire
from .declarations import Declaration, get_declarations, raw_declarations, resolve_model

logger = logging.getLogger("django_pgnotify.installation")

INSTALLED = "installed"
MISSING = "missing"
OUTDATED = "outdated"
UNKNOWN = "unknown"
NO_TABLE = "no table"
NO_EVENT_TABLE = "no event table"
NOT_A_TABLE = "not a table"
CONFLICT = "conflict"

#: Statuses of declarations no install can serve as they are: they need changing.
NEEDS_CHANGE = (NOT_A_TABLE, CONFLICT)

# Declarations nothing is installed for as they are: ``install_triggers`` stops
# before changing anything, ``sync_triggers`` leaves them alone and says why.
# A durable declaration's trigger writes to the event table: without it, every
# write to the model's table would fail.
_REFUSED = (NO_TABLE, NO_EVENT_TABLE, *NEEDS_CHANGE)
#: Statuses of a declaration whose changes are not sent at all (one in conflict may
#: still have its triggers).
NOT_SENDING = (MISSING, NO_TABLE, NO_EVENT_TABLE, NOT_A_TABLE)

_LOCK_KEY = "django-pgnotify installation"

# What a trigger does, as PostgreSQL prints it, and whether it is enabled.
# Hashed into its comment at install, so a trigger changed in place (CREATE OR
# REPLACE TRIGGER, ALTER TABLE DISABLE TRIGGER, its table renamed) no longer
# matches. pg_get_triggerdef() leaves out the schema of the names the session's
# search_path finds, so the hash stored is taken with an empty one
# (``_trigger_hashes``).
_TRIGGER_STATE = "left(md5(t.tgenabled::text || pg_get_triggerdef(t.oid)), 16)"

_OURS = """
SELECT t.oid::oid, t.tgrelid, t.tgname, obj_description(t.oid, 'pg_trigger'),
       ARRAY[n.nspname::text, c.relname::text], p.oid::oid,
       ARRAY[pn.nspname::text, p.proname::text], obj_description(p.oid, 'pg_proc'), p.prosrc,
       t.tgenabled::text
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE NOT t.tgisinternal AND obj_description(t.oid, 'pg_trigger') LIKE %s
ORDER BY c.relispartition, t.oid
"""

# Whether this session finds the event table as the durable triggers name it
# (unqualified, on the search_path), and the schemas that have a relation of
# that name: pg_class and pg_namespace are readable by every role, whatever it
# may use, and to_regclass() skips the schemas of the path it may not use.
_EVENT_TABLE = """
SELECT to_regclass(%s) IS NOT NULL, current_setting('search_path'),
       ARRAY(SELECT n.nspname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = %s ORDER BY 1)
"""

# Which of the event table's columns (``%s``, a text array) the table (``%s``)
# lacks: after an upgrade, before migrate has added those of a new migration.
_MISSING_COLUMNS = """
SELECT ARRAY(SELECT c FROM unnest(%s::text[]) WITH ORDINALITY AS u(c, i)
             WHERE NOT EXISTS (SELECT FROM pg_attribute a
                               WHERE a.attrelid = to_regclass(%s) AND a.attname = c
                                 AND a.attnum > 0 AND NOT a.attisdropped)
             ORDER BY i)
"""

# Written after the reason a durable declaration has no event table when its
# installed triggers write to it: they fail every write to the table.
_FAILING_WRITES = "; until then, its installed triggers make every write to the table fail"

_ORPHAN_FUNCTIONS = """
SELECT p.oid::oid, ARRAY[n.nspname::text, p.proname::text], obj_description(p.oid, 'pg_proc')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE obj_description(p.oid, 'pg_proc') LIKE %s
  AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgfoid = p.oid)
"""

# What pg_class.relkind says a relation is, for those that cannot have our triggers.
_RELATION_KINDS = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "c": "a composite type",
    "i": "an index",
    "I": "a partitioned index",
    "t": "a TOAST table",
}


@dataclass(frozen=True)
class TriggerState:
    """How one declaration (or one trigger nobody declares) stands in a database.

    ``drop_sql`` removes triggers and functions of ours under this URI that the
    declaration no longer asks for (for an unknown URI: all of them). For a
    declaration it runs after its own triggers were rebuilt or dropped: after
    a table was renamed, they call the function it drops. For a durable
    declaration with no event table (``NO_EVENT_TABLE``) it drops its
    installed triggers that write to the event table, when that is in no
    schema of the database: each write to the table would fail. For a
    declaration in conflict (``CONFLICT``) it drops what is installed under
    its names for it, and nothing of ``kept``.

    ``kept`` names, for a declaration in conflict, the declarations outside
    the selection whose installed triggers have its names on its table (and
    whose function may have its name): uninstalling it leaves those, which
    are theirs and may be working for them.

    ``unusable`` names, for a missing or outdated declaration, the partitions
    of its table in a schema this role may not use (no ``USAGE``): it can
    neither create nor drop their triggers, so ``install_triggers`` refuses
    the declaration and ``sync_triggers`` leaves it as it is (``detail`` says
    what to grant). Its SQL (``pgnotify_install --sql``) serves a role that may.
    For a state whose drops name tables or functions in such schemas (an
    unknown URI's, as ``inspect_triggers`` returns it; those ``CannotInstall``
    and ``CannotRemove`` name), it names them, and ``detail`` says first what
    to grant: this role can drop neither them nor, all or nothing, the rest.
    """

    uri: str
    status: str
    table: str
    detail: str = ""
    sql: trigger_sql.TriggerSQL | None = None
    drop_sql: str = ""
    kept: tuple[str, ...] = ()
    unusable: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.status}: {self.subject}"
        return f"{text} ({self.detail})" if self.detail else text

    @property
    def subject(self) -> str:
        """``<uri> on <table>``, or the URI alone for functions of ours with no
        trigger (``table`` is ``"-"``): what messages name."""
        return self.uri if self.table == "-" else f"{self.uri} on {self.table}"

    @property
    def kept_detail(self) -> str:
        """What uninstalling it leaves of the ``kept`` declarations, and why ("" for nothing)."""
        if not self.kept:
            return ""
        return (
            f"left what {' and '.join(self.kept)} installed on {self.table}: "
            f"{'it is' if len(self.kept) == 1 else 'they are'} not selected, and {self.uri} "
            "declares the same names (conflict)"
        )

    @property
    def uninstall_sql(self) -> str:
        """What ``uninstall_triggers`` runs for this state ("" for nothing).

        Every trigger goes before any function: after a table was renamed, the
        declaration's triggers still call the function of the old name.
        """
        built = self.sql
        if built is None or self.status in (MISSING, NO_TABLE, NOT_A_TABLE, CONFLICT):
            return self.drop_sql
        if self.status == NO_EVENT_TABLE:  # its drop_sql drops its own triggers
            return built.drop
        return "\n".join(filter(None, [built.drop_triggers, self.drop_sql, built.drop_function]))

    @property
    def install_sql(self) -> str:
        """What ``install_triggers`` runs for this state when it changes it ("" for nothing).

        A missing or outdated declaration's function and triggers, between the
        drops of the triggers an earlier version left and of its functions (the
        old triggers may have called them); an unknown URI's drop, for a
        superseded declaration. The old triggers go first: on a partitioned
        table, a declaration's statement triggers on the partitions have the
        names its row triggers, cloned onto them, would take. The installer then
        adds to each trigger's comment a hash of its state, which SQL run by hand
        lacks.
        """
        if self.status == UNKNOWN:
            return self.drop_sql
        if self.sql is None or self.status not in (MISSING, OUTDATED):
            return ""
        drop_triggers, drop_functions = split_drops(self.drop_sql)
        return "\n".join([*drop_triggers, self.sql.install, *drop_functions])


def describe_change(state: TriggerState, verb: str = "Installed") -> str:
    """One line for a change made to ``state``, as ``pgnotify_install`` and ``migrate``
    print it: ``Installed shop.Order:default on "shop_order"``, ``Updated ...`` for
    an outdated declaration rebuilt, ``Removed ...`` for triggers dropped (no
    declaration asks for them, or they would write to a missing event table).

    Args:
        state: A state that ``install_triggers``, ``sync_triggers``,
            ``prune_triggers`` or ``uninstall_triggers`` returned.
        verb: ``"Installed"`` for an install or sync, whose states say which of
            the words above applies; any other verb (``"Pruned"``, ``"Removed"``)
            is used as it is.
    """
    if verb == "Installed":
        verb = {OUTDATED: "Updated", UNKNOWN: "Removed", NO_EVENT_TABLE: "Removed"}.get(
            state.status, verb
        )
    return f"{verb} {state.subject}"


def declarations_for(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[Declaration]:
    """Declarations whose models the router migrates to ``using``."""
    return [d for d in get_declarations(selectors) if router.allow_migrate_model(using, d.model)]


def require_declarations(
    selectors: Iterable[str], aliases: Iterable[str], *, or_installed: bool = False
) -> None:
    """Refuse selectors whose models declare nothing for any of ``aliases``.

    Selectors that name only such models are a mistake (a typo'd app, the wrong
    ``--database``), not a request to do nothing. No selectors asks for
    whatever is declared, so nothing is refused then.

    Args:
        or_installed: Also accept selectors whose models have triggers or
            functions of ours installed in one of ``aliases`` (looked up only
            when they declare nothing): what checking reports, and pruning
            and uninstalling drop, of models that stopped declaring.

    Raises:
        NothingDeclared: Selectors were given, and none of their models has a
            declaration the router migrates to one of ``aliases`` (nor, with
            ``or_installed``, anything of ours installed there).
    """
    selectors, aliases = list(selectors), list(aliases)
    if not selectors or any(declarations_for(selectors, alias) for alias in aliases):
        return
    if or_installed and any(
        _selected(uri, selectors) for alias in aliases for uri in _installed_uris(alias)
    ):
        return
    raise NothingDeclared(selectors, aliases, or_installed=or_installed)


def _installed_uris(using: str) -> set[str]:
    """The URIs in the comments of the triggers and functions of ours in ``using``."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT obj_description(oid, 'pg_trigger') FROM pg_trigger"
            " WHERE obj_description(oid, 'pg_trigger') LIKE %s"
            " UNION SELECT obj_description(oid, 'pg_proc') FROM pg_proc"
            " WHERE obj_description(oid, 'pg_proc') LIKE %s",
            [trigger_sql.MARKER + ":%"] * 2,
        )
        parsed = [trigger_sql.parse_comment(comment) for (comment,) in cursor.fetchall()]
    return {found[0] for found in parsed if found is not None}


def inspect_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Compare declarations with what is installed in ``using``.

    Returns one state per declaration (installed, missing, outdated, no table
    yet, not a table, or in conflict with another model's declaration) and
    one per URI of ours in the database that no selected declaration has
    (unknown). Triggers a declaration no longer asks for (an event removed)
    make it outdated. With selectors, unknown ones are reported only for the
    selected apps and models. What a declaration of a model the router sends
    to another alias has installed is not unknown here: that alias may name
    this same database (a pooler in front of it), and it is that alias's.
    An unknown one with a trigger on a table (a partition, say), or a
    function, in a schema this role may not use says so first, with the grant
    pruning it needs; so does an outdated one that its install must drop
    there (what an earlier version left).
    """
    selectors = list(selectors)
    # A transaction: the trigger hashes are taken with a search_path set for it.
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        return _with_undroppable(
            cursor, _inspect(cursor, declarations_for(selectors, using), selectors)
        )


def install_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Create or update the triggers of every selected declaration.

    Idempotent: declarations already installed are not touched. Triggers of
    ours left by an earlier declaration of a model that still declares others
    (a renamed declaration), or by the same declaration on its table's former
    name, are dropped. All or nothing: one transaction, which an error rolls
    back. Returns the states of what was created, updated or dropped.

    Raises:
        TableMissing: A declared model's table does not exist (run ``migrate``).
        CannotInstall: A declared model's table is not a table (a view, for
            instance), two models' declarations would install the same
            triggers (on a partitioned table, a row-level declaration's and
            one on a partition of it included), a durable declaration's event
            table does not exist (run ``migrate``), or a partition of a
            declaration's table to change, or a table or function of ours to drop,
            is in a schema this role may not use (``TriggerState.unusable``);
            nothing was changed.
        InstallFailed: The database refused a declaration's SQL; nothing was
            changed.
    """
    selectors = list(selectors)
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        changes = _install_plan(cursor, selectors, using)
        # Its triggers on those partitions can be neither made nor dropped; nor can what
        # an earlier version left on a table in such a schema.
        blocked = {state.uri: state for state in changes if state.unusable}
        for state in _undroppable(
            cursor,
            [state for state in changes if not state.unusable],
            lambda state: state.drop_sql,
            "pgnotify_install",
        ):
            blocked[state.uri] = state
        if blocked:
            raise CannotInstall([blocked[s.uri] for s in changes if s.uri in blocked])
        for state in changes:
            if state.status == UNKNOWN:
                _refused_by_database(_drop_leftovers, cursor, state)
                logger.info("pgnotify: removed superseded %s", state.subject)
            else:
                _refused_by_database(_apply, cursor, state)
    return changes


def install_plan(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS, *, awaiting_migrate: bool = False
) -> list[TriggerState]:
    """What ``install_triggers`` would change now, in its order; changes nothing.

    ``pgnotify_install --sql`` prints the ``install_sql`` of each state, so
    that the SQL shown is the SQL run, the drops of superseded declarations
    and of outdated leftovers included.

    Args:
        awaiting_migrate: Also return, instead of refusing them, the states of
            declarations that wait for ``migrate`` (``NO_TABLE``,
            ``NO_EVENT_TABLE``): their ``install_sql`` is empty, their
            ``sql.install`` what install runs once their tables are there.

    Raises:
        TableMissing: As ``install_triggers``.
        CannotInstall: As ``install_triggers``.
    """
    selectors = list(selectors)
    # A transaction: the trigger hashes are taken with a search_path set for it.
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        return _install_plan(cursor, selectors, using, awaiting_migrate)


def _install_plan(
    cursor, selectors: list[str], using: str, awaiting_migrate: bool = False
) -> list[TriggerState]:
    """The states ``install_triggers`` changes, in the order it changes them."""
    states = _inspect(cursor, declarations_for(selectors, using), selectors)
    waiting = [s for s in states if awaiting_migrate and s.status in (NO_TABLE, NO_EVENT_TABLE)]
    refused = [s for s in states if s.status in _REFUSED and s not in waiting]
    if refused and all(s.status == NO_TABLE for s in refused):
        raise TableMissing(refused)
    if refused:
        raise CannotInstall(refused)
    changes = [s for s in states if s.sql is not None and s.status != INSTALLED]
    # A model's declaration renamed (or split in several) leaves the old
    # one's triggers firing beside the new: drop them with the install (not
    # before migrate lets the new ones in).
    declared = {s.uri.split(":", 1)[0] for s in states if s.sql is not None and s not in waiting}
    changes += [s for s in states if s.status == UNKNOWN and s.uri.split(":", 1)[0] in declared]
    return changes


def sync_triggers(
    using: str = DEFAULT_DB_ALIAS, detached: Iterable[Detached] = ()
) -> list[TriggerState]:
    """Make ``using`` match the declarations of every installed app: what ``migrate`` runs.

    Like ``install_triggers`` followed by ``prune_triggers`` for the installed
    apps, in one transaction, but it never fails the caller for one model: a
    model whose table does not exist (yet, or any more) is skipped; a model
    whose declaration is invalid (``manage.py check`` names the mistake), or
    shares its triggers' names with another model's, keeps what it has; a
    model on a view (or anything else that cannot have the triggers) gets
    none; a durable declaration whose event table does not exist (the
    database lacks django_pgnotify's migrations) gets none either, and loses
    the installed triggers that write to it, which would fail every write to
    its table; one whose event table is in a schema this session's
    search_path misses gets none and keeps what it has; so does one whose
    table or function this role cannot look up (no ``USAGE`` on its schema),
    or whose table has a partition in a schema this role may not use.
    Each declaration is installed in a savepoint of its own: one the database
    refuses is rolled back alone. Everything left alone is logged as an error
    naming the model.

    ``detached`` are the triggers ``detach_triggers`` disabled before the
    migration: those this sync neither rebuilt nor dropped are enabled again
    as they were, so that what it keeps is what the model had before.
    Triggers of apps that are no longer installed are left to
    ``pgnotify_install --prune``: another project may share the database.
    So are those of declarations the router sends to another alias, which may
    name this same database (``inspect_triggers``): an alias the router keeps
    the models off must not prune what they installed through the other.
    Returns the states of what was created, updated or dropped.
    """
    declarations, invalid = _valid_declarations(using)
    app_labels = [config.label for config in apps.get_app_configs()]
    changed = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        targets = _readable(cursor, declarations)
        readable = [target.built.declaration for target in targets]
        hidden = {_model_label(d.uri) for d in declarations if d not in readable}
        states = _inspect(cursor, readable, app_labels, declarations, targets)
        kept = invalid | hidden | {_model_label(s.uri) for s in states if s.status == CONFLICT}
        # What this role cannot drop is kept as it is, and said why; not for the models
        # kept already, whose triggers are unknown here (their reason is logged).
        states = _with_undroppable(cursor, states, kept)
        kept |= {_model_label(s.uri) for s in states if s.unusable}
        durable = {_model_label(s.uri) for s in states if s.status == NO_EVENT_TABLE}
        problem = _event_table_problem(cursor) if durable else None
        if problem is not None and not problem.gone:
            kept |= durable  # off this session's search_path: writers may find it
        for state in states:
            if state.status in NEEDS_CHANGE:
                logger.error(
                    "pgnotify: %s on %s is not installed: %s", state.uri, state.table, state.detail
                )
            elif state.unusable and state.status == UNKNOWN:
                logger.error(
                    "pgnotify: %s on %s is no longer declared, but kept: %s",
                    state.uri,
                    state.table,
                    state.detail,
                )
            elif state.unusable:
                logger.error(
                    "pgnotify: %s on %s is not installed, and keeps what it has: %s",
                    state.uri,
                    state.table,
                    state.detail,
                )
            elif state.status in (MISSING, OUTDATED) and state.sql is not None:
                if _in_savepoint(using, _apply, cursor, state):
                    changed.append(state)
            elif state.status == NO_EVENT_TABLE:
                reason = state.detail.removesuffix(_FAILING_WRITES)
                if not state.drop_sql:
                    logger.error(
                        "pgnotify: %s on %s is not installed: %s", state.uri, state.table, reason
                    )
                elif _in_savepoint(using, _drop_leftovers, cursor, state):
                    logger.error(
                        "pgnotify: dropped the triggers of %s on %s, which made every write "
                        "to it fail: %s",
                        state.uri,
                        state.table,
                        reason,
                    )
                    changed.append(state)
            elif (
                state.status == UNKNOWN
                and _model_label(state.uri) not in kept
                and _in_savepoint(using, _drop_leftovers, cursor, state)
            ):
                logger.info("pgnotify: pruned %s", state.subject)
                changed.append(state)
        # What it kept as it is: enabled again, in the state it had before the
        # migration (a rebuilt trigger is enabled; one left disabled, by this
        # migration or a failed one, is of a declaration the sync keeps).
        managed = {_model_label(d.uri) for d in declarations} | invalid
        _enable_kept(cursor, managed, {(r.relid, n): e for r in detached for n, e in r.triggers})
    _warn_unclaimed(using, changed)
    return changed


def left_unclaimed(using: str, states: Iterable[TriggerState]) -> dict[str, int]:
    """Pending durable changes per URI that ``states`` leave for no listener to claim:
    those of declarations whose triggers are (or would be) dropped, or rebuilt as live
    ones, that no durable declaration of ``using`` has any more.

    Raises:
        DatabaseError: The event table could not be read as expected.
    """
    from .status import unclaimed_events  # status imports this module

    uris = [
        state.uri
        for state in states
        if state.status == UNKNOWN
        or (state.sql is not None and not state.sql.declaration.notify.durable)
    ]
    return unclaimed_events(using, uris) if uris else {}


def unclaimed_warnings(using: str, states: list[TriggerState]) -> list[str]:
    """What ``left_unclaimed`` finds, one warning per URI that says what to do: a
    declaration made live keeps its URI, which the remedies of a renamed one do not.

    Raises:
        DatabaseError: The event table could not be read as expected.
    """
    from .status import unclaimed_warning

    unclaimed = left_unclaimed(using, states)
    live = set(declared_uris(using, durable=False)) if unclaimed else set()
    return [unclaimed_warning(uri, changes, live=uri in live) for uri, changes in unclaimed.items()]


def declared_uris(using: str, *, durable: bool) -> list[str]:
    """The URIs of the valid durable (or live) declarations of the models migrated to
    ``using``. An invalid declaration is left out, not raised: the checks report it, and
    ``migrate``'s sync goes on without it."""
    declarations, _ = _valid_declarations(using, log=False)
    return sorted(d.uri for d in declarations if d.notify.durable == durable)


def _warn_unclaimed(using: str, changed: list[TriggerState]) -> None:
    """Log ``unclaimed_warnings``, as ``pgnotify_install`` says them, for projects that
    leave installing to ``migrate``."""
    try:
        warnings = unclaimed_warnings(using, changed)
    except DatabaseError as exc:  # the sync is done: say so, not fail the migrate
        logger.warning(
            "pgnotify: cannot look for pending durable events of the declarations removed "
            "from database %r: %s",
            using,
            " ".join(str(exc).split()),
        )
        return
    for warning in warnings:
        logger.warning("pgnotify: %s", warning)


def _readable(cursor, declarations: list[Declaration]) -> list[_Target]:
    """The targets of the declarations whose table and function this role can look
    up; each other is logged as an error naming its model (a schema it lacks
    ``USAGE`` on)."""
    server_version = cursor.connection.info.server_version
    found = []
    for declaration in declarations:
        try:
            with transaction.atomic(using=cursor.db.alias):
                target = _target(cursor, declaration, server_version)
        except OperationalError:
            raise  # the connection or the statement timeout: not this declaration's
        except DatabaseError as exc:
            table = trigger_sql.table_identifier(declaration)
            logger.error(
                "pgnotify: %s on %s is not installed, and keeps what it has: its table or "
                "function cannot be looked up: %s",
                declaration.uri,
                table.as_string(None),
                " ".join(str(exc).split()),
            )
        else:
            found.append(target)
    return found


@dataclass(frozen=True)
class Detached:
    """The triggers of one declaration on one table that ``detach_triggers`` disabled.

    ``triggers`` are ``(name, pg_trigger.tgenabled)`` as they were:
    ``sync_triggers`` enables again, in that state, those it neither rebuilt
    nor dropped (``_enable_kept``).
    """

    uri: str
    relid: int
    table: str
    triggers: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return f"{self.uri} on {self.table}"


_COLUMNS = (
    "SELECT ARRAY(SELECT attname::text FROM pg_attribute"
    " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum)"
)

# ALTER TABLE ... <this> TRIGGER, for each pg_trigger.tgenabled.
_ENABLE = {"O": "ENABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA", "D": "DISABLE"}


def _enable_kept(cursor, managed: set[str], before: dict[tuple[int, str], str]) -> None:
    """Enable the disabled triggers of ours whose model is among ``managed``, in the
    state ``before`` gives (``(relid, name)``: ``pg_trigger.tgenabled`` before the
    migration), ``ENABLE`` otherwise; those of one table in a savepoint.

    Left disabled, with an error naming the model: triggers whose function reads
    a column its table no longer has (the migration renamed or dropped it), or
    writes one the event table lacks (its migrations rolled back): enabled,
    they would fail every write to the table. One disabled before the migration
    (by hand, or by a migrate that failed) is enabled, as the rebuild of a
    declaration the sync does not keep would enable it.
    """
    cursor.execute(_OURS, [trigger_sql.MARKER + ":%"])
    # (uri, relid) -> the table, its disabled triggers with the state to restore, and
    # the bodies of the functions they call.
    found: dict[tuple[str, int], tuple[tuple[str, ...], list[tuple[str, str]], set[str]]] = {}
    for _, relid, name, comment, table, _, _, _, body, enabled in cursor.fetchall():
        parsed = trigger_sql.parse_comment(comment)
        if enabled != "D" or parsed is None or _model_label(parsed[0]) not in managed:
            continue
        # Disabled before too (by hand, or by a migrate that failed): enabled, as a
        # rebuild would enable it.
        state = before.get((relid, name), "O").replace("D", "O")
        _, triggers, bodies = found.setdefault((parsed[0], relid), (tuple(table), [], set()))
        triggers.append((name, state))
        bodies.add(body or "")
    for (uri, relid), (names, triggers, bodies) in found.items():
        table = sql.Identifier(*names)
        where = table.as_string(None)
        read = _columns_gone(cursor, relid, bodies)
        # What would fail every write to the table, and what makes it installable again.
        if read:
            lacking, missing, verb, until = (
                "its table no longer has",
                read,
                "read",
                "it can be installed",
            )
        else:
            lacking, missing, verb, until = (
                "the event table lacks",
                _event_columns_missing(cursor, bodies),
                "write",
                "django_pgnotify's migrations are applied",
            )
        if missing:
            logger.error(
                "pgnotify: the triggers of %s on %s stay disabled: %s %s, which they %s "
                "(every write to the table would fail); once %s, manage.py pgnotify_install "
                "rebuilds them",
                uri,
                where,
                lacking,
                ", ".join(_qualified((c,)) for c in missing),
                verb,
                until,
            )
            continue
        statements = [
            sql.SQL("ALTER TABLE {} {} TRIGGER {}")
            .format(table, sql.SQL(_ENABLE.get(state, "ENABLE")), sql.Identifier(name))
            .as_string(None)
            for name, state in triggers
        ]
        try:
            with transaction.atomic(using=cursor.db.alias):
                cursor.execute(";\n".join(statements))
        except DatabaseError as exc:
            logger.error(
                "pgnotify: the triggers of %s on %s stay disabled: %s",
                uri,
                where,
                " ".join(str(exc).split()),
            )
            continue
        logger.info(
            "pgnotify: the triggers of %s on %s are enabled again as they were before the "
            "migration",
            uri,
            where,
        )


# A column a trigger function reads: by the alias of a row (``n``, ``o``, ``NEW``,
# ``OLD``), quoted as every template renders it.
_COLUMN_READ = re.compile(r'(?<![\w"$])"?(?:n|o|NEW|OLD)"?\."((?:[^"]|"")+)"')


def _columns_read(body: str) -> set[str]:
    """The table columns a function of ours reads (the position it numbers rows in aside)."""
    names = {match.group(1).replace('""', '"') for match in _COLUMN_READ.finditer(body)}
    return names - {trigger_sql.POSITION}


def _columns_gone(cursor, relid: int, bodies: Iterable[str]) -> list[str]:
    """The columns functions of ours with these ``bodies`` read and the table ``relid``
    no longer has (a migration dropped or renamed them): each write they fire on fails."""
    cursor.execute(_COLUMNS, [relid])
    (columns,) = cursor.fetchone()
    return sorted({c for body in bodies for c in _columns_read(body)} - set(columns))


# The column list of a durable function's insert into the event table.
_EVENT_INSERT = re.compile(
    r"INSERT INTO\s+(?:\"?[^\s\"(]+\"?\.)?\"?" + re.escape(wire.EVENT_TABLE) + r"\"?\s*\(([^)]*)\)"
)


def _event_columns_missing(cursor, bodies: Iterable[str]) -> list[str]:
    """The columns that durable functions of these ``bodies`` write and the event table
    (as this session finds it) lacks: all of them if it finds none.

    The table of the triggers installed before an upgrade may lack columns of later
    migrations that they do not write, and keep working; one rolled back to an
    earlier migration lacks columns they do write.
    """
    written = {
        column.strip().strip('"')
        for body in bodies
        for match in _EVENT_INSERT.finditer(body)
        for column in match.group(1).split(",")
    }
    if not written:
        return []
    cursor.execute(
        "SELECT ARRAY(SELECT attname::text FROM pg_attribute"
        " WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped)",
        [wire.EVENT_TABLE],
    )
    (present,) = cursor.fetchone()
    return sorted(written - set(present))


def detach_triggers(
    affected: Callable[[str], bool], using: str = DEFAULT_DB_ALIAS
) -> list[Detached]:
    """Disable our triggers on the tables of models for which ``affected(label)`` is true.

    ``label`` is the ``app_label.Model`` of the trigger's declaration URI. A
    disabled trigger does not call its function, which may read a column the
    migration renames or drops. ``inspect_triggers`` reports the declarations
    outdated until ``install_triggers`` or ``sync_triggers`` (given what this
    returns) rebuilds them or enables them again. A table whose triggers this
    role cannot alter (no ``USAGE`` on its schema) is logged and left alone.
    Returns what was disabled, one record per declaration and table.
    """
    found: dict[tuple[str, int], tuple[tuple[str, str], list[tuple[str, str]]]] = {}
    detached = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        cursor.execute(_OURS, [trigger_sql.MARKER + ":%"])
        for _, relid, name, comment, table, *_rest, enabled in cursor.fetchall():
            parsed = trigger_sql.parse_comment(comment)
            if parsed is None or not affected(parsed[0].split(":", 1)[0]):
                continue
            found.setdefault((parsed[0], relid), (tuple(table), []))[1].append((name, enabled))
        for (uri, relid), (table, triggers) in found.items():
            try:
                with transaction.atomic(using=using):
                    for name, enabled in triggers:
                        if enabled != "D":
                            cursor.execute(
                                sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}")
                                .format(sql.Identifier(*table), sql.Identifier(name))
                                .as_string(None)
                            )
            except OperationalError:
                raise  # the connection or the statement timeout: not this table's
            except DatabaseError as exc:
                logger.error(
                    "pgnotify: the triggers of %s on %s stay enabled during the migration: %s",
                    uri,
                    _qualified(table),
                    " ".join(str(exc).split()),
                )
                continue
            record = Detached(uri, relid, _qualified(table), tuple(triggers))
            detached.append(record)
    for record in detached:
        if any(enabled != "D" for _, enabled in record.triggers):
            logger.info("pgnotify: disabled the triggers of %s until migrate ends", record)
    return detached


# One statement of the installer's DROP SQL: anything up to a semicolon outside
# double-quoted identifiers (a name may hold one).
_STATEMENT = re.compile(r'(?:[^";]|"(?:[^"]|"")*")+;')


def split_drops(*scripts: str) -> tuple[list[str], list[str]]:
    """The ``DROP TRIGGER`` and the other (``DROP FUNCTION``) statements of ``scripts``.

    Run every trigger's drop before any function's: a trigger depends on the
    function it calls, which the statements of another declaration or URI
    may drop (the former triggers of a renamed model call the function of the
    declaration that has its table now).
    """
    statements = [m.group().strip() for script in scripts for m in _STATEMENT.finditer(script)]
    drop_triggers = [s for s in statements if s.startswith("DROP TRIGGER ")]
    return drop_triggers, [s for s in statements if not s.startswith("DROP TRIGGER ")]


def _drop_all(cursor, scripts: Iterable[str]) -> None:
    drop_triggers, drop_functions = split_drops(*scripts)
    if drop_triggers or drop_functions:
        cursor.execute("\n".join(drop_triggers + drop_functions))


def prune_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Drop triggers and functions of ours that no declaration asks for any more.

    Those of a declaration the router sends to another alias stay: they are
    not unknown (``inspect_triggers``).

    Raises:
        CannotRemove: One of them is on a table (a partition, say), or is a
            function, in a schema this role may not use (no ``USAGE``); nothing
            was dropped.
    """
    selectors = list(selectors)
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        unknown = [
            s
            for s in _inspect(cursor, declarations_for(selectors, using), selectors)
            if s.status == UNKNOWN
        ]
        blocked = _undroppable(
            cursor, unknown, lambda state: state.drop_sql, "pgnotify_install --prune"
        )
        if blocked:
            raise CannotRemove(blocked, "pruned")
        _drop_all(cursor, [state.drop_sql for state in unknown])
        for state in unknown:
            logger.info("pgnotify: pruned %s", state.subject)
    return unknown


def uninstall_triggers(
    selectors: Iterable[str] = (), using: str = DEFAULT_DB_ALIAS
) -> list[TriggerState]:
    """Drop every trigger and function of ours (within the selection).

    What a declaration outside the selection has installed stays, also where
    a selected declaration in conflict with it has the same trigger names on
    the same table (an unmanaged twin, or one naming the table in "public"):
    those triggers are the other declaration's, by their comment.

    Returns:
        The state of each declaration or URI whose triggers or functions were
        dropped, and of each declaration in conflict that left another's under
        its names (its ``kept``; its ``uninstall_sql`` is empty when nothing of
        its own was installed).

    Raises:
        CannotRemove: What it would drop names a table (a partition of a
            declaration's table, say) or function in a schema this role may not
            use (no ``USAGE``); nothing was dropped.
    """
    selectors = list(selectors)
    removed = []
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_KEY])
        states = _inspect(cursor, declarations_for(selectors, using), selectors)
        blocked = _undroppable(
            cursor, states, lambda state: state.uninstall_sql, "pgnotify_install --uninstall"
        )
        if blocked:  # it would drop some triggers of a declaration and not the others
            raise CannotRemove(blocked, "removed")
        _drop_all(cursor, [state.uninstall_sql for state in states])
        for state in states:
            if state.uninstall_sql:
                logger.info("pgnotify: removed %s on %s", state.uri, state.table)
            if state.kept:
                logger.info("pgnotify: %s", state.kept_detail)
            if state.uninstall_sql or state.kept:
                removed.append(state)
    return removed


def _apply(cursor, state: TriggerState) -> None:
    """Create or rebuild one declaration's function and triggers."""
    built = state.sql
    assert built is not None
    cursor.execute(state.install_sql)
    _seal(cursor, built)
    logger.info(
        "pgnotify: %s %s on %s",
        "updated" if state.status == OUTDATED else "installed",
        state.uri,
        state.table,
    )


def _drop_leftovers(cursor, state: TriggerState) -> None:
    cursor.execute(state.drop_sql)


def _refused_by_database(action: Callable[..., None], cursor, state: TriggerState) -> None:
    """Run ``action(cursor, state)``, naming the declaration if the database refuses it."""
    try:
        action(cursor, state)
    except DatabaseError as exc:
        raise InstallFailed(state, exc) from exc


def _in_savepoint(using: str, action: Callable[..., None], cursor, state: TriggerState) -> bool:
    """Run ``action(cursor, state)`` in a savepoint; if the database refuses it,
    roll back that alone, log it naming the declaration, and return False."""
    try:
        with transaction.atomic(using=using):
            action(cursor, state)
    except DatabaseError as exc:
        logger.error(
            "pgnotify: %s on %s keeps its current triggers: %s",
            state.uri,
            state.table,
            " ".join(str(exc).split()),
        )
        return False
    return True


def _valid_declarations(using: str, *, log: bool = True) -> tuple[list[Declaration], set[str]]:
    """Declarations of every model migrated to ``using``, and the lower-case
    labels of models whose declaration is invalid (reported, not raised: with
    ``log``, each is logged as an error)."""
    declarations: list[Declaration] = []
    invalid: set[str] = set()
    for model in apps.get_models():
        found, errors = resolve_model(model, raw_declarations(model))
        serious = [e for e in errors if e.is_serious()]
        if serious:
            invalid.add(model._meta.label_lower)
            if not log:
                continue
            logger.error(
                "pgnotify: %s keeps its current triggers: %s (%s)",
                model._meta.label,
                serious[0].msg,
                serious[0].id,
            )
        elif router.allow_migrate_model(using, model):
            declarations.extend(found)
    return declarations, invalid


def _declared_elsewhere(using: str) -> set[str]:
    """URIs of the valid declarations of models the router sends to another
    PostgreSQL alias but not to ``using``.

    Their triggers may well be in this database: that alias can name it too
    (a pooler in front of it). They are that alias's to install, report and
    drop, not leftovers of this one.
    """
    others = [a for a in connections if a != using and connections[a].vendor == "postgresql"]
    found: set[str] = set()
    for model in apps.get_models():
        if router.allow_migrate_model(using, model) or not any(
            router.allow_migrate_model(alias, model) for alias in others
        ):
            continue
        declarations, errors = resolve_model(model, raw_declarations(model))
        if not any(e.is_serious() for e in errors):
            found.update(d.uri for d in declarations)
    return found


def _model_label(uri: str) -> str:
    return uri.split(":", 1)[0].lower()


def _seal(cursor, built: trigger_sql.TriggerSQL) -> None:
    """Append to each trigger's comment (on its table and its partitions) the hash of
    its state in the catalogue."""
    tables = [built.table, *built.partitions]
    cursor.execute(
        "SELECT t.oid, t.tgname, r.i FROM unnest(%s::text[]) WITH ORDINALITY AS r(name, i)"
        " JOIN pg_trigger t ON t.tgrelid = to_regclass(r.name) WHERE t.tgname = ANY(%s)",
        [[table.as_string(None) for table in tables], list(built.triggers.values())],
    )
    names = {oid: (name, tables[i - 1]) for oid, name, i in cursor.fetchall()}
    for oid, seal in _trigger_hashes(cursor, list(names)).items():
        name, table = names[oid]
        cursor.execute(
            sql.SQL("COMMENT ON TRIGGER {} ON {} IS {}")
            .format(sql.Identifier(name), table, sql.Literal(f"{built.comment} {seal}"))
            .as_string(None)
        )


def _trigger_hashes(cursor, triggers: list[int]) -> dict[int, str]:
    """The state hash of each trigger (by oid), the same from every session.

    Taken with an empty ``search_path``, set for the transaction and put back
    at once, so that ``pg_get_triggerdef()`` qualifies every name: two
    environments whose connections search other schemas agree on it.
    """
    if not triggers:
        return {}
    assert cursor.db.in_atomic_block, "set_config(..., true) must not outlive this call"
    cursor.execute("SELECT current_setting('search_path')")
    (search_path,) = cursor.fetchone()
    cursor.execute("SELECT set_config('search_path', '', true)")
    cursor.execute(
        f"SELECT t.oid, {_TRIGGER_STATE} FROM pg_trigger t WHERE t.oid = ANY(%s::oid[])",
        [triggers],
    )
    found = dict(cursor.fetchall())
    cursor.execute("SELECT set_config('search_path', %s, true)", [search_path])
    return found


def _matches(comment: str, seal: str, built: trigger_sql.TriggerSQL) -> bool:
    """Whether a trigger is the one ``built`` describes, unchanged since install.

    ``seal`` is the trigger's state hash as ``_trigger_hashes`` takes it. A
    trigger created from ``pgnotify_install --sql`` output carries no state
    hash; its comment alone is compared.
    """
    if comment == built.comment:
        return True
    base, _, sealed = comment.rpartition(" ")
    return base == built.comment and sealed == seal


def _reduce_to_state(error: BaseException) -> tuple[Any, ...]:
    """Pickle ``error`` as its message and attributes: its ``args`` (the message) are not
    its constructor's arguments, which ``pickle`` would call it with. So the errors below
    reach a parent process (``multiprocessing``, a task queue) as they were raised."""
    return (_restored, (type(error), error.args, error.__dict__))


def _restored(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """The error ``_reduce_to_state`` pickled, made without calling its constructor."""
    error = cls.__new__(cls, *args)
    error.__dict__.update(state)
    return error


class NothingDeclared(ImproperlyConfigured):
    """Selectors that name only models declaring nothing for the databases in question."""

    __reduce__ = _reduce_to_state

    def __init__(
        self, selectors: list[str], aliases: list[str], *, or_installed: bool = False
    ) -> None:
        names = " or ".join(repr(alias) for alias in aliases)
        where = f"database {names}" if aliases else "any PostgreSQL database"
        message = f"No model in {' '.join(selectors)} declares pgnotify for {where}"
        if or_installed:
            message += " or has triggers or functions of ours there"
        super().__init__(f"{message}.{_proxies_named(selectors)}")


def _proxies_named(selectors: list[str]) -> str:
    """What to select instead of the proxy models ``selectors`` name: a proxy's changes
    are its concrete model's, announced with that model as the sender."""
    proxies = []
    for selector in selectors:
        try:
            model = apps.get_model(selector) if "." in selector else None
        except (LookupError, ValueError):
            continue
        if model is not None and model._meta.proxy:
            concrete = model._meta.concrete_model._meta.label
            proxies.append(f"{model._meta.label} is a proxy of {concrete}: select {concrete}")
    return "".join(f" {line}." for line in proxies)


class CannotInstall(Exception):
    """Declarations that cannot be installed as they are; nothing was changed."""

    __reduce__ = _reduce_to_state

    def __init__(self, states: list[TriggerState], message: str = "") -> None:
        self.states = states
        lines = "".join(f"\n  {state}" for state in states)
        super().__init__(
            message
            or f"nothing was installed; these declarations cannot be installed as they are:{lines}"
        )


class CannotRemove(CannotInstall):
    """Triggers or functions of ours that this role cannot drop: they are in schemas, or
    on tables in schemas, it may not use (``TriggerState.unusable``); nothing was changed."""

    def __init__(self, states: list[TriggerState], verb: str) -> None:
        lines = "".join(f"\n  {state}" for state in states)
        super().__init__(states, f"nothing was {verb}; these cannot be {verb} by this role:{lines}")


class TableMissing(CannotInstall):
    """Triggers were asked for on tables that do not exist yet."""

    def __init__(self, states: list[TriggerState]) -> None:
        names = ", ".join(f"{s.table} ({s.uri})" for s in states)
        super().__init__(states, f"table(s) {names} do not exist; run manage.py migrate first")


class InstallFailed(DatabaseError):
    """The database refused the SQL of one declaration; the install was rolled back."""

    __reduce__ = _reduce_to_state

    def __init__(self, state: TriggerState, error: DatabaseError) -> None:
        self.state = state
        super().__init__(
            f"{state.uri} on {state.table}: {str(error).strip()} (nothing was installed)"
        )


class _Installed(NamedTuple):
    """A trigger of ours in the database, and the function it calls."""

    oid: int
    comment: str
    table: tuple[str, str]  # (schema, name), as the functions' below
    function_oid: int
    function: tuple[str, str]
    function_comment: str | None
    function_body: str | None
    enabled: str  # pg_trigger.tgenabled: "D" when disabled


@dataclass
class _Target:
    """A declaration, and what the database holds under its table and names."""

    built: trigger_sql.TriggerSQL
    reference: trigger_sql.TriggerSQL  # what is installed is compared with
    table: str
    relid: int | None
    relkind: str | None
    function_oid: int | None
    body: str | None
    function_comment: str | None
    on_table: list[str]
    #: ``(relid, (schema, name))`` of each partition that gets its statement triggers.
    partitions: tuple[tuple[int, tuple[str, str]], ...] = ()
    #: ``(relid, name)`` of the triggers on those partitions, ours or not.
    on_partitions: frozenset[tuple[int, str]] = frozenset()
    #: ``(relid, (schema, name))`` of each partition of a partitioned table that
    #: PostgreSQL gives its row triggers (``level="row"``), under their names.
    cloned_onto: tuple[tuple[int, tuple[str, str]], ...] = ()
    #: Those of ``partitions`` in a schema this role may not use (no ``USAGE``):
    #: their triggers can be neither created nor dropped in this session.
    unusable: tuple[tuple[str, str], ...] = ()
    #: The names of the partitioned tables its table is a partition of, at every level.
    ancestors: tuple[str, ...] = ()

    @property
    def keys(self) -> list[tuple[int, str]]:
        """``(relid, name)`` of each of its triggers: on its table, then on its partitions."""
        if not self.relid:
            return []
        relids = [self.relid, *(relid for relid, _ in self.partitions)]
        return [(relid, name) for relid in relids for name in self.built.triggers.values()]

    def named(self, key: tuple[int, str]) -> bool:
        """Whether a trigger of that name is on that table (ours or not)."""
        return key[1] in self.on_table if key[0] == self.relid else key in self.on_partitions

    def where(self, key: tuple[int, str]) -> str:
        """`` on partition <name>`` for a key of a partition's trigger, "" for the table's."""
        name = self._partition_names.get(key[0])
        return f" on partition {_qualified(name)}" if name else ""

    @cached_property
    def _partition_names(self) -> dict[int, tuple[str, str]]:
        return dict(self.partitions)


def _target(cursor, declaration: Declaration, server_version: int) -> _Target:
    """Look up the declaration's table and function, and what its table has."""
    table = trigger_sql.table_identifier(declaration).as_string(None)
    cursor.execute(
        "SELECT r::oid, (SELECT relkind::text FROM pg_class WHERE oid = r), f::oid,"
        " (SELECT prosrc FROM pg_proc WHERE oid = f), obj_description(f, 'pg_proc'),"
        " ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = r AND NOT tgisinternal),"
        " EXISTS (SELECT FROM pg_constraint WHERE conrelid = r AND "
        + trigger_sql.FOREIGN_KEY_ACTIONS
        + "), ARRAY(SELECT c.relname::text FROM pg_partition_ancestors(r) AS a"
        " JOIN pg_class c ON c.oid = a.relid WHERE a.relid <> r)"
        " FROM to_regclass(%s) AS r, to_regprocedure(%s) AS f",
        [table, trigger_sql.function_identifier(declaration).as_string(None) + "()"],
    )
    relid, relkind, function_oid, body, function_comment, on_table, actions, ancestors = (
        cursor.fetchone()
    )
    partitions: tuple[tuple[int, tuple[str, str]], ...] = ()
    on_partitions: frozenset[tuple[int, str]] = frozenset()
    cloned_onto: tuple[tuple[int, tuple[str, str]], ...] = ()
    unusable: tuple[tuple[str, str], ...] = ()
    if relkind == "p":
        cursor.execute(_PARTITIONS, [relid])
        found = cursor.fetchall()
        tree = tuple((oid, (schema, name)) for oid, schema, name, *_ in found)
        if declaration.row_level:
            cloned_onto = tree
        else:
            partitions = tree
            on_partitions = frozenset((oid, t) for oid, _, _, names, *_ in found for t in names)
            unusable = tuple((schema, name) for _, schema, name, *_, usable in found if not usable)
            actions = actions or any(keys for *_, keys, _ in found)
    # What the table's foreign keys do decides whether its updates may change a row
    # twice: the SQL for the table as it is (adding such a key makes it outdated).
    built = trigger_sql.build_trigger_sql(
        declaration,
        server_version,
        actions if relid is not None else None,
        [name for _, name in partitions],
    )
    reference = built
    if body is not None and (body, function_comment) != (built.body, built.comment):
        # SQL printed by ``--sql`` counts as installed, and a repair rebuilds it in this
        # server's own form for the table as it is. Without a database ``--sql`` prints
        # SQL that every server runs; before the table exists, this server's, for
        # foreign keys not known.
        names = [name for _, name in partitions]
        for printed in (
            trigger_sql.build_trigger_sql(declaration, partitions=names),
            trigger_sql.build_trigger_sql(declaration, server_version, None, names),
        ):
            if (body, function_comment) == (printed.body, printed.comment):
                reference = printed
                break
    return _Target(
        built,
        reference,
        table,
        relid,
        relkind,
        function_oid,
        body,
        function_comment,
        on_table,
        partitions,
        on_partitions,
        cloned_onto,
        unusable,
        tuple(ancestors or ()),
    )


# The partitions of a partitioned table (``%s``, its oid) at every level below it,
# those partitioned in turn too: a statement that names one fires only its own
# statement triggers. Foreign tables are left out: PostgreSQL refuses transition
# tables on them. With the names of their triggers, whether they have foreign
# keys of their own whose actions update their rows (``FOREIGN_KEY_ACTIONS``), and
# whether this role may use their schema.
_PARTITIONS = (
    "SELECT c.oid::oid, n.nspname::text, c.relname::text,"
    " ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal),"
    " EXISTS (SELECT FROM pg_constraint WHERE conrelid = c.oid AND "
    + trigger_sql.FOREIGN_KEY_ACTIONS
    + "), has_schema_privilege(n.oid, 'USAGE')"
    " FROM pg_partition_tree(%s::oid::regclass) AS t"
    " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE t.level > 0 AND c.relkind IN ('r', 'p') ORDER BY n.nspname, c.relname"
)


def _neighbours(
    cursor,
    selected: list[Declaration],
    declared: list[Declaration],
    server_version: int,
    related: Collection[str] = (),
) -> list[_Target]:
    """The targets of declarations outside the selection that may be on a selected
    declaration's table: of the same name, and in the same schema or either
    unqualified (the search_path decides where that one is); or on a table named
    as one of ``related``: the partitions of the selected tables, which get
    their statement triggers too (or their row triggers, cloned), and the
    partitioned tables above them, whose triggers their partitions get.

    The others are not looked up: one query each would slow every inspect, and
    a table in a schema this role may not use makes ``to_regclass()`` fail. A
    neighbour whose lookup fails all the same (a schema it may not use) is left
    out, in a savepoint: it is not one of the selected tables, which were found.
    """
    chosen = {d.uri for d in selected}
    candidates = [
        other
        for other in declared
        if other.uri not in chosen
        and (
            other.table.name in related
            or any(
                other.table.name == d.table.name
                and (
                    other.table.schema == d.table.schema
                    or None in (other.table.schema, d.table.schema)
                )
                for d in selected
            )
        )
    ]
    found = []
    for other in candidates:
        try:
            with transaction.atomic(using=cursor.db.alias):
                found.append(_target(cursor, other, server_version))
        except OperationalError:
            raise  # the connection or the statement timeout: not this neighbour's
        except DatabaseError as exc:
            logger.debug("pgnotify: cannot look up %s on %s: %s", other.uri, other.table, exc)
    return found


def _without_event_table(
    target: _Target, installed: dict[tuple[int, str], _Installed], problem: _EventTableProblem
) -> TriggerState:
    """The state of a durable declaration whose event table this session does not find.

    Decided by what is installed: the triggers under the declaration's names
    that call a function writing to the event table (after a table or model was
    renamed, one of another name than the declaration's). When the table is in
    no schema of the database, they fail every write to the table: ``drop_sql``
    drops them. When it is in a schema this session's search_path misses, they
    may work for writers whose path finds it: nothing is dropped.
    """
    built = target.built
    writing = [
        (key[1], installed[key].table)
        for key in target.keys
        if key in installed and wire.EVENT_TABLE in (installed[key].function_body or "")
    ]
    detail, drop = problem.detail, ""
    if writing and problem.gone:
        detail += _FAILING_WRITES
        drop = "\n".join(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {};")
            .format(sql.Identifier(name), sql.Identifier(*table))
            .as_string(None)
            for name, table in writing
        )
    return TriggerState(built.uri, NO_EVENT_TABLE, target.table, detail, built, drop)


def _in_conflict(
    target: _Target, installed: dict[tuple[int, str], _Installed], detail: str, unselected: set[str]
) -> TriggerState:
    """The state of a declaration whose trigger names another declaration's have on its table.

    Its triggers and the other's are one set, as a name is unique on a table;
    their comments tell whose they are. Uninstalling it drops those installed
    for it (or for no declaration in ``unselected``: a former version of it
    left them) and its function, and leaves those of a declaration in
    ``unselected`` and the function they call (its own name, when the twins
    write the table's name alike): ``kept`` names those declarations.
    """
    built = target.built
    kept: set[str] = set()
    kept_functions: set[int] = set()
    dropped: dict[str, tuple[sql.Composable, list[str]]] = {}
    for key in target.keys:
        row = installed.get(key)
        if row is None:
            continue
        owner = trigger_sql.parse_comment(row.comment)
        if owner is not None and owner[0] in unselected:
            kept.add(owner[0])
            kept_functions.add(row.function_oid)
        else:
            on = built.table if key[0] == target.relid else sql.Identifier(*row.table)
            dropped.setdefault(on.as_string(None), (on, []))[1].append(key[1])
    statements = [trigger_sql.build_drop_sql(on, None, names) for on, names in dropped.values()]
    function_owner = trigger_sql.parse_comment(target.function_comment)
    if (
        target.function_oid is not None
        and target.function_oid not in kept_functions
        and (function_owner is None or function_owner[0] not in unselected)
    ):
        statements.append(built.drop_function)
    elif function_owner is not None and function_owner[0] in unselected:
        kept.add(function_owner[0])
    return TriggerState(
        built.uri, CONFLICT, target.table, detail, built, "\n".join(statements), tuple(sorted(kept))
    )


class _EventTableProblem(NamedTuple):
    """Why this session does not find the event table, and whether it is gone
    (in no schema of the database) rather than off the session's search_path."""

    detail: str
    gone: bool


def _event_table_problem(cursor) -> _EventTableProblem | None:
    """Why the durable triggers cannot write to the event table in this session
    (``None`` if they can)."""
    name = wire.EVENT_TABLE
    cursor.execute(_EVENT_TABLE, [sql.Identifier(name).as_string(None), name])
    visible, search_path, schemas = cursor.fetchone()
    using = cursor.db.alias
    if visible:
        return _missing_columns(cursor, using)
    if schemas:
        names = ", ".join(_qualified((schema,)) for schema in schemas)
        return _EventTableProblem(
            f'durable declarations write to table "{name}" unqualified, which is in '
            f"{'schema' if len(schemas) == 1 else 'schemas'} {names} of database {using!r} "
            f"but not on this session's search_path ({search_path}): make the search_path "
            "of the role that runs migrate and pgnotify_install find it, as the writers' "
            "must; triggers already installed are left as they are",
            gone=False,
        )
    from .models import DurableEvent

    if not router.allow_migrate_model(using, DurableEvent):
        # Its migrations are recorded there all the same (Django records what a router
        # skips): not a table dropped by hand, whose advice would change nothing.
        return _EventTableProblem(
            f'durable declarations write to table "{name}", which is not in database '
            f"{using!r}, and a database router keeps django_pgnotify's migrations off it "
            "(pgnotify.W006): make the router's allow_migrate() allow app 'django_pgnotify' "
            f"on {using!r} and run manage.py migrate django_pgnotify --database {using}, or "
            "route the model to a database that has the event table",
            gone=True,
        )
    recorded = _recorded_migrations(cursor)
    if recorded:
        # Not "migrate django_pgnotify zero --fake" then migrate: that also unrecords
        # the migrations of every app that depends on django_pgnotify's, which the
        # next migrate runs again. Their SQL, run again, changes no record.
        first, *rest = recorded
        more = ""
        if rest:
            names = f"{', '.join(rest[:-1])} and {rest[-1]}" if len(rest) > 1 else rest[0]
            more = f", then the same for {names}"
        return _EventTableProblem(
            f'durable declarations write to table "{name}", which is not in database '
            f"{using!r}, though django_pgnotify's migrations are recorded as applied there "
            "(was it dropped by hand?): create it again with their SQL, which leaves the "
            f"records of migrations alone: run manage.py sqlmigrate django_pgnotify {first} "
            f"--database {using} | manage.py dbshell --database {using}{more}; then "
            f"manage.py pgnotify_install --database {using}",
            gone=True,
        )
    return _EventTableProblem(
        f'durable declarations write to table "{name}", which is not in database '
        f"{using!r}: run manage.py migrate django_pgnotify --database {using} to create it",
        gone=True,
    )


def missing_event_columns(cursor: Any) -> list[str]:
    """The columns of django_pgnotify's latest migrations that the event table the
    search path finds lacks (an upgrade not migrated yet): queries of them fail."""
    from .models import DurableEvent

    columns = [f.column for f in DurableEvent._meta.concrete_fields]
    cursor.execute(_MISSING_COLUMNS, [columns, sql.Identifier(wire.EVENT_TABLE).as_string(None)])
    (missing,) = cursor.fetchone()
    return list(missing)


def _missing_columns(cursor, using: str) -> _EventTableProblem | None:
    """The problem of an event table that lacks columns this version writes or reads.

    django_pgnotify upgraded, and ``pgnotify_install`` (or a ``migrate`` of
    another app) run before ``migrate django_pgnotify``: the new triggers
    would fail every write to their tables, and the listener every claim.
    The installed triggers, of the version the table is from, still work.
    """
    missing = missing_event_columns(cursor)
    if not missing:
        return None
    names = ", ".join(f'"{column}"' for column in missing)
    return _EventTableProblem(
        f'table "{wire.EVENT_TABLE}" of database {using!r} lacks column'
        f"{'s' if len(missing) > 1 else ''} {names} of django_pgnotify's latest migrations, "
        "which durable declarations use: run manage.py migrate django_pgnotify "
        f"--database {using}; triggers already installed are left as they are",
        gone=False,
    )


def _recorded_migrations(cursor) -> list[str]:
    """The migrations of django_pgnotify ``django_migrations`` records as applied,
    in the order they were applied."""
    table = MigrationRecorder.Migration._meta.db_table
    cursor.execute(
        "SELECT CASE WHEN to_regclass(%s) IS NULL THEN false"
        " ELSE has_table_privilege(to_regclass(%s), 'SELECT') END",
        [table, table],
    )
    if not cursor.fetchone()[0]:
        return []
    cursor.execute(
        sql.SQL("SELECT name FROM {} WHERE app = %s ORDER BY id")
        .format(sql.Identifier(table))
        .as_string(None),
        ["django_pgnotify"],
    )
    return [name for (name,) in cursor.fetchall()]


def _not_a_table(target: _Target) -> str:
    """Why the target's relation cannot have its triggers ("" if it can)."""
    relkind = target.relkind or "r"
    row_level = target.built.declaration.row_level
    if relkind in ("r", "p") or (relkind == "f" and row_level):
        return ""
    kind = _RELATION_KINDS.get(relkind, f"a relation of kind {relkind!r}")
    if relkind == "f":
        return f'{kind}: PostgreSQL fires only row-level triggers on it; use Notify(level="row")'
    if relkind in ("v", "m"):
        return (
            f"{kind}: PostgreSQL cannot fire these triggers on it; declare pgnotify on "
            "the model of the table behind it, or remove the declaration"
        )
    return f"{kind}: PostgreSQL cannot fire triggers on it; remove the declaration"


class _Conflict(NamedTuple):
    """The URIs of the declarations a target shares trigger or function names with,
    and whether row triggers PostgreSQL clones onto a partition are among them."""

    others: list[str]
    cloned: bool


def _conflicts(targets: list[_Target]) -> dict[int, _Conflict]:
    """For each target (by index) whose trigger or function names another's
    also use, the URIs of the others: each install would replace the other's,
    or fail, where PostgreSQL has cloned one's row triggers onto a partition."""
    owners: dict[tuple, list[tuple[int, bool]]] = {}  # a function's, or a trigger's on a table
    for index, target in enumerate(targets):
        # Its triggers on its partitions too: a model may be declared on one of them.
        names: list[tuple] = [("function", target.built.function.as_string(None))]
        names += [("trigger", *key) for key in target.keys]
        if not target.keys:  # no table yet: by its name
            names += [("trigger", target.table, name) for name in target.built.triggers.values()]
        for owned in names:
            owners.setdefault(owned, []).append((index, False))
        # The clones of its row triggers, which carry their names.
        for relid, _ in target.cloned_onto:
            for trigger in target.built.triggers.values():
                owners.setdefault(("trigger", relid, trigger), []).append((index, True))
    others: dict[int, set[str]] = {}
    cloned: set[int] = set()
    for sharing in owners.values():
        if len({index for index, _ in sharing}) == 1:
            continue
        for index, _ in sharing:
            others.setdefault(index, set()).update(targets[i].built.uri for i, _ in sharing)
            if any(clone for _, clone in sharing):
                cloned.add(index)
    return {
        index: _Conflict(sorted(uris - {targets[index].built.uri}), index in cloned)
        for index, uris in others.items()
    }


def _inspect(
    cursor,
    declarations: list[Declaration],
    selectors: list[str],
    declared: list[Declaration] | None = None,
    targets: list[_Target] | None = None,
) -> list[TriggerState]:
    """The state of each of ``declarations`` and of what is installed for ``selectors``.

    ``declared`` is every valid declaration of the database (resolved here
    unless the caller has them): a selected one must not take their triggers
    over, nor drop a function one of them has. ``targets`` are those of
    ``declarations``, in their order, if the caller looked them up already.
    """
    cursor.execute(_OURS, [trigger_sql.MARKER + ":%"])
    installed = {
        (relid, name): _Installed(oid, comment, tuple(table), function_oid, tuple(function), *rest)
        for oid, relid, name, comment, table, function_oid, function, *rest in cursor.fetchall()
    }
    hashes = _trigger_hashes(cursor, [row.oid for row in installed.values()])
    server_version = cursor.connection.info.server_version
    if targets is None:
        targets = [_target(cursor, d, server_version) for d in declarations]
    if declared is None:
        declared = _valid_declarations(cursor.db.alias, log=False)[0]
    elsewhere = _declared_elsewhere(cursor.db.alias)
    related = {
        *(name for t in targets for _, (_, name) in (*t.partitions, *t.cloned_onto)),
        *(name for t in targets for name in t.ancestors),
    }
    neighbours = _neighbours(cursor, declarations, declared, server_version, related)
    declared_functions = {t.function_oid for t in [*targets, *neighbours]} - {None}
    declared_names = {d.function for d in declared}
    event_table = None
    if any(d.notify.durable for d in declarations):
        event_table = _event_table_problem(cursor)
    conflicts = _conflicts([*targets, *neighbours])
    unselected = {d.uri for d in declared} - {d.uri for d in declarations}
    expected_triggers: set[tuple[int, str]] = set()
    expected_functions: set[int] = set()
    states = []
    for index, target in enumerate(targets):
        built, reference, table = target.built, target.reference, target.table
        if target.relid is None:
            states.append(TriggerState(built.uri, NO_TABLE, table, sql=built))
            continue
        not_a_table = _not_a_table(target)
        if not_a_table:  # nothing of ours can be on it: whatever is left is unknown
            states.append(TriggerState(built.uri, NOT_A_TABLE, table, not_a_table, built))
            continue
        if target.function_oid is not None:
            expected_functions.add(target.function_oid)
        expected_triggers.update(target.keys)
        if index in conflicts:  # it keeps what it has
            conflict = conflicts[index]
            others = " and ".join(conflict.others)
            partitioned = target.partitions or target.cloned_onto
            where = "this table or a partition of it" if partitioned else "this table"
            outcome = "each install would replace the other's"
            if conflict.cloned:
                outcome = (
                    "PostgreSQL gives the partitions of a partitioned table its row-level "
                    "triggers under their names, so the two cannot be installed together"
                )
            detail = (
                f"{others} also declares it, with the same trigger names on {where}: "
                f"{outcome}; declare pgnotify on only one of the models, or give one of "
                "the declarations another name"
            )
            states.append(_in_conflict(target, installed, detail, unselected))
            continue
        if built.declaration.notify.durable and event_table is not None:
            states.append(_without_event_table(target, installed, event_table))
            continue
        problems = []
        if target.body is None:
            problems.append("function missing")
        elif target.body != reference.body or target.function_comment != reference.comment:
            problems.append("function differs")
        for key in target.keys:
            row = installed.get(key)
            where = target.where(key)
            if row is not None and not _matches(row.comment, hashes.get(row.oid, ""), reference):
                # Disabled: by hand, or by a migrate that failed (``detach_triggers``).
                problems.append(
                    f"trigger {key[1]}{where} {'disabled' if row.enabled == 'D' else 'differs'}"
                )
            elif row is None and target.named(key):
                problems.append(f"trigger {key[1]}{where} lacks our comment")
            elif row is None:
                problems.append(f"trigger {key[1]}{where} missing")
        if target.body is not None and problems and _fires(target, installed):
            problems[:0] = _failing_reads(cursor, target)  # first: the worst of them
        unusable = tuple(_qualified(name) for name in target.unusable) if problems else ()
        if unusable:  # first: what install must be told before it can change anything
            problems[:0] = [_unusable_detail(cursor, target)]
        if not problems:
            states.append(TriggerState(built.uri, INSTALLED, table, sql=built))
        elif target.body is None and not any(target.named(key) for key in target.keys):
            detail = problems[0] if unusable else ""
            states.append(TriggerState(built.uri, MISSING, table, detail, built, unusable=unusable))
        else:
            states.append(
                TriggerState(
                    built.uri, OUTDATED, table, "; ".join(problems), built, unusable=unusable
                )
            )

    # Ours in the database, but asked for by no selected declaration, by URI.
    leftovers: dict[str, _Leftovers] = {}
    for key, row in installed.items():
        parsed = trigger_sql.parse_comment(row.comment)
        if (
            key in expected_triggers
            or parsed is None
            or parsed[0] in elsewhere
            or not _selected(parsed[0], selectors)
        ):
            continue
        found = leftovers.setdefault(parsed[0], _Leftovers())
        found.triggers.append((key[1], row.table))
        if row.function_oid not in expected_functions:
            found.functions.add(row.function)
    cursor.execute(_ORPHAN_FUNCTIONS, [trigger_sql.MARKER + ":%"])
    for oid, function, comment in cursor.fetchall():
        parsed = trigger_sql.parse_comment(comment)
        if (
            parsed is None
            or oid in expected_functions
            or parsed[0] in elsewhere
            or not _selected(parsed[0], selectors)
        ):
            continue
        leftovers.setdefault(parsed[0], _Leftovers()).functions.add(tuple(function))
    # A declaration's own triggers that still call another function of ours,
    # one no declaration has: the table was renamed, or moved to another
    # schema (the function's name follows the table's), or the model was
    # renamed (the triggers moved with its table, under its former URI).
    # Rebuilding the triggers frees it, unless other triggers call it too.
    for target, state in zip(targets, states, strict=True):
        if state.status in _REFUSED:
            continue
        for call in [installed[key] for key in target.keys if key in installed]:
            callers = {
                key for key, row in installed.items() if row.function_oid == call.function_oid
            }
            if (
                trigger_sql.parse_comment(call.function_comment)
                and call.function_oid not in declared_functions
                and call.function[1] not in declared_names  # of a declaration not looked up
                and callers <= set(target.keys)
            ):
                leftovers.setdefault(state.uri, _Leftovers()).replaced.add(call.function)

    by_uri = {state.uri: index for index, state in enumerate(states)}
    for uri, found in leftovers.items():
        position = by_uri.get(uri)
        if position is not None and states[position].status not in _REFUSED:
            # Left by an earlier version of a declaration (an event removed, a
            # table renamed): installing or removing the declaration drops them.
            state = states[position]
            detail = "; ".join(filter(None, [state.detail, found.detail]))
            states[position] = replace(state, status=OUTDATED, detail=detail, drop_sql=found.drop)
        else:
            table = _qualified(found.triggers[0][1]) if found.triggers else "-"
            states.append(TriggerState(uri, UNKNOWN, table, str(found), drop_sql=found.drop))
    return states


def _unusable_detail(cursor, target: _Target) -> str:
    """Why this role cannot install ``target``: partitions of its table are in schemas
    it may not use (no ``USAGE``), where it can neither create nor drop triggers."""
    one = len(target.unusable) == 1
    return _no_usage_detail(
        cursor,
        f"{'partition' if one else 'partitions'} "
        f"{', '.join(_qualified(name) for name in target.unusable)}",
        target.unusable,
        f"it cannot give {'it' if one else 'them'} the triggers that statements naming "
        f"{'it' if one else 'them'} need",
        "pgnotify_install",
    )


def _no_usage_detail(
    cursor, subject: str, names: Collection[tuple[str, ...]], consequence: str, command: str
) -> str:
    """``<subject> is in schema <s>, which role <r> may not use (no USAGE): <consequence>;
    run GRANT USAGE ON SCHEMA <s> TO <r>, or <command> as a role that may use it``, for
    ``names`` (schema first) in schemas this role may not use."""
    cursor.execute("SELECT current_user")
    (role,) = cursor.fetchone()
    schemas = sorted({name[0] for name in names})
    grants = " and ".join(
        f"GRANT USAGE ON SCHEMA {_qualified((schema,))} TO {_qualified((role,))}"
        for schema in schemas
    )
    return (
        f"{subject} {'is' if len(names) == 1 else 'are'} in "
        f"{'schema' if len(schemas) == 1 else 'schemas'} "
        f"{', '.join(_qualified((schema,)) for schema in schemas)}, which role "
        f"{_qualified((role,))} may not use (no USAGE): {consequence}; run {grants}, or "
        f"{command} as a role that may use {'it' if len(schemas) == 1 else 'them'}"
    )


# A statement of the installer's DROP SQL that names its table or function with a
# schema: the trigger's table, or the function (``_dropped``).
_IDENTIFIER = r'"((?:[^"]|"")*)"'
_QUALIFIED_DROP = re.compile(
    rf"DROP (TRIGGER|FUNCTION) IF EXISTS (?:{_IDENTIFIER} ON )?"
    rf"{_IDENTIFIER}\.{_IDENTIFIER}(?:\(\))?;"
)


def _dropped(script: str) -> list[tuple[str, tuple[str, str]]]:
    """``("table" or "function", (schema, name))`` of each table whose triggers, and each
    function, the DROP statements of ``script`` name with a schema, once each, in order.
    Those named without one are looked up on the search_path, which skips the schemas
    the role may not use."""
    found: dict[tuple[str, tuple[str, str]], None] = {}
    drop_triggers, drop_functions = split_drops(script)
    for statement in (*drop_triggers, *drop_functions):
        match = _QUALIFIED_DROP.fullmatch(statement)
        if match:
            kind, _, schema, name = match.groups()
            parts = (schema.replace('""', '"'), name.replace('""', '"'))
            found["table" if kind == "TRIGGER" else "function", parts] = None
    return list(found)


def _with_undroppable(
    cursor, states: list[TriggerState], kept: Collection[str] = ()
) -> list[TriggerState]:
    """``states``, those of unknown and outdated declarations whose drops this role
    cannot make (``_undroppable``) with ``unusable`` and their detail set, as
    ``prune_triggers`` (for unknown ones) or ``install_triggers`` (for what an earlier
    version left) would refuse them; but those of the models ``kept`` (by label)."""
    blocked: dict[str, TriggerState] = {}
    for status, command in ((UNKNOWN, "pgnotify_install --prune"), (OUTDATED, "pgnotify_install")):
        chosen = [
            state
            for state in states
            if state.status == status and not state.unusable and _model_label(state.uri) not in kept
        ]
        for state in _undroppable(cursor, chosen, lambda state: state.drop_sql, command):
            blocked[state.uri] = state
    return [blocked.get(state.uri, state) for state in states]


def _undroppable(
    cursor, states: Iterable[TriggerState], script: Callable[[TriggerState], str], command: str
) -> list[TriggerState]:
    """Those of ``states`` whose drops (``script(state)``) name tables or functions in
    schemas this role may not use (no ``USAGE``): it could drop some of their triggers and
    not the others. Each comes with those names as its ``unusable``, and a detail, first,
    that names them and what to grant, or to run ``command`` as a role that may."""
    found = [(state, _dropped(script(state))) for state in states]
    if not any(names for _, names in found):
        return []
    cursor.execute(
        "SELECT nspname::text FROM pg_namespace WHERE NOT has_schema_privilege(oid, 'USAGE')"
    )
    denied = {schema for (schema,) in cursor.fetchall()}
    blocked = [
        (state, [(kind, name) for kind, name in names if name[0] in denied])
        for state, names in found
    ]
    blocked = [(state, names) for state, names in blocked if names]
    if not blocked:
        return []
    tables = [name for _, names in blocked for kind, name in names if kind == "table"]
    cursor.execute(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN unnest(%s::text[], %s::text[]) AS t(s, r) ON n.nspname = t.s AND c.relname = t.r"
        " WHERE c.relispartition",
        [[schema for schema, _ in tables], [name for _, name in tables]],
    )
    partitions = {tuple(row) for row in cursor.fetchall()}
    refused = []
    for state, names in blocked:
        groups: dict[str, list[tuple[str, str]]] = {}
        for kind, name in names:
            if kind == "table" and name in partitions:
                kind = "partition"
            groups.setdefault(kind, []).append(name)
        subject = " and ".join(
            f"{kind}{'s' if len(listed) > 1 else ''} "
            + ", ".join(_qualified(name) for name in sorted(listed))
            for kind, listed in groups.items()
        )
        one = len(names) == 1
        if "function" not in groups:
            consequence = f"it cannot drop the triggers of ours on {'it' if one else 'them'}"
        elif len(groups) == 1:
            consequence = f"it cannot drop {'it' if one else 'them'}"
        else:
            consequence = "it cannot drop those functions, nor the triggers of ours on the tables"
        detail = _no_usage_detail(cursor, subject, [n for _, n in names], consequence, command)
        refused.append(
            replace(
                state,
                detail="; ".join(filter(None, [detail, state.detail])),
                unusable=tuple(_qualified(name) for _, name in names),
            )
        )
    return refused


def _fires(target: _Target, installed: dict[tuple[int, str], _Installed]) -> bool:
    """Whether a trigger of ``target`` on its table is enabled."""
    return any(installed[key].enabled != "D" for key in target.keys if key in installed)


def _failing_reads(cursor, target: _Target) -> list[str]:
    """What says that the installed function of ``target`` reads columns its table no
    longer has (a migration run without the ``migrate`` hook dropped or renamed them):
    the writes its enabled triggers fire on fail until it is installed again. ``[]`` if
    it has them all."""
    assert target.body is not None and target.relid is not None
    missing = _columns_gone(cursor, target.relid, [target.body])
    if not missing:
        return []
    return [
        f"its function reads {', '.join(_qualified((c,)) for c in missing)}, which the table "
        "no longer has: writes to the table fail until it is installed"
    ]


@dataclass
class _Leftovers:
    """Triggers ``(name, table)`` and functions of ours that nothing declares.

    ``replaced`` are functions a declaration's own triggers call until they
    are rebuilt; ``drop`` must run after that.
    """

    triggers: list[tuple[str, tuple[str, str]]] = field(default_factory=list)
    functions: set[tuple[str, str]] = field(default_factory=set)
    replaced: set[tuple[str, str]] = field(default_factory=set)

    def __str__(self) -> str:
        names = [f"trigger {name}" for name in self._tables_by_name]
        if not self.triggers:
            names += [f"function {_qualified(f)} has no trigger" for f in sorted(self.functions)]
        tables = len({table for _, table in self.triggers})
        return ", ".join(names) + (f" on {tables} tables" if tables > 1 else "")

    @property
    def _tables_by_name(self) -> dict[str, list[str]]:
        """The tables of each trigger, by name, in order: each name once, as on a
        partitioned table each partition has the same triggers."""
        tables: dict[str, list[str]] = {}
        for name, table in self.triggers:
            tables.setdefault(name, []).append(_qualified(table))
        return tables

    @property
    def detail(self) -> str:
        """What they are, as part of the state of the declaration they were left by:
        with the table of each trigger, which may be another than the declaration's
        (its former name, or a partition detached from it)."""
        left = ", ".join(
            f"trigger {name} on {', '.join(on)}" for name, on in self._tables_by_name.items()
        )
        parts = [f"no longer declared: {left or self}"] if self.triggers or self.functions else []
        parts += [f"its triggers call {_qualified(f)}" for f in sorted(self.replaced)]
        return "; ".join(parts)

    @property
    def drop(self) -> str:
        # Functions last: a trigger depends on its function.
        statements = [
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {};").format(
                sql.Identifier(name), sql.Identifier(*table)
            )
            for name, table in self.triggers
        ]
        statements += [
            sql.SQL("DROP FUNCTION IF EXISTS {}();").format(sql.Identifier(*function))
            for function in sorted(self.functions | self.replaced)
        ]
        return "\n".join(statement.as_string(None) for statement in statements)


def _qualified(name: tuple[str, ...]) -> str:
    return sql.Identifier(*name).as_string(None)


def _selected(uri: str, selectors: list[str]) -> bool:
    if not selectors:
        return True
    label = uri.split(":", 1)[0].lower()
    app_label = label.split(".", 1)[0]
    return any(s.lower() in (label, app_label) for s in selectors)
