"""Installing, checking, pruning and removing triggers in a real database.

Each test runs inside a transaction that is rolled back afterwards (PostgreSQL
DDL is transactional), so whatever it installs or breaks is undone and the
next test finds the triggers of the session fixture again.
"""

from __future__ import annotations

import dataclasses
import logging
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections, models
from django.test import override_settings
from django.test.utils import CaptureQueriesContext, isolate_apps
from psycopg import sql

from django_pgnotify import Notify, triggers
from django_pgnotify.declarations import Declaration, get_declarations, resolve_model
from django_pgnotify.installation import (
    INSTALLED,
    MISSING,
    NO_EVENT_TABLE,
    NOT_A_TABLE,
    OUTDATED,
    UNKNOWN,
    CannotInstall,
    InstallFailed,
    TableMissing,
    inspect_triggers,
    install_triggers,
    prune_triggers,
    sync_triggers,
    uninstall_triggers,
)
from django_pgnotify.naming import TableName
from django_pgnotify.status import database_status
from django_pgnotify.triggers import TriggerSQL, build_trigger_sql
from tests.conftest import assert_pickles, install_stray_declaration
from tests.durableapp.models import Job

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
    assert_pickles(info.value)
    with pytest.raises(CommandError, match=r"testapp_tag.*run manage\.py migrate"):
        run()


# Tables that cannot have the triggers, and SQL the database refuses


def put_in_place_of_the_tag_table(kind: str, definition: str) -> None:
    """Make testapp.Tag's table a relation of another kind (a view, say), as an
    unmanaged model on one would have it."""
    uninstall_triggers(["testapp.Tag"])
    execute("ALTER TABLE testapp_tag RENAME TO testapp_tag_data")
    execute(sql.SQL("CREATE {} testapp_tag {}").format(sql.SQL(kind), sql.SQL(definition)))


def occupy_the_function_name_of(label: str) -> None:
    """A function of another return type where the declaration's must go:
    inspection cannot tell, and CREATE OR REPLACE FUNCTION fails."""
    built = build_trigger_sql(declaration(label))
    execute(
        sql.SQL("CREATE FUNCTION {}() RETURNS integer LANGUAGE sql AS 'SELECT 1'").format(
            built.function
        )
    )


NOT_TABLES = [
    pytest.param("VIEW", "a view", id="view"),
    pytest.param("MATERIALIZED VIEW", "a materialized view", id="materialized-view"),
]


@pytest.mark.parametrize(("kind", "described"), NOT_TABLES)
def test_a_model_on_a_view_is_not_a_table_for_inspect_and_check(kind, described):
    put_in_place_of_the_tag_table(kind, "AS SELECT * FROM testapp_tag_data")
    out = StringIO()

    (state,) = inspect_triggers(["testapp.Tag"])
    with pytest.raises(CommandError, match="needs changing"):
        call_command("pgnotify_install", "--check", stdout=out)

    assert state.status == NOT_A_TABLE
    assert state.detail.startswith(f"{described}: PostgreSQL cannot fire these triggers on it")
    assert f'not a table: testapp.Tag:default on "testapp_tag" ({described}: ' in out.getvalue()


def test_install_refuses_a_model_on_a_view_naming_it_and_installs_nothing():
    uninstall_triggers(["testapp.Order"])
    put_in_place_of_the_tag_table("VIEW", "AS SELECT * FROM testapp_tag_data")
    before = catalogue()

    with pytest.raises(CannotInstall) as info:
        install_triggers()
    with pytest.raises(CommandError, match=r'nothing was installed(.|\n)*"testapp_tag" \(a view: '):
        run()

    assert [(s.uri, s.status) for s in info.value.states] == [("testapp.Tag:default", NOT_A_TABLE)]
    assert catalogue() == before
    assert states("testapp.Order") == {"testapp.Order:default": MISSING}


def file_fdw_available() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT FROM pg_available_extensions WHERE name = 'file_fdw'")
        return cursor.fetchone() is not None


def test_a_model_on_a_foreign_table_takes_row_level_triggers_only(settings):
    if not file_fdw_available():
        pytest.skip("this server has no file_fdw")
    execute(
        "CREATE EXTENSION IF NOT EXISTS file_fdw;"
        " CREATE SERVER pgnotify_files FOREIGN DATA WRAPPER file_fdw"
    )
    put_in_place_of_the_tag_table(
        "FOREIGN TABLE",
        "(name varchar(50), colour varchar(20)) SERVER pgnotify_files"
        " OPTIONS (filename '/dev/null')",
    )

    (state,) = inspect_triggers(["testapp.Tag"])
    settings.PGNOTIFY = {"MODELS": {"testapp.Tag": Notify(level="row")}}
    install_triggers(["testapp.Tag"])

    assert state.status == NOT_A_TABLE
    assert state.detail == (
        'a foreign table: PostgreSQL fires only row-level triggers on it; use Notify(level="row")'
    )
    assert states("testapp.Tag") == {"testapp.Tag:default": INSTALLED}


def test_migrate_sync_leaves_a_model_on_a_view_alone_and_installs_the_others(caplog):
    uninstall_triggers(["testapp.Order"])
    put_in_place_of_the_tag_table("VIEW", "AS SELECT * FROM testapp_tag_data")

    with caplog.at_level(logging.ERROR, "django_pgnotify.installation"):
        changed = sync_triggers()

    assert "testapp.Order:default" in [s.uri for s in changed]
    assert states("testapp.Order") == {"testapp.Order:default": INSTALLED}
    assert 'testapp.Tag:default on "testapp_tag" is not installed: a view: ' in caplog.text


def test_migrate_sync_rolls_back_only_the_declaration_the_database_refuses(caplog):
    uninstall_triggers(["testapp.Order", "testapp.Tag"])
    occupy_the_function_name_of("testapp.Tag")

    with caplog.at_level(logging.ERROR, "django_pgnotify.installation"):
        changed = sync_triggers()

    assert "testapp.Order:default" in [s.uri for s in changed]
    assert "testapp.Tag:default" not in [s.uri for s in changed]
    assert states("testapp.Order") == {"testapp.Order:default": INSTALLED}
    assert trigger_names("testapp_tag") == set()
    assert (
        'testapp.Tag:default on "testapp_tag" keeps its current triggers: '
        "cannot change return type of existing function"
    ) in caplog.text


def test_install_stops_at_sql_the_database_refuses_naming_the_declaration():
    uninstall_triggers(["testapp.Order", "testapp.Tag"])
    occupy_the_function_name_of("testapp.Tag")

    with pytest.raises(InstallFailed) as info:
        install_triggers()
    with pytest.raises(CommandError, match="nothing was installed") as command:
        run()

    assert info.value.state.uri == "testapp.Tag:default"
    assert_pickles(info.value)
    assert str(command.value).startswith("Database 'default' (")
    assert 'testapp.Tag:default on "testapp_tag": cannot change return type' in str(command.value)
    assert states("testapp.Order") == {"testapp.Order:default": MISSING}


def test_install_with_selectors_that_declare_nothing_fails():
    with pytest.raises(CommandError, match="No model in contenttypes declares pgnotify"):
        run("contenttypes")


# The modes that also take what a model that stopped declaring left say that too.
NOR_INSTALLED = " or has triggers or functions of ours there"

EVERY_MODE = [
    pytest.param(("--sql",), "", id="sql"),
    pytest.param(("--check",), NOR_INSTALLED, id="check"),
    pytest.param(("--prune",), NOR_INSTALLED, id="prune"),
    pytest.param(("--uninstall",), NOR_INSTALLED, id="uninstall"),
    pytest.param(("--sql", "--prune"), NOR_INSTALLED, id="sql-prune"),
    pytest.param(("--sql", "--uninstall"), NOR_INSTALLED, id="sql-uninstall"),
]


@pytest.mark.parametrize(("mode", "nor_installed"), EVERY_MODE)
def test_every_mode_refuses_selectors_that_declare_nothing_naming_them(mode, nor_installed, gone):
    """A typo'd model or the wrong --database, not a request to do (or check) nothing,
    as plain install has it. testapp.Gone's leftovers are no selected model's."""
    before = catalogue()

    with pytest.raises(CommandError) as info:
        run(*mode, "contenttypes", "testapp.Supplier")

    assert str(info.value) == (
        "No model in contenttypes testapp.Supplier declares pgnotify for database "
        f"'default'{nor_installed}."
    )
    assert catalogue() == before


def test_check_prune_and_uninstall_take_a_model_that_stopped_declaring_while_it_left_triggers():
    """testapp.Supplier declared once: what it left is theirs to report and drop."""
    left = install_stray_declaration("Supplier", "default", table="testapp_supplier")
    out = StringIO()

    with pytest.raises(CommandError, match="1 trigger problem"):
        call_command("pgnotify_install", "--check", "testapp.Supplier", stdout=out)
    previewed = run("--sql", "--uninstall", "testapp.Supplier")
    pruned = run("--prune", "testapp.Supplier")

    assert out.getvalue().startswith(f"unknown: {left.uri} on ")
    assert f"-- prune {left.uri}\nDROP TRIGGER" in previewed
    assert f"Pruned {left.uri} on " in pruned
    assert trigger_names("testapp_supplier") == set()
    with pytest.raises(CommandError, match=NOR_INSTALLED):
        run("--uninstall", "testapp.Supplier")


# Durable declarations need the event table their trigger writes to


def drop_the_event_table(using: str = "default") -> None:
    """Drop ``pgnotify_event`` for the rest of the test's transaction, as a database
    django_pgnotify's migrations were never applied to (or were reverted on) lacks it."""
    with connections[using].cursor() as cursor:
        cursor.execute("DROP TABLE pgnotify_event")


@pytest.mark.django_db(databases=["default", "other"])
@pytest.mark.parametrize("using", ["default", "other"])
def test_install_refuses_a_durable_declaration_without_the_event_table(using):
    uninstall_triggers(["durableapp", "testapp.Tag"], using)
    drop_the_event_table(using)

    with pytest.raises(CannotInstall) as info:
        install_triggers(using=using)
    with pytest.raises(CommandError, match=r'no event table: durableapp\.Job:default on "durab'):
        run("--database", using)

    (state,) = info.value.states
    assert (state.uri, state.status) == ("durableapp.Job:default", NO_EVENT_TABLE)
    assert f"which is not in database {using!r}" in state.detail
    assert states("testapp.Tag", using=using) == {"testapp.Tag:default": MISSING}


def test_status_of_a_durable_declaration_without_its_table_or_the_event_table_says_so():
    """A database never migrated: the declaration needs migrate, and the backlog, which
    lives in the missing event table, is not counted (no database error is shown)."""
    uninstall_triggers(["durableapp"])
    drop_the_event_table()
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE durableapp_job RENAME TO durableapp_job_elsewhere")
    out = StringIO()

    with pytest.raises(SystemExit):
        call_command("pgnotify_status", "durableapp.Job", "--database", "default", stdout=out)

    assert "durableapp.Job:default" in out.getvalue()
    assert "no table" in out.getvalue()
    assert "backlog" not in out.getvalue()
    assert "does not exist" not in out.getvalue()


def test_check_flags_durable_triggers_whose_event_table_was_dropped_since():
    drop_the_event_table()
    out = StringIO()

    with pytest.raises(CommandError, match="no event table needs migrate first") as info:
        call_command("pgnotify_install", "--check", stdout=out)

    assert info.value.returncode == 1
    (line,) = [line for line in out.getvalue().splitlines() if "durableapp" in line]
    assert line.startswith('no event table: durableapp.Job:default on "durableapp_job" (')
    assert line.endswith("until then, its installed triggers make every write to the table fail)")


def test_migrate_sync_drops_durable_triggers_without_the_event_table_and_installs_the_others(
    caplog,
):
    uninstall_triggers(["testapp.Order"])
    drop_the_event_table()

    with caplog.at_level(logging.ERROR, "django_pgnotify.installation"):
        changed = sync_triggers()
        again = sync_triggers()

    assert [s.uri for s in changed] == ["testapp.Order:default", "durableapp.Job:default"]
    assert again == []
    assert trigger_names("durableapp_job") == set()
    Job.objects.create(name="written")
    assert (
        'pgnotify: dropped the triggers of durableapp.Job:default on "durableapp_job", which made '
        'every write to it fail: durable declarations write to table "pgnotify_event"'
    ) in caplog.text
    assert 'durableapp.Job:default on "durableapp_job" is not installed: durable' in caplog.text


def test_triggers_still_calling_the_function_of_a_former_table_name_count_without_the_event_table(
    caplog,
):
    """After a table (or model) rename with the migrate hook off, the triggers call the
    durable function of the former name: the declaration's own name has no function."""
    function = declaration("durableapp.Job").function
    execute(f'ALTER FUNCTION "{function}"() RENAME TO "pgnotify_durableapp_former_0badc0de"')
    drop_the_event_table()
    out = StringIO()

    with pytest.raises(CommandError, match="no event table needs migrate first"):
        call_command("pgnotify_install", "--check", "durableapp", stdout=out)
    with caplog.at_level(logging.ERROR, "django_pgnotify.installation"):
        changed = sync_triggers()

    assert (
        out.getvalue()
        .rstrip()
        .endswith("until then, its installed triggers make every write to the table fail)")
    )
    assert "durableapp.Job:default" in [s.uri for s in changed]
    assert 'dropped the triggers of durableapp.Job:default on "durableapp_job"' in caplog.text
    assert trigger_names("durableapp_job") == set()
    Job.objects.create(name="written")  # the triggers left would have failed it


class EventTableOnDefaultOnly:
    """A router that keeps django_pgnotify off every database but "default"."""

    def allow_migrate(self, db: str, app_label: str, **hints: object) -> bool | None:
        return db == "default" if app_label == "django_pgnotify" else None


@pytest.mark.django_db(databases=["default", "other"])
@override_settings(DATABASE_ROUTERS=[f"{__name__}.EventTableOnDefaultOnly"])
def test_an_event_table_a_router_keeps_off_the_database_is_not_taken_for_one_dropped_by_hand():
    """Django records the migrations a router skips: the table was never there, and
    running their SQL by hand is not the advice (pgnotify.W006's is)."""
    drop_the_event_table("other")

    (state,) = inspect_triggers(["durableapp"], "other")

    assert state.status == NO_EVENT_TABLE
    assert (
        "a database router keeps django_pgnotify's migrations off it (pgnotify.W006): make "
        "the router's allow_migrate() allow app 'django_pgnotify' on 'other'"
    ) in state.detail
    assert "sqlmigrate" not in state.detail


class DeclaringAppsOnDefaultOnly:
    """A router that keeps the apps that declare pgnotify off every database but "default"."""

    def allow_migrate(self, db: str, app_label: str, **hints: object) -> bool | None:
        return db == "default" if app_label in ("testapp", "durableapp", "auth") else None


@pytest.mark.django_db(databases=["default", "other"])
def test_an_alias_the_router_keeps_the_models_off_leaves_their_triggers_alone(caplog):
    """That alias may name the same database (a pooler in front of it): what the models
    installed through the other is neither unknown nor pruned there; true leftovers are."""
    install_triggers(using="other")
    declared = states(using="other")
    gone = install_stray_declaration("Gone", "gone")
    with connections["other"].cursor() as cursor:
        cursor.execute(gone.install)

    with override_settings(DATABASE_ROUTERS=[f"{__name__}.DeclaringAppsOnDefaultOnly"]):
        seen = states(using="other")
        with pytest.raises(CommandError, match="1 trigger problem"):
            run("--check", "--database", "other")
        with caplog.at_level(logging.INFO, "django_pgnotify.installation"):
            synced = sync_triggers("other")
        pruned = prune_triggers(using="other")
        removed = uninstall_triggers(using="other")
        out = run("--prune", "--database", "other")

    assert declared and set(declared.values()) == {INSTALLED}
    assert seen == {"testapp.Gone:gone": UNKNOWN}
    assert [s.uri for s in synced] == ["testapp.Gone:gone"]
    assert caplog.text.count("pgnotify: pruned") == 1
    assert pruned == removed == []
    assert out == "All triggers are up to date.\nNothing to prune.\n"
    assert states(using="other") == declared


def test_the_event_table_dropped_by_hand_is_not_migrate_django_pgnotifys_to_create_again():
    """Its migrations are still recorded: plain ``migrate django_pgnotify`` applies nothing."""
    drop_the_event_table()

    (state,) = inspect_triggers(["durableapp"])

    assert state.status == NO_EVENT_TABLE
    assert "though django_pgnotify's migrations are recorded as applied there" in state.detail
    assert (
        "create it again with their SQL, which leaves the records of migrations alone: "
        "run manage.py sqlmigrate django_pgnotify 0001_initial --database default | "
        "manage.py dbshell --database default, then the same for 0002_durableevent_layout, "
        "0003_durableevent_payload_text, 0004_durableevent_size_handled and "
        "0005_durableevent_pending_by_declaration; then "
        "manage.py pgnotify_install --database default"
    ) in state.detail
    assert "zero --fake" not in state.detail


def test_an_event_table_off_the_search_path_keeps_the_durable_triggers_that_writers_use(caplog):
    """The installing session may have another search_path than the writers, or lack
    USAGE on a schema of it: the table is there, and the triggers may be working."""
    before = trigger_names("durableapp_job")
    execute("CREATE SCHEMA pgnotify_elsewhere")
    execute("ALTER TABLE pgnotify_event SET SCHEMA pgnotify_elsewhere")

    with caplog.at_level(logging.ERROR, "django_pgnotify.installation"):
        changed = sync_triggers()
    with pytest.raises(CannotInstall) as info:
        install_triggers(["durableapp"])
    execute("SET LOCAL search_path = public, pgnotify_elsewhere")  # as a writer's
    Job.objects.create(name="recorded")

    assert "durableapp.Job:default" not in [s.uri for s in changed]
    assert (
        trigger_names("durableapp_job")
        == before
        == {
            "pgnotify_insert",
            "pgnotify_update",
            "pgnotify_delete",
        }
    )
    (state,) = info.value.states
    assert state.status == NO_EVENT_TABLE
    assert (
        'write to table "pgnotify_event" unqualified, which is in schema "pgnotify_elsewhere" '
        "of database 'default' but not on this session's search_path"
    ) in state.detail
    assert "triggers already installed are left as they are" in state.detail
    assert 'durableapp.Job:default on "durableapp_job" is not installed: ' in caplog.text
    assert "dropped the triggers" not in caplog.text
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pgnotify_elsewhere.pgnotify_event")
        assert cursor.fetchone() == (1,)


# A role that may not use every schema of the database


@pytest.fixture
def narrow_role() -> str:
    """A role with the rights every role has (USAGE on "public", none on the schema of
    testapp.Weird's table), which this test's transaction acts as until its rollback,
    which drops the role too."""
    name = f"{connection.settings_dict['NAME']}_narrow"
    execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(name)))
    execute(
        sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(name))
    )
    execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(name)))
    return name


def test_inspecting_one_model_looks_up_no_other_models_table():
    with CaptureQueriesContext(connection) as queries:
        inspect_triggers(["testapp.Tag"])

    looked_up = [q["sql"] for q in queries if "testapp_order" in q["sql"]]
    assert looked_up == []


def test_check_and_status_of_a_model_serve_a_role_that_may_not_use_another_models_schema(
    narrow_role,
):
    out = StringIO()

    call_command("pgnotify_install", "--check", "testapp.Tag", stdout=out)
    report = database_status("default", ["testapp.Tag"])

    assert out.getvalue().startswith("All 1 declaration(s) are installed and current.")
    assert [d["status"] for d in report.declarations] == [INSTALLED]
    assert not [p for p in report.problems if "failed" in p], report.problems


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
    execute(built.install)  # as --sql prints it when it cannot reach the database
    assert states("testapp.Order") == {built.uri: INSTALLED}
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


def test_install_renders_values_as_the_server_allows_and_sql_prints_what_install_runs():
    """Without a database connection, --sql prints the to_json form (test_commands)."""
    uninstall_triggers(["testapp.Order"])
    printed = run("--sql", "testapp.Order")
    install_triggers(["testapp.Order"])
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)",
            [build_trigger_sql(declaration("testapp.Order")).function.as_string(None) + "()"],
        )
        (installed,) = cursor.fetchone()

    newer = connection.pg_version >= triggers.JSON_SCALAR_SINCE
    assert ('JSON_SCALAR(n."status")' in installed) is newer
    assert ('to_json(n."status")' in installed) is not newer
    assert installed in printed


def test_sql_prints_nothing_to_run_when_every_declaration_is_current():
    out = run("--sql")

    assert "-- Nothing to run: all triggers are up to date." in out
    assert "CREATE" not in out and "DROP" not in out
    assert run("--sql", "-v", "0") == ""


def test_check_exits_0_when_everything_is_installed_and_current():
    out = run("--check")

    assert f"All {len(states())} declaration(s) are installed and current." in out


def test_check_prints_nothing_at_verbosity_0_when_everything_is_current():
    assert run("--check", "-v", "0") == ""


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


def set_search_path(value: str) -> None:
    """For the rest of the test's transaction."""
    execute(sql.SQL("SELECT set_config('search_path', {}, true)").format(sql.Literal(value)))


def test_triggers_installed_from_one_search_path_are_current_from_another():
    """testapp.Weird's table is in the schema "pgnotify odd": pg_get_triggerdef()
    names it with the schema only when the search_path does not include it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('search_path')")
        (default,) = cursor.fetchone()
    extended = f'"pgnotify odd", {default}'

    set_search_path(extended)  # installed with the default path (session fixture)
    assert states("testapp.Weird") == {"testapp.Weird:default": INSTALLED}
    assert install_triggers(["testapp.Weird"]) == []
    uninstall_triggers(["testapp.Weird"])
    install_triggers(["testapp.Weird"])
    set_search_path(default)  # installed with the extended path

    assert states("testapp.Weird") == {"testapp.Weird:default": INSTALLED}
    assert install_triggers(["testapp.Weird"]) == []


@pytest.mark.parametrize(("drift", "detail"), DRIFTS)
def test_install_brings_drifted_triggers_back_to_the_definition(drift, detail):
    drift(build_trigger_sql(declaration("testapp.Order")))

    out = run()

    assert "Updated testapp.Order:default on" in out
    assert set(states().values()) == {INSTALLED}


# A table renamed or moved to another schema (AlterModelTable, hook off)


@pytest.fixture(params=["renamed", "moved"])
def former_table(request) -> TriggerSQL:
    """testapp.Tag's triggers as installed on its table's former name, or in its
    former schema, before a migration renamed or moved it (triggers move with a
    table; the function's name follows the table's, so it is another)."""
    tag = declaration("testapp.Tag")
    uninstall_triggers(["testapp.Tag"])
    if request.param == "renamed":
        former = TableName(None, "testapp_tag_before")
        execute("ALTER TABLE testapp_tag RENAME TO testapp_tag_before")
        back = "ALTER TABLE testapp_tag_before RENAME TO testapp_tag"
    else:
        former = TableName("pgnotify_former", "testapp_tag")
        execute("CREATE SCHEMA pgnotify_former; ALTER TABLE testapp_tag SET SCHEMA pgnotify_former")
        back = "ALTER TABLE pgnotify_former.testapp_tag SET SCHEMA public"
    built = build_trigger_sql(dataclasses.replace(tag, table=former), connection.pg_version)
    execute(built.install)
    execute(back)
    return built


def functions() -> set[str]:
    return {name for kind, _, name, _, _ in catalogue() if kind == "function"}


def test_one_install_converges_after_the_table_was_renamed_or_moved(former_table):
    (state,) = inspect_triggers(["testapp.Tag"])
    assert state.status == OUTDATED
    assert "its triggers call" in state.detail
    assert former_table.declaration.function in state.detail

    out = run()

    assert "Updated testapp.Tag:default on" in out
    assert run("--check").startswith("All ")
    assert former_table.declaration.function not in functions()
    assert declaration("testapp.Tag").function in functions()


def test_uninstall_after_the_table_was_renamed_or_moved_removes_the_former_function(former_table):
    uninstall_triggers(["testapp.Tag"])

    assert trigger_names("testapp_tag") == set()
    assert former_table.declaration.function not in functions()
    assert states("testapp.Tag") == {"testapp.Tag:default": MISSING}
    assert UNKNOWN not in states().values()


# A model renamed (RenameModel, hook off)


def installed_by_a_former_model(label: str, events: tuple[str, ...]) -> TriggerSQL:
    """The model ``label``'s table as a RenameModel from ``testapp.Label`` leaves it:
    renamed with its triggers, which keep the former model's URI and call the
    function named after the table's former name."""
    table = declaration(label).table.name
    uninstall_triggers([label])
    execute(f"ALTER TABLE {table} RENAME TO testapp_label")
    former = install_stray_declaration("Label", "default", table="testapp_label", events=events)
    execute(f"ALTER TABLE testapp_label RENAME TO {table}")
    return former


def test_one_install_converges_after_the_model_was_renamed():
    former = installed_by_a_former_model("testapp.Tag", ("insert", "update", "delete"))

    out = run()

    assert "Updated testapp.Tag:default on" in out
    assert run("--check").startswith("All ")
    assert former.declaration.function not in functions()


def test_after_a_model_rename_the_former_function_stays_while_a_leftover_trigger_calls_it():
    """testapp.Article declares no delete: the former model's delete trigger is not
    one install rebuilds, so its function stays until --prune drops both."""
    former = installed_by_a_former_model("testapp.Article", ("insert", "update", "delete"))

    out = run()

    assert "Updated testapp.Article:default on" in out
    assert trigger_names("testapp_article") == {
        "pgnotify_insert",
        "pgnotify_update",
        "pgnotify_delete",
    }
    assert states()["testapp.Label:default"] == UNKNOWN
    assert former.declaration.function in functions()
    run("--prune")
    assert run("--check").startswith("All ")
    assert former.declaration.function not in functions()


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
    out = run()

    assert states()["testapp.Gone:gone"] == UNKNOWN
    assert out == (
        "All triggers are up to date.\n"
        "1 leftover(s) of ours that no declaration asks for any more (unknown, for --check): "
        'testapp.Gone:gone on "public"."testapp_tag"; pgnotify_install --prune removes them.\n'
    )
    assert run("-v", "0") == ""


def test_a_function_of_ours_without_a_trigger_is_named_without_a_table(gone, caplog):
    execute(sql.SQL("DROP TRIGGER pgnotify_gone_insert ON testapp_tag"))

    with pytest.raises(CommandError):
        run("--check")
    check = (state for state in inspect_triggers() if state.status == UNKNOWN)
    with caplog.at_level(logging.INFO, "django_pgnotify.installation"):
        out = run("--prune")

    assert str(next(check)) == (
        'unknown: testapp.Gone:gone (function "public".'
        f"{gone.function.as_string(None)} has no trigger)"
    )
    assert out == "All triggers are up to date.\nPruned testapp.Gone:gone\n"
    assert "pgnotify: pruned testapp.Gone:gone\n" in caplog.text


def test_check_and_sql_together_are_refused():
    with pytest.raises(CommandError, match="--check and --sql exclude each other") as info:
        run("--check", "--sql")

    assert info.value.returncode == 2


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


def test_uninstall_drops_every_trigger_before_any_function():
    """A trigger left under another URI (a model since renamed, say) that calls the
    Tag declaration's function: dropping that function before this trigger, which
    the later state drops, would fail and roll back the whole uninstall."""
    tag = build_trigger_sql(declaration("testapp.Tag"))
    execute(
        sql.SQL(
            "CREATE TRIGGER pgnotify_renamed_insert AFTER INSERT ON testapp_tag"
            " FOR EACH ROW EXECUTE FUNCTION {}(); COMMENT ON TRIGGER pgnotify_renamed_insert"
            " ON testapp_tag IS {}"
        )
        .format(tag.function, triggers.format_comment("testapp.Renamed:default", "0" * 16))
        .as_string(None)
    )
    preview = run("--uninstall", "--sql", "testapp")

    removed = uninstall_triggers(["testapp"])

    assert "testapp.Renamed:default" in {s.uri for s in removed}
    assert trigger_names("testapp_tag") == set()
    assert [name for kind, _, name, _, _ in catalogue() if "testapp" in name] == []
    # The preview runs as it stands, as the command does.
    uninstall_triggers()
    install_triggers()
    execute(
        sql.SQL(
            "CREATE TRIGGER pgnotify_renamed_insert AFTER INSERT ON testapp_tag"
            " FOR EACH ROW EXECUTE FUNCTION {}()"
        )
        .format(tag.function)
        .as_string(None)
    )
    execute(preview)
    assert trigger_names("testapp_tag") == set()


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


# migrate: what the sync keeps is what the model had before


def migrate_signals(app_label: str, *operations) -> None:
    """What migrate's signals do around a plan of these operations (not run)."""
    from django.db import migrations

    from django_pgnotify.migrating import detach_before_migrate, sync_after_migrate

    migration = migrations.Migration("0099_test", app_label)
    migration.operations = list(operations)
    plan = [(migration, False)]
    detach_before_migrate(None, "default", plan)
    sync_after_migrate(None, "default", plan)


def job_events() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pgnotify_event WHERE model = 'durableapp.job'")
        return cursor.fetchone()[0]


def test_durable_changes_written_while_migrate_adds_a_column_are_stored(caplog):
    """A migration that changes no column of the table leaves its triggers enabled."""
    from django.db import migrations, models

    from django_pgnotify.migrating import detach_before_migrate, sync_after_migrate

    migration = migrations.Migration("0099_test", "durableapp")
    migration.operations = [migrations.AddField("job", "extra", models.TextField(null=True))]
    plan = [(migration, False)]
    before = job_events()

    with caplog.at_level(logging.INFO, "django_pgnotify"):
        detach_before_migrate(None, "default", plan)
        execute("ALTER TABLE durableapp_job ADD COLUMN extra text")  # what the plan does
        try:
            Job.objects.create(name="written by another process meanwhile")
            sync_after_migrate(None, "default", plan)
        finally:
            execute("ALTER TABLE durableapp_job DROP COLUMN extra")

    assert job_events() == before + 1
    assert "disabled" not in caplog.text


def test_migrate_warns_that_durable_changes_written_while_it_changes_columns_are_not_stored(
    caplog,
):
    from django.db import migrations

    with caplog.at_level(logging.WARNING, "django_pgnotify"):
        migrate_signals("durableapp", migrations.RemoveField("job", "extra"))

    (warning,) = [r for r in caplog.records if "not stored" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert (
        "changes written to the tables of durable declarations whose columns the migration "
        "changes are not stored as durable events, nor delivered: durableapp.Job:default. "
    ) in warning.getMessage()


def test_migrate_keeps_working_the_durable_triggers_of_an_event_table_behind(caplog):
    """django_pgnotify upgraded, migrate shop before migrate django_pgnotify: the
    installed triggers (which do not write the column the table lacks) keep working."""
    from django.db import migrations

    execute("ALTER TABLE pgnotify_event DROP COLUMN handled")
    before = job_events()

    with caplog.at_level(logging.INFO, "django_pgnotify"):
        migrate_signals("durableapp", migrations.RemoveField("job", "extra"))
    Job.objects.create(name="recorded")
    events = job_events()

    assert trigger_names("durableapp_job") == {
        "pgnotify_insert",
        "pgnotify_update",
        "pgnotify_delete",
    }
    assert events == before + 1
    assert 'lacks column "handled"' in caplog.text
    assert "disabled the triggers of durableapp.Job:default" in caplog.text
    assert states("durableapp") == {"durableapp.Job:default": NO_EVENT_TABLE}
    execute("ALTER TABLE pgnotify_event ADD COLUMN handled text")  # as it was
    assert states("durableapp") == {"durableapp.Job:default": INSTALLED}


def test_migrate_leaves_disabled_the_durable_triggers_that_write_a_column_the_event_table_lost(
    caplog,
):
    """django_pgnotify's migrations rolled back past one the installed triggers write:
    enabled again, they would fail every write to the table."""
    from django.db import migrations

    execute("ALTER TABLE pgnotify_event DROP COLUMN size")
    before = job_events()
    try:
        with caplog.at_level(logging.INFO, "django_pgnotify"):
            migrate_signals("durableapp", migrations.RemoveField("job", "extra"))
        Job.objects.create(name="not recorded")  # the write works

        assert job_events() == before
        assert (
            'the triggers of durableapp.Job:default on "public"."durableapp_job" stay disabled:'
            ' the event table lacks "size", which they write'
        ) in caplog.text
    finally:
        execute("ALTER TABLE pgnotify_event ADD COLUMN size integer NOT NULL DEFAULT 1")
        call_command("pgnotify_install", "durableapp", verbosity=0)
    assert states("durableapp") == {"durableapp.Job:default": INSTALLED}


def test_migrate_leaves_disabled_the_kept_triggers_that_read_a_column_it_renamed(caplog):
    """Enabled again, they would fail every write to the table."""
    from django.db import migrations

    from django_pgnotify.migrating import detach_before_migrate, sync_after_migrate

    execute("ALTER TABLE pgnotify_event DROP COLUMN handled")
    migration = migrations.Migration("0099_test", "durableapp")
    migration.operations = [migrations.RenameField("job", "n", "count")]
    plan = [(migration, False)]

    with caplog.at_level(logging.INFO, "django_pgnotify"):
        detach_before_migrate(None, "default", plan)
        execute('ALTER TABLE durableapp_job RENAME COLUMN "body" TO "text"')  # the migration
        sync_after_migrate(None, "default", plan)
    execute("INSERT INTO durableapp_job (name, text, n) VALUES ('written', '', 0)")

    assert (
        'the triggers of durableapp.Job:default on "public"."durableapp_job" stay disabled: '
        'its table no longer has "body", which they read'
    ) in caplog.text
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT tgenabled FROM pg_trigger WHERE tgrelid = 'durableapp_job'::regclass"
        )
        assert cursor.fetchall() == [("D",)]


def test_the_next_migrate_enables_the_kept_triggers_a_failed_one_left_disabled(caplog):
    """Whatever its plan, and whatever column the failed one added and removed."""
    from django.db import migrations, models

    from django_pgnotify.migrating import detach_before_migrate

    execute("ALTER TABLE pgnotify_event DROP COLUMN handled")  # the declaration is kept
    before = job_events()
    failed = migrations.Migration("0098_test", "durableapp")
    failed.operations = [migrations.AlterField("job", "key", models.TextField())]
    detach_before_migrate(None, "default", [(failed, False)])  # and post_migrate never comes
    execute("ALTER TABLE durableapp_job ADD COLUMN key text")
    Job.objects.create(name="not recorded")
    assert job_events() == before

    with caplog.at_level(logging.INFO, "django_pgnotify"):
        migrate_signals("durableapp", migrations.RemoveField("job", "key"))
        execute("ALTER TABLE durableapp_job DROP COLUMN key")  # what the plan did
    Job.objects.create(name="recorded")

    assert job_events() == before + 1
    assert "are enabled again as they were before the migration" in caplog.text
    execute("ALTER TABLE pgnotify_event ADD COLUMN handled text")  # as it was
    assert states("durableapp") == {"durableapp.Job:default": INSTALLED}


def test_migrate_sync_names_a_model_whose_schema_the_role_may_not_use_and_syncs_the_others(
    narrow_role, caplog
):
    from django.db import migrations

    execute("RESET ROLE")
    uninstall_triggers(["testapp.Tag"])
    execute(sql.SQL("ALTER TABLE testapp_tag OWNER TO {}").format(sql.Identifier(narrow_role)))
    execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(narrow_role)))
    execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(narrow_role)))

    with caplog.at_level(logging.ERROR, "django_pgnotify"):
        migrate_signals("testapp", migrations.RemoveField("tag", "extra"))

    execute("RESET ROLE")
    assert states("testapp.Tag") == {"testapp.Tag:default": INSTALLED}
    assert (
        'testapp.Weird:default on "pgnotify odd"."Weird Table\'s $$" is not installed, and '
        "keeps what it has: its table or function cannot be looked up: permission denied for "
        "schema pgnotify odd"
    ) in caplog.text
    assert states("testapp.Weird") == {"testapp.Weird:default": INSTALLED}


def function_body(declaration_uri: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE obj_description(oid, 'pg_proc') LIKE %s",
            [f"%{declaration_uri} %"],
        )
        (body,) = cursor.fetchone()
        return body


def test_an_update_looks_for_a_row_changed_twice_only_on_a_table_with_foreign_key_actions():
    """Only such keys make a statement change a row twice: other tables' updates pay
    nothing for it, and adding one makes the declaration outdated until rebuilt."""
    assert "twice :=" not in function_body("testapp.Order:default")

    execute(
        "ALTER TABLE testapp_order ADD COLUMN pgnotify_test_parent integer"
        " REFERENCES testapp_order ON DELETE SET NULL"
    )
    try:
        assert states("testapp.Order") == {"testapp.Order:default": OUTDATED}
        call_command("pgnotify_install", "testapp.Order", verbosity=0)
        body = function_body("testapp.Order:default")
        # Known to have such a key: the repeated pk is looked for, the keys are not.
        assert 'GROUP BY n."id" HAVING count(*) > 1' in body
        assert "pg_constraint" not in body
    finally:
        execute("ALTER TABLE testapp_order DROP COLUMN pgnotify_test_parent")
        call_command("pgnotify_install", "testapp.Order", verbosity=0)
    assert states("testapp.Order") == {"testapp.Order:default": INSTALLED}


# Pending durable events that dropped triggers leave unclaimed


def install_stray_durable_declaration(model_name: str, name: str) -> TriggerSQL:
    """Install on the Job table the triggers of a durable declaration the project does
    not have (a declaration since renamed, a model since removed)."""
    with isolate_apps("tests.durableapp"):
        meta = type("Meta", (), {"app_label": "durableapp", "db_table": "durableapp_job"})
        model = type(
            model_name,
            (models.Model,),
            {"__module__": __name__, "name": models.CharField(max_length=100), "Meta": meta},
        )
        (found,), _ = resolve_model(model, Notify(name=name, fields=["name"], durable=True))
    built = build_trigger_sql(found, connection.pg_version)
    execute(built.install)
    return built


ADVICE = (
    "that no listener claims: give a renamed declaration's events its new URI (one UPDATE), "
    "declare the old one again (each new change is then stored twice), or discard them in "
    "the admin; see docs/durable.md#pending-events-no-declaration-claims"
)


MADE_LIVE = (
    "pending durable change(s) that no listener claims: set durable=True again (then "
    "pgnotify_install) until a listener has handled them, or discard them in the admin; see "
    "docs/durable.md#pending-events-no-declaration-claims"
)


def test_install_warns_of_the_pending_events_a_renamed_durable_declaration_leaves():
    install_stray_durable_declaration("Job", "stock")
    Job.objects.create(name="first")  # stored under both URIs, as before the rename
    Job.objects.create(name="second")

    out = run()

    assert 'Removed durableapp.Job:stock on "public"."durableapp_job"' in out
    assert f"Warning: durableapp.Job:stock leaves 2 pending durable change(s) {ADVICE}" in out
    assert "durableapp.Job:default" not in out  # declared: a listener claims its events


def test_prune_warns_of_the_pending_events_of_a_removed_durable_model():
    install_stray_durable_declaration("Gone", "gone")
    Job.objects.create(name="first")

    out = run("--prune")

    assert "Pruned durableapp.Gone:gone" in out
    assert f"Warning: durableapp.Gone:gone leaves 1 pending durable change(s) {ADVICE}" in out


def test_removing_triggers_without_pending_events_warns_of_nothing(gone):
    install_stray_durable_declaration("Job", "stock")  # no change stored under it yet

    out = run("--prune")

    assert "Removed durableapp.Job:stock on" in out
    assert "Pruned testapp.Gone:gone" in out
    assert "Warning" not in out


@pytest.mark.parametrize("prune", [[], ["--prune"]], ids=["renamed", "pruned"])
def test_sql_warns_of_unclaimed_pending_events_in_an_sql_comment(prune):
    install_stray_durable_declaration("Job" if not prune else "Gone", "stock")
    Job.objects.create(name="first")
    uri = "durableapp.Job:stock" if not prune else "durableapp.Gone:stock"

    out = run("--sql", *prune)

    warning = f"-- Warning: {uri} leaves 1 pending durable change(s) {ADVICE}\n"
    assert warning in out
    execute(out)  # still SQL to run: it drops what install would
    assert uri not in states()


def test_an_install_that_cannot_look_for_pending_events_says_so_and_succeeds():
    """The triggers are dropped, as asked, before the look: a failed look is a warning,
    not a failed command."""
    install_stray_durable_declaration("Job", "stock")
    execute("ALTER TABLE pgnotify_event ALTER COLUMN handled TYPE text USING handled::text")
    out, err = StringIO(), StringIO()

    call_command("pgnotify_install", stdout=out, stderr=err)

    assert 'Removed durableapp.Job:stock on "public"."durableapp_job"' in out.getvalue()
    assert "Warning: cannot look for pending durable events of the removed declarations" in (
        err.getvalue()
    )
    assert states("durableapp.Job") == {"durableapp.Job:default": INSTALLED}


def install_order_as_durable() -> None:
    """Install ``testapp.Order``'s declaration as the durable one it was before it was
    made live, and store one change with it."""
    from tests.testapp.models import Order

    (was_durable,), _ = resolve_model(
        Order, Notify(fields=["status", "total"], when_changed=["status", "total"], durable=True)
    )
    execute(build_trigger_sql(was_durable, connection.pg_version).install)
    Order.objects.create()


def test_the_migrate_sync_warns_of_unclaimed_events_beside_an_invalid_declaration(caplog):
    """The invalid one is logged and kept; the look for unclaimed events goes on
    without it, as the rest of the sync does, rather than failing the migrate."""
    from tests.testapp.models import Order

    install_stray_durable_declaration("Job", "stock")
    Job.objects.create(name="first")
    declared, Order._meta.pgnotify = Order._meta.pgnotify, Notify(fields=["nope"])
    try:
        with caplog.at_level(logging.WARNING, logger="django_pgnotify.installation"):
            changed = sync_triggers()
    finally:
        Order._meta.pgnotify = declared

    assert "durableapp.Job:stock" in {state.uri for state in changed}
    assert f"pgnotify: durableapp.Job:stock leaves 1 pending durable change(s) {ADVICE}" in (
        caplog.messages
    )
    assert any("testapp.Order keeps its current triggers" in m for m in caplog.messages)


def test_install_warns_of_the_pending_events_a_declaration_made_live_leaves():
    """Its URI stays; its triggers are rebuilt, not dropped, and store nothing any more.
    The advice is its own: a rename's remedies do not fit."""
    install_order_as_durable()

    out = run()

    assert 'Updated testapp.Order:default on "testapp_order"' in out
    assert f"Warning: testapp.Order:default, made live, leaves 1 {MADE_LIVE}" in out
    assert "renamed" not in out


def test_the_migrate_sync_logs_the_pending_events_a_declaration_made_live_leaves(caplog):
    install_order_as_durable()

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.installation"):
        sync_triggers()

    assert f"pgnotify: testapp.Order:default, made live, leaves 1 {MADE_LIVE}" in (caplog.messages)


def test_the_migrate_sync_logs_the_pending_events_a_renamed_durable_declaration_leaves(caplog):
    """Projects that leave installing to ``migrate`` hear of them too."""
    install_stray_durable_declaration("Job", "stock")
    Job.objects.create(name="first")

    with caplog.at_level(logging.WARNING, logger="django_pgnotify.installation"):
        changed = sync_triggers()

    assert "durableapp.Job:stock" in {state.uri for state in changed}
    assert f"pgnotify: durableapp.Job:stock leaves 1 pending durable change(s) {ADVICE}" in (
        caplog.messages
    )
