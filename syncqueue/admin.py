"""Admin views of the sync queue: twins and events are read-only; the actions call the flow's recovery."""

from __future__ import annotations

from django.contrib import admin, messages

from connections.admin import StaffViewsAdminChanges, is_admin
from syncqueue import flow
from syncqueue.models import SyncEvent, Twin


class ReadOnlyWithActions(StaffViewsAdminChanges):
    """Nothing is added, edited or deleted by hand; superusers may run the recovery actions."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_recover_permission(self, request) -> bool:
        return is_admin(request)


@admin.register(Twin)
class TwinAdmin(ReadOnlyWithActions, admin.ModelAdmin):
    list_display = ("connection", "local_key", "remote_key", "state", "blocked_reason", "last_synced")
    list_filter = ("state", "connection")
    search_fields = ("local_key", "remote_key")
    list_select_related = ("connection",)
    actions = ["resolve_and_retry", "stop_syncing"]

    @admin.action(description="Resolve and retry the selected twins", permissions=["recover"])
    def resolve_and_retry(self, request, queryset) -> None:
        twins = list(queryset)
        retried = sum(flow.resolve_and_retry(twin) for twin in twins)
        self.message_user(request, f"{len(twins)} twin(s) unblocked, {retried} event(s) retried.", messages.SUCCESS)

    @admin.action(description="Stop syncing the selected twins", permissions=["recover"])
    def stop_syncing(self, request, queryset) -> None:
        twins = list(queryset)
        for twin in twins:
            flow.stop_twin(twin)
        self.message_user(request, f"{len(twins)} twin(s) stopped; the remote side is told.", messages.SUCCESS)


@admin.register(SyncEvent)
class SyncEventAdmin(ReadOnlyWithActions, admin.ModelAdmin):
    list_display = ("id", "connection", "direction", "kind", "twin", "seq", "status", "attempts", "created", "error")
    list_filter = ("direction", "status", "kind", "connection")
    search_fields = ("message_id",)
    list_select_related = ("connection", "twin")
    actions = ["retry"]

    @admin.action(description="Retry the selected failed events", permissions=["recover"])
    def retry(self, request, queryset) -> None:
        # A failed event blocks its twin, and a twin's events apply in order: so the twin is
        # resolved, which puts all its failed events back in the queue with next_attempt now.
        twins = Twin.objects.filter(pk__in=queryset.filter(status=SyncEvent.Status.FAILED).values("twin_id"))
        twins = list(twins)
        retried = sum(flow.resolve_and_retry(twin) for twin in twins)
        self.message_user(request, f"{retried} failed event(s) of {len(twins)} twin(s) retried.", messages.SUCCESS)
