"""The durable event table: the changes of a ``durable=True`` declaration.

The trigger inserts the rows in the writing transaction, so changes and their
events commit or roll back together. One row holds up to
``wire.DURABLE_ID_STEP`` changes of one statement (a single-row write gives a
row of one): a bulk write inserts a row per thousand changes, not one per
change. Listeners claim rows with a lease and delete (or mark done) those whose
changes their receivers handled.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.functions import Now

from .wire import EVENT_TABLE


class PositionsField(models.Field):
    """An ``integer[]`` column, read and written as a list of ints by psycopg.

    Not ``ArrayField``, which would need ``django.contrib.postgres`` in every
    project's ``INSTALLED_APPS`` for one column that only the listener writes.
    """

    description = "Positions (an integer array)"

    def db_type(self, connection: Any) -> str:
        return "integer[]"


class DurableEvent(models.Model):
    """Changes of one statement waiting for, or done with, delivery by a listener.

    Row ids are ``wire.DURABLE_ID_STEP`` apart (migration 0004 sets the
    identity's increment): the change at position ``i`` of the row has the
    ``event_id`` ``id + i``, unique and the same on every delivery.
    """

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
    #: The changed rows as the wire format's ``rows`` entries carry them, as
    #: JSON text without size limit, comma-separated (``size`` of them): version
    #: 2 arrays laid out by ``layout``, or (rows written before ``layout``
    #: existed) one version 1 object. The listener rebuilds the full message
    #: from it and the columns above (see ``django_pgnotify.wire``). Text, not
    #: jsonb: the trigger's JSON is stored as built and the listener splices it
    #: into the message as read, where jsonb parsed it on every insert and
    #: rendered it again on every claim.
    payload = models.TextField()
    #: The version 2 message keys that say how ``payload`` is laid out, as JSON
    #: text (``"fields":[...],"watched":[...]``); "" for a version 1 object.
    #: Stored with the row, so a declaration changed while events wait does
    #: not change how they are read.
    layout = models.TextField(blank=True, default="", db_default="")
    pid = models.IntegerField(null=True, blank=True, help_text="Backend PID of the writer.")
    size = models.PositiveIntegerField(
        default=1, db_default=1, help_text="How many changes the payload holds."
    )
    #: Positions in ``payload`` of the changes already handled, when some of
    #: the row's changes failed or the listener stopped mid-row: they are not
    #: delivered again. ``None`` when none is.
    handled = PositionsField(null=True, blank=True)
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
            # Claiming reads the pending rows of each declaration served in id
            # order: neither done rows kept for retention nor pending rows of the
            # declarations a listener does not serve must slow it down.
            models.Index(
                fields=["declaration", "id"],
                name="pgnotify_event_pending",
                condition=models.Q(status="pending"),
            ),
        ]

    def __str__(self) -> str:
        if self.size == 1:
            return f"{self.model} event {self.id} ({self.status})"
        return f"{self.model} events {self.id}+{self.size - 1} ({self.status})"

    @property
    def unhandled(self) -> int:
        """Changes of the row not handled yet."""
        return self.size - len(self.handled or ())
