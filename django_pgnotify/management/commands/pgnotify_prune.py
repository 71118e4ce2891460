"""``manage.py pgnotify_prune``: delete old handled durable events, in batches."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from django_pgnotify.durable import prune_events

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` as a ``timedelta``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise CommandError(
            f"--older-than {text!r}: give a number and a unit (s, m, h, d or w), e.g. 7d."
        )
    return timedelta(**{_UNITS[match[2]]: float(match[1])})


class Command(BaseCommand):
    help = (
        "Delete durable events handled (status done) longer ago than --older-than, and "
        "with --dead also dead letters. Pending events are never deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            default="7d",
            help="Age of the events to delete, e.g. 12h or 7d (default: 7d).",
        )
        parser.add_argument(
            "--dead", action="store_true", help="Delete dead letters of that age too."
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=10_000,
            help="Rows deleted per transaction (default: 10000).",
        )
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS, help="The database alias.")

    def handle(self, *args: str, **options: Any) -> None:
        if options["database"] not in connections:
            raise CommandError(f"Unknown database alias {options['database']!r}.")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")
        deleted = prune_events(
            parse_age(options["older_than"]),
            dead=options["dead"],
            batch_size=options["batch_size"],
            using=options["database"],
        )
        self.stdout.write(f"Deleted {deleted} durable event(s).")
