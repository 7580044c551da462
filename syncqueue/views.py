"""Pages of the sync: the queue monitor, an event, a twin, the sync panel on an issue page, and their buttons.

Staff may look and act: the buttons here are operations on the queue (sync now, stop,
retry, discard). Only admins change rules and connections, on the connection pages.
Reads and writes live in ``monitor`` and ``flow``; the views stay thin.
"""

from __future__ import annotations

from django import db
from django.contrib import messages
from django.db.models import F, FilteredRelation, Prefetch, Q, prefetch_related_objects
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST, require_safe

from connections.access import staff_only
from connections.models import Connection, Node
from syncqueue import flow, monitor
from syncqueue.models import SyncEvent, Twin
from trackers.base import TrackerError

SYNCING = (Connection.Status.ACTIVE, Connection.Status.DEACTIVATED)
PANEL_EVENTS = 5
# What the panel shows of a twin; the columns in Twin's field order, as Model.from_db wants them.
PANEL_TWIN_FIELDS = ("id", "remote_key", "state", "blocked_reason", "last_synced")
PANEL_TWIN_COLUMNS = ("id", "connection_id", "local_key", "remote_key", "state", "blocked_reason", "last_synced")


def _connections():
    # The few columns the pages show: no secret is loaded (and decrypted) for a list.
    return Connection.objects.only("id", "name", "status", "remote_url").order_by("name", "id")


def _back(request: HttpRequest, fallback: str) -> HttpResponse:
    """Back to the page the form was on (``next``, when it is on this site), else to ``fallback``."""
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return redirect(target)
    return redirect(fallback)


def issue_elsewhere(key: str) -> str:
    """On a node serving another tracker, that tracker's page of ``key`` (so issue links work on every node)."""
    if Node.local().tracker_kind == "builtin":
        return ""
    try:
        web_url = getattr(flow.local_tracker(), "web_url", None)
        return web_url(key) if web_url else ""
    except TrackerError:
        return ""


def _twin_home(twin: Twin) -> str:
    if twin.local_key:
        return reverse("builtin:issue-detail", args=[twin.local_key])
    return reverse("sync:twin", args=[twin.pk])


def _report(request: HttpRequest, outcome: monitor.Outcome, done: str) -> None:
    if outcome.changed:
        messages.success(request, done.format(n=outcome.changed))
    for reason in outcome.refused:
        messages.error(request, reason)
    if not outcome.changed and not outcome.refused:
        messages.info(request, "Nothing to do.")


# --- the issue page's panel -------------------------------------------------------------------


def issue_panel(request: HttpRequest, key: str) -> str:
    """The issue page's sync panel (staff only): each twin with its latest events, and the sync buttons.

    Two queries however many twins and events there are: the connections, each joined to
    its twin of this key (there is at most one), and the twins' latest events.
    """
    if not request.user.is_staff:
        return ""
    rows = _connections().annotate(
        issue_twin=FilteredRelation("twins", condition=Q(twins__local_key=key)),
        **{f"twin_{name}": F(f"issue_twin__{name}") for name in PANEL_TWIN_FIELDS},
    )
    twins, others = [], []
    for connection in rows:
        if connection.twin_id is None:
            if connection.status in SYNCING:
                others.append(connection)
            continue
        twin_id, *values = (getattr(connection, f"twin_{name}") for name in PANEL_TWIN_FIELDS)
        twin = Twin.from_db(db.DEFAULT_DB_ALIAS, PANEL_TWIN_COLUMNS, [twin_id, connection.pk, key, *values])
        twin.connection = connection
        twin.remote_url = monitor.remote_issue_url(connection, twin.remote_key)
        twins.append(twin)
    latest = SyncEvent.objects.only(*monitor.EVENT_LIST_FIELDS).order_by("-id")[:PANEL_EVENTS]
    prefetch_related_objects(twins, Prefetch("events", queryset=latest, to_attr="latest_events"))
    return render_to_string(
        "syncqueue/issue_panel.html",
        {"key": key, "twins": twins, "connections": others, "here": request.get_full_path()},
        request=request,
    )


@staff_only
@require_POST
def sync_now(request: HttpRequest, key: str) -> HttpResponse:
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
    return _back(request, reverse("builtin:issue-detail", args=[key]))


@staff_only
@require_POST
def twin_stop(request: HttpRequest, pk: int) -> HttpResponse:
    twin = get_object_or_404(Twin.objects.select_related("connection"), pk=pk)
    flow.stop_twin(twin)
    messages.success(request, f"Stopped syncing {twin} with {twin.connection.name}.")
    return _back(request, _twin_home(twin))


@staff_only
@require_POST
def twin_retry(request: HttpRequest, pk: int) -> HttpResponse:
    """Resolve and retry: unblock the twin and put its failed events back, in order."""
    twin = get_object_or_404(Twin.objects.select_related("connection"), pk=pk)
    retried = flow.resolve_and_retry(twin)
    messages.success(request, f"Retrying {retried} event(s) of {twin}.")
    return _back(request, _twin_home(twin))


# --- the monitor ------------------------------------------------------------------------------


@staff_only
@require_safe
def queue_monitor(request: HttpRequest) -> HttpResponse:
    connections = list(_connections())
    form = monitor.EventFilter(request.GET, connections)
    events = form.apply(monitor.event_list())
    page = monitor.CappedPaginator(events, monitor.EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    counts = monitor.queue_counts(connections)
    blocked = monitor.blocked_twins()
    for twin in blocked:
        failure = twin.latest_failure[0] if twin.latest_failure else None
        twin.failure = failure
        twin.failure_line = monitor.script_line(failure, twin.connection.active_rules) if failure else ""
        twin.remote_url = monitor.remote_issue_url(twin.connection, twin.remote_key)
    context = {
        "counts": counts,
        "statuses": SyncEvent.Status.choices,
        "chart": monitor.throughput(),
        "form": form,
        "page": page,
        "blocked": blocked,
        "blocked_total": sum(c.blocked for c in counts),
        "here": request.get_full_path(),
    }
    return render(request, "syncqueue/monitor.html", context)


@staff_only
@require_safe
def event_detail(request: HttpRequest, pk: int) -> HttpResponse:
    event = get_object_or_404(
        SyncEvent.objects.select_related("twin", "connection__active_rules", "rules_version"), pk=pk
    )
    context = {
        "event": event,
        "twin": event.twin,
        "payload": monitor.pretty_json(event.payload),
        "line": monitor.script_line(event, event.connection.active_rules),
        "remote_url": monitor.remote_issue_url(event.connection, event.twin.remote_key),
        "here": request.get_full_path(),
    }
    return render(request, "syncqueue/event_detail.html", context)


@staff_only
@require_safe
def twin_detail(request: HttpRequest, pk: int) -> HttpResponse:
    twin = get_object_or_404(Twin.objects.select_related("connection"), pk=pk)
    timeline = (
        twin.events.select_related("rules_version")
        .only(*monitor.EVENT_LIST_FIELDS, "rules_version__number")
        .order_by("-id")
    )
    context = {
        "twin": twin,
        "remote_url": monitor.remote_issue_url(twin.connection, twin.remote_key),
        "last_sent": monitor.pretty_json(twin.last_sent) if twin.last_sent is not None else "",
        "last_received": monitor.pretty_json(twin.last_received) if twin.last_received is not None else "",
        "comment_map": sorted(twin.comment_map.items()),
        "attachment_map": sorted(twin.attachment_map.items()),
        "conflicts": twin.conflicts.order_by("-id")[:20],
        "page": monitor.CappedPaginator(timeline, monitor.EVENTS_PER_PAGE).get_page(request.GET.get("page")),
        "here": request.get_full_path(),
    }
    return render(request, "syncqueue/twin_detail.html", context)


# --- queue actions ----------------------------------------------------------------------------

RETRIED = "Put {n} failed event(s) back in the queue."
DISCARDED = "Discarded {n} event(s)."


def _event(pk: int) -> SyncEvent:
    return get_object_or_404(SyncEvent.objects.select_related("twin"), pk=pk)


@staff_only
@require_POST
def event_retry(request: HttpRequest, pk: int) -> HttpResponse:
    event = _event(pk)
    _report(request, monitor.retry_events([event]), RETRIED)
    return _back(request, reverse("sync:event", args=[pk]))


@staff_only
@require_POST
def event_discard(request: HttpRequest, pk: int) -> HttpResponse:
    event = _event(pk)
    _report(request, monitor.discard_events([event], request.user), DISCARDED)
    return _back(request, reverse("sync:event", args=[pk]))


@staff_only
@require_POST
def events_bulk(request: HttpRequest) -> HttpResponse:
    """The event list's form: retry or discard the ticked events."""
    ids = [int(value) for value in request.POST.getlist("event") if value.isdigit()][: monitor.EVENTS_PER_PAGE]
    action = request.POST.get("action")
    events = list(SyncEvent.objects.select_related("twin").filter(pk__in=ids))
    if action not in ("retry", "discard"):
        messages.error(request, "Choose retry or discard.")
    elif not events:
        messages.error(request, "Tick the events to act on first.")
    elif action == "retry":
        _report(request, monitor.retry_events(events), RETRIED)
    else:
        _report(request, monitor.discard_events(events, request.user), DISCARDED)
    return _back(request, reverse("sync:monitor"))
