"""``manage.py pgnotify_prune``: delete old handled durable events, in batches."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from django_pgnotify.conf import get_setting
from django_pgnotify.connection import NotPostgreSQL, connection_params, describe
from django_pgnotify.durable import prune_events
from django_pgnotify.status import connect_within, exhausted_bound

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` as a ``timedelta``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise CommandError(
            f"--older-than {text!r}: give a number and a unit (s, m, h, d or w), e.g. 7d.",
            returncode=2,  # wrong usage, as argparse's own errors
        )
    try:
        age = timedelta(**{_UNITS[match[2]]: float(match[1])})
        # Before the year 1 (and so, further on, before PostgreSQL's 4713 BC): the
        # server would fail the DELETE with "timestamp out of range".
        datetime.now(timezone.utc) - age
    except OverflowError:
        raise CommandError(f"--older-than {text!r} is too long ago to be a date.") from None
    return age


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
            raise CommandError("--batch-size must be at least 1.", returncode=2)
        using = options["database"]
        older_than = parse_age(options["older_than"])
        try:
            where = describe(connection_params(using))
        except (NotPostgreSQL, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
        wrapper = connections[using]
        timeout = float(get_setting("PROBE_TIMEOUT"))
        try:
            # A server that accepts and says nothing must not hold a cron job for ever.
            if wrapper.connection is None:
                connect_within(wrapper, timeout)
            deleted = prune_events(
                older_than, dead=options["dead"], batch_size=options["batch_size"], using=using
            )
        except DatabaseError as exc:
            text = " ".join(str(exc).split())
            bound = exhausted_bound(using, exc, timeout)
            if bound is not None and isinstance(exc.__cause__, psycopg.errors.ConnectionTimeout):
                text = f"did not answer within {bound}: {text}"
            elif isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
                text += (
                    f" (django_pgnotify's migrations are not applied there: run manage.py "
                    f"migrate django_pgnotify --database {using})"
                )
            raise CommandError(f"Database {using!r} ({where}): {text}") from exc
        self.stdout.write(f"Deleted {deleted} durable event(s).")
