"""The listener settings, forwarding to Channels' in-memory layer.

For a ``pgnotify_listen`` process of its own: a configuration that reaches no
consumer (they run in other processes), which the listener must warn about.
"""

from tests.settings_listener import *  # noqa: F403
from tests.settings_listener import PGNOTIFY

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
PGNOTIFY = {**PGNOTIFY, "CHANNEL_LAYER": "default"}
