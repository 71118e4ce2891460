"""Number settings: a delay pair's minimum above its maximum, or a value that is not
finite, fails ``manage.py check``."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_pgnotify.checks import check_declarations


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
    assert 'PGNOTIFY["PROBE_TIMEOUT"] must be a number greater than 0' in messages[0].msg
