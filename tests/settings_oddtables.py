"""Settings for tests of declarations the installer refuses: only the oddtables app,
on DATABASE_URL (set by the test)."""

import os

from django_pgnotify.embedded import database_settings

SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {"default": database_settings(os.environ["DATABASE_URL"])}
INSTALLED_APPS = ["django_pgnotify", "tests.oddtables"]
PGNOTIFY = {"INSTALL_ON_MIGRATE": os.environ.get("ODDTABLES_INSTALL_ON_MIGRATE", "1") == "1"}
