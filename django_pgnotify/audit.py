"""``context()``: say who made a change and why, in every event it causes.

The values travel as the transaction-local setting ``pgnotify.context``; the
trigger sends it with each change of that transaction, so receivers (and an
audit feed built on them) see ``event.context``, also for raw SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from .transaction_settings import CONTEXT, enclosing_context, encode_context, setting_frame


@contextmanager
def context(*, using: str = DEFAULT_DB_ALIAS, **values: Any) -> Iterator[None]:
    """Attach ``values`` to every change made in this block on ``using``.

    Nested blocks merge, the inner value of a key winning; each transaction
    on the connection after the block carries none of it.

    Args:
        using: The database alias whose writes carry the context.
        values: Short JSON-serialisable values, e.g. ``actor="user:42"``,
            ``reason="refund"``, ``request_id=...``; at most
            ``wire.CONTEXT_LIMIT`` bytes as JSON.

    Raises:
        TypeError: A value JSON cannot represent.
        ValueError: The values are too large, alone or merged with those of the
            enclosing blocks.
    """
    encode_context(values)  # fail here, not in the middle of a write
    enclosing = enclosing_context(using)
    if enclosing:
        try:
            encode_context({**enclosing, **values})
        except ValueError as exc:
            raise ValueError(f"{exc} (merged with the enclosing context() blocks)") from None
    with setting_frame(using, CONTEXT, dict(values)):
        yield
