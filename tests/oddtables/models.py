"""Declarations the installer must refuse, beside one it installs.

``NoteSummary`` is an unmanaged model on a view. With ``ODDTABLES_TWIN=1``,
``NoteTwin`` is an unmanaged model on ``Note``'s table that declares too: its
triggers and function would have the same names as ``Note``'s. With
``ODDTABLES_TWIN=public`` it names the table with its schema: its function's
name differs, its triggers' do not.
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


if os.environ.get("ODDTABLES_TWIN") in ("1", "public"):

    class NoteTwin(models.Model):
        text = models.CharField(max_length=50)

        class Meta:
            app_label = "oddtables"
            managed = False
            if os.environ["ODDTABLES_TWIN"] == "public":
                db_table = '"public"."oddtables_note"'
            else:
                db_table = "oddtables_note"
            pgnotify = Notify(fields=["text"])
