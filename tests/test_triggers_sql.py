"""The SQL builder: declarations in, trigger SQL out (pure, no database)."""

from __future__ import annotations

import re

import pytest
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.test.utils import isolate_apps
from psycopg import sql

from django_pgnotify import Notify, triggers
from django_pgnotify.declarations import Declaration, raw_declarations, resolve_model
from django_pgnotify.triggers import build_trigger_sql, parse_comment
from tests.testapp.models import Article, Measurement, Order, Reading, Tag, Weird


def declaration(model: type[models.Model], notify: Notify | None = None) -> Declaration:
    """The one valid declaration of ``model`` (its own, or ``notify``)."""
    found, errors = resolve_model(model, notify or raw_declarations(model))
    assert not errors
    (result,) = found
    return result


def trigger_for(built, event: str) -> str:
    (statement,) = [s for s in built.create_triggers if f" AFTER {event.upper()} " in s]
    return statement


def call_arguments(text: str, function: str) -> list[int]:
    """How many arguments each call of ``function`` in ``text`` passes."""
    counts = []
    for match in re.finditer(rf"\b{function}\(", text):
        depth, quote, args, position = 1, None, 1, match.end()
        if text[position] == ")":
            args = 0
        while depth:
            char = text[position]
            if quote:
                quote = None if char == quote else quote  # '' and "" close and reopen
            elif char in "'\"":
                quote = char
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
            elif char == "," and depth == 1:
                args += 1
            position += 1
        counts.append(args)
    return counts


@pytest.fixture
def registry():
    with isolate_apps("tests.testapp") as apps:
        yield apps


def test_names_and_values_that_need_quoting_are_quoted():
    built = build_trigger_sql(declaration(Weird))

    assert """PERFORM pg_notify('Odd "Channel" %s é', '{"v":2,""" in built.body
    assert """n."La bel's $$ é\"""" in built.body
    assert """["La bel''s $$ é"]""" in built.body  # the column name in the message's list
    assert """ON "pgnotify odd"."Weird Table's $$" """ in trigger_for(built, "insert")
    assert built.create_function.startswith(
        """CREATE OR REPLACE FUNCTION "pgnotify odd"."pgnotify_Weird Table's $$_"""
    )


# The list is read in a nested IF: PL/pgSQL prepares every expression it
# reaches again in each transaction, and nothing is paused most of the time.
PAUSE_CHECK = (
    "BEGIN\n"
    "  IF current_setting('pgnotify.paused', true) <> '' THEN\n"
    "    IF lower(btrim(current_setting('pgnotify.paused', true))) = 'on'"
    " OR strpos(',' || replace(lower(current_setting('pgnotify.paused', true)), ' ', '') || ',',"
    " ',{label},') > 0 THEN\n"
    "      RETURN NULL;\n"
    "    END IF;\n"
    "  END IF;\n"
)


def test_every_trigger_is_one_statement_level_trigger_per_event_with_its_rows():
    built = build_trigger_sql(declaration(Order))

    assert 'AFTER INSERT ON "testapp_order" REFERENCING NEW TABLE AS "pgnotify_new"' in (
        trigger_for(built, "insert")
    )
    assert (
        'AFTER UPDATE ON "testapp_order" REFERENCING OLD TABLE AS "pgnotify_old"'
        ' NEW TABLE AS "pgnotify_new" FOR EACH STATEMENT'
    ) in trigger_for(built, "update")
    assert " FOR EACH ROW" not in built.install


def test_update_sends_only_rows_whose_when_changed_columns_changed():
    body = build_trigger_sql(declaration(Order)).body

    assert (
        'WHERE o."id" IS NULL OR ("o"."status" IS DISTINCT FROM "n"."status"'
        ' OR "o"."total" IS DISTINCT FROM "n"."total")'
    ) in body


def test_update_without_when_changed_sends_rows_where_any_column_changed():
    body = build_trigger_sql(declaration(Tag)).body

    assert 'WHERE o."name" IS NULL OR record_image_ne("o".*, "n".*)' in body


def test_the_bulk_query_runs_without_jit_and_merge_joins_and_restores_them():
    body = build_trigger_sql(declaration(Order)).body

    # The planner cannot know a transition table's size: compiling, sorting
    # and spilling a bulk statement's query took longer than running it.
    # One per event, and one for an update whose rows are paired by position.
    assert body.count("set_config('jit', 'off', true)") == 4
    assert body.count("set_config('enable_mergejoin', 'off', true)") == 4
    assert body.count("set_config('jit', saved[1], true)") == 4


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_rows_paired_by_position_are_sent_in_that_order_and_only_they_are_ordered(durable):
    """A hash join that spills to disk in batches returns rows out of their order, and a
    sort to group them into notifications may too (seen with 100,000 rows changed twice:
    a quarter of them arrived with their older version last). Paired by position, the
    rows are ordered explicitly; paired by primary key, a row is there once, unordered."""
    body = build_trigger_sql(declaration(Order, Notify(fields=["status"], durable=durable))).body
    twice = body.split("\n    IF twice THEN\n", 1)[1]
    by_position, by_pk = twice.split("\n    ELSE\n", 1)
    by_pk = by_pk.split("\n    END IF;\n", 1)[0]

    position = '"pgnotify_position"'
    assert f"OVER (ORDER BY {position} ROWS UNBOUNDED PRECEDING)" in by_position
    if durable:
        assert f"string_agg(r, ',' ORDER BY {position})" in by_position
    else:
        assert "string_agg(('[' ||" in by_position  # the short path's
        assert f"ORDER BY n.{position}) IS NOT NULL THEN format(" in by_position
        assert "string_agg(r, ',' ORDER BY total)" in by_position
        # Not joined: a row's short version would go out before an older long one.
        assert "joinable := least(0, room);" in by_position
        assert "joinable := least(512, room);" in by_pk
    assert "OVER (ROWS UNBOUNDED PRECEDING)" in by_pk
    assert " ORDER BY" not in by_pk.replace("ORDER BY min(total)", "").replace("ORDER BY run", "")


def test_small_statements_take_the_short_path_without_the_executor_for_pg_notify():
    body = build_trigger_sql(declaration(Order)).body

    # Counted without an aggregate, one row rendered without one (by json_build_array,
    # an update's too), a few joined (by concatenation); each message whole in the
    # query that reads the rows, in one format() call (which writes a NULL ctx as nothing).
    message = (
        """format('{"v":2,"model":"testapp.order","action":"%s","xid":%%s,"ts":%%s%%s,"""
        """"fields":["status","total"],"rows":[%%s]}', txid_current(),"""
        " extract(epoch FROM clock_timestamp()), ctx, "
    )
    for rows, action, record in [("pgnotify_new", "insert", "n"), ("pgnotify_old", "delete", "o")]:
        assert (
            f'    PERFORM FROM "{rows}" LIMIT 21;\n    GET DIAGNOSTICS counted = ROW_COUNT;\n'
            f"    IF counted = 1 THEN\n      SELECT {message % action}json_build_array({record}."
        ) in body
        assert f"{message % action}string_agg(r, ',')) INTO batch" in body
    assert len(re.findall(r"IF counted = 1 THEN\n +SELECT format\(", body)) == 4
    assert "count(*) INTO" not in body
    # Insert, delete, and an update's two pairings (by primary key, by position).
    assert body.count("    ELSIF counted BETWEEN 2 AND 20 THEN\n") == 4
    assert "counted <= 20" not in body  # an update of no rows runs no query but the count
    # Sent when it fits, in an IF's expression; the bulk path sets room up for itself.
    sent = re.findall(
        r" IF batch IS NOT NULL AND octet_length\(batch\) <= 7999"
        r" AND pg_notify\('pgnotify_testapp_order', batch\) IS NOT NULL THEN\n"
        r" +ELSIF counted > 20 OR batch IS NOT NULL THEN\n +room := ",
        body,
    )
    assert len(sent) == 4  # insert, delete, and update's two pairings
    # The short path's notification and the bulk path's loop, for each event (an
    # update's twice: its rows paired by primary key, or by position).
    assert body.count("IF pg_notify(") == 4
    assert body.count("AND pg_notify(") == 4


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_the_function_checks_the_pause_setting_first_and_the_triggers_have_no_when(durable):
    # A statement trigger's WHEN is read and compiled again for every statement.
    built = build_trigger_sql(declaration(Order, Notify(fields=["status"], durable=durable)))
    check = PAUSE_CHECK.format(label="testapp.order")

    assert built.body.index("BEGIN\n") == built.body.index(check)
    for statement in built.create_triggers:
        assert " WHEN " not in statement
        assert "FOR EACH STATEMENT EXECUTE FUNCTION" in statement


def test_the_pause_check_names_no_column_and_runs_no_query():
    body = build_trigger_sql(declaration(Reading)).body
    check = body.split("BEGIN\n", 1)[1].split("  END IF;\n", 1)[0]

    assert "current_setting('pgnotify.paused', true)" in check
    assert "SELECT" not in check.upper()
    assert '"' not in check


def test_the_context_setting_is_sent_unparsed_and_left_out_when_it_would_not_fit():
    body = build_trigger_sql(declaration(Order)).body

    assert "ctx text := current_setting('pgnotify.context', true);" in body
    # Rendered only when set, where a transaction without one never prepares it.
    assert (
        "  IF ctx <> '' THEN\n"
        """    ctx := ',"context":' || to_json(ctx);\n"""
        "    IF octet_length(ctx) > 2200 THEN\n"
        "      ctx := NULL;\n"
        "    END IF;\n"
        "  END IF;\n"
    ) in body
    assert "::json" not in body.replace("json_build", "")
    assert "room := 7841 - coalesce(octet_length(ctx), 0);" in body  # insert and delete


def test_only_declared_events_get_triggers_and_branches():
    built = build_trigger_sql(declaration(Article))  # insert and update

    assert set(built.triggers) == {"insert", "update"}
    assert len(built.create_triggers) == 2
    assert not any(" AFTER DELETE " in statement for statement in built.create_triggers)
    assert "TG_OP = 'DELETE'" not in built.body
    assert "TG_OP = 'INSERT'" in built.body
    assert "TG_OP = 'UPDATE'" in built.body


def test_datetimes_are_sent_in_utc_and_durations_in_seconds():
    body = build_trigger_sql(declaration(Reading)).body

    assert """(n."taken_at" AT TIME ZONE 'UTC')""" in body
    assert """(extract(epoch FROM n."took") - 21600 * extract(year FROM n."took"))""" in body


def test_a_foreign_key_to_a_datetime_pk_is_sent_in_utc(registry):
    class Slot(models.Model):
        starts = models.DateTimeField(primary_key=True)

        class Meta:
            app_label = "testapp"

    class Booking(models.Model):
        slot = models.ForeignKey(Slot, on_delete=models.CASCADE)

        class Meta:
            app_label = "testapp"
            pgnotify = Notify(fields=["slot"])

    body = build_trigger_sql(declaration(Booking)).body

    assert """(n."slot_id" AT TIME ZONE 'UTC')""" in body


@pytest.mark.parametrize(
    "options",
    [{}, {"level": "row"}, {"old": False}, {"durable": True}],
    ids=["statement", "row", "new values alone", "durable"],
)
def test_decimals_in_arrays_are_sent_as_text_arrays_and_compared_as_stored(options):
    # numeric[]'s JSON holds numbers, which a float parser rounds; text[]'s holds
    # strings of every digit, in the same dimensions and with the same NULLs.
    notify = Notify(fields=["readings", "grid"], **options)
    body = build_trigger_sql(declaration(Measurement, notify)).body
    sends_old = options.get("old", True)

    for record in ["n", "o"] if sends_old else ["n"]:
        assert f'to_json({record}."readings"::text[])::text' in body
        assert f'to_json({record}."grid"::text[])::text' in body
    assert not re.search(r'[no]\."(readings|grid)"\)', body)  # never rendered as stored
    if sends_old:
        assert '"o"."readings" IS DISTINCT FROM "n"."readings"' in body
        assert '"o"."grid" IS DISTINCT FROM "n"."grid"' in body


def test_only_arrays_of_decimals_are_sent_as_text_arrays_also_in_wide_rows(registry):
    columns = {
        **{
            f"d{i:02}": ArrayField(models.DecimalField(max_digits=5, decimal_places=2))
            for i in range(8)
        },
        **{f"i{i:02}": ArrayField(models.IntegerField()) for i in range(8)},
        "floats": ArrayField(ArrayField(models.FloatField())),
    }
    meta = type("Meta", (), {"app_label": "testapp", "pgnotify": Notify(fields="__all__")})
    wide = type("Wide", (models.Model,), {"__module__": __name__, "Meta": meta, **columns})

    body = build_trigger_sql(declaration(wide)).body

    assert "json_build_array(" in body  # 16 values or more per row
    assert all(f'n."d{i:02}"::text[]' in body for i in range(8))
    assert all(f'n."i{i:02}", ' in body for i in range(8))
    assert 'n."floats"' in body and 'n."floats"::text[]' not in body


def test_more_than_50_fields_stay_within_postgresqls_100_arguments(registry):
    columns = {f"c{i:02}": models.IntegerField(null=True) for i in range(120)}
    meta = type("Meta", (), {"app_label": "testapp", "pgnotify": Notify(fields="__all__")})
    wide = type("Wide", (models.Model,), {"__module__": __name__, "Meta": meta, **columns})

    body = build_trigger_sql(declaration(wide)).body

    counts = call_arguments(body, "json_build_array") + call_arguments(body, "jsonb_build_array")
    assert max(counts) <= 100
    assert "jsonb_build_array" in body
    assert all(f'n."{name}"' in body for name in columns)


def test_checksum_is_stable_for_the_same_declaration():
    first = build_trigger_sql(declaration(Order))
    second = build_trigger_sql(declaration(Order))

    assert first.checksum == second.checksum
    assert first.install == second.install


@pytest.mark.parametrize(
    "changed",
    [
        Notify(fields=["status"], when_changed=["status", "total"]),
        Notify(fields=["status", "total"], when_changed=["total"]),
        Notify(fields=["status", "total"], when_changed=["status", "total"], events=["update"]),
        Notify(fields=["status", "total"], when_changed=["status", "total"], channel="orders"),
    ],
    ids=["fields", "when_changed", "events", "channel"],
)
def test_checksum_changes_when_the_declaration_changes(changed):
    original = build_trigger_sql(declaration(Order))

    assert build_trigger_sql(declaration(Order, changed)).checksum != original.checksum


def test_comment_round_trips_through_parse_comment():
    built = build_trigger_sql(declaration(Order))

    assert parse_comment(built.comment) == ("testapp.Order:default", built.checksum)
    assert sql.Literal(built.comment).as_string(None) in built.create_function
    assert all(sql.Literal(built.comment).as_string(None) in t for t in built.create_triggers)


def test_comment_with_the_installers_state_hash_still_parses():
    built = build_trigger_sql(declaration(Order))

    assert parse_comment(f"{built.comment} 0123456789abcdef") == (
        "testapp.Order:default",
        built.checksum,
    )


@pytest.mark.parametrize(
    "comment", [None, "", "some other trigger", "django-pgnotify:1 a", "django-pgnotify:1 a b c d"]
)
def test_comments_that_are_not_ours_parse_as_none(comment):
    assert parse_comment(comment) is None


def test_body_is_a_quoted_literal_when_a_name_contains_the_dollar_tag():
    notify = Notify(fields=["status"], channel="orders$pgnotify$")

    built = build_trigger_sql(declaration(Order, notify))

    assert "$pgnotify$" in built.body
    assert "AS $pgnotify$" not in built.create_function
    assert f" AS {sql.Literal(built.body).as_string(None)};" in built.create_function


def test_drop_removes_each_trigger_and_the_function():
    built = build_trigger_sql(declaration(Article))

    assert built.drop == (
        'DROP TRIGGER IF EXISTS "pgnotify_insert" ON "testapp_article";\n'
        'DROP TRIGGER IF EXISTS "pgnotify_update" ON "testapp_article";\n'
        f"DROP FUNCTION IF EXISTS {built.function.as_string(None)}();"
    )


@pytest.mark.parametrize(("watched", "as_string"), [(62, False), (63, True)])
def test_a_changed_mask_of_more_than_62_columns_is_sent_as_a_string(registry, watched, as_string):
    columns = {f"c{i:02}": models.IntegerField(null=True) for i in range(watched)}
    notify = Notify(fields=["c00"], when_changed=list(columns))
    meta = type("Meta", (), {"app_label": "testapp", "pgnotify": notify})
    wide = type("Wide", (models.Model,), {"__module__": __name__, "Meta": meta, **columns})

    body = build_trigger_sql(declaration(wide)).body

    # A JSON number past 64 bits would be rounded by a reader that parses floats.
    assert ("ELSE 0 END)::text)::text" in body) is as_string
    assert ("::numeric" in body) is as_string


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_values_render_with_json_scalar_on_servers_that_have_it(durable):
    # JSON_SCALAR() looks up how to render its argument's type once per query;
    # to_json() once per value. PostgreSQL 17 added it.
    notify = Notify(fields=["status", "note"], durable=durable)
    older = build_trigger_sql(declaration(Order, notify), 160000)
    newer = build_trigger_sql(declaration(Order, notify), triggers.JSON_SCALAR_SINCE)

    assert 'to_json(n."note")::text' in older.body
    assert "JSON_SCALAR" not in older.body
    assert 'JSON_SCALAR(n."note")::text' in newer.body
    assert 'to_json(n."note")' not in newer.body
    assert build_trigger_sql(declaration(Order, notify)).body == older.body
    # The checksum is of the SQL installed: each server's triggers match its own.
    assert older.checksum != newer.checksum


def test_row_level_declarations_get_row_triggers_and_a_function_that_runs_no_query():
    built = build_trigger_sql(declaration(Order, Notify(fields=["status"], level="row")))

    for statement in built.create_triggers:
        assert "FOR EACH ROW EXECUTE FUNCTION" in statement
        assert "REFERENCING" not in statement
    assert "SELECT" not in built.body.upper()
    assert "PERFORM" not in built.body
    assert "pgnotify_new" not in built.body
    assert built.body.count("IF pg_notify(") == 3  # one per event, one row each
    # n and o alias NEW and OLD, so rows render as in the statement triggers.
    assert "n ALIAS FOR NEW;\n  o ALIAS FOR OLD;" in built.body
    statement_level = build_trigger_sql(declaration(Order, Notify(fields=["status"])))
    assert built.checksum != statement_level.checksum


@pytest.mark.parametrize(
    ("notify", "announced"),
    [
        (Notify(level="row"), "IF NOT record_image_ne(o, n) THEN"),
        (
            Notify(level="row", when_changed=["status"]),
            'IF NOT (o."id" IS DISTINCT FROM n."id"'
            ' OR ("o"."status" IS DISTINCT FROM "n"."status")) THEN',
        ),
    ],
    ids=["any-column", "when-changed"],
)
def test_a_row_level_update_returns_early_unless_it_is_announced(notify, announced):
    body = build_trigger_sql(declaration(Order, notify)).body

    assert announced in body
