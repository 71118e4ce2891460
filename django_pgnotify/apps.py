"""The Django app: registers the ``Meta`` option, the system checks and the
``migrate`` hook that keeps triggers in step with declarations."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate

from .conf import get_setting
from .meta import allow_meta_option

# Django imports this module before any models module: see meta.py.
if get_setting("META_OPTION"):
    allow_meta_option()

logger = logging.getLogger("django_pgnotify")


class PgNotifyConfig(AppConfig):
    name = "django_pgnotify"
    verbose_name = "PostgreSQL notifications"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)

        post_migrate.connect(install_on_migrate, dispatch_uid="django_pgnotify.install_on_migrate")


def install_on_migrate(sender: AppConfig, using: str, plan: Any = None, **kwargs: Any) -> None:
    """Install the triggers of the app ``migrate`` just handled.

    A function body names its columns, so a migration that renames one leaves
    a trigger that fails the table's writes until it is rebuilt: doing it here
    keeps that window to the migration itself. ``flush`` also sends
    ``post_migrate`` (without a plan); the schema has not changed then.
    """
    from django.db import connections

    from .conf import get_setting
    from .installation import TableMissing, declarations_for, install_triggers

    if plan is None or not get_setting("INSTALL_ON_MIGRATE"):
        return
    if connections[using].vendor != "postgresql":
        return
    if not declarations_for([sender.label], using):
        return
    try:
        install_triggers([sender.label], using)
    except TableMissing as exc:
        # Migrated backwards past a model's creation: nothing to attach to.
        logger.warning("pgnotify: triggers not installed after migrate: %s", exc)
