"""The test settings with a listener that reconnects and probes quickly.

For listener processes in resilience tests: delays of seconds in production
would make those tests slow, not different.
"""

import os

from django_pgnotify.embedded import database_settings
from tests.settings import *  # noqa: F403
from tests.settings import PGNOTIFY

PGNOTIFY = {
    **PGNOTIFY,
    "APPLICATION_NAME": "pgnotify_listen_tests",
    "RECONNECT_DELAY_MIN": 0.1,
    "RECONNECT_DELAY_MAX": 0.5,
    "PROBE_INTERVAL": 0.5,
    "PROBE_TIMEOUT": 2.0,
    "POLL_INTERVAL": 0.1,
    "STATS_INTERVAL": 0.5,
}

# With PGNOTIFY_LISTEN_URL set, the listener serving "default" listens through an alias
# of its own, as a site behind a transaction-pooling PgBouncer would configure it.
if os.environ.get("PGNOTIFY_LISTEN_URL"):
    DATABASES["direct"] = database_settings(os.environ["PGNOTIFY_LISTEN_URL"])  # noqa: F405
    PGNOTIFY["LISTEN_DATABASES"] = {"default": "direct"}
