"""The test settings for Channels: channels_redis, signed-cookie sessions, row groups.

Used by the ASGI server and listener processes of tests/test_channels.py. Redis is
``REDIS_URL`` (an embedded one when unset); ``PGNOTIFY_TEST_REDIS_PREFIX`` keeps
concurrent test runs on one Redis apart; ``PGNOTIFY_TEST_CHANNEL_LAYER`` picks
channels_redis's ``core`` (default) or ``pubsub`` layer.
"""

import os

from django_pgnotify.embedded_redis import redis_channel_layer
from tests.settings_listener import *  # noqa: F403
from tests.settings_listener import PGNOTIFY

CHANNEL_LAYERS = {
    "default": redis_channel_layer(
        prefix=os.environ.get("PGNOTIFY_TEST_REDIS_PREFIX", "asgi"),
        kind=os.environ.get("PGNOTIFY_TEST_CHANNEL_LAYER", "core"),
    )
}
# No session table needed: the test signs the cookie with the same SECRET_KEY.
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
PGNOTIFY = {**PGNOTIFY, "CHANNEL_LAYER": "default", "CHANNEL_ROW_GROUPS": True}
