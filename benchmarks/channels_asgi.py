"""The ASGI application of ``latency.py``: the project's ``RowChangeConsumer``, open to all.

Authorization is not what is measured, so the permission hook allows every
subscription (no session, no user query); everything else is the consumer as
shipped. Settings come from ``benchmarks.settings`` (``BENCH_SETTINGS`` carries
the channel layer).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

import django

django.setup()

from typing import Any  # noqa: E402

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.db import models  # noqa: E402
from django.urls import path  # noqa: E402

from django_pgnotify.consumers import RowChangeConsumer  # noqa: E402


class OpenConsumer(RowChangeConsumer):
    """``RowChangeConsumer`` whose permission hook says yes."""

    async def has_permission(self, model: type[models.Model], pk: Any | None) -> bool:
        return True


application = ProtocolTypeRouter(
    {"websocket": URLRouter([path("ws/pgnotify/", OpenConsumer.as_asgi())])}
)
