"""Keeping triggers out of the way of ``migrate`` and in step after it.

A trigger's function names the columns it sends (the triggers themselves,
with no ``WHEN`` clause nor column list, depend on none): once a migration
renames or drops one, every write that calls the function fails, also the
writes of the migration itself (a data migration later in the plan, the
``UPDATE`` Django runs to fill a column made ``NOT NULL``). So, with
``INSTALL_ON_MIGRATE``, ``pre_migrate`` disables our triggers on the tables of
every model whose columns the migration plan may change (``models_touched``),
and ``post_migrate``, once the whole plan has run, rebuilds every declaration,
prunes what no declaration asks for, and enables again, as they were, the
disabled triggers of declarations it keeps as they are (one it cannot install
now, see ``sync_triggers``). Writes made to those tables meanwhile are not
announced, nor stored for durable declarations: ``pre_migrate`` warns of these.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.apps import AppConfig, apps
from django.contrib.postgres import operations as _postgres_operations
from django.db import connections
from django.db.migrations import operations as _operations
from django.db.migrations.operations import RunPython, SeparateDatabaseAndState

from .conf import get_setting

if TYPE_CHECKING:
    from .installation import Detached

logger = logging.getLogger("django_pgnotify.migrating")

_OWN_APP = "django_pgnotify"

# The (alias, plan) last handled: both signals are sent once per app, with
# the same plan object, and one pass per migrate run is enough.
_handled: dict[str, tuple[Any, Any]] = {}

# By alias, the triggers pre_migrate disabled, for post_migrate to enable
# again those it keeps.
_detached: dict[str, list[Detached]] = {}


# Operations that, applied (not reversed), leave every existing column as it is: they
# add columns, indexes, constraints, extensions or collations, or change no schema. A
# trigger's function reads columns by name, so these cannot break it, and the triggers
# stay enabled: writes made meanwhile are announced (and stored, for durable
# declarations). Reversed, an AddField drops its column, so they count then as any other.
# Django's own classes only (AddIndexConcurrently is an AddIndex): a project's subclass
# may do anything.
_KEEPING_COLUMNS = tuple(
    operation
    for module, names in (
        (
            _operations,
            (
                "CreateModel",
                "AddField",
                "AddIndex",
                "RemoveIndex",
                "RenameIndex",
                "AddConstraint",
                "RemoveConstraint",
                "AlterConstraint",
                "AlterUniqueTogether",
                "AlterIndexTogether",
                "AlterModelOptions",
                "AlterModelManagers",
                "AlterModelTableComment",
            ),
        ),
        (_postgres_operations, ("CreateExtension", "CollationOperation", "ValidateConstraint")),
    )
    for operation in (getattr(module, name, None) for name in names)
    if operation is not None
)


def _keeps_columns(operation: Any) -> bool:
    return isinstance(operation, _KEEPING_COLUMNS) and type(operation).__module__.startswith(
        "django."
    )


def models_touched(plan: list[tuple[Any, bool]]) -> Callable[[str], bool]:
    """A predicate: may ``plan`` change a column of the table of the model ``app_label.Model``?

    Asks each operation (``references_model``), which answers yes when in
    doubt: ``RunSQL`` and custom operations count for every model. Data
    migrations (``RunPython``) change no schema and count for none; nor do
    Django's operations that add to a table without changing its columns
    (``AddField``, ``AddIndex``, ``CreateExtension``...: ``_KEEPING_COLUMNS``) and
    django_pgnotify's own migrations, which change only the event table and keep
    it writable by the triggers installed before them, unless the plan reverses
    them. A model counts too when one of its foreign keys points to a touched
    model, since Django alters referencing columns with a primary key.
    """
    operations: list[tuple[str, Any]] = []
    for migration, backwards in plan:
        if migration.app_label == _OWN_APP and not backwards:
            continue
        pending = list(migration.operations)
        while pending:
            operation = pending.pop()
            if isinstance(operation, SeparateDatabaseAndState):
                pending.extend(operation.database_operations)
            elif isinstance(operation, RunPython):
                continue
            elif backwards or not _keeps_columns(operation):
                operations.append((migration.app_label, operation))

    def direct(app_label: str, name: str) -> bool:
        return any(
            operation.references_model(name.lower(), app_label)
            for migration_app, operation in operations
            if migration_app == app_label or _crosses_apps(operation)
        )

    def touched(label: str) -> bool:
        app_label, _, name = label.partition(".")
        if direct(app_label, name):
            return True
        try:
            model = apps.get_model(app_label, name)
        except LookupError:
            return False
        return any(
            direct(f.related_model._meta.app_label, f.related_model._meta.object_name)
            for f in model._meta.local_concrete_fields
            if f.is_relation and f.related_model is not None
        )

    return touched


def _crosses_apps(operation: Any) -> bool:
    # A model operation names models of its migration's app only; anything
    # else (RunSQL, custom operations) may touch any app's tables.
    return not hasattr(operation, "model_name") and not hasattr(operation, "name_lower")


def _first_time(signal: str, using: str, plan: Any) -> bool:
    handled = _handled.get(signal + using)
    if handled is not None and handled[1] is plan:
        return False
    _handled[signal + using] = (using, plan)
    return True


def _applies(using: str, plan: Any) -> bool:
    return (
        plan is not None
        and bool(get_setting("INSTALL_ON_MIGRATE"))
        and connections[using].vendor == "postgresql"
    )


def detach_before_migrate(sender: AppConfig, using: str, plan: Any = None, **kwargs: Any) -> None:
    """``pre_migrate``: disable our triggers on the tables the plan may change.

    Writes to those tables during the migration (data migrations, and other
    processes writing meanwhile) are not announced, nor stored for durable
    declarations, which a warning names; ``post_migrate`` rebuilds
    the triggers or enables them again. If the migration fails, they stay
    disabled until the next ``migrate`` or ``pgnotify_install``, and
    ``pgnotify_install --check`` reports them.
    """
    from .installation import detach_triggers

    if not plan or not _applies(using, plan) or not _first_time("pre", using, plan):
        return
    detached = detach_triggers(models_touched(plan), using)
    _detached[using] = detached
    if detached:
        logger.info(
            "pgnotify: triggers disabled for the migration, rebuilt or enabled again at its "
            "end: %s",
            ", ".join(str(record) for record in detached),
        )
    # Those this migrate disabled (a failed one may have left some disabled), each
    # declaration once: a partitioned table has a record per partition.
    durable = _durable_uris()
    unstored = list(
        dict.fromkeys(
            record.uri
            for record in detached
            if record.uri in durable and any(enabled != "D" for _, enabled in record.triggers)
        )
    )
    if unstored:
        logger.warning(
            "pgnotify: until migrate ends, changes written to the tables of durable "
            "declarations whose columns the migration changes are not stored as durable "
            "events, nor delivered: %s. Stop the writes to these tables while it runs",
            ", ".join(unstored),
        )


def _durable_uris() -> set[str]:
    """Every durable declaration's URI, whatever the router says: the triggers disabled
    are this database's, which another alias may name (``installation.declared_uris``,
    by contrast, is what one alias's listeners claim)."""
    from django.core.exceptions import ImproperlyConfigured

    from .declarations import get_declarations

    try:
        return {d.uri for d in get_declarations() if d.notify.durable}
    except ImproperlyConfigured:  # an invalid declaration: migrate's checks name it
        return set()


def sync_after_migrate(
    sender: AppConfig,
    using: str,
    plan: Any = None,
    verbosity: int = 1,
    stdout: Any = None,
    **kwargs: Any,
) -> None:
    """``post_migrate``: install, update and prune so triggers match declarations.

    Each change is printed to ``migrate``'s output (``stdout``), as ``migrate``
    prints each migration it applies, unless ``verbosity`` is 0: without it, a
    user cannot tell that triggers were installed. ``flush`` also sends
    ``post_migrate``, without a plan: the schema has not changed then, so it
    does nothing.
    """
    from .installation import describe_change, sync_triggers

    if not _applies(using, plan) or not _first_time("post", using, plan):
        return
    changed = sync_triggers(using, _detached.pop(using, []))
    if changed and verbosity >= 1:
        # Django's own default when a sender gives no stdout (emit_post_migrate_signal).
        out = stdout if stdout is not None else sys.stdout
        lines = [SYNC_HEADING, *(f"  {describe_change(state)}" for state in changed)]
        out.write("".join(f"{line}\n" for line in lines))


#: What ``migrate`` prints above the changes ``sync_after_migrate`` made.
SYNC_HEADING = "Synchronizing pgnotify triggers:"
