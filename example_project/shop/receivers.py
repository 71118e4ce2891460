"""What the shop does when an order changes, whoever changed it."""

import logging

from django.dispatch import receiver

from django_pgnotify import RowChange, row_changed

from .models import Order

logger = logging.getLogger(__name__)


@receiver(row_changed, sender=Order)
def on_order(sender: type[Order], event: RowChange, **kwargs: object) -> None:
    if event.truncated:
        logger.info(
            "shop.Order pk=%s %s (too large to send; use event.fetch())", event.pk, event.action
        )
    elif event.action == "update":
        old = event.old or {}
        changes = ", ".join(
            f"{name} {old.get(name)} -> {event.fields.get(name)}" for name in sorted(event.changed)
        )
        logger.info("shop.Order pk=%s update: %s", event.pk, changes)
    else:
        values = ", ".join(f"{name} {value}" for name, value in event.fields.items())
        logger.info("shop.Order pk=%s %s: %s", event.pk, event.action, values)
