"""``manage.py pgnotify_status`` as a deploy script or a monitor runs it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress

import psycopg
import pytest
from psycopg import sql

from django_pgnotify.installation import uninstall_triggers
from django_pgnotify.status import MADE_LIVE_ADVICE, UNCLAIMED_ADVICE, queue_usage_percents
from tests.conftest import django_env, run_manage
from tests.conftest import test_database_url as database_url

LISTENER_SETTINGS = "tests.settings_listener"  # its listeners are named pgnotify_listen_tests


def status(*args: str):
    return run_manage(
        "pgnotify_status", "--database", "default", "--settings", LISTENER_SETTINGS, *args
    )


def no_test_listeners_left(conn) -> None:
    deadline = time.monotonic() + 10
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'pgnotify_listen_tests' AND datname = current_database()"
    )
    while conn.execute(query).fetchone()[0]:
        assert time.monotonic() < deadline, "a listener of an earlier test is still connected"
        time.sleep(0.05)


def test_status_exits_0_and_shows_triggers_queue_and_listener_when_healthy(listener_process):
    listener = listener_process("--settings", LISTENER_SETTINGS)

    result = status()

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Database 'default'" in out
    assert "testapp.Order:default  channel pgnotify_testapp_order  installed" in out
    assert "notification queue: " in out
    assert "listener: pid " in out
    assert out.rstrip().endswith("OK")
    assert listener.stop() == 0


def test_status_json_reports_the_same_for_scripts(listener_process):
    listener_process("--settings", LISTENER_SETTINGS)

    result = status("--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    (database,) = report["databases"]
    assert database["alias"] == "default"
    assert database["problems"] == []
    assert 0 <= database["queue_usage"] < 1
    assert len(database["listeners"]) == 1
    order = next(d for d in database["declarations"] if d["uri"] == "testapp.Order:default")
    assert order == {
        "uri": "testapp.Order:default",
        "model": "testapp.Order",
        "channel": "pgnotify_testapp_order",
        "durable": False,
        "table": '"testapp_order"',
        "status": "installed",
        "detail": "",
    }


def test_status_exits_1_when_no_listener_is_connected(other_connection):
    no_test_listeners_left(other_connection)

    result = status("--json")

    assert result.returncode == 1
    (database,) = json.loads(result.stdout)["databases"]
    assert database["listeners"] == []
    assert any("no listener is connected" in p for p in database["problems"])
    assert "1 problem(s) need action" in result.stderr


def test_status_exits_1_and_names_a_missing_trigger(listener_process, restore_triggers):
    listener_process("--settings", LISTENER_SETTINGS)
    uninstall_triggers(["testapp.Tag"])

    result = status()

    assert result.returncode == 1
    assert "testapp.Tag:default  channel pgnotify_testapp_tag  missing" in result.stdout
    assert "needs action: missing: testapp.Tag:default" in result.stdout


def test_status_reports_a_query_that_fails_for_what_it_is_and_keeps_the_rest(other_connection):
    # A column of a type the backlog's query cannot use (changed by hand, say).
    other_connection.execute(
        "ALTER TABLE pgnotify_event ALTER COLUMN handled TYPE text USING handled::text"
    )
    try:
        result = status("--json")
    finally:
        other_connection.execute(
            "ALTER TABLE pgnotify_event ALTER COLUMN handled TYPE integer[]"
            " USING handled::integer[]"
        )

    assert result.returncode == 1, result.stderr
    (database,) = json.loads(result.stdout)["databases"]
    (failed,) = [p for p in database["problems"] if "durable backlog" in p]
    assert failed.startswith(
        "counting the durable backlog in database 'default' failed: "
        "function cardinality(text) does not exist"
    )
    assert not [p for p in database["problems"] if "cannot reach" in p]
    assert {d["status"] for d in database["declarations"]} == {"installed"}
    assert database["queue_usage"] is not None
    assert database["durable"] is None


@pytest.mark.parametrize("database", [[], ["--database", "other"]], ids=["every", "one"])
def test_status_json_refuses_selectors_that_declare_nothing_as_install_does(
    database, transactional_db
):
    result = run_manage("pgnotify_status", "contenttypes", "--json", *database)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "No model in contenttypes declares pgnotify for database " in result.stderr
    assert "'other'" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_refuses_an_unknown_database_alias(transactional_db):
    result = run_manage("pgnotify_status", "--database", "nope")

    assert result.returncode != 0
    assert "Unknown database alias 'nope'" in result.stderr


def test_database_status_leaves_a_callers_transaction_open(transactional_db):
    from django.db import connection, transaction

    from django_pgnotify.status import database_status
    from tests.testapp.models import Tag

    with transaction.atomic():
        Tag.objects.create(name="in a transaction")
        database_status("default")
        assert Tag.objects.filter(name="in a transaction").exists()
    assert connection.is_usable()


def test_status_names_a_database_that_is_not_postgresql_without_a_traceback():
    env = django_env(DJANGO_SETTINGS_MODULE="tests.settings_sqlite")
    result = run_manage("pgnotify_status", "--database", "default", "--skip-checks", env=env)

    assert result.returncode == 1
    assert "database 'default' uses django.db.backends.sqlite3" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers, as a hung server does."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with suppress(OSError):  # closed at teardown
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def test_status_gives_up_on_a_server_that_never_answers_naming_the_database(silent_port):
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/silent"
    env = django_env(DATABASE_URL=url)
    # PROBE_TIMEOUT is 2 s in these settings; without a bound, the subprocess times out.
    result = run_manage(
        "pgnotify_status",
        "--database",
        "default",
        "--settings",
        LISTENER_SETTINGS,
        env=env,
        timeout=30,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Database 'default' (postgres@127.0.0.1:{silent_port}/silent)" in result.stdout
    assert (
        "needs action: database 'default' did not answer within 2s "
        '(PGNOTIFY["PROBE_TIMEOUT"]): connection timeout expired'
    ) in result.stdout
    assert "1 problem(s) need action" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_gives_up_on_a_query_that_waits_past_the_probe_timeout(other_connection):
    # A migration holding the durable event table, say: the backlog count waits for it.
    with other_connection.transaction():
        other_connection.execute("LOCK TABLE pgnotify_event IN ACCESS EXCLUSIVE MODE")
        # PROBE_TIMEOUT is 2 s in these settings; without a bound, the subprocess times out.
        result = run_manage(
            "pgnotify_status", "--database", "default", "--settings", LISTENER_SETTINGS, timeout=30
        )

    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "needs action: database 'default' did not answer within 2s "
        '(PGNOTIFY["PROBE_TIMEOUT"]): canceling statement due to statement timeout'
    ) in result.stdout
    assert "Traceback" not in result.stderr


@pytest.fixture
def monitoring_role(other_connection) -> Iterator[str]:
    """A login role that is neither a superuser nor the listener's, as a monitoring
    job's: it may read the event table, and not pg_read_all_stats."""
    import uuid

    from psycopg import sql

    role = f"pgnotify_monitor_{uuid.uuid4().hex[:8]}"
    other_connection.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    other_connection.execute(
        sql.SQL("GRANT SELECT ON pgnotify_event TO {}").format(sql.Identifier(role))
    )
    schemas = other_connection.execute(
        "SELECT nspname FROM pg_namespace"
        " WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'"
    ).fetchall()
    for (schema,) in schemas:  # the test database's other schemas, to inspect their triggers
        other_connection.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
    try:
        yield role
    finally:
        other_connection.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        other_connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_status_run_by_another_role_counts_a_listener_whose_details_it_cannot_see(
    listener_process, monitoring_role
):
    # pg_stat_activity shows another role's session with its pid and application_name,
    # and NULL for its start, address and state.
    listener_process("--settings", LISTENER_SETTINGS)
    env = django_env(DATABASE_URL=database_url(user=monitoring_role))

    result = run_manage(
        "pgnotify_status", "--database", "default", "--settings", LISTENER_SETTINGS, env=env
    )
    as_json = run_manage(
        "pgnotify_status",
        "--json",
        "--database",
        "default",
        "--settings",
        LISTENER_SETTINGS,
        env=env,
    )

    assert "Traceback" not in result.stderr + as_json.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert "details hidden from this role (it needs pg_read_all_stats" in result.stdout
    assert result.stdout.rstrip().endswith("OK")
    assert as_json.returncode == 0, as_json.stderr
    (database,) = json.loads(as_json.stdout)["databases"]
    (listener,) = database["listeners"]
    assert listener["since"] is None and listener["state"] is None
    assert "pg_read_all_stats" in listener["client"]


def insert_event(conn, declaration: str, *, size: int = 1, handled=None, status="pending") -> None:
    """An event row of ``declaration``, as its trigger would have written it."""
    conn.execute(
        "INSERT INTO pgnotify_event (declaration, model, action, payload, size, handled, status)"
        " VALUES (%s, lower(split_part(%s, ':', 1)), 'insert', '[1]', %s, %s, %s)",
        [declaration, declaration, size, handled, status],
    )


def test_status_exits_1_naming_pending_durable_events_no_declaration_claims(
    listener_process, other_connection
):
    # A model removed since, and one whose declaration is no longer durable.
    listener_process("--settings", LISTENER_SETTINGS)
    insert_event(other_connection, "gone.Removed:default", size=3, handled=[0])
    insert_event(other_connection, "gone.Removed:default")
    insert_event(other_connection, "testapp.Tag:default")

    result = status()

    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "needs action: 3 pending durable change(s) of declarations that database 'default' "
        "no longer has (a model removed, a declaration renamed or moved), which no listener "
        "claims: gone.Removed:default (3); "
    ) in result.stdout
    # Declaring again alone would store each new change twice: every way out, in short.
    assert (
        "give a renamed declaration's events its new URI (one UPDATE), declare the old one "
        "again (each new change is then stored twice), or discard them in the admin; see "
        "docs/durable.md#pending-events-no-declaration-claims"
    ) in result.stdout
    # Its URI is the same: neither renaming nor declaring it again beside itself applies.
    assert (
        "needs action: 1 pending durable change(s) of declarations made live (durable=False), "
        "which no listener claims: testapp.Tag:default (1); set durable=True again (then "
        "pgnotify_install) until a listener has handled them, or discard them in the admin; "
        "see docs/durable.md#pending-events-no-declaration-claims"
    ) in result.stdout
    assert "2 problem(s) need action" in result.stderr


def test_database_status_counts_only_pending_events_of_undeclared_declarations(
    other_connection,
):
    from django_pgnotify.status import database_status

    insert_event(other_connection, "gone.Removed:default", size=2)
    insert_event(other_connection, "gone.Removed:default", status="dead")
    insert_event(other_connection, "gone.Removed:old", status="done")
    insert_event(other_connection, "durableapp.Job:default")  # declared: a listener claims it

    report = database_status("default", ["testapp"])  # the table's, whatever is selected

    assert report.undeclared_events == {"gone.Removed:default": 2}
    assert report.as_dict()["undeclared_events"] == {"gone.Removed:default": 2}
    assert any("gone.Removed:default (2)" in problem for problem in report.problems)


def test_status_of_live_declarations_by_a_role_that_may_not_read_the_event_table_is_ok(
    listener_process, monitoring_role, other_connection
):
    # The event table is there (django_pgnotify's migrations), its events none of its
    # business: not looked at, rather than a permission error to act on.
    listener_process("--settings", LISTENER_SETTINGS)
    other_connection.execute(
        sql.SQL("REVOKE SELECT ON pgnotify_event FROM {}").format(sql.Identifier(monitoring_role))
    )
    insert_event(other_connection, "gone.Removed:default")
    env = django_env(DATABASE_URL=database_url(user=monitoring_role))

    result = run_manage(
        "pgnotify_status",
        "testapp",
        "--database",
        "default",
        "--settings",
        LISTENER_SETTINGS,
        env=env,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("OK")


@pytest.mark.parametrize("advice", [UNCLAIMED_ADVICE, MADE_LIVE_ADVICE], ids=["gone", "live"])
def test_the_advice_on_unclaimed_events_points_to_a_section_the_docs_have(advice):
    from pathlib import Path

    page, anchor = re.search(r"docs/(\S+\.md)#([\w-]+)", advice).groups()
    text = (Path(__file__).resolve().parent.parent / "docs" / page).read_text()
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    assert anchor in [re.sub(r"[^\w]+", "-", h.lower()).strip("-") for h in headings]


def test_status_shows_a_durable_declaration_as_durable_not_on_a_channel(transactional_db):
    # A durable declaration stores its changes in the event table: no channel carries them.
    result = status("durableapp")
    as_json = status("durableapp", "--json")

    assert "Traceback" not in result.stderr + as_json.stderr
    assert (
        "  durableapp.Job:default  durable (event table pgnotify_event)  installed" in result.stdout
    )
    assert "channel pgnotify_durableapp_job" not in result.stdout
    (database,) = json.loads(as_json.stdout)["databases"]
    (job,) = database["declarations"]
    assert job["channel"] is None
    assert job["durable"] is True
    # A live one's channel stays as it was.
    live = json.loads(status("testapp.Order", "--json").stdout)["databases"][0]
    assert live["declarations"][0]["channel"] == "pgnotify_testapp_order"
    assert live["declarations"][0]["durable"] is False


def test_status_still_wants_a_listener_for_durable_declarations_alone(other_connection):
    no_test_listeners_left(other_connection)

    result = status("durableapp", "--json")

    assert result.returncode == 1
    (database,) = json.loads(result.stdout)["databases"]
    assert any("no listener is connected" in p for p in database["problems"])


@pytest.mark.parametrize(
    ("usage", "threshold", "expected"),
    [
        (9.5e-07, 0.0, ("0.000095%", "0.0%")),  # a held queue's first page
        (0.6, 0.5, ("60.0%", "50.0%")),
        (0.1000001, 0.1, ("10.00001%", "10.0%")),
        (0.12352, 0.12351, ("12.352%", "12.351%")),
        (0.0, 0.1, ("0.0%", "10.0%")),
    ],
)
def test_a_queue_usage_above_the_threshold_never_prints_as_equal_to_it(usage, threshold, expected):
    assert queue_usage_percents(usage, threshold) == expected


def test_a_queue_usage_one_float_above_the_threshold_is_printed_above_it():
    # 0.7 and the next float up are one float once multiplied by 100: in a process of
    # its own, so that a loop that never ends fails the test rather than hanging it.
    code = (
        "from django_pgnotify.status import queue_usage_percents\n"
        "print(queue_usage_percents(0.7000000000000001, 0.7))"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("queue_usage_percents(0.7000000000000001, 0.7) did not return")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('70.00000000000001%', '70.0%')"


@pytest.fixture
def held_queue(other_connection) -> Iterator[None]:
    """PostgreSQL's notification queue holding a few pages: a session that ran LISTEN
    stays in a transaction, and keeps every notification sent after it."""
    with psycopg.connect(database_url()) as stuck:
        stuck.execute("LISTEN pgnotify_status_held_queue")
        stuck.commit()
        stuck.execute("SELECT 1")  # in a transaction from now on
        for _ in range(40):  # about 40 kB: a few 8 kB pages
            other_connection.execute(
                "SELECT pg_notify('pgnotify_status_held_queue', repeat('x', 1000))"
            )
        usage = other_connection.execute("SELECT pg_notification_queue_usage()").fetchone()[0]
        assert usage > 0
        try:
            yield
        finally:
            stuck.rollback()


def test_status_prints_a_small_queue_usage_above_a_zero_threshold_above_it(held_queue):
    from io import StringIO

    from django.conf import settings
    from django.core.management import call_command
    from django.test import override_settings

    out = StringIO()
    zero = {**settings.PGNOTIFY, "QUEUE_USAGE_WARNING": 0.0}
    with override_settings(PGNOTIFY=zero), pytest.raises(SystemExit):
        call_command("pgnotify_status", "testapp", "--database", "default", stdout=out)

    text = out.getvalue()
    (used,) = re.findall(r"notification queue: ([\d.]+)% used", text)
    assert float(used) > 0, text
    (shown,) = re.findall(r"queue is ([\d.]+)% full \(warning above ([\d.]+)%\)", text)
    assert float(shown[0]) > float(shown[1]) == 0.0, text


def test_status_of_an_event_table_behind_the_code_names_the_missing_columns_alone(
    other_connection,
):
    """django-pgnotify upgraded, migrate not run yet: the durable declarations' state says
    which columns the table lacks; the query of the events no declaration claims, which
    reads them, is not run to fail beside it."""
    from django_pgnotify.status import database_status

    other_connection.execute("ALTER TABLE pgnotify_event DROP COLUMN handled")
    try:
        report = database_status("default")
    finally:
        # As migration 0004 made it: the tests after this one use it.
        other_connection.execute("ALTER TABLE pgnotify_event ADD COLUMN handled integer[]")

    assert any('lacks column "handled"' in problem for problem in report.problems)
    assert not any("does not exist" in problem for problem in report.problems), report.problems
