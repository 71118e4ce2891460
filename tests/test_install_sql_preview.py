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

from django_pgnotify.installation import INSTALLED, UNKNOWN, inspect_triggers
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
