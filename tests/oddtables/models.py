"""Declarations the installer must refuse, beside one it installs.

``NoteSummary`` is an unmanaged model on a view. With ``ODDTABLES_TWIN=1``,
``NoteTwin`` is an unmanaged model on ``Note``'s table that declares too: its
triggers and function would have the same names as ``Note``'s.
"""

import os

from django.db import models

from django_pgnotify import Notify


class Note(models.Model):
    text = models.CharField(max_length=50)

    class Meta:
        app_label = "oddtables"
        pgnotify = Notify(fields=["text"])


class Memo(models.Model):
    text = models.CharField(max_length=50)

    class Meta:
        app_label = "oddtables"
        pgnotify = Notify(fields=["text"])


class NoteSummary(models.Model):
    text = models.CharField(max_length=50)

    class Meta:
        app_label = "oddtables"
        managed = False
        db_table = "oddtables_note_summary"
        pgnotify = Notify(fields=["text"])


if os.environ.get("ODDTABLES_TWIN") == "1":

    class NoteTwin(models.Model):
        text = models.CharField(max_length=50)

        class Meta:
            app_label = "oddtables"
            managed = False
            db_table = "oddtables_note"
            pgnotify = Notify(fields=["text"])
