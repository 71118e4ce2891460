"""``manage.py pgnotify_install``: create, update, check, prune or remove triggers."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from django_pgnotify import installation
from django_pgnotify.connection import connection_params, describe
from django_pgnotify.triggers import build_trigger_sql


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
            help="Print the SQL that would be run and change nothing.",
        )

    def handle(self, *args: str, **options: Any) -> None:
        selectors = tuple(options["selectors"])
        self.verbosity = options["verbosity"]
        using = options["database"]
        if using not in connections:
            raise CommandError(f"Unknown database alias {using!r}.")
        if connections[using].vendor != "postgresql":
            raise CommandError(
                f"Database {using!r} uses {connections[using].settings_dict['ENGINE']}; "
                "django-pgnotify needs PostgreSQL."
            )
        try:
            if options["sql"]:
                self.print_sql(selectors, using, options)
            elif options["check"]:
                self.check_triggers(selectors, using)
            elif options["uninstall"]:
                self.report(installation.uninstall_triggers(selectors, using), "Removed")
            else:
                nothing = not installation.declarations_for(selectors, using)
                if selectors and nothing and not options["prune"]:
                    raise CommandError(
                        f"No model in {' '.join(selectors)} declares pgnotify for database "
                        f"{using!r}; nothing to install."
                    )
                self.report(installation.install_triggers(selectors, using), "Installed")
                if options["prune"]:
                    self.report(installation.prune_triggers(selectors, using), "Pruned")
        except (ImproperlyConfigured, installation.CannotInstall) as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            where = describe(connection_params(using))
            raise CommandError(f"Database {using!r} ({where}): {exc}".strip()) from exc

    def print_sql(self, selectors: tuple[str, ...], using: str, options: dict[str, Any]) -> None:
        if options["uninstall"] or options["prune"] or options["check"]:
            states = installation.inspect_triggers(selectors, using)
            for state in states:
                if state.status == installation.UNKNOWN:
                    self.stdout.write(f"-- prune {state.uri}\n{state.drop_sql}\n")
                elif options["uninstall"] and state.uninstall_sql:
                    self.stdout.write(f"-- remove {state.uri}\n{state.uninstall_sql}\n")
            if options["uninstall"]:
                return
        for declaration in installation.declarations_for(selectors, using):
            built = build_trigger_sql(declaration)
            self.stdout.write(f"-- {built.uri}\n{built.install}\n")

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
            change = any(s.status in installation.NEEDS_CHANGE for s in problems)
            raise CommandError(
                f"{len(problems)} trigger problem(s) in database {using!r}; "
                "run manage.py pgnotify_install (with --prune for unknown ones)"
                + (
                    "; a declaration that is not a table or in conflict needs changing."
                    if change
                    else "."
                ),
                returncode=1,
            )
        self.stdout.write(
            self.style.SUCCESS(f"All {len(states)} declaration(s) are installed and current.")
        )

    def report(self, states: list[installation.TriggerState], verb: str) -> None:
        installed_words = {installation.OUTDATED: "Updated", installation.UNKNOWN: "Removed"}
        for state in states:
            word = installed_words.get(state.status, verb) if verb == "Installed" else verb
            self.stdout.write(self.style.SUCCESS(f"{word} {state.uri} on {state.table}"))
        if not states and self.verbosity >= 1:
            nothing = {
                "Installed": "All triggers are up to date.",
                "Pruned": "Nothing to prune.",
                "Removed": "Nothing to remove.",
            }
            self.stdout.write(nothing[verb])
