"""Installing, checking, pruning and removing triggers in a real database.

Each test runs inside a transaction that is rolled back afterwards (PostgreSQL
DDL is transactional), so whatever it installs or breaks is undone and the
next test finds the triggers of the session fixture again.
"""

from __future__ import annotations

import dataclasses
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from psycopg import sql

from django_pgnotify import triggers
from django_pgnotify.declarations import Declaration, get_declarations
from django_pgnotify.installation import (
    INSTALLED,
    MISSING,
    OUTDATED,
    UNKNOWN,
    TableMissing,
    inspect_triggers,
    install_triggers,
    prune_triggers,
    uninstall_triggers,
)
from django_pgnotify.triggers import TriggerSQL, build_trigger_sql
from tests.conftest import install_stray_declaration

pytestmark = pytest.mark.django_db


def declaration(label: str) -> Declaration:
    (found,) = get_declarations([label])
    return found


def states(*selectors: str, using: str = "default") -> dict[str, str]:
    """``{uri: status}`` of what is installed in ``using``."""
    return {s.uri: s.status for s in inspect_triggers(selectors, using)}


def catalogue() -> set[tuple]:
    """Every trigger and function named like ours, with what changes when one is rewritten."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 'trigger', tgrelid::regclass::text, tgname, oid::int8, xmin::text"
            " FROM pg_trigger WHERE tgname LIKE 'pgnotify%%'"
            " UNION ALL SELECT 'function', pronamespace::regnamespace::text, proname,"
            " oid::int8, xmin::text FROM pg_proc WHERE proname LIKE 'pgnotify%%'"
        )
        return set(cursor.fetchall())


def run(*args: str) -> str:
    out = StringIO()
    call_command("pgnotify_install", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def execute(statement: str | sql.Composable) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            statement.as_string(None) if isinstance(statement, sql.Composable) else statement
        )


def trigger_names(table: str) -> set[str]:
    """Every trigger on ``table``, ours or not."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            [table],
        )
        return {name for (name,) in cursor.fetchall()}


@pytest.fixture
def gone() -> TriggerSQL:
    """A declaration whose model no longer exists, installed on the Tag table."""
    return install_stray_declaration("Gone", "gone")


# Install


def test_install_is_idempotent():
    before = catalogue()

    assert install_triggers() == []
    assert run() == "All triggers are up to date.\n"
    assert catalogue() == before


def test_install_creates_what_is_missing():
    uninstall_triggers(["testapp.Tag"])
    assert states("testapp.Tag") == {"testapp.Tag:default": MISSING}

    (state,) = install_triggers()

    assert (state.uri, state.status) == ("testapp.Tag:default", MISSING)
    assert states("testapp.Tag") == {"testapp.Tag:default": INSTALLED}
    assert {"pgnotify_insert", "pgnotify_update", "pgnotify_delete"} <= trigger_names("testapp_tag")


def test_sql_option_prints_the_sql_and_changes_nothing():
    uninstall_triggers()

    out = run("--sql")

    assert "CREATE TRIGGER" in out
    assert "CREATE OR REPLACE FUNCTION" in out
    assert "-- testapp.Order:default" in out
    assert set(states().values()) == {MISSING}


def test_removing_an_event_from_a_declaration_drops_its_trigger_on_reinstall():
    article = declaration("testapp.Article")  # declares insert and update
    earlier = dataclasses.replace(article, events=("insert", "update", "delete"))
    execute(build_trigger_sql(earlier).install)
    assert "pgnotify_delete" in trigger_names("testapp_article")
    assert states("testapp.Article")["testapp.Article:default"] == OUTDATED

    (state,) = install_triggers()

    assert state.uri == "testapp.Article:default"
    assert "pgnotify_delete" not in trigger_names("testapp_article")
    assert {"pgnotify_insert", "pgnotify_update"} <= trigger_names("testapp_article")
    assert set(states().values()) == {INSTALLED}


def test_install_without_the_table_raises_table_missing_naming_it():
    execute("ALTER TABLE testapp_tag RENAME TO testapp_tag_elsewhere")

    with pytest.raises(TableMissing, match=r'"testapp_tag" \(testapp\.Tag:default\)') as info:
        install_triggers()

    assert [s.uri for s in info.value.states] == ["testapp.Tag:default"]
    with pytest.raises(CommandError, match=r"testapp_tag.*run manage\.py migrate"):
        run()


def test_install_with_selectors_that_declare_nothing_fails():
    with pytest.raises(CommandError, match="No model in contenttypes declares pgnotify"):
        run("contenttypes")


# Check and drift


def hand_edit_function(built: TriggerSQL) -> None:
    execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql"
            " AS 'BEGIN RETURN NULL; END'"
        ).format(built.function)
    )


def recreate_trigger_without_comment(built: TriggerSQL) -> None:
    name = sql.Identifier(built.triggers["insert"])
    execute(
        sql.SQL(
            "DROP TRIGGER {name} ON {table};"
            " CREATE TRIGGER {name} AFTER INSERT ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION {function}()"
        ).format(name=name, table=built.table, function=built.function)
    )


def comment_trigger_with_another_checksum(built: TriggerSQL) -> None:
    name = sql.Identifier(built.triggers["update"])
    comment = built.comment.replace(built.checksum, "0" * len(built.checksum))
    execute(
        sql.SQL("COMMENT ON TRIGGER {} ON {} IS {}").format(name, built.table, sql.Literal(comment))
    )


def test_triggers_installed_from_the_printed_sql_count_as_installed():
    built = build_trigger_sql(declaration("testapp.Order"))
    uninstall_triggers(["testapp.Order"])
    execute(run("--sql", "testapp.Order"))

    assert states("testapp.Order") == {built.uri: INSTALLED}


def test_a_repair_of_triggers_installed_from_the_printed_sql_uses_the_servers_own_form():
    if connection.pg_version < triggers.JSON_SCALAR_SINCE:
        pytest.skip("both forms are the same before PostgreSQL 17")
    built = build_trigger_sql(declaration("testapp.Order"))
    uninstall_triggers(["testapp.Order"])
    execute(run("--sql", "testapp.Order"))
    execute(
        sql.SQL("DROP TRIGGER {} ON {}").format(
            sql.Identifier(built.triggers["update"]), built.table
        )
    )
    assert states("testapp.Order") == {built.uri: OUTDATED}

    run("testapp.Order")

    assert states("testapp.Order") == {built.uri: INSTALLED}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)",
            [built.function.as_string(None) + "()"],
        )
        assert 'JSON_SCALAR(n."status")' in cursor.fetchone()[0]


def test_install_renders_values_as_the_server_allows_and_sql_prints_what_every_server_runs():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)",
            [build_trigger_sql(declaration("testapp.Order")).function.as_string(None) + "()"],
        )
        (installed,) = cursor.fetchone()
    printed = run("--sql", "testapp.Order")

    newer = connection.pg_version >= triggers.JSON_SCALAR_SINCE
    assert ('JSON_SCALAR(n."status")' in installed) is newer
    assert ('to_json(n."status")' in installed) is not newer
    assert 'to_json(n."status")' in printed
    assert "JSON_SCALAR" not in printed


def test_check_exits_0_when_everything_is_installed_and_current():
    out = run("--check")

    assert f"All {len(states())} declaration(s) are installed and current." in out


def test_check_exits_1_naming_each_missing_outdated_and_unknown_trigger(gone):
    uninstall_triggers(["testapp.Tag"])
    hand_edit_function(build_trigger_sql(declaration("testapp.Order")))
    out = StringIO()

    with pytest.raises(CommandError, match="3 trigger problem") as info:
        call_command("pgnotify_install", "--check", stdout=out)

    assert info.value.returncode == 1
    lines = out.getvalue().splitlines()
    assert any(line.startswith("missing: testapp.Tag:default on") for line in lines)
    assert any(line.startswith("outdated: testapp.Order:default on") for line in lines)
    assert any(
        line.startswith("unknown: testapp.Gone:gone on") and "pgnotify_gone_insert" in line
        for line in lines
    )


def replace_trigger_in_place_keeping_its_comment(built: TriggerSQL) -> None:
    name = sql.Identifier(built.triggers["update"])
    execute(
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER UPDATE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION {function}()"
        ).format(name=name, table=built.table, function=built.function)
    )


def disable_trigger(built: TriggerSQL) -> None:
    execute(
        sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(
            built.table, sql.Identifier(built.triggers["delete"])
        )
    )


DRIFTS = [
    pytest.param(hand_edit_function, "function differs", id="hand-edited-function"),
    pytest.param(recreate_trigger_without_comment, "pgnotify_insert", id="trigger-uncommented"),
    pytest.param(comment_trigger_with_another_checksum, "pgnotify_update", id="trigger-checksum"),
    pytest.param(
        replace_trigger_in_place_keeping_its_comment, "pgnotify_update", id="trigger-replaced"
    ),
    pytest.param(disable_trigger, "pgnotify_delete", id="trigger-disabled"),
]


@pytest.mark.parametrize(("drift", "detail"), DRIFTS)
def test_drift_from_the_definition_is_reported_outdated(drift, detail):
    built = build_trigger_sql(declaration("testapp.Order"))
    drift(built)

    (state,) = inspect_triggers(["testapp.Order"])

    assert state.status == OUTDATED
    assert detail in state.detail
    assert set(states().values()) == {INSTALLED, OUTDATED}


@pytest.mark.parametrize(("drift", "detail"), DRIFTS)
def test_install_brings_drifted_triggers_back_to_the_definition(drift, detail):
    drift(build_trigger_sql(declaration("testapp.Order")))

    out = run()

    assert "Updated testapp.Order:default on" in out
    assert set(states().values()) == {INSTALLED}


# Unknown triggers and pruning


def test_trigger_whose_declaration_disappeared_is_unknown(gone):
    found = {s.uri: s for s in inspect_triggers()}

    assert found["testapp.Gone:gone"].status == UNKNOWN
    assert "pgnotify_gone_insert" in found["testapp.Gone:gone"].detail
    assert found["testapp.Tag:default"].status == INSTALLED


def test_prune_removes_unknown_triggers_and_leaves_declared_ones(gone):
    before = catalogue()

    out = run("--prune")

    assert "Pruned testapp.Gone:gone on" in out
    assert "testapp.Gone:gone" not in states()
    assert "pgnotify_gone_insert" not in trigger_names("testapp_tag")
    removed = {(kind, name) for kind, _, name, _, _ in before - catalogue()}
    assert removed == {("trigger", "pgnotify_gone_insert"), ("function", gone.declaration.function)}
    assert set(states().values()) == {INSTALLED}


def test_function_of_ours_without_a_trigger_is_unknown_and_pruned(gone):
    execute(sql.SQL("DROP TRIGGER pgnotify_gone_insert ON testapp_tag"))
    (state,) = [s for s in inspect_triggers() if s.status == UNKNOWN]
    assert state.uri == "testapp.Gone:gone"
    assert "has no trigger" in state.detail

    (pruned,) = prune_triggers()

    assert pruned.uri == "testapp.Gone:gone"
    assert set(states().values()) == {INSTALLED}
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regprocedure(%s)", [gone.function.as_string(None) + "()"])
        assert cursor.fetchone() == (None,)


def test_install_drops_the_triggers_of_a_renamed_declaration_of_the_same_model():
    install_stray_declaration("Tag", "old")
    assert states()["testapp.Tag:old"] == UNKNOWN

    out = run()

    assert "Removed testapp.Tag:old on" in out
    assert "testapp.Tag:old" not in states()
    assert "pgnotify_old_insert" not in trigger_names("testapp_tag")
    assert states()["testapp.Tag:default"] == INSTALLED


def test_unknown_triggers_are_left_alone_without_prune(gone):
    run()

    assert states()["testapp.Gone:gone"] == UNKNOWN


# Uninstall


def test_uninstall_drops_all_of_ours_and_leaves_a_users_own_triggers():
    execute(
        "CREATE FUNCTION user_touch() RETURNS trigger LANGUAGE plpgsql"
        " AS 'BEGIN NEW.note := NEW.note || ''!''; RETURN NEW; END';"
        " CREATE TRIGGER user_audit BEFORE UPDATE ON testapp_order"
        " FOR EACH ROW EXECUTE FUNCTION user_touch();"
        " CREATE TRIGGER pgnotify_lookalike BEFORE INSERT ON testapp_order"
        " FOR EACH ROW EXECUTE FUNCTION user_touch();"
    )

    out = run("--uninstall")

    assert "Removed testapp.Order:default on" in out
    assert set(states().values()) == {MISSING}
    assert {(kind, name) for kind, _, name, _, _ in catalogue()} == {
        ("trigger", "pgnotify_lookalike")  # named like ours, but not commented as ours
    }
    assert trigger_names("testapp_order") == {"user_audit", "pgnotify_lookalike"}


def test_uninstall_also_drops_triggers_left_by_an_earlier_declaration():
    article = declaration("testapp.Article")
    earlier = dataclasses.replace(article, events=("insert", "update", "delete"))
    execute(build_trigger_sql(earlier).install)

    uninstall_triggers()

    assert trigger_names("testapp_article") == set()
    assert catalogue() == set()


def test_uninstall_drops_unknown_triggers_too(gone):
    uninstall_triggers()

    assert catalogue() == set()


# Selectors and databases


def test_selectors_narrow_install():
    uninstall_triggers()

    installed = install_triggers(["testapp.Tag", "auth"])

    assert sorted(s.uri for s in installed) == ["auth.User:default", "testapp.Tag:default"]
    found = states()
    assert found.pop("testapp.Tag:default") == found.pop("auth.User:default") == INSTALLED
    assert set(found.values()) == {MISSING}


def test_selectors_narrow_check():
    uninstall_triggers(["testapp.Tag"])

    assert run("--check", "testapp.Order", "auth").startswith("All 2 declaration(s)")
    assert states("testapp.Tag") == {"testapp.Tag:default": MISSING}
    assert set(states("testapp.Order")) == {"testapp.Order:default"}
    with pytest.raises(CommandError):
        run("--check", "testapp")


def test_selectors_narrow_uninstall():
    removed = uninstall_triggers(["testapp.Order"])

    assert [s.uri for s in removed] == ["testapp.Order:default"]
    found = states()
    assert found.pop("testapp.Order:default") == MISSING
    assert set(found.values()) == {INSTALLED}


def test_selectors_narrow_prune(gone):
    assert prune_triggers(["testapp.Order"]) == []
    assert states()["testapp.Gone:gone"] == UNKNOWN

    assert [s.uri for s in prune_triggers(["testapp"])] == ["testapp.Gone:gone"]


def test_unknown_selector_is_refused():
    with pytest.raises(CommandError, match="'nosuchapp' is neither an installed app"):
        run("nosuchapp")


@pytest.mark.django_db(databases=["default", "other"])
def test_database_option_picks_the_alias():
    uninstall_triggers(using="other")
    uninstall_triggers(["testapp.Tag"])
    assert set(states(using="other").values()) == {MISSING}

    out = run("--database", "other")

    assert "Installed testapp.Tag:default on" in out
    assert set(states(using="other").values()) == {INSTALLED}
    assert states("testapp.Tag") == {"testapp.Tag:default": MISSING}
