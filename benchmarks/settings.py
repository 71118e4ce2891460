"""Settings of the benchmark project: DATABASE_URL if set, else an embedded PostgreSQL.

``BENCH_SETTINGS`` (JSON, set by ``harness.setup_django``) overrides settings, so
child processes (listeners) run with the same ones as their parent. Its
``PGNOTIFY`` dict is merged into the one below.
"""

import json
import os

from django_pgnotify.embedded import database_settings, database_url

SECRET_KEY = "benchmarks-only"
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {"default": database_settings(database_url())}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_pgnotify",
    "benchmarks.benchapp",
]

PGNOTIFY = {
    # No periodic statistics lines in the middle of the measurements.
    "STATS_INTERVAL": 0,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pgnotify": {"handlers": ["console"], "level": "WARNING"}},
}

for _key, _value in json.loads(os.environ.get("BENCH_SETTINGS") or "{}").items():
    if _key == "PGNOTIFY":
        PGNOTIFY.update(_value)
    else:
        globals()[_key] = _value
