"""The reconnect backoff: no database needed."""

from __future__ import annotations

from django_pgnotify.backoff import Backoff


def test_backoff_stays_at_its_cap_however_long_the_outage():
    # 1100 attempts: past the 1024 at which doubling the first delay overflows a float.
    backoff = Backoff(0.001, 0.008)

    delays = [backoff.next() for _ in range(1100)]

    ceilings = [0.001, 0.002, 0.004] + [0.008] * 1097
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays[-100:])) > 1  # still jittered at the cap
    assert backoff.attempts == 1100


def test_backoff_starts_again_from_its_minimum_after_reset():
    backoff = Backoff(0.001, 0.008)
    for _ in range(1100):
        backoff.next()

    backoff.reset()

    assert backoff.attempts == 0
    for ceiling in (0.001, 0.002, 0.004, 0.008):
        assert ceiling / 2 <= backoff.next() <= ceiling


def test_a_cap_below_the_first_delay_waits_the_first_delay():
    """A maximum below the minimum (settings not checked: a Listener run in a process
    of one's own) is raised to it: no delay is ever shorter than the minimum asked."""
    backoff = Backoff(0.004, 0.001)

    delays = [backoff.next() for _ in range(20)]

    assert all(0.002 <= delay <= 0.004 for delay in delays)
