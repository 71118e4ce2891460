"""Settings of the example project.

The database is ``DATABASE_URL`` when it is set. Otherwise an embedded PostgreSQL is
started for this process (and removed when it exits), and its URL is exported as
``DATABASE_URL`` so that child processes reach the same server.
"""

import os

from django_pgnotify.embedded import database_settings

SECRET_KEY = "example-project-only-not-a-secret"
DEBUG = True
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

#: Whether this process starts its own PostgreSQL (the demo says so in its banner).
EMBEDDED_POSTGRES = not os.environ.get("DATABASE_URL")
DATABASES = {"default": database_settings()}

INSTALLED_APPS = [
    "django_pgnotify",
    "shop",
]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "django_pgnotify": {"handlers": ["console"], "level": "INFO"},
        "shop": {"handlers": ["console"], "level": "INFO"},
    },
}
