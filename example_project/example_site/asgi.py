"""The example project's ASGI application: the dashboard pages and its WebSocket.

``uvicorn example_site.asgi:application`` (from ``example_project/``) serves it. With the
in-memory channel layer (no ``REDIS_URL``) the listener runs inside this process
(single-process mode); with ``channels_redis`` run ``manage.py pgnotify_listen`` next to it.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_site.settings")

from django.core.asgi import get_asgi_application

django_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402
from shop.consumers import OrderConsumer  # noqa: E402

from django_pgnotify.asgi import with_listener  # noqa: E402

routes = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([path("ws/orders/", OrderConsumer.as_asgi())]))
        ),
    }
)

application = with_listener(routes) if settings.IN_PROCESS_LISTENER else routes
