"""``manage.py pgnotify_listen``: re-emit notifications as ``row_changed`` signals."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from django_pgnotify import installation
from django_pgnotify.connection import NotPostgreSQL, connection_params, describe
from django_pgnotify.events import RowChange
from django_pgnotify.listener import Listener
from django_pgnotify.signals import row_changed


class Command(BaseCommand):
    help = (
        "Listen for the notifications of the models declaring pgnotify and send "
        "each change as the row_changed signal. Runs until SIGTERM or SIGINT."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "selectors",
            nargs="*",
            metavar="app_label[.Model]",
            help="Listen only for these apps or models (default: all).",
        )
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help='The database alias whose settings the listener uses (default: "default").',
        )

    def handle(self, *args: str, **options: Any) -> None:
        selectors = tuple(options["selectors"])
        self.verbosity = options["verbosity"]
        using = options["database"]
        if using not in connections:
            raise CommandError(f"Unknown database alias {using!r}.")
        self.configure_logging()
        try:
            params = connection_params(using)
            states = installation.inspect_triggers(selectors, using)
        except (NotPostgreSQL, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(
                f"Cannot reach database {using!r} ({describe(params)}): {exc}".strip()
            ) from exc
        finally:
            connections[using].close()  # the listener has its own connection
        self.require_installed(states, using, selectors)

        listener = Listener([s.sql.declaration for s in states if s.sql is not None], using)
        if self.verbosity >= 2:
            row_changed.connect(self.print_event, weak=False, dispatch_uid="pgnotify_listen_print")
        previous = {
            sig: signal.signal(sig, lambda *_: listener.stop())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            listener.run()
        except psycopg.OperationalError as exc:
            raise CommandError(
                f"Lost or could not open the listening connection to {describe(params)}: "
                f"{exc}".strip()
            ) from exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            row_changed.disconnect(dispatch_uid="pgnotify_listen_print")

    def require_installed(
        self, states: list[installation.TriggerState], using: str, selectors: tuple[str, ...]
    ) -> None:
        declared = [s for s in states if s.sql is not None]
        if not declared:
            where = f" in {' '.join(selectors)}" if selectors else ""
            raise CommandError(
                f"No model{where} declares pgnotify for database {using!r}; add "
                "pgnotify = Notify(...) to a model's Meta or PGNOTIFY['MODELS']."
            )
        no_table = [s for s in declared if s.status == installation.NO_TABLE]
        if no_table:
            names = ", ".join(f"{s.table} ({s.uri})" for s in no_table)
            raise CommandError(
                f"Table(s) {names} do not exist in database {using!r}; run manage.py migrate."
            )
        missing = [s for s in declared if s.status == installation.MISSING]
        if missing:
            names = ", ".join(s.uri for s in missing)
            raise CommandError(
                f"Triggers are not installed for {names} in database {using!r}; "
                f"run manage.py pgnotify_install --database {using}."
            )
        for state in declared:
            if state.status == installation.OUTDATED:
                self.stderr.write(
                    f"Warning: triggers of {state.uri} are outdated ({state.detail}); "
                    f"run manage.py pgnotify_install --database {using}."
                )

    def print_event(self, sender: Any, event: RowChange, **kwargs: Any) -> None:
        details = f" {event.fields}" if event.fields else ""
        if event.changed:
            details += f" changed={sorted(event.changed)}"
        if event.truncated:
            details += " (truncated)"
        self.stdout.write(f"{event.label} {event.action} pk={event.pk!r}{details}")
        self.stdout.flush()

    def configure_logging(self) -> None:
        """Show the listener's log lines when the project has not configured them."""
        logger = logging.getLogger("django_pgnotify")
        if self.verbosity >= 1 and not logger.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
