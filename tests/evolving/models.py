"""A model that changes over six migrations; ``EVOLVING_STEP`` picks its code.

Each step's code matches the schema after migration ``000<step>``, as it
would in a project's history. ``EVOLVING_STALE=1`` keeps a declaration that
names a dropped field; ``EVOLVING_PART_QUIET=1`` makes ``Part`` stop declaring.
"""

import os

from django.db import models

from django_pgnotify import Notify

STEP = int(os.environ.get("EVOLVING_STEP", "6"))


class Gadget(models.Model):
    if STEP < 3:
        name = models.CharField(max_length=50)
    else:
        title = models.CharField(max_length=50)
    if STEP < 4:
        price = models.IntegerField(default=0)
    else:
        price = models.DecimalField(max_digits=10, decimal_places=2, default=0)
    if 2 <= STEP < 5:
        colour = models.CharField(max_length=20, default="red")

    class Meta:
        app_label = "evolving"
        _watched = ["name" if STEP < 3 else "title", "price"]
        if 2 <= STEP < 5 or os.environ.get("EVOLVING_STALE") == "1":
            _watched.append("colour")
        pgnotify = Notify(fields=_watched, when_changed=_watched)
        del _watched


if STEP < 6:

    class Part(models.Model):
        label = models.CharField(max_length=50)

        class Meta:
            app_label = "evolving"
            if os.environ.get("EVOLVING_PART_QUIET") != "1":
                pgnotify = Notify(fields=["label"])
