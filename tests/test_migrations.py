"""Triggers follow ``migrate``: real migrations of ``tests/evolving`` in a database of their own.

Each migration step runs ``manage.py migrate`` in a child process whose model
code (``EVOLVING_STEP``) matches that step, as a project's history would.
After each, a plain client writes and a plain ``LISTEN`` shows what the
triggers send.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from django.contrib.postgres.operations import CreateExtension
from django.db import migrations, models
from psycopg import sql

from django_pgnotify import wire
from django_pgnotify.migrating import models_touched
from tests.conftest import ROOT, django_env, run_manage
from tests.conftest import test_database_url as database_url

CHANNEL = "pgnotify_evolving_gadget"
MARKER = "end of test writes"


class Evolving:
    """A database for the evolving app, a connection to write and one to listen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.writer = psycopg.connect(url, autocommit=True)
        self.listener = psycopg.connect(url, autocommit=True)

    def migrate(self, step: int, *args: str, expect_failure: bool = False, **env: str) -> str:
        """``migrate evolving 000<step>`` with that step's model code; its output."""
        result = self.manage("migrate", "evolving", f"{step:04}", *args, step=step, **env)
        output = result.stdout + result.stderr
        assert (result.returncode != 0) == expect_failure, output
        return output

    def manage(self, *args: str, step: int, **env: str):
        return run_manage(
            *args,
            env=django_env(
                DATABASE_URL=self.url,
                DJANGO_SETTINGS_MODULE="tests.settings_evolving",
                EVOLVING_STEP=str(step),
                **env,
            ),
        )

    def listen(self, channel: str = CHANNEL) -> None:
        self.listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def write(self, statement: str, params: list | None = None) -> int | None:
        """Run one statement in its own transaction; the value it returns, if any."""
        cursor = self.writer.execute(statement, params)
        return cursor.fetchone()[0] if cursor.description else None

    def received(self, timeout: float = 5) -> list[wire.Message]:
        """Every message committed before a marker sent now, in commit order."""
        self.writer.execute(sql.SQL("NOTIFY {}, {}").format(sql.Identifier(CHANNEL), MARKER))
        messages = []
        for note in self.listener.notifies(timeout=timeout):
            if note.payload == MARKER:
                return messages
            messages.append(wire.parse(note.payload))
        raise AssertionError(f"the marker did not arrive within {timeout}s; got {messages}")

    def triggers(self) -> set[tuple[str, str]]:
        rows = self.writer.execute(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"
        )
        return set(rows.fetchall())

    def functions(self) -> set[str]:
        rows = self.writer.execute("SELECT proname FROM pg_proc WHERE proname LIKE 'pgnotify%'")
        return {name for (name,) in rows.fetchall()}

    def close(self) -> None:
        self.writer.close()
        self.listener.close()


@pytest.fixture
def evolving(other_connection: psycopg.Connection) -> Iterator[Evolving]:
    name = f"pgnotify_evolving_{uuid.uuid4().hex[:8]}"
    other_connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database = Evolving(database_url(dbname=name))
    try:
        yield database
    finally:
        database.close()
        other_connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def rows(messages: list[wire.Message]) -> list[tuple]:
    return [
        (
            m.action,
            m.row_objects()[0].get("fields"),
            sorted(m.row_objects()[0].get("changed") or []),
        )
        for m in messages
    ]


def test_migrate_installs_the_triggers_of_new_models_without_pgnotify_install(evolving):
    evolving.migrate(1)
    evolving.listen()
    evolving.listen("pgnotify_evolving_part")

    pk = evolving.write("INSERT INTO evolving_gadget (name, price) VALUES ('a', 1) RETURNING id")
    evolving.write("INSERT INTO evolving_part (label) VALUES ('p')")

    gadget, part = evolving.received()
    assert (gadget.model, gadget.row_objects()) == (
        "evolving.gadget",
        [{"pk": pk, "fields": {"name": "a", "price": 1}}],
    )
    assert (part.model, part.row_objects()[0]["fields"]) == ("evolving.part", {"label": "p"})


def migrate_output(evolving: Evolving, step: int, *args: str, **env: str) -> str:
    """What ``migrate evolving 000<step>`` prints to stdout; it must succeed."""
    result = evolving.manage("migrate", "evolving", f"{step:04}", *args, step=step, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_migrate_says_which_triggers_it_installed_updated_and_removed(evolving):
    installed = migrate_output(evolving, 1)
    unchanged = migrate_output(evolving, 1)
    updated = migrate_output(evolving, 2)  # AddField colour, which the declaration names
    removed = migrate_output(evolving, 2, EVOLVING_PART_QUIET="1")  # Part stops declaring

    assert installed.endswith(
        "  Applying evolving.0001_initial... OK\n"
        "Synchronizing pgnotify triggers:\n"
        '  Installed evolving.Gadget:default on "evolving_gadget"\n'
        '  Installed evolving.Part:default on "evolving_part"\n'
    ), installed
    assert "No migrations to apply." in unchanged
    assert "pgnotify" not in unchanged
    assert updated.endswith(
        "  Applying evolving.0002_gadget_colour... OK\n"
        "Synchronizing pgnotify triggers:\n"
        '  Updated evolving.Gadget:default on "evolving_gadget"\n'
    ), updated
    assert removed.endswith(
        "Synchronizing pgnotify triggers:\n"
        '  Removed evolving.Part:default on "public"."evolving_part"\n'
    ), removed


def test_migrate_at_verbosity_0_and_flush_print_nothing_of_the_triggers(evolving):
    quiet = migrate_output(evolving, 2, "-v", "0")
    flushed = evolving.manage("flush", "--no-input", step=2)

    assert quiet == ""
    assert ("evolving_gadget", "pgnotify_insert") in evolving.triggers()  # installed all the same
    assert flushed.returncode == 0, flushed.stderr
    assert "pgnotify" not in flushed.stdout


def test_adding_a_field_updates_the_declaration_it_joins(evolving):
    evolving.migrate(1)
    evolving.migrate(2)
    evolving.listen()

    pk = evolving.write(
        "INSERT INTO evolving_gadget (name, price, colour) VALUES ('a', 1, 'blue') RETURNING id"
    )
    evolving.write("UPDATE evolving_gadget SET colour = 'green' WHERE id = %s", [pk])

    assert rows(evolving.received()) == [
        ("insert", {"name": "a", "price": 1, "colour": "blue"}, []),
        ("update", {"name": "a", "price": 1, "colour": "green"}, ["colour"]),
    ]


def test_renaming_a_declared_field_works_even_for_writes_during_the_migration(evolving):
    evolving.migrate(2)
    pk = evolving.write(
        "INSERT INTO evolving_gadget (name, price, colour) VALUES ('old', 1, 'red') RETURNING id"
    )

    evolving.migrate(3)  # RenameField, then a data migration that inserts
    evolving.listen()
    evolving.write("UPDATE evolving_gadget SET title = 'renamed' WHERE id = %s", [pk])
    evolving.write("UPDATE evolving_gadget SET price = 2 WHERE id = %s", [pk])

    titles = evolving.writer.execute("SELECT title FROM evolving_gadget ORDER BY id").fetchall()
    assert titles == [("renamed",), ("from data migration",)]
    assert rows(evolving.received()) == [
        ("update", {"title": "renamed", "price": 1, "colour": "red"}, ["title"]),
        ("update", {"title": "renamed", "price": 2, "colour": "red"}, ["price"]),
    ]


def test_without_the_hook_the_same_rename_fails_in_the_data_migration(evolving):
    """What the pre_migrate step prevents: the old function reads the old column."""
    evolving.migrate(2)

    output = evolving.migrate(3, expect_failure=True, EVOLVING_INSTALL_ON_MIGRATE="0")

    assert "column n.name does not exist" in output


def test_changing_the_type_of_a_when_changed_column_succeeds(evolving):
    evolving.migrate(3)
    pk = evolving.write(
        "INSERT INTO evolving_gadget (title, price, colour) VALUES ('t', 5, 'red') RETURNING id"
    )

    evolving.migrate(4)  # AlterField price: integer -> numeric(10, 2)
    evolving.listen()
    evolving.write("UPDATE evolving_gadget SET price = 7.5 WHERE id = %s", [pk])
    evolving.write("UPDATE evolving_gadget SET price = 7.50 WHERE id = %s", [pk])  # no change

    ((action, fields, changed),) = rows(evolving.received())
    assert (action, changed) == ("update", ["price"])
    # numeric travels as a string of its digits (the decoder makes it a Decimal).
    assert fields == {"title": "t", "price": "7.50", "colour": "red"}


def test_dropping_a_declared_field_succeeds_and_writes_notify_without_it(evolving):
    evolving.migrate(4)
    pk = evolving.write(
        "INSERT INTO evolving_gadget (title, price, colour) VALUES ('t', 1, 'red') RETURNING id"
    )

    evolving.migrate(5)  # RemoveField colour, which was in fields and when_changed
    evolving.listen()
    evolving.write("INSERT INTO evolving_gadget (title, price) VALUES ('new', 2)")
    evolving.write("UPDATE evolving_gadget SET title = 'u' WHERE id = %s", [pk])
    evolving.write("DELETE FROM evolving_gadget WHERE id = %s", [pk])

    assert rows(evolving.received()) == [
        ("insert", {"title": "new", "price": "2.00"}, []),
        ("update", {"title": "u", "price": "1.00"}, ["title"]),
        ("delete", {"title": "u", "price": "1.00"}, []),
    ]


def test_check_says_when_writes_fail_for_a_column_dropped_without_the_hook(evolving):
    """The function still reads it; "outdated (function differs)" did not say that the
    table's writes fail meanwhile."""
    evolving.migrate(4)
    evolving.migrate(5, EVOLVING_INSTALL_ON_MIGRATE="0")  # RemoveField colour

    check = evolving.manage("pgnotify_install", "--check", step=5)
    with pytest.raises(psycopg.errors.UndefinedColumn):
        evolving.write("INSERT INTO evolving_gadget (title, price) VALUES ('fails', 1)")
    said = {}
    for event in ("insert", "update", "delete"):
        evolving.write(f"ALTER TABLE evolving_gadget DISABLE TRIGGER pgnotify_{event}")
        said[event] = (
            "its function reads" in evolving.manage("pgnotify_install", "--check", step=5).stdout
        )

    assert check.returncode == 1, check.stdout + check.stderr
    assert (
        'outdated: evolving.Gadget:default on "evolving_gadget" (its function reads "colour", '
        "which the table no longer has: writes to the table fail until it is installed; "
        "function differs;"
    ) in check.stdout
    # Said while one of its triggers still fires, not once none does.
    assert said == {"insert": True, "update": True, "delete": False}


def test_a_declaration_that_still_names_the_dropped_field_is_reported_and_harmless(evolving):
    evolving.migrate(4)

    check = evolving.manage("check", step=5, EVOLVING_STALE="1")
    output = evolving.migrate(5, "--skip-checks", EVOLVING_STALE="1")
    evolving.write("INSERT INTO evolving_gadget (title, price) VALUES ('still works', 1)")

    assert check.returncode != 0
    assert "pgnotify.E003" in check.stderr and "'colour'" in check.stderr
    assert "evolving.Gadget keeps its current triggers" in output
    inserted = "SELECT count(*) FROM evolving_gadget WHERE title = 'still works'"
    assert evolving.writer.execute(inserted).fetchone() == (1,)


def test_dropping_a_model_and_a_declaration_prunes_what_they_left(evolving):
    evolving.migrate(5)
    assert ("evolving_part", "pgnotify_insert") in evolving.triggers()

    evolving.migrate(5, EVOLVING_PART_QUIET="1")  # Part stops declaring: no migration
    assert not any(table == "evolving_part" for table, _ in evolving.triggers())
    evolving.migrate(6)  # DeleteModel Part

    assert {name for name in evolving.functions() if "part" in name} == set()
    assert {table for table, _ in evolving.triggers()} == {"evolving_gadget"}
    check = evolving.manage("pgnotify_install", "--check", step=6)
    assert check.returncode == 0, check.stdout + check.stderr


def test_triggers_of_tables_the_plan_does_not_touch_stay_in_place(evolving):
    evolving.migrate(1)
    before = evolving.writer.execute(
        "SELECT oid FROM pg_trigger WHERE tgrelid = 'evolving_part'::regclass ORDER BY oid"
    ).fetchall()

    evolving.migrate(2)  # changes the gadget table only

    after = evolving.writer.execute(
        "SELECT oid FROM pg_trigger WHERE tgrelid = 'evolving_part'::regclass ORDER BY oid"
    ).fetchall()
    assert before == after and len(after) == 3


def test_migrating_a_durable_app_before_django_pgnotify_installs_its_triggers_only_after(
    empty_database_url,
):
    """Triggers that write to an event table the database lacks would fail every write."""
    env = django_env(DATABASE_URL=empty_database_url)
    insert = "INSERT INTO durableapp_job (name, body, n) VALUES ('written', '', 0)"

    alone = run_manage("migrate", "durableapp", env=env)
    check = run_manage("pgnotify_install", "--check", "durableapp", env=env)
    install = run_manage("pgnotify_install", "durableapp", env=env)
    report = run_manage("pgnotify_status", "--json", "--database", "default", "durableapp", env=env)
    listen = run_manage("pgnotify_listen", "durableapp", env=env, timeout=30)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(insert)  # nothing of ours is in its way

        everything = run_manage("migrate", env=env)  # django_pgnotify's migrations too
        conn.execute(insert)
        events = conn.execute("SELECT count(*) FROM pgnotify_event").fetchone()

    assert alone.returncode == 0, alone.stderr
    assert (
        'pgnotify: durableapp.Job:default on "durableapp_job" is not installed: durable '
        "declarations write to table \"pgnotify_event\", which is not in database 'default'"
    ) in alone.stderr
    assert check.returncode == 1
    assert 'no event table: durableapp.Job:default on "durableapp_job"' in check.stdout
    assert install.returncode == 1
    assert "run manage.py migrate django_pgnotify --database default" in install.stderr
    (database,) = json.loads(report.stdout)["databases"]
    assert [d["status"] for d in database["declarations"]] == ["no event table"]
    assert database["durable"] is None  # the backlog is not counted: that would fail
    assert len(database["problems"]) == 2  # this, and no listener
    # At startup, as for a missing table: the durable worker would wait on it for ever.
    assert listen.returncode == 1
    assert (
        "Durable declaration(s) durableapp.Job:default cannot use the event table of "
        "database 'default': durable declarations write to table \"pgnotify_event\""
    ) in listen.stderr
    assert "Traceback" not in listen.stderr
    assert everything.returncode == 0, everything.stderr
    assert events == (1,)
    final = run_manage("pgnotify_install", "--check", "durableapp", env=env)
    assert final.returncode == 0, final.stdout + final.stderr


POOLED_SETTINGS = """\
import os

from django_pgnotify.embedded import database_settings

SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": database_settings(os.environ["DATABASE_URL"])}
DATABASES["pooled"] = dict(DATABASES["default"])  # a pooler in front of the same database
INSTALLED_APPS = ["django_pgnotify", "tests.durableapp"]
DATABASE_ROUTERS = ["pooled_settings.DirectOnly"]
SILENCED_SYSTEM_CHECKS = ["pgnotify.W006"]


class DirectOnly:
    def allow_migrate(self, db, app_label, **hints):
        return db == "default"
"""


def test_migrate_through_an_alias_the_router_keeps_the_models_off_prunes_none_of_theirs(
    empty_database_url, tmp_path
):
    """Its plan is empty, but its post_migrate rebuild ran with no declaration and took
    every trigger of the database for a leftover."""
    (tmp_path / "pooled_settings.py").write_text(POOLED_SETTINGS)
    env = django_env(
        DATABASE_URL=empty_database_url,
        DJANGO_SETTINGS_MODULE="pooled_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    migrated = run_manage("migrate", "-v", "0", env=env)
    assert migrated.returncode == 0, migrated.stderr

    pooled = run_manage("migrate", "--database", "pooled", env=env)
    after_migrate = run_manage("pgnotify_install", "--check", "-v", "2", env=env)
    run_manage("pgnotify_install", "-v", "0", env=env)  # puts back what it dropped, if any
    pruned = run_manage("pgnotify_install", "--prune", "--database", "pooled", env=env)
    after_prune = run_manage("pgnotify_install", "--check", "-v", "2", env=env)

    assert pooled.returncode == 0, pooled.stderr
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout == "All triggers are up to date.\nNothing to prune.\n"
    for check in (after_migrate, after_prune):
        assert check.returncode == 0, check.stdout + check.stderr
        assert 'installed: durableapp.Job:default on "durableapp_job"' in check.stdout


def test_an_event_table_behind_this_versions_migrations_gets_no_triggers_that_need_them(
    empty_database_url,
):
    """django_pgnotify upgraded, another app migrated or pgnotify_install run before
    migrate django_pgnotify: triggers writing the new columns would fail every write."""
    env = django_env(DATABASE_URL=empty_database_url)
    insert = "INSERT INTO durableapp_job (name, body, n) VALUES ('written', '', 0)"

    behind = run_manage("migrate", "django_pgnotify", "0003", env=env)
    alone = run_manage("migrate", "durableapp", env=env)
    install = run_manage("pgnotify_install", "durableapp", env=env)
    listen = run_manage("pgnotify_listen", "durableapp", env=env, timeout=30)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(insert)  # nothing of ours is in its way

        everything = run_manage("migrate", env=env)
        conn.execute(insert)
        events = conn.execute("SELECT count(*) FROM pgnotify_event").fetchone()

    assert behind.returncode == 0, behind.stderr
    assert alone.returncode == 0, alone.stderr
    lacks = (
        'table "pgnotify_event" of database \'default\' lacks columns "size", "handled" of '
        "django_pgnotify's latest migrations, which durable declarations use: run manage.py "
        "migrate django_pgnotify --database default"
    )
    assert lacks in alone.stderr
    assert install.returncode == 1
    assert lacks in install.stderr
    assert listen.returncode == 1
    assert lacks in listen.stderr
    assert "Traceback" not in listen.stderr
    assert everything.returncode == 0, everything.stderr
    assert events == (1,)


def test_an_event_table_dropped_by_hand_comes_back_as_the_advice_says(empty_database_url):
    """Its migrations are still recorded, so ``migrate django_pgnotify`` applies nothing."""
    env = django_env(DATABASE_URL=empty_database_url)
    assert run_manage("migrate", "-v", "0", env=env).returncode == 0
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE pgnotify_event")

    check = run_manage("pgnotify_install", "--check", "durableapp", env=env)
    plain = run_manage("migrate", "django_pgnotify", env=env)
    faked = run_manage("migrate", "django_pgnotify", "zero", "--fake", env=env)
    again = run_manage("migrate", "django_pgnotify", env=env)
    final = run_manage("pgnotify_install", "--check", "durableapp", env=env)

    assert check.returncode == 1
    assert (
        "create it again with their SQL, which leaves the records of migrations alone: "
        "run manage.py sqlmigrate django_pgnotify 0001_initial --database default | "
        "manage.py dbshell --database default, then the same for "
    ) in check.stdout
    assert "No migrations to apply." in plain.stdout
    assert faked.returncode == 0, faked.stderr
    assert again.returncode == 0, again.stderr
    assert final.returncode == 0, final.stdout + final.stderr


# Which tables a plan touches (no database needed)


def plan(app_label: str, *operations) -> list:
    migration = migrations.Migration("0099_test", app_label)
    migration.operations = list(operations)
    return [(migration, False)]


def test_a_field_operation_touches_its_model_and_models_pointing_to_it_only():
    touched = models_touched(
        plan("testapp", migrations.AlterField("order", "id", models.BigAutoField(primary_key=True)))
    )

    assert touched("testapp.Order")
    assert touched("testapp.Reading")  # its foreign key column follows the pk's type
    assert not touched("testapp.Tag")
    assert not touched("shop.Order")  # same model name, another app


def test_data_migrations_touch_nothing_and_raw_sql_touches_everything():
    data = models_touched(plan("testapp", migrations.RunPython(migrations.RunPython.noop)))
    raw = models_touched(plan("testapp", migrations.RunSQL("ALTER TABLE x ADD y int")))

    assert not data("testapp.Order") and not data("auth.User")
    assert raw("testapp.Order") and raw("auth.User")


def test_operations_that_keep_every_column_touch_nothing_unless_reversed():
    """Triggers of tables that only gain a column, an index or a constraint stay enabled:
    their functions read the same columns, and writes meanwhile are announced."""
    operations = [
        migrations.AddField("order", "flag", models.BooleanField(default=False)),
        migrations.AddIndex("order", models.Index(fields=["status"], name="order_status")),
        migrations.AddConstraint(
            "tag", models.CheckConstraint(condition=models.Q(id__gt=0), name="tag_id")
        ),
        migrations.AlterModelOptions("order", {"ordering": ["id"]}),
    ]
    applied = models_touched(plan("testapp", *operations, CreateExtension("pg_trgm")))
    reversed_ = models_touched([(plan("testapp", *operations)[0][0], True)])  # drops "flag"
    # A project's subclass may do anything in its database_forwards().
    custom = models_touched(plan("testapp", CustomAddField("tag", "x", models.TextField())))

    assert not applied("testapp.Order") and not applied("testapp.Tag")
    assert not applied("auth.User")
    assert reversed_("testapp.Order") and reversed_("testapp.Tag")
    assert custom("testapp.Tag")


class CustomAddField(migrations.AddField):
    """An operation of a project's own, as far as the hook can tell."""


def test_django_pgnotify_migrations_touch_no_model_unless_reversed():
    """They change the event table alone (RunSQL among them), which they keep writable
    by the triggers installed before them."""
    ours = plan("django_pgnotify", migrations.RunSQL("ALTER TABLE pgnotify_event SET (x = 1)"))

    assert not models_touched(ours)("testapp.Order")
    assert models_touched([(ours[0][0], True)])("testapp.Order")


def test_database_operations_inside_separate_database_and_state_count():
    touched = models_touched(
        plan(
            "testapp",
            migrations.SeparateDatabaseAndState(
                database_operations=[migrations.RemoveField("tag", "colour")],
                state_operations=[migrations.RemoveField("order", "note")],
            ),
        )
    )

    assert touched("testapp.Tag") and not touched("testapp.Order")
