"""``paused()``: writes that announce nothing, for backfills and data migrations.

The trigger functions check the transaction-local setting ``pgnotify.paused``
first, so pausing needs no DDL, costs next to nothing per row and concerns
only the transactions of the block, on one connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, models

from .transaction_settings import PAUSED, setting_frame


@contextmanager
def paused(*models_: type[models.Model] | str, using: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """Announce nothing for the writes made in this block on ``using``.

    Other connections, and this connection after the block, are not
    affected. Nested blocks add up; leaving one, normally or by an
    exception, restores what the enclosing block paused.

    Args:
        models_: Pause only these models (classes or ``"app_label.Model"``);
            none means every model.
        using: The database alias whose connection is paused.

    Example::

        with paused(Order):
            Order.objects.filter(status="").update(status="new")
    """
    labels = frozenset(_label(model) for model in models_)
    with setting_frame(using, PAUSED, labels):
        yield


def _label(model: type[models.Model] | str) -> str:
    found = apps.get_model(model) if isinstance(model, str) else model
    concrete = found._meta.concrete_model or found
    return concrete._meta.label_lower
