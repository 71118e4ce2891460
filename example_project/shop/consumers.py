"""The dashboard's WebSocket: django-pgnotify's consumer, with one row-level rule."""

from typing import Any

from django_pgnotify.consumers import RowChangeConsumer


class OrderConsumer(RowChangeConsumer):
    """Users with the ``view_order`` permission follow orders; notes never reach a browser.

    ``has_permission`` is the default (logged in, ``shop.view_order``). ``filter_event``
    shows where row-level rules go: here it only drops the trigger's ``context``, which
    may name other users.
    """

    async def filter_event(self, model: Any, event: dict[str, Any]) -> dict[str, Any] | None:
        return {**event, "context": None}
