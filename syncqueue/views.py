"""Pages of the sync: the sync panel on an issue page and its buttons (sync now, stop, retry)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from connections.models import Connection
from syncqueue import flow
from syncqueue.models import Twin
from trackers.base import TrackerError

SYNCING = (Connection.Status.ACTIVE, Connection.Status.DEACTIVATED)


def issue_panel(request, key: str) -> str:
    """The issue page's sync panel: its twins and the sync-now button (staff only)."""
    if not request.user.is_staff:
        return ""
    twins = list(Twin.objects.filter(local_key=key).select_related("connection").order_by("connection__name"))
    twinned = {t.connection_id for t in twins}
    others = Connection.objects.filter(status__in=SYNCING).exclude(pk__in=twinned).order_by("name")
    return render_to_string(
        "syncqueue/issue_panel.html", {"key": key, "twins": twins, "connections": others}, request=request
    )


def _back(key: str):
    return redirect("builtin:issue-detail", key=key)


@staff_member_required
@require_POST
def sync_now(request, key: str):
    connection = get_object_or_404(Connection.objects.select_related("active_rules"), pk=request.POST.get("connection"))
    try:
        event = flow.sync_entity(connection, key, force=True)
    except (TrackerError, flow.SyncRefused) as e:
        messages.error(request, f"Could not sync {key} to {connection.name}: {e}")
    else:
        if event is not None and event.error:
            messages.error(request, f"The outgoing rules failed: {event.error}")
        else:
            messages.success(request, f"{key} is queued for {connection.name}.")
    return _back(key)


@staff_member_required
@require_POST
def twin_stop(request, pk: int):
    twin = get_object_or_404(Twin, pk=pk)
    flow.stop_twin(twin)
    messages.success(request, f"Stopped syncing {twin.local_key} with {twin.connection.name}.")
    return _back(twin.local_key)


@staff_member_required
@require_POST
def twin_retry(request, pk: int):
    twin = get_object_or_404(Twin, pk=pk)
    retried = flow.resolve_and_retry(twin)
    messages.success(request, f"Retrying {retried} event(s) of {twin.local_key}.")
    return _back(twin.local_key)
