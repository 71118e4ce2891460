"""Let Django models carry ``pgnotify`` in their ``class Meta``.

Django rejects unknown ``Meta`` attributes, so the name is added to
``django.db.models.options.DEFAULT_NAMES``. Our AppConfig module does it when
Django imports it, which Django does for every installed app before it imports
any models module, so the order of ``INSTALLED_APPS`` does not matter. Options
copied this way follow Django's own ``Meta`` inheritance rules (abstract
parents pass it on, multi-table parents do not).

This is the one change we make to Django; ``PGNOTIFY["META_OPTION"] = False``
turns it off (for instance if another library claims the same name), and
declarations then come from ``PGNOTIFY["MODELS"]`` only.

The option is kept out of migrations: declarations are installed by
``pgnotify_install``, not by schema migrations, so changing one must not ask
for a new migration.
"""

from __future__ import annotations

from typing import Any

from django.db.models import options
from django.db.models.signals import class_prepared

META_OPTION = "pgnotify"


def allow_meta_option() -> None:
    """Add ``pgnotify`` to the ``Meta`` names Django accepts (idempotent)."""
    if META_OPTION not in options.DEFAULT_NAMES:
        options.DEFAULT_NAMES = (*options.DEFAULT_NAMES, META_OPTION)
    class_prepared.connect(_keep_out_of_migrations, dispatch_uid="django_pgnotify.meta")


def _keep_out_of_migrations(sender: Any, **kwargs: Any) -> None:
    # Migrations serialise Options.original_attrs; the live option stays on _meta.
    sender._meta.original_attrs.pop(META_OPTION, None)
