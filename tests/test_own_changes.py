"""Which backend PIDs count as this process's own, as Django connections open and close."""

from __future__ import annotations

import gc
import types
import warnings

import pytest
from django.db import connections

from django_pgnotify import own_changes
from django_pgnotify.own_changes import CLOSED_GRACE, OPENED_MARGIN, is_own_pid, is_own_write


@pytest.fixture
def clock(monkeypatch):
    """The registry's clock, moved by hand: seconds pass without waiting for them."""
    now = types.SimpleNamespace(value=1000.0)
    monkeypatch.setattr(own_changes, "time", types.SimpleNamespace(monotonic=lambda: now.value))
    own_changes.track_own_connections()
    return now


@pytest.fixture
def wrapper(transactional_db):
    """A Django connection of its own, so the test's connection is left alone."""
    wrapper = connections.create_connection("default")
    yield wrapper
    wrapper.close()


def open_pid(wrapper) -> int:
    wrapper.ensure_connection()
    return wrapper.connection.info.backend_pid


def test_a_closed_connection_counts_as_own_for_the_grace_after_it_closed(clock, wrapper):
    pid = open_pid(wrapper)
    assert is_own_pid(pid)

    wrapper.close()
    clock.value += CLOSED_GRACE / 2
    assert is_own_pid(pid)  # its last notifications may still be on their way

    clock.value += CLOSED_GRACE / 2
    assert not is_own_pid(pid)  # the PID may be another client's by now


def test_a_connection_closed_long_ago_is_not_own_when_first_asked_about(clock, wrapper):
    pid = open_pid(wrapper)
    wrapper.close()

    clock.value += 3600

    assert not is_own_pid(pid)


def test_a_connection_collected_without_closing_counts_as_closed_then(clock, wrapper):
    unclosed = connections.create_connection("default")
    pid = open_pid(unclosed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # psycopg: deleted while open
        del unclosed
        gc.collect()
    clock.value += CLOSED_GRACE / 2
    assert is_own_pid(pid)

    clock.value += CLOSED_GRACE / 2
    assert not is_own_pid(pid)


def test_the_registry_holds_open_connections_and_recent_closes_only(clock, wrapper):
    pids = []
    for _ in range(50):  # a request each, with CONN_MAX_AGE = 0
        pids.append(open_pid(wrapper))
        wrapper.close()
        clock.value += 1

    recent = set(pids[-int(CLOSED_GRACE) :])
    assert not set(own_changes._pids) & set(pids)
    assert set(own_changes._closed) & set(pids) <= recent
    assert not any(is_own_pid(pid) for pid in set(pids) - recent)


def test_an_old_change_counts_as_own_only_if_written_once_its_pid_was_ours(clock, wrapper):
    """A durable event may wait for hours: its writer's PID may be ours since."""
    opened = clock.value
    pid = open_pid(wrapper)
    clock.value += 60

    assert is_own_write(pid, opened + 30)
    assert is_own_write(pid, opened - OPENED_MARGIN / 2)  # within a round trip's doubt
    assert not is_own_write(pid, opened - 3600)  # by the session that had the PID before

    wrapper.close()
    clock.value += CLOSED_GRACE
    assert not is_own_write(pid, opened + 30)  # the PID may be another client's by now
