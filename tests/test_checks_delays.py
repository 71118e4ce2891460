"""Number settings: a delay pair's minimum above its maximum, a value that is not
finite, or seconds too many for PostgreSQL to add to the time, fail ``manage.py check``."""

from __future__ import annotations

import threading

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import DataError, connection, transaction
from django.test import override_settings

from django_pgnotify.checks import _SQL_SECONDS_MAX, check_declarations


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        (
            {"RECONNECT_DELAY_MIN": 10, "RECONNECT_DELAY_MAX": 5.0},
            'PGNOTIFY["RECONNECT_DELAY_MIN"] (10) is greater than '
            'PGNOTIFY["RECONNECT_DELAY_MAX"] (5.0).',
        ),
        (
            {"RECONNECT_DELAY_MIN": 60},
            'PGNOTIFY["RECONNECT_DELAY_MIN"] (60) is greater than '
            'PGNOTIFY["RECONNECT_DELAY_MAX"] (30.0, the default).',
        ),
        (
            {"DURABLE_RETRY_DELAY_MIN": 2.5, "DURABLE_RETRY_DELAY_MAX": 2},
            'PGNOTIFY["DURABLE_RETRY_DELAY_MIN"] (2.5) is greater than '
            'PGNOTIFY["DURABLE_RETRY_DELAY_MAX"] (2).',
        ),
        (
            {"DURABLE_RETRY_DELAY_MAX": 0.5},
            'PGNOTIFY["DURABLE_RETRY_DELAY_MIN"] (1.0, the default) is greater than '
            'PGNOTIFY["DURABLE_RETRY_DELAY_MAX"] (0.5).',
        ),
    ],
    ids=["reconnect", "reconnect-default-max", "durable-retry", "durable-retry-default-min"],
)
def test_a_delay_minimum_above_its_maximum_is_an_error_naming_both(setting, shown):
    with override_settings(PGNOTIFY=setting):
        messages = check_declarations()

    assert [(m.id, m.msg) for m in messages] == [("pgnotify.E010", shown)]


def test_manage_py_check_fails_on_a_delay_minimum_above_its_maximum(db):
    setting = {"RECONNECT_DELAY_MIN": 45, "DURABLE_RETRY_DELAY_MIN": 600}
    with override_settings(PGNOTIFY=setting), pytest.raises(SystemCheckError) as raised:
        call_command("check", "--database", "default")

    report = str(raised.value)
    assert report.count("(pgnotify.E010)") == 2
    assert 'PGNOTIFY["RECONNECT_DELAY_MIN"] (45) is greater than' in report
    assert 'PGNOTIFY["DURABLE_RETRY_DELAY_MAX"] (300.0, the default)' in report


@pytest.mark.parametrize(
    "setting",
    [
        {"RECONNECT_DELAY_MIN": 5, "RECONNECT_DELAY_MAX": 5},  # a constant delay
        {"DURABLE_RETRY_DELAY_MIN": 0, "DURABLE_RETRY_DELAY_MAX": 0.1},
        {"RECONNECT_DELAY_MIN": "10", "RECONNECT_DELAY_MAX": 5},  # not a number: reported once
    ],
    ids=["equal", "zero-minimum", "not-a-number"],
)
def test_delay_pairs_in_order_or_already_invalid_get_no_range_error(setting):
    with override_settings(PGNOTIFY=setting):
        messages = [m.msg for m in check_declarations()]

    assert not [m for m in messages if "is greater than" in m]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "infinity"])
def test_a_number_setting_that_is_not_finite_is_an_error(value):
    with override_settings(PGNOTIFY={"PROBE_TIMEOUT": value}):
        messages = check_declarations()

    assert [m.id for m in messages] == ["pgnotify.E010"]
    assert 'PGNOTIFY["PROBE_TIMEOUT"] must be a finite number greater than 0' in messages[0].msg


@pytest.mark.parametrize(
    ("setting", "shown", "failing"),
    [
        (
            {"DURABLE_LEASE": 1e13},
            'PGNOTIFY["DURABLE_LEASE"] must be at most 8970915715199 seconds (about 284,000 '
            "years), got 10000000000000.0.",
            "every claim of durable events",
        ),
        (
            {"DURABLE_RETRY_DELAY_MAX": 8_970_915_715_200},
            'PGNOTIFY["DURABLE_RETRY_DELAY_MAX"] must be at most 8970915715199 seconds (about '
            "284,000 years), got 8970915715200.",
            "every retry of a durable event",
        ),
    ],
    ids=["lease", "retry-delay-max"],
)
def test_seconds_added_to_the_time_in_sql_beyond_postgresqls_timestamps_are_an_error(
    setting, shown, failing
):
    with override_settings(PGNOTIFY=setting):
        messages = check_declarations()

    assert [(m.id, m.msg) for m in messages] == [("pgnotify.E010", shown)]
    assert "timestamps end in the year 294276" in messages[0].hint
    assert failing in messages[0].hint


def test_the_most_seconds_the_checks_accept_are_added_to_the_time_by_postgresql(db):
    """The bound is PostgreSQL's: the time plus as many seconds as the checks accept is
    a timestamp until the year 10000, and one second more is not even then; 1e13 is
    none at any time."""
    setting = {
        "DURABLE_LEASE": _SQL_SECONDS_MAX,
        "DURABLE_RETRY_DELAY_MIN": _SQL_SECONDS_MAX,
        "DURABLE_RETRY_DELAY_MAX": float(_SQL_SECONDS_MAX),
    }
    with override_settings(PGNOTIFY=setting):
        assert check_declarations() == []
    later = "SELECT (%s::timestamptz + make_interval(secs => %s))::text"
    last_year = "9999-12-31 23:59:59.999999+00"

    with connection.cursor() as cursor:
        cursor.execute("SELECT now() + make_interval(secs => %s)", [float(_SQL_SECONDS_MAX)])
        cursor.execute(later, [last_year, float(_SQL_SECONDS_MAX)])
        (latest,) = cursor.fetchone()
        assert latest.startswith("294276-12-31 23:59:58.99")  # a second to spare
        for seconds in [_SQL_SECONDS_MAX + 1.0, 1e13]:
            with pytest.raises(DataError, match="out of range"), transaction.atomic():
                cursor.execute(later, ["10000-01-01 00:00:00+00", seconds])
        with pytest.raises(DataError, match="out of range"), transaction.atomic():
            cursor.execute("SELECT now() + make_interval(secs => %s)", [1e13])


@pytest.mark.parametrize(
    ("setting", "shown", "why"),
    [
        (
            {"PROBE_TIMEOUT": 2_147_484},
            'PGNOTIFY["PROBE_TIMEOUT"] must be at most 2147483 seconds, got 2147484.',
            "statement_timeout, which holds at most 2147483647 milliseconds",
        ),
        (
            {"RECONNECT_DELAY_MIN": 1e10, "RECONNECT_DELAY_MAX": 1e10},
            'PGNOTIFY["RECONNECT_DELAY_MIN"] must be at most 9223372036 seconds (about 292 '
            "years), got 10000000000.0.",
            "threading.TIMEOUT_MAX",
        ),
    ],
    ids=["probe-timeout", "reconnect-delay"],
)
def test_seconds_beyond_what_their_use_can_take_are_an_error(setting, shown, why):
    with override_settings(PGNOTIFY=setting):
        messages = check_declarations()

    assert [m.id for m in messages] == ["pgnotify.E010"] * len(setting)
    assert messages[0].msg == shown
    assert why in messages[0].hint


def test_the_most_probe_timeout_the_checks_accept_is_a_statement_timeout(db):
    """pgnotify_status sets ``PROBE_TIMEOUT`` as ``statement_timeout`` in milliseconds:
    the largest value the checks accept is one, a second more is not."""
    # With a lease twice as long: a shorter one gets pgnotify.W009.
    with override_settings(PGNOTIFY={"PROBE_TIMEOUT": 2_147_483, "DURABLE_LEASE": 4_294_966}):
        assert check_declarations() == []
    as_set = "SELECT set_config('statement_timeout', %s, true)"

    with connection.cursor() as cursor, transaction.atomic():
        cursor.execute(as_set, [f"{2_147_483 * 1000}ms"])
        with pytest.raises(DataError, match="statement_timeout"), transaction.atomic():
            cursor.execute(as_set, [f"{2_147_484 * 1000}ms"])


def test_a_thread_cannot_wait_longer_than_the_reconnect_delays_the_checks_accept():
    stopping = threading.Event()
    raised: list[BaseException] = []

    def wait(seconds: float) -> None:
        try:
            stopping.wait(seconds)
        except OverflowError as exc:
            raised.append(exc)

    waiting = threading.Thread(target=wait, args=[threading.TIMEOUT_MAX + 1], daemon=True)
    waiting.start()
    waiting.join(timeout=10)
    stopping.set()  # releases it, had it waited

    assert [type(e) for e in raised] == [OverflowError]
