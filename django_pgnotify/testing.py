"""Helpers for testing receivers against a real listener.

Notifications are delivered only after commit, so use them with
``TransactionTestCase`` or ``pytest.mark.django_db(transaction=True)``; inside
a plain ``TestCase`` the transaction never commits and nothing arrives.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from . import installation
from .events import RowChange
from .installation import declarations_for
from .listener import Listener
from .signals import row_changed

_POLL_INTERVAL = 0.05


class CapturedChanges(list):
    """The ``RowChange`` objects received so far, in delivery order.

    ``stats`` are the listener's counters (``received``, ``dispatched``,
    ``receiver_errors``, ``undecodable``...), to assert on what was skipped;
    ``listener`` is the running :class:`~django_pgnotify.listener.Listener`.
    """

    def __init__(self, stats: Counter[str] | None = None, listener: Listener | None = None) -> None:
        super().__init__()
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.listener = listener
        self._arrived = threading.Condition()
        self._failure: BaseException | None = None
        #: Why nothing may be arriving, told by a wait that failed ("" if no reason is seen).
        self.diagnose: Callable[[], str] = lambda: ""

    def add(self, event: RowChange) -> None:
        with self._arrived:
            self.append(event)
            self._arrived.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Record that the listener ended with ``exc``: waits end at once, saying so."""
        with self._arrived:
            self._failure = exc
            self._arrived.notify_all()

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[RowChange]:
        """Block until at least ``count`` changes arrived; return them.

        Raises:
            AssertionError: Fewer arrived within ``timeout`` seconds, or the
                listener failed first (its error is the cause).
        """
        with self._arrived:
            arrived = self._arrived.wait_for(
                lambda: len(self) >= count or self._failure is not None, timeout
            )
            if len(self) < count:
                self._check_listener(f"expected {count} row change(s)")
            if not arrived:
                raise AssertionError(
                    f"expected {count} row change(s) within {timeout}s, "
                    f"got {len(self)}: {list(self)!r}{self.diagnose()}"
                )
            return list(self[:count])

    def wait_for(self, predicate: Callable[[RowChange], bool], timeout: float = 5.0) -> RowChange:
        """Block until a change matching ``predicate`` arrived; return the first.

        Raises:
            AssertionError: None arrived within ``timeout`` seconds, or the
                listener failed first (its error is the cause).
        """

        found: RowChange | None = None

        def matched_or_failed() -> bool:
            # The predicate sees each change once per look, as it did before the
            # listener's failure was waited for too.
            nonlocal found
            found = next((event for event in self if predicate(event)), None)
            return found is not None or self._failure is not None

        with self._arrived:
            self._arrived.wait_for(matched_or_failed, timeout)
            if found is None:
                self._check_listener("no matching row change")
                raise AssertionError(
                    f"no matching row change within {timeout}s; got {list(self)!r}{self.diagnose()}"
                )
            return found

    def _check_listener(self, expected: str) -> None:
        if self._failure is not None:
            raise AssertionError(
                f"{expected}, but the pgnotify listener failed: {self._failure!r}; "
                f"got {list(self)!r}"
            ) from self._failure


@contextmanager
def capture_row_changes(
    *selectors: str,
    using: str = DEFAULT_DB_ALIAS,
    timeout: float = 5.0,
    **listener_options: Any,
) -> Iterator[CapturedChanges]:
    """Run a real listener in a thread and collect the changes it dispatches.

    Example::

        with capture_row_changes("shop.Order") as changes:
            Order.objects.create(status="new", total=5)
            (event,) = changes.wait(1)

    Args:
        selectors: Apps or models to listen for (default: all declared).
        using: The database alias to listen on.
        timeout: How long to wait for the listener to start.
        listener_options: More ``Listener`` arguments, e.g. ``ignore_own_changes=True``.

    Raises:
        NothingDeclared: ``selectors`` name only models that declare nothing for
            ``using`` (an ``ImproperlyConfigured``), as the commands refuse them:
            the listener would wait for changes that never come.
    """
    installation.require_declarations(selectors, [using])
    declarations = declarations_for(selectors, using)
    models = {d.model for d in declarations}
    listener = Listener(declarations, using, poll_interval=_POLL_INTERVAL, **listener_options)
    changes = CapturedChanges(listener.stats, listener)
    changes.diagnose = lambda: _not_sending(selectors, using)
    failure: list[BaseException] = []

    # Async, so that it runs after every sync receiver of the batch and after the
    # async receivers of earlier events: when wait() returns, they have finished.
    async def receive(sender: Any, event: RowChange, **kwargs: Any) -> None:
        if sender in models and event.using == using:
            changes.add(event)

    def run() -> None:
        try:
            listener.run()
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)
            changes.fail(exc)
            listener.ready.set()

    row_changed.connect(receive, weak=False)
    thread = threading.Thread(target=run, name="pgnotify-capture", daemon=True)
    thread.start()
    try:
        if not listener.ready.wait(timeout) or failure:
            raise RuntimeError(
                f"the pgnotify listener did not start within {timeout}s "
                "(is the database reachable, are the triggers installed?)"
            ) from (failure[0] if failure else None)
        yield changes
    finally:
        listener.stop()
        thread.join(timeout)
        row_changed.disconnect(receive)
    if failure:
        raise RuntimeError("the pgnotify listener failed") from failure[0]


def _not_sending(selectors: tuple[str, ...], using: str) -> str:
    """Which selected declarations have no triggers sending in ``using``, as the end of
    a failed wait's message: a test database made without the migrate hook has none,
    and a wait would only say that nothing arrived. ``""`` if all have, or if the
    database cannot say (the wait's own message is then all there is)."""
    try:
        states = installation.inspect_triggers(selectors, using)
    except Exception:  # e.g. the test's transaction is broken: no diagnosis
        return ""
    silent = [s for s in states if s.sql is not None and s.status in installation.NOT_SENDING]
    if not silent:
        return ""
    names = "; ".join(str(state) for state in silent)
    return (
        f" (in database {using!r}: {names}; run manage.py pgnotify_install, or keep "
        "PGNOTIFY['INSTALL_ON_MIGRATE'] on for the test database)"
    )
