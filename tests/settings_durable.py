"""The listener test settings with durable delivery tuned for tests.

Short leases, polls and retry delays: production values of seconds to minutes
would make these tests slow, not different. PGNOTIFY_TEST_* variables let a
test vary them per listener process.
"""

import os

from tests.settings_listener import *  # noqa: F403
from tests.settings_listener import PGNOTIFY

PGNOTIFY = {
    **PGNOTIFY,
    "DURABLE_LEASE": float(os.environ.get("PGNOTIFY_TEST_LEASE", "30")),
    "DURABLE_POLL_INTERVAL": float(os.environ.get("PGNOTIFY_TEST_POLL", "1")),
    "DURABLE_BATCH_SIZE": int(os.environ.get("PGNOTIFY_TEST_BATCH", "500")),
    "DURABLE_RETRY_DELAY_MIN": 0.3,
    "DURABLE_RETRY_DELAY_MAX": 1.0,
}
