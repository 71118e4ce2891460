"""``pgnotify_install --sql``: what would run, and no change.

The commands page documents that ``--sql`` changes nothing in every combination, and that
what it prints is what the command would run: the install SQL with the drops install runs,
then with ``--prune`` the statements that would prune; with ``--uninstall`` only the
statements that would drop. Each test runs in a transaction that is rolled back afterwards.
"""

from __future__ import annotations

import dataclasses
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from django_pgnotify.declarations import get_declarations
from django_pgnotify.installation import INSTALLED, UNKNOWN, inspect_triggers, uninstall_triggers
from django_pgnotify.naming import TableName
from django_pgnotify.triggers import build_trigger_sql
from tests.conftest import install_stray_declaration

pytestmark = pytest.mark.django_db


def preview(*args: str) -> str:
    out = StringIO()
    call_command("pgnotify_install", "--sql", *args, stdout=out)
    return out.getvalue()


def run_as_psql_would(printed: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(printed)


def states() -> dict[str, str]:
    return {s.uri: s.status for s in inspect_triggers()}


def install_a_leftover() -> str:
    """Install the triggers of a declaration no model has any more; return its URI."""
    return install_stray_declaration("Removed", "removed").uri


def test_sql_with_uninstall_prints_only_the_drop_statements_and_changes_nothing():
    before = states()

    out = preview("--uninstall", "testapp.Order")

    assert "-- remove testapp.Order:default" in out
    assert "DROP TRIGGER" in out and "DROP FUNCTION" in out
    assert "CREATE" not in out
    assert "testapp.Tag" not in out  # only the selection
    assert states() == before
    assert before["testapp.Order:default"] == INSTALLED


def test_sql_with_prune_prints_the_install_sql_then_the_leftovers_as_the_command_runs_them():
    leftover = install_a_leftover()
    uninstall_triggers(["testapp.Order"])
    before = states()
    assert before[leftover] == UNKNOWN

    out = preview("--prune")

    assert out.index("-- testapp.Order:default") < out.index(f"-- prune {leftover}")
    assert "CREATE TRIGGER" in out
    assert states() == before  # the leftover is still there
    run_as_psql_would(out)
    assert set(states().values()) == {INSTALLED}


def test_sql_after_a_declaration_was_renamed_drops_the_former_triggers_as_install_does():
    """testapp.Tag declared Notify(name="old") when it was installed; it now declares
    the default name. Running the printed SQL leaves one set of triggers, not two."""
    uninstall_triggers(["testapp.Tag"])
    install_stray_declaration("Tag", "old")

    out = preview("testapp.Tag")

    assert out.index("-- testapp.Tag:default") < out.index("-- remove testapp.Tag:old")
    run_as_psql_would(out)
    assert set(states().values()) == {INSTALLED}
    assert "testapp.Tag:old" not in states()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'testapp_tag'::regclass"
            " AND NOT tgisinternal ORDER BY tgname"
        )
        names = [name for (name,) in cursor.fetchall()]
    assert names == ["pgnotify_delete", "pgnotify_insert", "pgnotify_update"]


def test_sql_with_uninstall_after_a_table_rename_drops_the_former_function_after_the_triggers():
    (tag,) = get_declarations(["testapp.Tag"])
    former = build_trigger_sql(
        dataclasses.replace(tag, table=TableName(None, "testapp_tag_before")), connection.pg_version
    )
    uninstall_triggers(["testapp.Tag"])
    with connection.cursor() as cursor:  # installed under the former name, then renamed
        cursor.execute("ALTER TABLE testapp_tag RENAME TO testapp_tag_before")
        cursor.execute(former.install)
        cursor.execute("ALTER TABLE testapp_tag_before RENAME TO testapp_tag")

    out = preview("--uninstall", "testapp.Tag")

    statements = out.splitlines()[1:]
    assert any(
        s.startswith("DROP FUNCTION") and former.declaration.function in s for s in statements
    )
    assert max(i for i, s in enumerate(statements) if s.startswith("DROP TRIGGER")) < min(
        i for i, s in enumerate(statements) if s.startswith("DROP FUNCTION")
    )
    run_as_psql_would(out)


def test_sql_before_migrate_prints_what_install_will_run_under_a_comment_saying_why_not_now():
    """For a DBA to prepare the triggers before the migrations are applied."""
    uninstall_triggers(["testapp.Tag", "durableapp"])
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE testapp_tag")
        cursor.execute("DROP TABLE pgnotify_event")

    out = preview("testapp.Tag", "durableapp", "testapp.Order")

    assert (
        '-- testapp.Tag:default: pgnotify_install refuses it now (no table: table "testapp_tag" '
        "does not exist yet).\n-- Run this only once migrate has created the table(s):\n"
        'CREATE OR REPLACE FUNCTION "pgnotify_testapp_tag_'
    ) in out
    assert (
        "-- durableapp.Job:default: pgnotify_install refuses it now (no event table: durable "
        'declarations write to table "pgnotify_event", which is not in database '
    ) in out
    assert out.count("CREATE TRIGGER") >= 6  # three for each
    assert "testapp.Order" not in out  # installed and current: nothing to run


def test_sql_printed_before_migrate_counts_as_installed_once_run_on_the_table_made_since():
    """Printed with the table missing, the SQL is this server's (``JSON_SCALAR`` on
    PostgreSQL 17 and later) and cannot know the table's foreign keys: run on the
    table once made, it is installed, not ``outdated`` (function differs)."""
    uninstall_triggers(["testapp.Tag"])
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE testapp_tag RENAME TO testapp_tag_away")
        printed = preview("testapp.Tag")
        cursor.execute("ALTER TABLE testapp_tag_away RENAME TO testapp_tag")
    assert "pgnotify_install refuses it now (no table" in printed

    run_as_psql_would(printed)

    assert states()["testapp.Tag:default"] == INSTALLED
