"""``pgnotify_install --sql`` with ``--uninstall`` or ``--prune``: what would run, and no change.

The commands page documents that ``--sql`` changes nothing in every combination: with
``--prune`` it prints the statements that would prune before the install SQL, and with
``--uninstall`` only the statements that would drop. Each test runs in a transaction that is
rolled back afterwards.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, models
from django.test.utils import isolate_apps

from django_pgnotify import Notify
from django_pgnotify.declarations import resolve_model
from django_pgnotify.installation import INSTALLED, UNKNOWN, inspect_triggers
from django_pgnotify.triggers import build_trigger_sql

pytestmark = pytest.mark.django_db


def preview(*args: str) -> str:
    out = StringIO()
    call_command("pgnotify_install", "--sql", *args, stdout=out)
    return out.getvalue()


def states() -> dict[str, str]:
    return {s.uri: s.status for s in inspect_triggers()}


def install_a_leftover() -> str:
    """Install the triggers of a declaration no model has any more; return its URI."""
    with isolate_apps("tests.testapp"):

        class Removed(models.Model):
            name = models.CharField(max_length=50, primary_key=True)

            class Meta:
                app_label = "testapp"
                db_table = "testapp_tag"

        (found,), _ = resolve_model(Removed, Notify(name="removed", events=["insert"]))
    built = build_trigger_sql(found)
    with connection.cursor() as cursor:
        cursor.execute(built.install)
    return built.uri


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
