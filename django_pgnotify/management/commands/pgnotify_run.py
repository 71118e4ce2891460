"""``manage.py pgnotify_run``: run another command paused, or with a context."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from django_pgnotify import context, paused


class Command(BaseCommand):
    help = (
        "Run a management command whose writes announce nothing (--paused) or carry "
        "a context (--context key=value), e.g. pgnotify_run --paused loaddata orders.json."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("command", help="The management command to run.")
        parser.add_argument(
            "arguments", nargs=argparse.REMAINDER, help="Its arguments and options."
        )
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help='The database alias whose writes are affected (default: "default").',
        )
        parser.add_argument(
            "--paused",
            action="store_true",
            help="Announce none of the command's writes (with --only: of those models).",
        )
        parser.add_argument(
            "--only",
            action="append",
            default=[],
            metavar="app_label.Model",
            help="With --paused: pause only this model; repeat for more.",
        )
        parser.add_argument(
            "--context",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Attach KEY=VALUE to every change the command makes; repeat for more.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        if using not in connections:
            raise CommandError(f"Unknown database alias {using!r}.")
        if options["only"] and not options["paused"]:
            raise CommandError("--only narrows --paused; add --paused.")
        values = {}
        for item in options["context"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--context takes KEY=VALUE, got {item!r}.")
            values[key] = value
        with ExitStack() as stack:
            try:
                if options["paused"]:
                    stack.enter_context(paused(*options["only"], using=using))
                if values:
                    stack.enter_context(context(using=using, **values))
            except (LookupError, ValueError) as exc:
                raise CommandError(str(exc)) from exc
            call_command(options["command"], *options["arguments"])
