"""Declarations the installer refuses: a model on a view, two models on one table.

``manage.py migrate`` and ``pgnotify_install`` run in child processes, with the
``tests/oddtables`` app, in a database of their own for each test. The system
checks are skipped where two models share a table: they report it before the
installer sees it, and these tests are about the installer.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import django_env, run_manage

VIEW_REFUSED = (
    'oddtables.NoteSummary:default on "oddtables_note_summary" is not installed: a view: '
    "PostgreSQL cannot fire these triggers on it"
)


class OddTables:
    """A database for the oddtables app, and a connection to look into it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = psycopg.connect(url, autocommit=True)

    def manage(self, *args: str, timeout: float = 60, **env: str):
        return run_manage(
            *args,
            env=django_env(
                DATABASE_URL=self.url, DJANGO_SETTINGS_MODULE="tests.settings_oddtables", **env
            ),
            timeout=timeout,
        )

    def triggers(self) -> dict[tuple[str, str], str]:
        """``{(table, trigger): comment}`` of every trigger."""
        rows = self.connection.execute(
            "SELECT tgrelid::regclass::text, tgname, obj_description(oid, 'pg_trigger')"
            " FROM pg_trigger WHERE NOT tgisinternal"
        )
        return {(table, name): comment for table, name, comment in rows.fetchall()}

    def tables_with_triggers(self) -> set[str]:
        return {table for table, _ in self.triggers()}


@pytest.fixture
def oddtables(empty_database_url: str) -> Iterator[OddTables]:
    database = OddTables(empty_database_url)
    try:
        yield database
    finally:
        database.connection.close()


def test_migrate_with_a_model_on_a_view_succeeds_and_installs_the_other_models(oddtables):
    first = oddtables.manage("migrate")
    again = oddtables.manage("migrate")  # "No migrations to apply."

    for result in (first, again):
        assert result.returncode == 0, result.stdout + result.stderr
        assert VIEW_REFUSED in result.stderr
        assert "Traceback" not in result.stderr
    assert oddtables.tables_with_triggers() == {"oddtables_note", "oddtables_memo"}


def test_install_and_check_name_the_model_on_a_view(oddtables):
    migrated = oddtables.manage("migrate", ODDTABLES_INSTALL_ON_MIGRATE="0")
    assert migrated.returncode == 0, migrated.stderr

    install = oddtables.manage("pgnotify_install")
    check = oddtables.manage("pgnotify_install", "--check")

    line = 'not a table: oddtables.NoteSummary:default on "oddtables_note_summary" (a view: '
    assert install.returncode == 1
    assert "nothing was installed" in install.stderr and line in install.stderr
    assert oddtables.tables_with_triggers() == set()
    assert check.returncode == 1
    assert line in check.stdout


def test_a_second_model_on_a_declared_table_is_refused_naming_both(oddtables):
    alone = oddtables.manage("migrate")
    assert alone.returncode == 0, alone.stderr
    before = oddtables.triggers()

    twins = oddtables.manage("migrate", "--skip-checks", ODDTABLES_TWIN="1")
    install = oddtables.manage("pgnotify_install", "--skip-checks", ODDTABLES_TWIN="1")
    check = oddtables.manage("pgnotify_install", "--check", "--skip-checks", ODDTABLES_TWIN="1")

    assert twins.returncode == 0, twins.stderr
    for uri, other in [
        ("oddtables.Note:default", "oddtables.NoteTwin:default"),
        ("oddtables.NoteTwin:default", "oddtables.Note:default"),
    ]:
        refused = f'{uri} on "oddtables_note" is not installed: {other} also declares it'
        assert refused in twins.stderr
        assert f'conflict: {uri} on "oddtables_note" ({other} also declares it' in install.stderr
        assert f'conflict: {uri} on "oddtables_note" ({other} also declares it' in check.stdout
    assert install.returncode == check.returncode == 1
    # Note keeps the triggers it had, and what they send.
    assert oddtables.triggers() == before
    assert all(
        "oddtables.Note:default" in comment
        for (table, _), comment in before.items()
        if table == "oddtables_note"
    )


@pytest.mark.parametrize("twin", ["1", "public"], ids=["same-name", "schema-qualified"])
def test_installing_only_the_second_model_on_a_declared_table_is_refused_too(oddtables, twin):
    assert oddtables.manage("migrate").returncode == 0
    before = oddtables.triggers()

    install = oddtables.manage(
        "pgnotify_install", "oddtables.NoteTwin", "--skip-checks", ODDTABLES_TWIN=twin
    )

    assert install.returncode == 1
    assert "conflict: oddtables.NoteTwin:default on " in install.stderr
    assert "(oddtables.Note:default also declares it" in install.stderr
    # Note keeps the triggers it had, and what they send.
    assert oddtables.triggers() == before


def test_listen_refuses_a_model_on_a_view_rather_than_wait_on_a_channel_that_never_fires(
    oddtables,
):
    assert oddtables.manage("migrate").returncode == 0

    listen = oddtables.manage("pgnotify_listen", timeout=30)

    assert listen.returncode == 1
    assert "cannot have triggers in database 'default'" in listen.stderr
    assert 'not a table: oddtables.NoteSummary:default on "oddtables_note_summary"' in listen.stderr
