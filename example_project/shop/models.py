from django.db import models
from django.db.models.functions import Now

from django_pgnotify import Notify


class Order(models.Model):
    customer = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=20)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    note = models.TextField(blank=True)
    # A database default, so that writers other than Django can leave it out.
    created = models.DateTimeField(db_default=Now())

    class Meta:
        # Announce inserts, deletes, and updates that change status or total; send those
        # and the customer with every event. Editing only the note announces nothing.
        pgnotify = Notify(fields=["customer", "status", "total"], when_changed=["status", "total"])

    def __str__(self) -> str:
        return f"order #{self.pk}"
