"""Benchmark models: the same four columns, declared in the ways the targets name.

Identical columns keep the variants comparable: only the trigger differs.
"""

from django.db import models

from django_pgnotify import Notify


class _Columns(models.Model):
    """The columns every benchmark model has."""

    a = models.IntegerField()
    b = models.CharField(max_length=50)
    c = models.IntegerField()
    d = models.IntegerField()

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{type(self).__name__} {self.pk}"


class PlainItem(_Columns):
    """No declaration: the no-trigger baseline, and the template of hand-written ones."""


class Item(_Columns):
    """Sends the pk and two fields, the write-path targets' declaration."""

    class Meta:
        pgnotify = Notify(fields=["a", "b"])


class ChangedItem(_Columns):
    """Announces updates of ``a`` or ``c`` only; updates carry the changed-field list."""

    class Meta:
        pgnotify = Notify(fields=["a", "b"], when_changed=["a", "c"])


class DurableItem(_Columns):
    """Stores each change in the event table (durable delivery)."""

    class Meta:
        pgnotify = Notify(fields=["a", "b"], durable=True)


class RowItem(_Columns):
    """``Item``'s declaration with row-level triggers (``level="row"``)."""

    class Meta:
        pgnotify = Notify(fields=["a", "b"], level="row")


class NewValuesItem(_Columns):
    """``Item``'s pk and two fields, updates sending their new values alone (``old=False``)."""

    class Meta:
        pgnotify = Notify(fields=["a", "b"], old=False)
