"""``manage.py pgnotify_install``: create, update, check, prune or remove triggers."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, connections

from django_pgnotify import installation
from django_pgnotify.connection import connection_params, describe
from django_pgnotify.triggers import TriggerSQL, build_partition_triggers_sql, build_trigger_sql


class Command(BaseCommand):
    help = (
        "Install or update the triggers that announce row changes of the models "
        "declaring pgnotify. Idempotent: triggers that are up to date are left alone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "selectors",
            nargs="*",
            metavar="app_label[.Model]",
            help="Limit to these apps or models (default: all).",
        )
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help='The database alias to work on (default: "default").',
        )
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--check",
            action="store_true",
            help="Change nothing; list missing, outdated and unknown triggers and "
            "exit with status 1 if there are any.",
        )
        mode.add_argument(
            "--uninstall", action="store_true", help="Drop every trigger and function of ours."
        )
        parser.add_argument(
            "--prune",
            action="store_true",
            help="Also drop triggers of ours that no declaration asks for any more.",
        )
        parser.add_argument(
            "--sql",
            action="store_true",
            help="Print the SQL that would be run and change nothing (for declarations "
            "whose table or event table does not exist yet: their SQL, marked as such; "
            "when it cannot connect to the database: the SQL of every selected "
            "declaration, without the drops of what earlier installs left).",
        )

    def handle(self, *args: str, **options: Any) -> None:
        selectors = tuple(options["selectors"])
        self.verbosity = options["verbosity"]
        using = options["database"]
        if using not in connections:
            raise CommandError(f"Unknown database alias {using!r}.")
        if options["check"] and options["sql"]:
            # --check reports and exits 1 on a problem, --sql prints SQL and exits 0:
            # one would silently win (as --check and --uninstall, wrong usage).
            raise CommandError(
                "--check and --sql exclude each other: --check reports what is off and "
                "exits 1 if anything is; --sql prints the SQL that would fix it (add --prune "
                "for the unknown ones).",
                returncode=2,
            )
        if connections[using].vendor != "postgresql":
            raise CommandError(
                f"Database {using!r} uses {connections[using].settings_dict['ENGINE']}; "
                "django-pgnotify needs PostgreSQL."
            )
        try:
            # Checking reports, and --prune and --uninstall drop, what models that
            # stopped declaring left: a selector of theirs is no mistake.
            leftovers = options["check"] or options["prune"] or options["uninstall"]
            installation.require_declarations(selectors, [using], or_installed=leftovers)
            if options["sql"]:
                self.print_sql(selectors, using, options)
            elif options["check"]:
                self.check_triggers(selectors, using)
            elif options["uninstall"]:
                self.report(installation.uninstall_triggers(selectors, using), "Removed", using)
            else:
                self.report(installation.install_triggers(selectors, using), "Installed", using)
                if options["prune"]:
                    self.report(installation.prune_triggers(selectors, using), "Pruned", using)
                else:
                    self.report_leftovers(selectors, using)
        except (ImproperlyConfigured, installation.CannotInstall) as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            where = describe(connection_params(using))
            raise CommandError(f"Database {using!r} ({where}): {exc}".strip()) from exc

    def print_sql(self, selectors: tuple[str, ...], using: str, options: dict[str, Any]) -> None:
        pruning = options["prune"]
        try:
            connections[using].ensure_connection()
        except OperationalError as exc:
            if options["uninstall"] or pruning:  # only the database knows what is there
                raise
            self.print_declared_sql(selectors, using, exc)
            return
        if options["uninstall"]:
            drops = []
            states = installation.inspect_triggers(selectors, using)
            for state in states:
                if state.status == installation.UNKNOWN:
                    drops.append((f"prune {state.uri}", state.drop_sql))
                elif state.uninstall_sql:
                    drops.append((f"remove {state.uri}", state.uninstall_sql))
                if state.kept:
                    self.stdout.write(f"-- {state.uri}: {state.kept_detail}.\n")
            self.write_drops(drops)
            self.write_unclaimed(states, using, sql_comment=True)
            return
        changes = installation.install_plan(selectors, using, awaiting_migrate=True)
        awaiting = (installation.NO_TABLE, installation.NO_EVENT_TABLE)
        waiting = [state for state in changes if state.status in awaiting]
        changes = [state for state in changes if state.status not in awaiting]
        pruned = []
        if pruning:  # as prune_triggers finds them after the install
            removed = {state.uri for state in changes}
            pruned = [
                state
                for state in installation.inspect_triggers(selectors, using)
                if state.status == installation.UNKNOWN and state.uri not in removed
            ]
        if not changes and not pruned and not waiting and self.verbosity < 1:
            return
        where = describe(connection_params(using))
        self.stdout.write(f"-- What pgnotify_install would run in database {using!r} ({where}).\n")
        for state in changes:
            superseded = state.status == installation.UNKNOWN
            heading = f"remove {state.uri}" if superseded else state.uri
            self.stdout.write(f"-- {heading}\n{state.install_sql}\n")
        self.write_drops([(f"prune {state.uri}", state.drop_sql) for state in pruned])
        self.write_unclaimed([*changes, *pruned], using, sql_comment=True)
        for state in waiting:  # the SQL for the DBA, ahead of migrate
            assert state.sql is not None
            reason = state.detail or f"table {state.table} does not exist yet"
            self.stdout.write(
                f"-- {state.uri}: pgnotify_install refuses it now ({state.status}: {reason}).\n"
                "-- Run this only once migrate has created the table(s):\n"
                f"{state.sql.install}\n"
            )
            if state.status == installation.NO_TABLE:  # its partitions are not known either
                self.write_partition_triggers(state.sql)
        if not changes and not pruned and not waiting:
            self.stdout.write("-- Nothing to run: all triggers are up to date.\n")

    def write_drops(self, drops: list[tuple[str, str]]) -> None:
        """Each ``(heading, SQL)``'s trigger drops under its heading, then every
        function drop, as the installer runs them: a function may be called by
        triggers under another heading."""
        functions = []
        for heading, script in drops:
            drop_triggers, drop_functions = installation.split_drops(script)
            self.stdout.write("".join(f"{line}\n" for line in [f"-- {heading}", *drop_triggers]))
            functions += drop_functions
        if functions:
            lines = ["-- functions, once no trigger calls them", *functions]
            self.stdout.write("".join(f"{line}\n" for line in lines))

    def print_declared_sql(self, selectors: tuple[str, ...], using: str, error: Exception) -> None:
        """Without the database: the SQL of every selected declaration, in the form
        every supported server runs. What an earlier install left is not known."""
        where = describe(connection_params(using))
        self.stdout.write(
            f"-- Cannot connect to database {using!r} ({where}): {' '.join(str(error).split())}\n"
            "-- Below is the SQL of every selected declaration, in the form every supported\n"
            "-- server runs. It does not drop what an earlier install left (the triggers of a\n"
            "-- renamed declaration, the function of a renamed table or model), as\n"
            "-- pgnotify_install does; connected to the database, --sql prints those drops.\n"
        )
        for declaration in installation.declarations_for(selectors, using):
            built = build_trigger_sql(declaration)
            self.stdout.write(f"-- {built.uri}\n{built.install}\n")
            self.write_partition_triggers(built)

    def write_partition_triggers(self, built: TriggerSQL) -> None:
        """The block that gives the partitions the table has when it runs the statement
        triggers: written without the database, the SQL cannot name them."""
        block = build_partition_triggers_sql(built)
        if block:
            self.stdout.write(
                "-- The same triggers on each partition of the table, if it is partitioned,\n"
                "-- as it is when this runs (none for a table that is not):\n"
                f"{block}\n"
            )

    def check_triggers(self, selectors: tuple[str, ...], using: str) -> None:
        states = installation.inspect_triggers(selectors, using)
        problems = [s for s in states if s.status != installation.INSTALLED]
        for state in states:
            if state.status == installation.INSTALLED:
                if self.verbosity >= 2:
                    self.stdout.write(str(state))
            else:
                self.stdout.write(self.style.ERROR(str(state)))
        if problems:
            statuses = {s.status for s in problems}
            advice = ["run manage.py pgnotify_install (with --prune for unknown ones)"]
            if statuses & {installation.NO_TABLE, installation.NO_EVENT_TABLE}:
                advice.append("a declaration with no table or no event table needs migrate first")
            if statuses & set(installation.NEEDS_CHANGE):
                advice.append("a declaration that is not a table or in conflict needs changing")
            raise CommandError(
                f"{len(problems)} trigger problem(s) in database {using!r}; "
                + "; ".join(advice)
                + ".",
                returncode=1,
            )
        if self.verbosity >= 1:
            self.stdout.write(
                self.style.SUCCESS(f"All {len(states)} declaration(s) are installed and current.")
            )

    def report_leftovers(self, selectors: tuple[str, ...], using: str) -> None:
        """Say that triggers or functions of ours no declaration asks for remain:
        ``--check`` counts them, and only ``--prune`` drops them."""
        if self.verbosity < 1:
            return
        unknown = [
            state
            for state in installation.inspect_triggers(selectors, using)
            if state.status == installation.UNKNOWN
        ]
        if unknown:
            names = ", ".join(state.subject for state in unknown)
            self.stdout.write(
                self.style.WARNING(
                    f"{len(unknown)} leftover(s) of ours that no declaration asks for any "
                    f"more (unknown, for --check): {names}; pgnotify_install --prune removes "
                    "them."
                )
            )

    def write_unclaimed(
        self, states: list[installation.TriggerState], using: str, sql_comment: bool = False
    ) -> None:
        """Warn of the pending durable events that ``states`` leave for no listener to
        claim: the unknown ones, whose triggers are (or would be) dropped, and live
        ones, whose triggers (durable ones before, maybe) are (or would be) rebuilt."""
        try:
            warnings = installation.unclaimed_warnings(using, states)
        except DatabaseError as exc:  # what was asked is done: say so, not fail it
            self.stderr.write(
                "Warning: cannot look for pending durable events of the removed declarations: "
                + " ".join(str(exc).split())
            )
            return
        for text in warnings:
            if sql_comment:  # the output stays SQL to run
                self.stdout.write(f"-- Warning: {text}\n")
            else:
                self.stdout.write(self.style.WARNING(f"Warning: {text}"))

    def report(self, states: list[installation.TriggerState], verb: str, using: str) -> None:
        changed = []
        for state in states:
            if verb != "Removed" or state.uninstall_sql:  # else uninstall left it all
                self.stdout.write(self.style.SUCCESS(installation.describe_change(state, verb)))
                changed.append(state)
            if verb == "Removed" and state.kept:
                detail = state.kept_detail
                self.stdout.write(self.style.WARNING(f"{detail[0].upper()}{detail[1:]}."))
        self.write_unclaimed(changed, using)
        if not changed and self.verbosity >= 1:
            nothing = {
                "Installed": "All triggers are up to date.",
                "Pruned": "Nothing to prune.",
                "Removed": "Nothing to remove.",
            }
            self.stdout.write(nothing[verb])
