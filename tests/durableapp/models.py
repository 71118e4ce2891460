from django.db import models

from django_pgnotify import Notify


class Job(models.Model):
    """A model announced durably, for the durable delivery tests."""

    name = models.CharField(max_length=100)
    body = models.TextField(blank=True)
    n = models.IntegerField(default=0)

    class Meta:
        pgnotify = Notify(fields=["name", "body", "n"], durable=True, max_attempts=3)
