"""The Django app: registers the ``Meta`` option and the system checks."""

from django.apps import AppConfig

# Imported for its effect, before any models module: see meta.py.
from . import meta  # noqa: F401


class PgNotifyConfig(AppConfig):
    name = "django_pgnotify"
    verbose_name = "PostgreSQL notifications"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
