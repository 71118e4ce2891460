"""A pytest plugin with a ``row_changes`` fixture: a real listener for one test.

Opt in from your project's root ``conftest.py``::

    pytest_plugins = ["django_pgnotify.pytest_plugin"]

or with ``-p django_pgnotify.pytest_plugin`` in pytest's ``addopts``. It is
not loaded automatically, so projects that do not ask for it are unaffected.
It needs pytest-django (for ``transactional_db``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import CapturedChanges


@pytest.fixture
def row_changes(transactional_db: None) -> Iterator[CapturedChanges]:
    """Every change the listener dispatches during the test, with ``wait()``.

    The test runs with ``transactional_db``: changes really commit, so they
    are really announced. Use ``capture_row_changes()`` directly to listen for
    some models only or on another database.
    """
    from .testing import capture_row_changes  # Django is set up by now

    with capture_row_changes() as captured:
        yield captured
