"""The ASGI application of tests/test_channels.py: RowChangeConsumer behind session auth."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings_channels")

import django

django.setup()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from django_pgnotify.consumers import RowChangeConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "websocket": AuthMiddlewareStack(
            URLRouter([path("ws/pgnotify/", RowChangeConsumer.as_asgi())])
        )
    }
)
