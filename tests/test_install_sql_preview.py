"""``pgnotify_install --sql`` with ``--uninstall`` or ``--prune``: what would run, and no change.

The commands page documents that ``--sql`` changes nothing in every combination: with
``--prune`` it prints the statements that would prune before the install SQL, and with
``--uninstall`` only the statements that would drop. Each test runs in a transaction that is
rolled back afterwards.
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


def test_sql_with_prune_prints_the_leftovers_first_then_the_install_sql():
    leftover = install_a_leftover()
    before = states()
    assert before[leftover] == UNKNOWN

    out = preview("--prune")

    assert f"-- prune {leftover}" in out
    assert out.index(f"-- prune {leftover}") < out.index("-- testapp.Order:default")
    assert "CREATE TRIGGER" in out
    assert states() == before  # the leftover is still there


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
    with connection.cursor() as cursor:  # and it runs
        cursor.execute(out)
