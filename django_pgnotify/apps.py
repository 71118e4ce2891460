"""The Django app: registers the ``Meta`` option, the system checks and the
``migrate`` hooks that keep triggers in step with declarations (see
migrating.py)."""

from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate, pre_migrate

from .conf import get_setting
from .meta import allow_meta_option

# Django imports this module before any models module: see meta.py.
if get_setting("META_OPTION"):
    allow_meta_option()


class PgNotifyConfig(AppConfig):
    name = "django_pgnotify"
    verbose_name = "PostgreSQL notifications"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
        from .migrating import detach_before_migrate, sync_after_migrate

        pre_migrate.connect(detach_before_migrate, dispatch_uid="django_pgnotify.pre_migrate")
        post_migrate.connect(sync_after_migrate, dispatch_uid="django_pgnotify.post_migrate")
