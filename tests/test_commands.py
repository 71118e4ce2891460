"""The management commands as a user runs them: real processes, real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from psycopg import sql

from django_pgnotify import wire
from django_pgnotify.installation import uninstall_triggers
from tests.conftest import ROOT, ManagedProcess, assert_pickles, django_env, run_manage
from tests.conftest import test_database_url as database_url
from tests.test_refused_declarations import OddTables
from tests.testapp.models import Order, Tag

# pgnotify_listen


def test_listen_sends_changes_made_through_django(listener_process):
    listener = listener_process()

    order = Order.objects.create(status="new", total="1.50")

    line = listener.wait_for(rf"^testapp\.order insert pk={order.pk} ", stream="out")
    assert "'status': 'new'" in line
    assert "Decimal('1.50')" in line
    assert listener.stop() == 0


def test_listen_sends_changes_made_by_raw_sql(listener_process, other_connection):
    listener = listener_process()

    other_connection.execute("INSERT INTO testapp_tag (name, colour) VALUES ('raw', 'blue')")
    other_connection.execute("DELETE FROM testapp_tag WHERE name = 'raw'")

    listener.wait_for(r"^testapp\.tag insert pk='raw'$", stream="out")
    listener.wait_for(r"^testapp\.tag delete pk='raw'$", stream="out")
    assert listener.stop() == 0


def test_listen_with_selectors_sends_only_those_models(listener_process):
    listener = listener_process("testapp.Tag")

    Order.objects.create(status="not listened to")
    Tag.objects.create(name="listened to")

    listener.wait_for(r"^testapp\.tag insert pk='listened to'$", stream="out")
    assert not [line for name, line in listener.seen if name == "out" and "order" in line]
    assert listener.stop() == 0


def test_listen_at_verbosity_2_warns_of_models_no_receiver_hears_and_prints_their_changes(
    listener_process,
):
    """Printing the changes is no receiver of the project's: the warning stays."""
    listener = listener_process("testapp.Tag")

    listener.wait_for(
        r"no row_changed receiver is connected for testapp\.Tag: the listener dispatches "
        r"their changes to no one",
        stream="err",
    )
    Tag.objects.create(name="printed")
    listener.wait_for(r"^testapp\.tag insert pk='printed'$", stream="out")
    assert listener.stop() == 0


# What psycopg logs of a durable claim's pipeline that a lost connection ended.
PSYCOPG_WARNING = """
import logging, django
django.setup()
from django_pgnotify.management.commands.pgnotify_listen import Command
command = Command()
command.verbosity = {verbosity}
command.configure_logging()
psycopg_logger = logging.getLogger("psycopg")
psycopg_logger.warning("error ignored terminating <psycopg.AsyncPipeline [BAD]>: lost")
psycopg_logger.info("an information line")
"""


@pytest.mark.parametrize("verbosity", [1, 0])
def test_listen_shows_psycopgs_warnings_as_its_own_log_lines(verbosity):
    """With a time and a level, as the listener's own lines, not bare (as Python prints
    a warning of a logger nothing handles); psycopg's information lines stay hidden."""
    result = subprocess.run(
        [sys.executable, "-c", PSYCOPG_WARNING.format(verbosity=verbosity)],
        cwd=ROOT,
        env=django_env(DATABASE_URL=database_url()),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    warning = "error ignored terminating <psycopg.AsyncPipeline [BAD]>: lost\n"
    if verbosity:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ WARNING " + re.escape(warning), result.stderr)
    else:  # as Python prints it: -v 0 configures nothing
        assert result.stderr == warning


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_listen_exits_0_within_seconds_on_signal(listener_process, sig):
    listener = listener_process()

    started = time.monotonic()
    assert listener.stop(sig) == 0
    assert time.monotonic() - started < 3
    assert any("listener stopped" in line for line in listener.output("err"))


def test_sigterm_lets_the_event_in_hand_finish_and_starts_no_other(listener_process):
    listener = listener_process(PGNOTIFY_TEST_SLOW="1.5")
    first = Order.objects.create(status="slow")
    second = Order.objects.create(status="waiting")
    listener.wait_for(rf"^slow receiver started testapp\.order pk={first.pk}$", stream="out")

    assert listener.stop(signal.SIGTERM) == 0

    out = listener.output("out")
    finished = out.index(f"slow receiver finished testapp.order pk={first.pk}")
    # The receivers after the slow one ran too: the event was dispatched whole.
    assert any(line.startswith(f"testapp.order insert pk={first.pk} ") for line in out[finished:])
    assert not [line for line in out if f"pk={second.pk}" in line]


# pgnotify_listen and pgnotify_install refuse to start, saying why


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["pgnotify_listen", "pgnotify_install"])
@pytest.mark.parametrize("skip_checks", [False, True], ids=["checks", "skip-checks"])
def test_commands_refuse_a_database_that_is_not_postgresql(command, skip_checks):
    args = [command, "--settings", "tests.settings_sqlite"]
    result = run_manage(*args, *(["--skip-checks"] if skip_checks else []))

    assert result.returncode != 0
    assert "sqlite3" in result.stderr
    assert "PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr


def test_install_reports_an_unreachable_server():
    port = closed_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/nowhere?connect_timeout=5"

    result = run_manage("pgnotify_install", env=django_env(DATABASE_URL=url))

    assert result.returncode != 0
    assert "Database 'default'" in result.stderr or "database 'default'" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_install_sql_without_a_server_prints_every_declaration_and_says_what_it_lacks():
    port = closed_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/nowhere?connect_timeout=5"

    result = run_manage("pgnotify_install", "--sql", env=django_env(DATABASE_URL=url))

    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"-- Cannot connect to database 'default' (postgres@127.0.0.1:{port}/")
    assert "It does not drop what an earlier install left" in result.stdout
    assert "-- testapp.Order:default\n" in result.stdout
    assert "-- testapp.Tag:default\n" in result.stdout
    # The form every supported server runs, whatever the server it is run on.
    assert 'to_json(n."status")' in result.stdout and "JSON_SCALAR" not in result.stdout


def test_listen_waits_for_an_unreachable_server_naming_it_and_stops_on_sigterm():
    port = closed_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/nowhere?connect_timeout=5"
    listener = ManagedProcess(
        [sys.executable, "-m", "django", "pgnotify_listen"], django_env(DATABASE_URL=url)
    )
    try:
        line = listener.wait_for(r"cannot reach database 'default'.*\(attempt 2\)", stream="err")
        assert f"postgres@127.0.0.1:{port}/nowhere" in line
        assert "retrying in" in line

        assert listener.stop() == 0
    finally:
        listener.kill()
    assert not any("Traceback" in line for line in listener.output("err"))


def test_listen_serves_metrics_while_it_waits_for_the_database(transactional_db):
    """pgnotify_connected 0 from the start, so that an alert on it fires; Prometheus
    would otherwise see a target down, or nothing while the port is not yet served."""
    pytest.importorskip("prometheus_client")
    from tests.test_listener_resilience import free_port, scrape

    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere?connect_timeout=5"
    listener = ManagedProcess(
        [sys.executable, "-m", "django", "pgnotify_listen", "--metrics-port", str(port),
         "--metrics-address", "127.0.0.1"],
        django_env(DATABASE_URL=url),
    )  # fmt: skip
    try:
        listener.wait_for(r"cannot reach database 'default'", stream="err")
        body = scrape(port)

        assert listener.stop() == 0
    finally:
        listener.kill()
    assert 'pgnotify_connected{database="default"} 0.0' in body
    assert "pgnotify_received_total" not in body


@pytest.mark.parametrize("command", ["pgnotify_listen", "pgnotify_install"])
def test_commands_report_tables_that_are_not_migrated(command, empty_database_url):
    result = run_manage(command, env=django_env(DATABASE_URL=empty_database_url))

    assert result.returncode != 0
    assert '"testapp_order" (testapp.Order:default)' in result.stderr
    assert "migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_listen_refuses_to_start_without_triggers(restore_triggers):
    uninstall_triggers(["testapp.Tag"])

    result = run_manage("pgnotify_listen")

    assert result.returncode != 0
    assert "not installed for testapp.Tag:default" in result.stderr
    assert "pgnotify_install" in result.stderr


@pytest.mark.parametrize("command", ["pgnotify_listen", "pgnotify_install"])
def test_commands_refuse_an_unknown_database_alias(command):
    result = run_manage(command, "--database", "nope")

    assert result.returncode != 0
    assert "Unknown database alias 'nope'" in result.stderr


@pytest.mark.parametrize("command", ["pgnotify_listen", "pgnotify_install", "pgnotify_status"])
def test_commands_refuse_selectors_that_declare_nothing(command, transactional_db):
    result = run_manage(command, "contenttypes")

    assert result.returncode != 0
    assert "No model in contenttypes declares pgnotify" in result.stderr


def test_a_refused_proxy_selector_names_the_model_to_select():
    """A proxy's changes are its concrete model's, sent with that model as the sender."""
    from django_pgnotify.installation import NothingDeclared, require_declarations

    with pytest.raises(NothingDeclared) as refused:
        require_declarations(["testapp.OrderProxy", "contenttypes"], ["default"])

    assert str(refused.value).endswith(
        "declares pgnotify for database 'default'. testapp.OrderProxy is a proxy of "
        "testapp.Order: select testapp.Order."
    )
    assert_pickles(refused.value)


@pytest.mark.parametrize("command", ["pgnotify_listen", "pgnotify_install", "pgnotify_status"])
def test_commands_refuse_a_selector_that_names_no_app_or_model(command, transactional_db):
    result = run_manage(command, "nosuchapp")

    assert result.returncode == 1
    assert "'nosuchapp' is neither an installed app label nor an app.Model label" in result.stderr
    assert "Traceback" not in result.stderr


# pgnotify_install --check as a deploy script runs it


def test_install_check_exits_0_when_current_and_1_when_not(restore_triggers):
    current = run_manage("pgnotify_install", "--check")
    assert current.returncode == 0, current.stderr

    uninstall_triggers(["testapp.Tag"])
    broken = run_manage("pgnotify_install", "--check")

    assert broken.returncode == 1
    assert "missing: testapp.Tag:default" in broken.stdout
    assert "pgnotify_install" in broken.stderr


def test_install_puts_back_what_check_reported(restore_triggers):
    uninstall_triggers(["testapp.Tag"])

    installed = run_manage("pgnotify_install")

    assert installed.returncode == 0, installed.stderr
    assert "Installed testapp.Tag:default on" in installed.stdout
    assert run_manage("pgnotify_install", "--check").returncode == 0


@pytest.fixture
def narrow_role_url(other_connection) -> Iterator[str]:
    """The test database, as a role with the rights every role has: USAGE on "public",
    none on the schema of testapp.Weird's table. Dropped afterwards."""
    name = f"{connection.settings_dict['NAME']}_narrow"
    role = sql.Identifier(name)
    other_connection.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    try:
        yield database_url(user=name)
    finally:
        other_connection.execute(sql.SQL("DROP OWNED BY {}").format(role))
        other_connection.execute(sql.SQL("DROP ROLE {}").format(role))


def test_listen_reports_a_query_the_server_refuses_at_startup_without_a_traceback(
    narrow_role_url,
):
    result = run_manage(
        "pgnotify_listen", "testapp.Weird", env=django_env(DATABASE_URL=narrow_role_url)
    )

    assert result.returncode == 1
    assert "CommandError: Database 'default' (" in result.stderr
    assert "_narrow@" in result.stderr
    assert "permission denied for schema pgnotify odd" in result.stderr
    assert "Traceback" not in result.stderr


# pgnotify_install --uninstall of one of two models on one table (tests/oddtables)


@pytest.fixture
def oddtables(empty_database_url: str) -> Iterator[OddTables]:
    """A database migrated for the oddtables app: oddtables.Note's triggers installed."""
    database = OddTables(empty_database_url)
    try:
        migrated = database.manage("migrate")
        assert migrated.returncode == 0, migrated.stderr
        yield database
    finally:
        database.connection.close()


def functions_of_ours(database: OddTables) -> dict[str, str]:
    """``{function: comment}`` of every function commented as ours."""
    rows = database.connection.execute(
        "SELECT oid::regproc::text, obj_description(oid, 'pg_proc') FROM pg_proc"
        " WHERE obj_description(oid, 'pg_proc') LIKE 'django-pgnotify:%'"
    )
    return dict(rows.fetchall())


def manage_with_twin(database: OddTables, twin: str, *args: str):
    """Run a command with NoteTwin declared on Note's table: named as Note names it
    (``twin="1"``, pgnotify.E014, an error: the system checks are skipped), or in
    "public" (``twin="public"``, pgnotify.W005, a warning, which lets commands run)."""
    skip = ["--skip-checks"] if twin == "1" else []
    return database.manage(*args, *skip, ODDTABLES_TWIN=twin)


TWINS = pytest.mark.parametrize("twin", ["public", "1"], ids=["public-qualified", "same-name"])


@TWINS
def test_uninstalling_one_of_two_models_on_a_table_leaves_the_others_triggers_working(
    oddtables, twin
):
    """The triggers on the table are oddtables.Note's (installed before NoteTwin
    declared): uninstalling NoteTwin alone must not take them."""
    triggers, functions = oddtables.triggers(), functions_of_ours(oddtables)
    check_before = manage_with_twin(oddtables, twin, "pgnotify_install", "--check")

    preview = manage_with_twin(
        oddtables, twin, "pgnotify_install", "--uninstall", "--sql", "oddtables.NoteTwin"
    )
    uninstall = manage_with_twin(
        oddtables, twin, "pgnotify_install", "--uninstall", "oddtables.NoteTwin"
    )
    check_after = manage_with_twin(oddtables, twin, "pgnotify_install", "--check")

    assert uninstall.returncode == 0, uninstall.stderr
    assert oddtables.triggers() == triggers
    assert functions_of_ours(oddtables) == functions
    assert "Left what oddtables.Note:default installed on " in uninstall.stdout
    assert (
        "it is not selected, and oddtables.NoteTwin:default declares the same names (conflict)."
    ) in uninstall.stdout
    assert "Removed" not in uninstall.stdout
    assert preview.stdout.startswith(
        "-- oddtables.NoteTwin:default: left what oddtables.Note:default installed on "
    )
    assert "DROP" not in preview.stdout
    assert (check_after.returncode, check_after.stdout) == (
        check_before.returncode,
        check_before.stdout,
    )
    # And they still send Note's changes.
    with psycopg.connect(oddtables.url, autocommit=True) as listening:
        listening.execute("LISTEN pgnotify_oddtables_note")
        oddtables.connection.execute("INSERT INTO oddtables_note (text) VALUES ('still heard')")
        note = next(listening.notifies(timeout=10, stop_after=1), None)
    assert note is not None, "no notification from oddtables.Note's triggers"
    message = wire.parse(note.payload)
    assert (message.model, message.action) == ("oddtables.note", "insert")


@TWINS
def test_a_migrate_touching_a_table_two_models_declare_leaves_it_the_triggers_it_had(
    oddtables, twin
):
    """Both keep what they have (conflict): the triggers migrate disabled for the
    plan (a RunSQL, which may touch any table) are enabled again at its end."""
    triggers = oddtables.triggers()

    migrated = manage_with_twin(oddtables, twin, "migrate", "django_pgnotify", "0003")

    assert migrated.returncode == 0, migrated.stderr
    assert "oddtables.NoteTwin:default also declares it" in migrated.stderr
    assert oddtables.triggers() == triggers
    disabled = oddtables.connection.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'oddtables_note'::regclass"
        " AND tgenabled = 'D'"
    )
    assert disabled.fetchone() == (0,)
    with psycopg.connect(oddtables.url, autocommit=True) as listening:
        listening.execute("LISTEN pgnotify_oddtables_note")
        oddtables.connection.execute("INSERT INTO oddtables_note (text) VALUES ('still heard')")
        note = next(listening.notifies(timeout=10, stop_after=1), None)
    assert note is not None, "no notification from oddtables.Note's triggers"


def test_uninstalling_one_of_two_models_on_a_table_drops_what_is_its_own_and_only_that(oddtables):
    """The insert trigger installed for NoteTwin (by hand, say, from SQL of an earlier
    version), the others and the function (one name for both: the twins write the
    table's name alike) for oddtables.Note: the comments tell whose each is."""
    insert_comment = oddtables.triggers()[("oddtables_note", "pgnotify_insert")]
    oddtables.connection.execute(
        sql.SQL("COMMENT ON TRIGGER pgnotify_insert ON oddtables_note IS {}").format(
            sql.Literal(insert_comment.replace("oddtables.Note:", "oddtables.NoteTwin:"))
        )
    )
    functions = functions_of_ours(oddtables)

    uninstall = manage_with_twin(
        oddtables, "1", "pgnotify_install", "--uninstall", "oddtables.NoteTwin"
    )

    assert uninstall.returncode == 0, uninstall.stderr
    assert {name for table, name in oddtables.triggers() if table == "oddtables_note"} == {
        "pgnotify_update",
        "pgnotify_delete",
    }
    assert functions_of_ours(oddtables) == functions
    assert 'Removed oddtables.NoteTwin:default on "oddtables_note"' in uninstall.stdout
    assert 'Left what oddtables.Note:default installed on "oddtables_note"' in uninstall.stdout


# The event table dropped by hand, in a project with an app whose migrations depend on
# django_pgnotify's


DEPENDENT_MIGRATION = """\
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("django_pgnotify", "0004_durableevent_size_handled")]
    operations = [
        migrations.RunSQL(
            "CREATE TABLE pgnotify_dependent_note (id integer)",
            "DROP TABLE pgnotify_dependent_note",
        )
    ]
"""

DEPENDENT_SETTINGS = """\
import os

from django_pgnotify.embedded import database_settings

SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": database_settings(os.environ["DATABASE_URL"])}
INSTALLED_APPS = ["django_pgnotify", "tests.durableapp", "pgnotify_dependent"]
"""


def project_with_a_dependent_app(root: Path, url: str) -> dict[str, str]:
    """Write an app whose migration depends on django_pgnotify's latest (as one with a
    foreign key to DurableEvent would) and settings with it; return their environment."""
    migrations_dir = root / "pgnotify_dependent" / "migrations"
    migrations_dir.mkdir(parents=True)
    (root / "pgnotify_dependent" / "__init__.py").write_text("")
    (migrations_dir / "__init__.py").write_text("")
    (migrations_dir / "0001_initial.py").write_text(DEPENDENT_MIGRATION)
    (root / "dependent_settings.py").write_text(DEPENDENT_SETTINGS)
    return django_env(
        DATABASE_URL=url,
        DJANGO_SETTINGS_MODULE="dependent_settings",
        PYTHONPATH=os.pathsep.join([str(root), str(ROOT)]),
    )


ADVICE = re.compile(
    r"run manage\.py sqlmigrate django_pgnotify (?P<first>\S+) --database default \| "
    r"manage\.py dbshell --database default(?:, then the same for (?P<rest>[^;]+))?; "
    r"then manage\.py pgnotify_install --database default"
)


def test_the_event_table_dropped_by_hand_comes_back_by_the_advice_and_every_migration_stays(
    empty_database_url, tmp_path
):
    """``migrate django_pgnotify zero --fake`` would unrecord pgnotify_dependent's
    migration too, which the next ``migrate`` runs again (and fails on its table)."""
    env = project_with_a_dependent_app(tmp_path, empty_database_url)
    migrated = run_manage("migrate", "-v", "0", env=env)
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        recorded = conn.execute("SELECT app, name FROM django_migrations ORDER BY id").fetchall()
        assert ("pgnotify_dependent", "0001_initial") in recorded
        conn.execute("DROP TABLE pgnotify_event")

        check = run_manage("pgnotify_install", "--check", env=env)
        advice = ADVICE.search(check.stdout)
        assert advice is not None, check.stdout
        rest = advice["rest"] or ""
        for name in [advice["first"], *filter(None, re.split(r", | and ", rest))]:
            printed = run_manage(
                "sqlmigrate", "django_pgnotify", name, "--database", "default", env=env
            )
            assert printed.returncode == 0, printed.stderr
            conn.execute(printed.stdout)  # as manage.py dbshell (psql) runs it
        install = run_manage("pgnotify_install", "--database", "default", env=env)
        final = run_manage("pgnotify_install", "--check", env=env)
        again = run_manage("migrate", env=env)

        assert conn.execute("SELECT to_regclass('pgnotify_event') IS NOT NULL").fetchone() == (
            True,
        )
        assert (
            conn.execute("SELECT app, name FROM django_migrations ORDER BY id").fetchall()
            == recorded
        )
        conn.execute("INSERT INTO durableapp_job (name, body, n) VALUES ('recorded', '', 0)")
        assert conn.execute("SELECT count(*) FROM pgnotify_event").fetchone() == (1,)
    assert check.returncode == 1
    assert install.returncode == 0, install.stderr
    assert final.returncode == 0, final.stdout + final.stderr
    assert again.returncode == 0, again.stderr
    assert "No migrations to apply." in again.stdout
