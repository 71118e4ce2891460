"""The durable events in the Django admin: find dead letters, retry or discard them."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db.models import BooleanField, ExpressionWrapper, Q, QuerySet
from django.db.models.functions import Now
from django.http import HttpRequest
from django.utils import timezone

from .durable import retry_events_counted
from .models import DurableEvent


@admin.register(DurableEvent)
class DurableEventAdmin(admin.ModelAdmin):
    """Read-only rows with two actions: a row is changed only by listeners and these.

    A row holds the changes of one statement (up to ``wire.DURABLE_ID_STEP``);
    retrying it delivers again only those not handled yet.
    """

    list_display = (
        "id",
        "model",
        "changes",
        "status",
        "attempts",
        "created_at",
        "available_at",
        "held_by",
        "short_error",
    )
    list_filter = ("status", "model", "attempts")
    search_fields = ("=id", "declaration", "last_error")
    actions = ("retry", "discard")
    ordering = ("-id",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="changes")
    def changes(self, obj: DurableEvent) -> str:
        """How many changes the row holds, and how many are still to deliver if not all."""
        left = obj.unhandled
        if left == obj.size or obj.status == "done":
            return str(obj.size)
        return f"{left} of {obj.size}"

    def get_queryset(self, request: HttpRequest) -> QuerySet[DurableEvent]:
        # Whether each lease still runs, by the database's clock, as listeners judge it.
        running = ExpressionWrapper(Q(lease_until__gt=Now()), output_field=BooleanField())
        return super().get_queryset(request).annotate(lease_running=running)

    @admin.display(description="held by", ordering="lease_owner")
    def held_by(self, obj: DurableEvent) -> str:
        """The listener delivering the row now. A row released by a stopping listener
        keeps its ``lease_owner`` as a mark (see ``durable``) but no lease: nobody holds
        it. A lease that ran out is shown as such: the row is claimable again."""
        if not obj.lease_owner or obj.lease_until is None:
            return ""
        running = getattr(obj, "lease_running", None)
        if running is None:  # not read through get_queryset
            running = obj.lease_until > timezone.now()
        if not running:
            return f"nobody ({obj.lease_owner}'s lease expired)"
        return obj.lease_owner

    @admin.display(description="last error")
    def short_error(self, obj: DurableEvent) -> str:
        return obj.last_error[:120]

    def has_retry_permission(self, request: HttpRequest) -> bool:
        """Retrying changes rows: it takes the change permission, which the admin's own
        change view is not given (rows are changed only by listeners and these actions)."""
        codename = get_permission_codename("change", self.opts)
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    @admin.action(
        description="Retry the selected events (attempts start again)", permissions=["retry"]
    )
    def retry(self, request: HttpRequest, queryset: QuerySet[DurableEvent]) -> None:
        count, held = retry_events_counted(queryset)
        self.message_user(request, f"{count} event(s) will be delivered again.", messages.SUCCESS)
        if held:
            self.message_user(
                request,
                f"{held} event(s) left as they are: a listener is delivering them now.",
                messages.WARNING,
            )

    @admin.action(description="Discard the selected events", permissions=["delete"])
    def discard(self, request: HttpRequest, queryset: QuerySet[DurableEvent]) -> None:
        count, _ = queryset.delete()
        self.message_user(request, f"{count} event(s) discarded.", messages.SUCCESS)
