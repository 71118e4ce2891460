"""A project whose notifying models sit on SQLite: every command must refuse it.

Standalone rather than importing tests.settings, which would start a PostgreSQL.
"""

from django_pgnotify import Notify

SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
INSTALLED_APPS = [
    "tests.testapp",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.postgres",  # testapp.Measurement's ArrayField
    "django_pgnotify",
]
PGNOTIFY = {"MODELS": {"auth.User": Notify(fields=["username"], events=["insert"])}}
