"""``manage.py pgnotify_status``: triggers, notification queue and listeners, per database."""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from django_pgnotify import wire
from django_pgnotify.conf import get_setting
from django_pgnotify.connection import NotPostgreSQL
from django_pgnotify.installation import declarations_for, require_declarations
from django_pgnotify.status import DatabaseStatus, database_status, queue_usage_percents


class Command(BaseCommand):
    help = (
        "Show, per database, the declared models and channels, the state of their "
        "triggers, the notification queue and the connected listeners. Exits 1 when "
        "something needs action."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "selectors",
            nargs="*",
            metavar="app_label[.Model]",
            help="Report only these apps or models (default: all).",
        )
        parser.add_argument(
            "--database",
            help="Report only this database alias (default: every PostgreSQL alias "
            "that declared models are routed to).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON, for scripts.")

    def handle(self, *args: str, **options: Any) -> None:
        selectors = tuple(options["selectors"])
        try:
            if options["database"] is not None:
                if options["database"] not in connections:
                    raise CommandError(f"Unknown database alias {options['database']!r}.")
                aliases = [options["database"]]
                require_declarations(selectors, aliases)
            else:
                postgres = [a for a in connections if connections[a].vendor == "postgresql"]
                require_declarations(selectors, postgres)
                aliases = [alias for alias in postgres if declarations_for(selectors, alias)]
            statuses = [database_status(alias, selectors) for alias in aliases]
        except (NotPostgreSQL, ImproperlyConfigured) as exc:  # an unknown selector, say
            raise CommandError(str(exc)) from exc
        if options["json"]:
            ok = all(s.ok for s in statuses)
            report = {"ok": ok, "databases": [s.as_dict() for s in statuses]}
            self.stdout.write(json.dumps(report, indent=2))
        else:
            for status in statuses:
                self.write_status(status)
        problems = sum(len(s.problems) for s in statuses)
        if problems:
            self.stderr.write(f"{problems} problem(s) need action.")
            sys.exit(1)

    def write_status(self, status: DatabaseStatus) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(f"Database {status.alias!r} ({status.where})"))
        for item in status.declarations:
            style = self.style.SUCCESS if item["status"] == "installed" else self.style.ERROR
            if item["durable"]:
                carrier = f"durable (event table {wire.EVENT_TABLE})"
            else:
                carrier = f"channel {item['channel']}" if item["channel"] else "no declaration"
            self.stdout.write(f"  {item['uri']}  {carrier}  " + style(item["status"]))
        if status.queue_usage is not None:
            threshold = float(get_setting("QUEUE_USAGE_WARNING"))
            usage, _ = queue_usage_percents(status.queue_usage, threshold, decimals=2)
            self.stdout.write(f"  notification queue: {usage} used")
        for listener in status.listeners:
            if listener["since"] is None:  # another role's session, its details hidden
                self.stdout.write(f"  listener: pid {listener['pid']}, {listener['client']}")
                continue
            self.stdout.write(
                f"  listener: pid {listener['pid']} since {listener['since']} "
                f"from {listener['client']}"
            )
        if not status.listeners and status.queue_usage is not None:  # else not looked at
            self.stdout.write("  listeners: none")
        if status.durable is not None:
            age = status.durable["oldest_pending_age"]
            self.stdout.write(
                f"  durable events: {status.durable['pending']} pending"
                + (f" (oldest {age:.1f}s old)" if age is not None else "")
                + f", {status.durable['dead']} dead letter(s), {status.durable['done']} done"
            )
        for problem in status.problems:
            self.stdout.write(self.style.ERROR(f"  needs action: {problem}"))
        if status.ok:
            self.stdout.write(self.style.SUCCESS("  OK"))
