"""The durable event table: one row per change of a ``durable=True`` declaration.

The trigger inserts the row in the writing transaction, so a change and its
event commit or roll back together; listeners claim rows with a lease and
delete (or mark done) those their receivers handled.
"""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Now

from .wire import EVENT_TABLE


class DurableEvent(models.Model):
    """A change waiting for, or done with, delivery by a listener."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    STATUSES = [(PENDING, "pending"), (DONE, "done"), (DEAD, "dead letter")]

    id = models.BigAutoField(primary_key=True)
    #: The declaration's URI, ``app_label.Model:name`` (its max_attempts applies).
    declaration = models.TextField()
    #: The model's ``app_label.model_name``.
    model = models.TextField()
    action = models.TextField()
    #: The writing transaction's id (``txid_current()``).
    xid = models.BigIntegerField(null=True, blank=True)
    #: When the trigger ran.
    changed_at = models.DateTimeField(null=True, blank=True)
    #: The writing transaction's ``pgnotify.context`` setting, unparsed ("" if unset).
    context = models.TextField(blank=True, default="", db_default="")
    #: The row as the wire format's ``rows`` entries carry it, as JSON text
    #: without size limit: a version 2 array laid out by ``layout``, or (rows
    #: written before ``layout`` existed) a version 1 object. The listener
    #: rebuilds the full message from it and the columns above (see
    #: ``django_pgnotify.wire``). Text, not jsonb: the trigger's JSON is stored
    #: as built and the listener splices it into the message as read, where jsonb
    #: parsed it on every insert and rendered it again on every claim.
    payload = models.TextField()
    #: The version 2 message keys that say how ``payload`` is laid out, as JSON
    #: text (``"fields":[...],"watched":[...]``); "" for a version 1 object.
    #: Stored with the row, so a declaration changed while events wait does
    #: not change how they are read.
    layout = models.TextField(blank=True, default="", db_default="")
    pid = models.IntegerField(null=True, blank=True, help_text="Backend PID of the writer.")
    status = models.TextField(choices=STATUSES, default=PENDING, db_default=PENDING)
    attempts = models.IntegerField(default=0, db_default=0)
    available_at = models.DateTimeField(db_default=Now(), help_text="Not claimed before this.")
    lease_owner = models.TextField(blank=True, default="", db_default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="", db_default="")
    created_at = models.DateTimeField(db_default=Now())
    done_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = EVENT_TABLE
        verbose_name = "durable event"
        ordering = ["id"]
        indexes = [
            # Claiming scans pending rows in id order; done rows kept for
            # retention must not slow it down.
            models.Index(
                fields=["id"],
                name="pgnotify_event_pending",
                condition=models.Q(status="pending"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} event {self.id} ({self.status})"
