"""Partitioned tables: a write that names a partition is announced, and stored, once,
as a write through the partitioned table is.

The model is unmanaged, on a partitioned table made for the test: ``low`` (a leaf)
and ``high``, in a schema of its own and partitioned in turn, whose leaf is ``top``.
Triggers are installed by the installer and fire for real; changes are read by the
listener (live) or from the event table (durable).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO

import psycopg
import pytest
from django.apps import apps
from django.core.management import CommandError, call_command
from django.db import connection, models, transaction
from psycopg import sql

from django_pgnotify import Notify, installation
from django_pgnotify.declarations import get_declarations
from django_pgnotify.status import database_status
from django_pgnotify.testing import capture_row_changes
from django_pgnotify.triggers import build_trigger_sql

PARENT = "pgnotify_test_parts"
SCHEMA = "pgnotify test parts"
LOW = f'"{PARENT}_low"'
HIGH = f'"{SCHEMA}"."High part"'
TOP = f'"{SCHEMA}"."Top ""leaf"""'
LATER = f'"{PARENT}_later"'

DDL = f"""
CREATE SCHEMA "{SCHEMA}";
CREATE TABLE {PARENT} (id integer, k integer, label text, PRIMARY KEY (id, k))
    PARTITION BY RANGE (k);
CREATE TABLE {LOW} PARTITION OF {PARENT} FOR VALUES FROM (0) TO (100);
CREATE TABLE {HIGH} PARTITION OF {PARENT} FOR VALUES FROM (100) TO (200)
    PARTITION BY RANGE (k);
CREATE TABLE {TOP} PARTITION OF {HIGH} FOR VALUES FROM (100) TO (200);
"""
DROP = f'DROP TABLE IF EXISTS {PARENT}, {LATER}; DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'

# Each statement, and the (action, pk) of each change it makes, in order.
STATEMENTS = [
    (f"INSERT INTO {PARENT} VALUES (1, 10, 'a'), (2, 150, 'b')", [("insert", 1), ("insert", 2)]),
    (f"INSERT INTO {LOW} VALUES (3, 20, 'c')", [("insert", 3)]),
    (f"INSERT INTO {HIGH} VALUES (4, 160, 'd')", [("insert", 4)]),
    (f"INSERT INTO {TOP} VALUES (5, 170, 'e')", [("insert", 5)]),
    (f"COPY {LOW} FROM STDIN", [("insert", 6)]),
    (f"UPDATE {PARENT} SET label = 'a2' WHERE id = 1", [("update", 1)]),
    (f"UPDATE {LOW} SET label = 'c2' WHERE id = 3", [("update", 3)]),
    (f"UPDATE {HIGH} SET label = 'd2' WHERE id = 4", [("update", 4)]),
    (f"UPDATE {TOP} SET label = 'e2' WHERE id = 5", [("update", 5)]),
    # Moved from low to top: one update, as the statement names the parent.
    (f"UPDATE {PARENT} SET k = 120 WHERE id = 1", [("update", 1)]),
    (f"DELETE FROM {PARENT} WHERE id = 2", [("delete", 2)]),
    (f"DELETE FROM {LOW} WHERE id = 3", [("delete", 3)]),
    (f"DELETE FROM {HIGH} WHERE id = 4", [("delete", 4)]),
    (f"DELETE FROM {TOP} WHERE id = 5", [("delete", 5)]),
]


def run_statements(conn: psycopg.Connection) -> list[tuple[str, int]]:
    """Run ``STATEMENTS``, each in a transaction of its own; the changes they make."""
    for statement, _ in STATEMENTS:
        if statement.startswith("COPY"):
            with conn.cursor().copy(statement) as copy:
                copy.write_row((6, 30, "f"))
        else:
            conn.execute(statement)
    return [change for _, changes in STATEMENTS for change in changes]


@contextmanager
def partitioned_model(
    conn: psycopg.Connection, name: str, notify: Notify
) -> Iterator[type[models.Model]]:
    """An unmanaged model ``testapp.<name>`` declaring ``notify`` on the partitioned
    table, known to the project (the installer and listener find it) until the end."""
    conn.execute(DDL)
    try:
        with registered_model(name, PARENT, notify) as model:
            yield model
    finally:
        conn.execute(DROP)
        conn.execute("DELETE FROM pgnotify_event WHERE model = %s", [f"testapp.{name.lower()}"])


@contextmanager
def registered_model(name: str, table: str, notify: Notify) -> Iterator[type[models.Model]]:
    """An unmanaged model ``testapp.<name>`` on ``table``; its triggers uninstalled after."""
    meta = type(
        "Meta",
        (),
        {"app_label": "testapp", "db_table": table, "managed": False, "pgnotify": notify},
    )
    model = type(
        name,
        (models.Model,),
        {
            "__module__": __name__,
            "Meta": meta,
            "id": models.IntegerField(primary_key=True),
            "k": models.IntegerField(),
            "label": models.TextField(null=True),
        },
    )
    try:
        yield model
    finally:
        installation.uninstall_triggers([f"testapp.{name}"])
        del apps.all_models["testapp"][name.lower()]
        apps.clear_cache()


def our_triggers(conn: psycopg.Connection) -> dict[str, list[str]]:
    """The names of the triggers of ours on each table, by its qualified name."""
    rows = conn.execute(
        "SELECT tgrelid::regclass::text, tgname::text FROM pg_trigger"
        " WHERE obj_description(oid, 'pg_trigger') LIKE 'django-pgnotify:%'"
        " ORDER BY 1, 2"
    ).fetchall()
    found: dict[str, list[str]] = {}
    for table, name in rows:
        found.setdefault(table, []).append(name)
    return found


def check(*selectors: str) -> str:
    """``pgnotify_install --check``'s output; raises ``CommandError`` on a problem."""
    out = StringIO()
    try:
        call_command("pgnotify_install", "--check", *selectors, stdout=out)
    except CommandError as exc:
        raise CommandError(f"{out.getvalue()}\n{exc}") from exc
    return out.getvalue()


@pytest.fixture
def live_model(other_connection) -> Iterator[type[models.Model]]:
    with partitioned_model(other_connection, "PartRow", Notify(fields=["k", "label"])) as model:
        yield model


@pytest.fixture
def durable_model(other_connection) -> Iterator[type[models.Model]]:
    notify = Notify(fields=["k", "label"], durable=True)
    with partitioned_model(other_connection, "DurablePartRow", notify) as model:
        yield model


def test_writes_naming_a_partition_are_announced_once_as_writes_naming_the_parent(
    live_model, other_connection
):
    installation.install_triggers(["testapp.PartRow"])

    with capture_row_changes("testapp.PartRow") as changes:
        expected = run_statements(other_connection)
        other_connection.execute(f"INSERT INTO {PARENT} VALUES (99, 199, 'marker')")
        changes.wait_for(lambda e: e.pk == 99, timeout=10)

    assert [(e.action, e.pk) for e in changes] == [*expected, ("insert", 99)]
    moved = [e for e in changes if e.pk == 1 and e.action == "update"][-1]
    assert (moved.old["k"], moved.fields["k"]) == (10, 120)


def test_durable_writes_naming_a_partition_are_stored_once(durable_model, other_connection):
    installation.install_triggers(["testapp.DurablePartRow"])

    expected = run_statements(other_connection)

    rows = other_connection.execute(
        "SELECT action, payload FROM pgnotify_event WHERE model = %s ORDER BY id",
        ["testapp.durablepartrow"],
    ).fetchall()
    stored = [(action, row[0]) for action, payload in rows for row in json.loads(f"[{payload}]")]
    assert stored == expected


def test_a_partition_attached_later_is_reported_by_check_and_status_until_installed(
    live_model, other_connection
):
    installation.install_triggers(["testapp.PartRow"])
    check("testapp.PartRow")
    other_connection.execute(f"CREATE TABLE {LATER} (LIKE {PARENT})")
    other_connection.execute(
        f"ALTER TABLE {PARENT} ATTACH PARTITION {LATER} FOR VALUES FROM (200) TO (300)"
    )

    missing = f'trigger pgnotify_insert on partition "public".{LATER} missing'
    with pytest.raises(CommandError) as raised:
        check("testapp.PartRow")
    assert missing in str(raised.value)
    problems = database_status("default", ["testapp.PartRow"]).problems
    assert any(missing in problem for problem in problems), problems
    preview = StringIO()
    call_command("pgnotify_install", "--sql", "testapp.PartRow", stdout=preview)
    assert (
        f'CREATE TRIGGER "pgnotify_insert" AFTER INSERT ON "public".{LATER}' in preview.getvalue()
    )

    installation.install_triggers(["testapp.PartRow"])

    check("testapp.PartRow")
    with capture_row_changes("testapp.PartRow") as changes:
        other_connection.execute(f"INSERT INTO {LATER} VALUES (7, 250, 'later')")
        (event,) = changes.wait(1, timeout=10)
    assert (event.action, event.pk, event.fields["label"]) == ("insert", 7, "later")


def test_migrate_installs_the_triggers_of_a_partition_attached_later(live_model, other_connection):
    installation.install_triggers(["testapp.PartRow"])
    other_connection.execute(
        f"CREATE TABLE {LATER} PARTITION OF {PARENT} FOR VALUES FROM (200) TO (300)"
    )

    installation.sync_triggers()

    check("testapp.PartRow")
    assert "pgnotify_update" in our_triggers(other_connection)[LATER.strip('"')]


def test_install_puts_the_triggers_on_every_partition_and_uninstall_removes_them_all(
    live_model, other_connection
):
    installation.install_triggers(["testapp.PartRow"])
    names = [f"pgnotify_{event}" for event in ("delete", "insert", "update")]

    found = our_triggers(other_connection)
    for table in (PARENT, LOW.strip('"'), HIGH, TOP):
        assert found.get(table) == names, (table, found)

    installation.uninstall_triggers(["testapp.PartRow"])

    assert not any(t in our_triggers(other_connection) for t in (PARENT, LOW.strip('"'), HIGH, TOP))


def test_a_detached_partition_loses_the_triggers_at_install_and_a_dropped_one_breaks_nothing(
    live_model, other_connection
):
    installation.install_triggers(["testapp.PartRow"])
    other_connection.execute(f"ALTER TABLE {HIGH} DETACH PARTITION {TOP}")
    other_connection.execute(f"DROP TABLE {LOW}")

    with pytest.raises(CommandError) as raised:
        check("testapp.PartRow")
    assert "no longer declared: trigger pgnotify_" in str(raised.value)
    assert f"trigger pgnotify_delete on {TOP}" in str(raised.value)

    installation.install_triggers(["testapp.PartRow"])

    check("testapp.PartRow")
    assert TOP not in our_triggers(other_connection)


def test_sql_written_without_a_database_covers_the_partitions_the_table_has_when_run(
    durable_model, other_connection
):
    """``pgnotify_install --sql`` that cannot connect prints, after a declaration's SQL,
    a block that gives each partition the triggers as the table has it when run."""
    from django_pgnotify.triggers import build_partition_triggers_sql

    (declaration,) = get_declarations(["testapp.DurablePartRow"])
    built = build_trigger_sql(declaration)  # no database: no partition is known
    other_connection.execute(built.install)
    other_connection.execute(build_partition_triggers_sql(built))

    check("testapp.DurablePartRow")  # installed, every partition included
    expected = run_statements(other_connection)
    rows = other_connection.execute(
        "SELECT action, payload FROM pgnotify_event WHERE model = %s ORDER BY id",
        ["testapp.durablepartrow"],
    ).fetchall()
    assert [(action, row[0]) for action, p in rows for row in json.loads(f"[{p}]")] == expected


def test_a_model_declared_on_a_partition_with_the_same_trigger_names_is_a_conflict(
    live_model, other_connection
):
    """Each install would replace the other's triggers on the partition: refused."""
    with registered_model("LowRow", LOW.strip('"'), Notify(fields=["label"])):
        with pytest.raises(installation.CannotInstall) as raised:
            installation.install_triggers(["testapp.PartRow"])
        assert "testapp.LowRow:default also declares it" in str(raised.value)
        assert "this table or a partition of it" in str(raised.value)


def test_installing_only_the_model_declared_on_a_partition_does_not_take_its_tables_triggers(
    live_model, other_connection
):
    """Selected alone, it finds the declaration of the partitioned table above it as a
    full install does: a conflict, refused, which leaves that one's triggers as they are."""
    installation.install_triggers(["testapp.PartRow"])

    with registered_model("LowRow", LOW.strip('"'), Notify(fields=["label"])):
        with pytest.raises(installation.CannotInstall) as raised:
            installation.install_triggers(["testapp.LowRow"])
        with pytest.raises(CommandError) as checked:
            check("testapp.LowRow")

    assert "conflict: testapp.LowRow:default" in str(raised.value)
    assert "testapp.PartRow:default also declares it" in str(raised.value)
    assert "conflict: testapp.LowRow:default" in str(checked.value)
    check("testapp.PartRow")  # its triggers on the partition are still its own


@contextmanager
def row_level_parent_and_partition_model(
    conn: psycopg.Connection, installed_first: str
) -> Iterator[None]:
    """``testapp.RowParent`` (``level="row"``) on the partitioned table and
    ``testapp.LowRow`` on its partition ``low``, both default-named; the one named
    ``installed_first`` installed before the other is declared."""
    row = Notify(fields=["k", "label"], level="row")
    with (
        partitioned_model(conn, "RowParent", row),
        registered_model("LowRow", LOW.strip('"'), Notify(fields=["label"])),
    ):
        other = "LowRow" if installed_first == "RowParent" else "RowParent"
        model = apps.get_model("testapp", other)
        model._meta.pgnotify, declared = None, model._meta.pgnotify
        try:
            installation.install_triggers([f"testapp.{installed_first}"])
        finally:
            model._meta.pgnotify = declared
        yield


@pytest.mark.parametrize("installed_first", ["RowParent", "LowRow"])
def test_a_row_level_declaration_and_one_on_a_partition_under_the_same_names_are_refused(
    other_connection, installed_first
):
    """PostgreSQL clones the row triggers of a partitioned table onto each partition
    under their names: neither can replace the other's there. Both are refused, each
    naming the other, and what is installed stays as it is."""
    with row_level_parent_and_partition_model(other_connection, installed_first):
        before = our_triggers(other_connection)
        assert (PARENT if installed_first == "RowParent" else LOW.strip('"')) in before
        other = "LowRow" if installed_first == "RowParent" else "RowParent"

        with pytest.raises(installation.CannotInstall) as alone:
            installation.install_triggers([f"testapp.{other}"])
        with pytest.raises(installation.CannotInstall) as both:
            installation.install_triggers(["testapp.RowParent", "testapp.LowRow"])

        assert our_triggers(other_connection) == before
        assert f"conflict: testapp.{other}:default" in str(alone.value)
        assert f"testapp.{installed_first}:default also declares it" in str(alone.value)
        assert "row-level triggers under their names" in str(alone.value)
        assert {(s.uri, s.status) for s in both.value.states} == {
            ("testapp.RowParent:default", installation.CONFLICT),
            ("testapp.LowRow:default", installation.CONFLICT),
        }
        # Uninstalling the one not installed leaves the other's triggers alone.
        installation.uninstall_triggers([f"testapp.{other}"])
        assert our_triggers(other_connection) == before


@pytest.fixture
def owner_without_partition_schema(live_model, other_connection) -> Iterator[str]:
    """A role that owns the partitioned table and every partition, but may not use the
    schema of ``high`` and ``top``; dropped afterwards, with what it owns."""
    name = f"{connection.settings_dict['NAME']}_parts_owner"
    role = sql.Identifier(name)
    other_connection.execute(sql.SQL("CREATE ROLE {}").format(role))
    try:
        other_connection.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))
        for table in (PARENT, LOW, HIGH, TOP):
            other_connection.execute(
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.SQL(table), role)
            )
        yield name
    finally:
        other_connection.execute(sql.SQL("DROP OWNED BY {}").format(role))
        other_connection.execute(sql.SQL("DROP ROLE {}").format(role))


@contextmanager
def acting_as(role: str) -> Iterator[None]:
    """Django's connection as ``role`` in a transaction, rolled back at the end."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)).as_string(None)
            )
        yield
        transaction.set_rollback(True)


def test_a_partition_in_a_schema_the_role_may_not_use_refuses_the_install_naming_it(
    owner_without_partition_schema, other_connection, caplog
):
    """Its triggers could be neither created nor dropped: install refuses the
    declaration before changing anything, saying what to grant; check names it too,
    and migrate's sync leaves the declaration as it is."""
    role = owner_without_partition_schema
    expected = (
        f'partitions {HIGH}, {TOP} are in schema "{SCHEMA}", which role "{role}" may not use '
        f"(no USAGE): it cannot give them the triggers that statements naming them need; run "
        f'GRANT USAGE ON SCHEMA "{SCHEMA}" TO "{role}", or pgnotify_install as a role that '
        "may use it"
    )

    with acting_as(role), pytest.raises(installation.CannotInstall) as raised:
        installation.install_triggers(["testapp.PartRow"])
    with acting_as(role), pytest.raises(CommandError) as checked:
        check("testapp.PartRow")
    with acting_as(role), caplog.at_level("ERROR", "django_pgnotify.installation"):
        synced = installation.sync_triggers()

    assert f'missing: testapp.PartRow:default on "{PARENT}" ({expected})' in str(raised.value)
    assert expected in str(checked.value)
    assert "testapp.PartRow:default" not in [state.uri for state in synced]
    assert (
        f'testapp.PartRow:default on "{PARENT}" is not installed, and keeps what it has: {expected}'
    ) in caplog.text
    assert PARENT not in our_triggers(other_connection)


@pytest.fixture
def installed_by_owner(owner_without_partition_schema, other_connection) -> str:
    """``testapp.PartRow`` installed, as if by the owner role while it could use the
    schema of ``high`` and ``top``: its function is that role's too."""
    role = owner_without_partition_schema
    installation.install_triggers(["testapp.PartRow"])
    (declaration,) = get_declarations(["testapp.PartRow"])
    other_connection.execute(
        sql.SQL("ALTER FUNCTION {}() OWNER TO {}").format(
            build_trigger_sql(declaration).function, sql.Identifier(role)
        )
    )
    return role


def cannot_drop(role: str, command: str) -> str:
    """The detail of what ``role`` cannot drop on ``high`` and ``top``, and what to run."""
    return (
        f'partitions {HIGH}, {TOP} are in schema "{SCHEMA}", which role "{role}" may not use '
        f"(no USAGE): it cannot drop the triggers of ours on them; run "
        f'GRANT USAGE ON SCHEMA "{SCHEMA}" TO "{role}", or {command} as a role that may use it'
    )


def test_uninstall_by_a_role_that_may_not_use_a_partitions_schema_is_refused_naming_it(
    installed_by_owner, other_connection
):
    """It could drop the table's triggers and not the partitions', whose writes would go
    on calling the function: it refuses before dropping anything, saying what to grant,
    and drops them all once granted. Check reports the declaration installed: reading
    the catalogue needs no USAGE."""
    role = installed_by_owner
    before = our_triggers(other_connection)

    with acting_as(role):
        checked = check("testapp.PartRow")
    with acting_as(role), pytest.raises(installation.CannotRemove) as raised:
        installation.uninstall_triggers(["testapp.PartRow"])
    with acting_as(role), pytest.raises(CommandError) as command:
        call_command("pgnotify_install", "--uninstall", "testapp.PartRow", stdout=StringIO())

    assert "All 1 declaration(s) are installed and current." in checked
    assert str(raised.value) == (
        "nothing was removed; these cannot be removed by this role:\n"
        f'  installed: testapp.PartRow:default on "{PARENT}" '
        f"({cannot_drop(role, 'pgnotify_install --uninstall')})"
    )
    assert str(command.value) == str(raised.value)
    assert our_triggers(other_connection) == before
    assert all(table in before for table in (PARENT, HIGH, TOP))

    other_connection.execute(
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(SCHEMA), sql.Identifier(role)
        )
    )
    with acting_as(role):
        removed = installation.uninstall_triggers(["testapp.PartRow"])
        states = installation.inspect_triggers(["testapp.PartRow"])
    assert [state.uri for state in removed] == ["testapp.PartRow:default"]
    assert [state.status for state in states] == [installation.MISSING]


@pytest.mark.parametrize("selectors", [["testapp.PartRow"], ["testapp"], []])
def test_prune_by_a_role_that_may_not_use_a_partitions_schema_is_refused_naming_it(
    installed_by_owner, live_model, other_connection, selectors
):
    """The triggers of a model that stopped declaring are unknown: prune refuses to
    drop some and not the others, saying what to grant, after the install it runs
    first; check names the same grant for them."""
    role = installed_by_owner
    # The app's and the database's declarations include testapp.Weird, in a schema of its own.
    other_connection.execute(
        sql.SQL('GRANT USAGE ON SCHEMA "pgnotify odd" TO {}').format(sql.Identifier(role))
    )
    live_model._meta.pgnotify = None
    before = our_triggers(other_connection)
    out = StringIO()

    with acting_as(role), pytest.raises(installation.CannotRemove) as raised:
        installation.prune_triggers(selectors)
    with acting_as(role), pytest.raises(CommandError) as command:
        call_command("pgnotify_install", "--prune", *selectors, stdout=out)
    with acting_as(role), pytest.raises(CommandError) as checked:
        check(*selectors)

    detail = cannot_drop(role, "pgnotify_install --prune")
    assert str(raised.value).startswith(
        "nothing was pruned; these cannot be pruned by this role:\n"
        "  unknown: testapp.PartRow:default on "
    )
    assert f" ({detail}; trigger pgnotify_" in str(raised.value)
    assert str(command.value) == str(raised.value)
    assert out.getvalue() == "All triggers are up to date.\n"  # the install ran first
    assert f" ({detail}; trigger pgnotify_" in str(checked.value)
    assert our_triggers(other_connection) == before


def test_install_by_a_role_that_may_not_use_a_partitions_schema_keeps_old_triggers_there(
    installed_by_owner, live_model, other_connection
):
    """Made row-level, the declaration must drop its statement triggers on the partitions,
    where PostgreSQL clones the row triggers under their names: refused before anything
    changes, saying what to grant, as a partition that needs triggers is."""
    role = installed_by_owner
    live_model._meta.pgnotify = Notify(fields=["k", "label"], level="row")
    before = our_triggers(other_connection)

    with acting_as(role), pytest.raises(installation.CannotInstall) as raised:
        installation.install_triggers(["testapp.PartRow"])
    with acting_as(role), pytest.raises(CommandError) as checked:
        check("testapp.PartRow")

    expected = (
        f'outdated: testapp.PartRow:default on "{PARENT}" '
        f"({cannot_drop(role, 'pgnotify_install')}; "
    )
    assert expected in str(raised.value)
    assert expected in str(checked.value)
    assert our_triggers(other_connection) == before


def test_sql_printed_before_migrate_gives_the_triggers_to_the_partitions_made_since(
    other_connection,
):
    """The SQL ``--sql`` prints for a table that does not exist yet, run once it does."""
    try:
        with registered_model("EarlyRow", PARENT, Notify(fields=["label"])):
            out = StringIO()
            call_command("pgnotify_install", "--sql", "testapp.EarlyRow", stdout=out)
            assert "refuses it now (no table" in out.getvalue()
            other_connection.execute(DDL)

            other_connection.execute(out.getvalue())

            assert our_triggers(other_connection)[TOP] == [
                f"pgnotify_{event}" for event in ("delete", "insert", "update")
            ]
            comments = other_connection.execute(
                "SELECT DISTINCT obj_description(oid, 'pg_trigger') FROM pg_trigger"
                " WHERE tgrelid = ANY(ARRAY[%s::regclass, %s::regclass])",
                [PARENT, TOP],
            ).fetchall()
            assert len(comments) == 1  # the same as the table's: they count as installed
    finally:
        other_connection.execute(DROP)


@pytest.mark.parametrize("first, then", [("statement", "row"), ("row", "statement")])
def test_a_declaration_switching_level_is_rebuilt_on_every_partition(
    live_model, other_connection, first, then
):
    """Row triggers are cloned onto the partitions under the names the statement
    triggers have there: each rebuild makes room for the other."""
    live_model._meta.pgnotify = Notify(fields=["k", "label"], level=first)
    installation.install_triggers(["testapp.PartRow"])
    live_model._meta.pgnotify = Notify(fields=["k", "label"], level=then)

    installation.install_triggers(["testapp.PartRow"])

    check("testapp.PartRow")
    with capture_row_changes("testapp.PartRow") as changes:
        other_connection.execute(f"INSERT INTO {TOP} VALUES (8, 180, 'top')")
        other_connection.execute(f"INSERT INTO {PARENT} VALUES (99, 1, 'marker')")
        changes.wait_for(lambda e: e.pk == 99, timeout=10)
    assert [(e.action, e.pk) for e in changes] == [("insert", 8), ("insert", 99)]


def test_migrate_disables_the_triggers_of_every_partition_and_enables_them_again(
    live_model, other_connection
):
    """``pre_migrate`` disables the declaration's triggers on each partition too (a write
    naming one would call the function while a column it reads is being dropped), and
    ``post_migrate`` enables them all again."""
    installation.install_triggers(["testapp.PartRow"])
    tables = (PARENT, LOW.strip('"'), HIGH, TOP)

    def states() -> dict[str, set[str]]:
        rows = other_connection.execute(
            "SELECT tgrelid::regclass::text, tgenabled::text FROM pg_trigger"
            " WHERE obj_description(oid, 'pg_trigger') LIKE 'django-pgnotify:% testapp.PartRow:%'"
        ).fetchall()
        found: dict[str, set[str]] = {}
        for table, enabled in rows:
            found.setdefault(table, set()).add(enabled)
        return found

    detached = installation.detach_triggers(lambda label: label == "testapp.PartRow")

    assert states() == {table: {"D"} for table in tables}
    other_connection.execute(f"INSERT INTO {TOP} VALUES (1, 150, 'unannounced')")

    installation.sync_triggers("default", detached)

    assert states() == {table: {"O"} for table in tables}
    check("testapp.PartRow")


def test_a_partition_whose_columns_are_in_another_order_is_announced_as_its_table(
    live_model, other_connection
):
    """Attached from a table of its own, a partition may hold the columns in another
    order, with a dropped one among them: the function reads them by name."""
    other_connection.execute(
        f"CREATE TABLE {LATER} (junk integer, label text, k integer NOT NULL, id integer NOT NULL);"
        f" ALTER TABLE {LATER} DROP COLUMN junk;"
        f" ALTER TABLE {PARENT} ATTACH PARTITION {LATER} FOR VALUES FROM (200) TO (300)"
    )
    installation.install_triggers(["testapp.PartRow"])

    with capture_row_changes("testapp.PartRow") as changes:
        other_connection.execute(f"INSERT INTO {LATER} (id, k, label) VALUES (7, 250, 'x')")
        other_connection.execute(f"UPDATE {LATER} SET label = 'y' WHERE id = 7")
        other_connection.execute(f"INSERT INTO {PARENT} VALUES (1, 10, 'a')")
        other_connection.execute(f"UPDATE {PARENT} SET k = 270 WHERE id = 1")
        other_connection.execute(f"DELETE FROM {LATER} WHERE id = 1")
        other_connection.execute(f"INSERT INTO {PARENT} VALUES (99, 1, 'marker')")
        changes.wait_for(lambda e: e.pk == 99, timeout=10)

    assert [(e.action, e.pk, e.fields, e.old) for e in changes][:-1] == [
        ("insert", 7, {"k": 250, "label": "x"}, None),
        ("update", 7, {"k": 250, "label": "y"}, {"k": 250, "label": "x"}),
        ("insert", 1, {"k": 10, "label": "a"}, None),
        ("update", 1, {"k": 270, "label": "a"}, {"k": 10, "label": "a"}),
        ("delete", 1, {"k": 270, "label": "a"}, None),
    ]


def test_a_leftover_on_a_partitioned_table_is_reported_on_that_table_naming_each_trigger_once(
    live_model, other_connection
):
    """Its triggers are on the table and on every partition: the line names the table
    the model declared, and the triggers once, with how many tables have them."""
    call_command("pgnotify_install", "testapp.PartRow", verbosity=0)
    live_model._meta.pgnotify = None

    with pytest.raises(CommandError):
        check("testapp.PartRow")
    (state,) = installation.inspect_triggers(["testapp.PartRow"])

    assert (state.status, state.table) == (installation.UNKNOWN, f'"public"."{PARENT}"')
    assert state.detail == (
        "trigger pgnotify_insert, trigger pgnotify_update, trigger pgnotify_delete on 4 tables"
    )


@pytest.mark.parametrize(
    ("declared", "logged", "command"),
    [
        (None, "is no longer declared, but kept", "pgnotify_install --prune"),
        (
            Notify(fields=["k", "label"], level="row"),
            "is not installed, and keeps what it has",
            "pgnotify_install",
        ),
    ],
)
def test_migrate_by_a_role_that_may_not_use_a_partitions_schema_keeps_what_it_cannot_drop(
    installed_by_owner, live_model, other_connection, caplog, declared, logged, command
):
    """Pruning the triggers of a model that stopped declaring, or dropping those an earlier
    version left: migrate's sync keeps them, logging what to grant, as the commands say."""
    role = installed_by_owner
    live_model._meta.pgnotify = declared
    before = our_triggers(other_connection)

    with acting_as(role), caplog.at_level("ERROR", "django_pgnotify.installation"):
        synced = installation.sync_triggers()

    assert "testapp.PartRow:default" not in [state.uri for state in synced]
    assert "testapp.PartRow:default on " in caplog.text
    assert f" {logged}: {cannot_drop(role, command)}" in caplog.text
    assert our_triggers(other_connection) == before


def test_migrate_by_such_a_role_says_no_more_of_a_model_it_keeps_for_another_reason(
    installed_by_owner, live_model, other_connection, caplog
):
    """An invalid declaration keeps what it has, said once: its installed triggers,
    unknown to the sync, are not also reported as no longer declared."""
    role = installed_by_owner
    declared, live_model._meta.pgnotify = live_model._meta.pgnotify, Notify(fields=["k", "nope"])
    before = our_triggers(other_connection)

    try:
        with acting_as(role), caplog.at_level("ERROR", "django_pgnotify"):
            installation.sync_triggers()
    finally:
        live_model._meta.pgnotify = declared  # for the fixtures' teardown

    said = [r.getMessage() for r in caplog.records if "testapp.PartRow" in r.getMessage()]
    assert said
    assert not [message for message in said if "no longer declared" in message]
    assert our_triggers(other_connection) == before


def test_an_event_no_longer_declared_names_its_trigger_once_with_the_tables_it_is_on(
    live_model, other_connection
):
    """Its trigger is on the table and on every partition: one entry, every table."""
    installation.install_triggers(["testapp.PartRow"])
    live_model._meta.pgnotify = Notify(fields=["k", "label"], events=["insert", "update"])

    (state,) = installation.inspect_triggers(["testapp.PartRow"])

    assert state.status == installation.OUTDATED
    assert state.detail.count("trigger pgnotify_delete on ") == 1
    assert f'trigger pgnotify_delete on "public"."{PARENT}", ' in state.detail
    assert TOP in state.detail
