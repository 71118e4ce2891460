"""Let Django models carry ``pgnotify`` in their ``class Meta``.

Django rejects unknown ``Meta`` attributes, so the name is added to
``django.db.models.options.DEFAULT_NAMES``. Our AppConfig module does it when
Django imports it, which Django does for every installed app before it imports
any models module, so the order of ``INSTALLED_APPS`` does not matter. Options
copied this way follow Django's own ``Meta`` inheritance rules (abstract
parents pass it on, multi-table parents do not), except that a multi-table
child never takes an abstract grandparent's declaration through its parent.

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
    class_prepared.connect(_prepare_option, dispatch_uid="django_pgnotify.meta")


def _prepare_option(sender: Any, **kwargs: Any) -> None:
    opts = sender._meta
    # Migrations serialise Options.original_attrs; the live option stays on _meta.
    opts.original_attrs.pop(META_OPTION, None)
    if _inherited_through_a_parent(sender):
        setattr(opts, META_OPTION, None)


def _inherited_through_a_parent(model: Any) -> bool:
    """Whether a multi-table child's declaration is its parent's abstract ancestor's.

    Django gives a model without a ``Meta`` of its own the first ``Meta`` found
    along its bases, which for a multi-table child can be an abstract ancestor
    of its concrete parent: the child would announce its grandparent's
    declaration. An abstract class among the child's own bases still passes
    its declaration on, as for any other child.
    """
    opts = model._meta
    declared = getattr(opts, META_OPTION, None)
    if declared is None or opts.proxy or not opts.parents:
        return False
    for base in model.__mro__[1:]:
        meta = base.__dict__.get("Meta")
        if meta is not None and getattr(meta, META_OPTION, None) is declared:
            return base not in model.__bases__ and any(
                issubclass(parent, base) for parent in opts.parents
            )
    return False
