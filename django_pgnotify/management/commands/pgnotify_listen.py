"""``manage.py pgnotify_listen``: re-emit notifications as ``row_changed`` signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from django_pgnotify import installation
from django_pgnotify.conf import get_setting
from django_pgnotify.connection import NotPostgreSQL, connection_params, describe
from django_pgnotify.dispatch import WATCHES_ONLY
from django_pgnotify.events import RowChange
from django_pgnotify.listener import (
    Listener,
    ListenerError,
    freeze_startup_objects,
    retry_until_reachable,
)
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
        parser.add_argument(
            "--ignore-own-changes",
            action="store_true",
            default=None,
            help="Skip changes made by this process's own database connections.",
        )
        parser.add_argument(
            "--health-file",
            metavar="PATH",
            help="Touch PATH while the listener is healthy (for liveness probes).",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="Serve Prometheus metrics on PORT at /metrics (needs prometheus-client).",
        )
        parser.add_argument(
            "--channel-layer",
            metavar="ALIAS",
            help="Also forward every change to this CHANNEL_LAYERS alias's groups "
            '(default: PGNOTIFY["CHANNEL_LAYER"]; needs the channels extra).',
        )
        parser.add_argument(
            "--metrics-address",
            default="0.0.0.0",
            metavar="ADDRESS",
            help='The address the metrics server binds to (default: "0.0.0.0").',
        )

    def handle(self, *args: str, **options: Any) -> None:
        selectors = tuple(options["selectors"])
        self.verbosity = options["verbosity"]
        using = options["database"]
        if using not in connections:
            raise CommandError(f"Unknown database alias {using!r}.")
        self.configure_logging()
        try:
            connection_params(using)
        except (NotPostgreSQL, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc

        # SIGTERM while waiting for the database, or while listening, stops cleanly.
        stopping = threading.Event()
        listener: list[Listener] = []

        def stop(*_: Any) -> None:
            stopping.set()
            for running in listener:
                running.stop()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            # Before the wait for the database: pgnotify_connected says 0 meanwhile.
            metrics = None
            if options["metrics_port"] is not None:
                metrics = self.serve_metrics(
                    using, options["metrics_port"], options["metrics_address"]
                )
            states = retry_until_reachable(
                lambda: installation.inspect_triggers(selectors, using), using, stopping
            )
            if states is None:
                return  # stopped before the database came up
            self.require_installed(states, using, selectors)
            declarations = [s.sql.declaration for s in states if s.sql is not None]
            listener.append(
                Listener(
                    declarations,
                    using,
                    dispatcher=self.channels_dispatcher(options["channel_layer"], declarations),
                    ignore_own_changes=options["ignore_own_changes"],
                    health_file=options["health_file"],
                )
            )
            if stopping.is_set():
                return
            if metrics is not None:
                metrics.listener = listener[0]
            if self.verbosity >= 2:
                row_changed.connect(
                    self.print_event, weak=False, dispatch_uid="pgnotify_listen_print"
                )
            freeze_startup_objects()
            listener[0].run()
        except ListenerError as exc:
            raise CommandError(f"Database {using!r}: {exc}.") from exc
        except ImproperlyConfigured as exc:  # a selector that names no app or model, say
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:  # a query the server refused: a permission, say
            where = describe(connection_params(using))
            raise CommandError(
                f"Database {using!r} ({where}): {' '.join(str(exc).split())}"
            ) from exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            row_changed.disconnect(dispatch_uid="pgnotify_listen_print")

    def channels_dispatcher(self, layer: str | None, declarations: list[Any]) -> Any:
        """A dispatcher that also forwards to Channels groups, if a layer is configured."""
        layer = layer or get_setting("CHANNEL_LAYER")
        if not layer:
            return None
        try:
            from django_pgnotify.channels_bridge import ChannelsDispatcher

            labels = {d.model._meta.label_lower for d in declarations}
            return ChannelsDispatcher(layer, labels)
        except ImportError as exc:
            raise CommandError(
                f'--channel-layer needs Channels: pip install "django-pgnotify[channels]" ({exc}).'
            ) from exc
        except (ImproperlyConfigured, ValueError) as exc:
            raise CommandError(str(exc)) from exc

    def serve_metrics(self, using: str, port: int, address: str) -> Any:
        """Serve /metrics; the listener is set on the collector returned once it exists."""
        try:
            from django_pgnotify.metrics import ListenerCollector, start_metrics_server

            return start_metrics_server(ListenerCollector(using=using), port, address)
        except ImportError as exc:
            raise CommandError(
                '--metrics-port needs prometheus-client: pip install "django-pgnotify[prometheus]".'
            ) from exc
        except OSError as exc:
            raise CommandError(f"Cannot serve metrics on {address}:{port}: {exc}") from exc

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
        no_event_table = [s for s in declared if s.status == installation.NO_EVENT_TABLE]
        if no_event_table:  # the durable worker would wait on it for ever
            names = ", ".join(s.uri for s in no_event_table)
            raise CommandError(
                f"Durable declaration(s) {names} cannot use the event table of database "
                f"{using!r}: {no_event_table[0].detail}."
            )
        refused = [s for s in declared if s.status in installation.NEEDS_CHANGE]
        if refused:  # their channels would never fire
            lines = "".join(f"\n  {state}" for state in refused)
            raise CommandError(
                f"These declarations cannot have triggers in database {using!r}; change or "
                f"remove them:{lines}"
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
        """``row_changed`` at ``-v 2``: print the change."""
        details = f" {event.fields}" if event.fields else ""
        if event.changed:
            details += f" changed={sorted(event.changed)}"
        if event.truncated:
            details += " (truncated)"
        self.stdout.write(f"{event.label} {event.action} pk={event.pk!r}{details}")
        self.stdout.flush()

    # Printing the changes is hearing none: the models it alone hears are still warned of.
    setattr(print_event, WATCHES_ONLY, True)

    def configure_logging(self) -> None:
        """Show the listener's log lines when the project has not configured them, and
        psycopg's warnings of its connections in the same form (a pipeline that a lost
        connection ended, say), which Python would otherwise print bare."""
        if self.verbosity < 1:
            return
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for name, level in (("django_pgnotify", logging.INFO), ("psycopg", logging.NOTSET)):
            logger = logging.getLogger(name)
            if not logger.hasHandlers():
                logger.addHandler(handler)
                if level:  # psycopg's stays at WARNING, where psycopg sets it
                    logger.setLevel(level)
