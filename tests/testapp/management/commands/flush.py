"""The test suite's ``flush``: Django's, truncating only the tables that hold rows.

Every transactional test ends with a ``flush``. Django's truncates every table,
and PostgreSQL makes new files for each one it truncates: that took most of a
test's teardown, where a test writes to two or three tables. This one truncates
the tables that hold rows (with ``CASCADE``, as the tables that refer to them
must go too), and leaves the content types and permissions in place. So it
sends no ``post_migrate``: Django's receivers would find nothing to write back,
and django_pgnotify's does nothing for a flush. It is the test project's own:
``tests.testapp`` is listed first in the test settings, so its commands
override Django's; ``flush`` as users run it (asking first) is Django's.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management.color import no_style
from django.core.management.commands import flush
from django.db import connections


class Command(flush.Command):
    def handle(self, **options: Any) -> None:
        if options["interactive"] or options.get("reset_sequences", True):
            return super().handle(**options)  # as users run it, or resetting sequences
        connection = connections[options["database"]]
        kept = {ContentType._meta.db_table, Permission._meta.db_table}
        tables = [
            table
            for table in connection.introspection.django_table_names(
                only_existing=True, include_views=False
            )
            if table not in kept
        ]
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            cursor.execute(
                " UNION ALL ".join(
                    f"SELECT %s WHERE EXISTS (SELECT FROM {quote(table)})" for table in tables
                ),
                tables,
            )
            filled = [table for (table,) in cursor.fetchall()]
        if filled:
            statements = connection.ops.sql_flush(no_style(), filled, allow_cascade=True)
            connection.ops.execute_sql_flush(statements)
