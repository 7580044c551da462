"""The connection setup pages: list, invite, accept a code, a connection's page and its buttons,
and the tracker this node serves.

Staff may look; only admins (superusers) change anything, as in the REST API. Every write
goes through ``handshake``, ``lifecycle``, ``tracker_settings`` or the API's trigger validation.
"""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.text import capfirst
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from connections import handshake, lifecycle, tracker_settings
from connections.access import admins_only, is_admin, staff_only
from connections.forms import (
    TRACKER_KINDS,
    AcceptForm,
    InvitationForm,
    TrackerSettingsForm,
    TriggerForm,
    has_projects,
)
from connections.models import Connection, Invitation, Node, Trigger
from trackers.base import TrackerError

require_form_methods = require_http_methods(["GET", "HEAD", "POST"])


def _session_key(connection: Connection) -> str:
    return f"connections.invitation.{connection.pk}"


def _to_detail(connection: Connection) -> HttpResponse:
    return redirect("connections:detail", pk=connection.pk)


# --- list and detail -------------------------------------------------------------------------


@staff_only
@require_safe
def connection_list(request: HttpRequest) -> HttpResponse:
    connections = Connection.objects.select_related("active_rules").order_by("name", "id")
    return render(request, "connections/list.html", {"connections": connections, "can_change": is_admin(request.user)})


def _render_detail(request: HttpRequest, connection: Connection, trigger_form: TriggerForm | None = None):
    context = {
        "connection": connection,
        "triggers": connection.triggers.order_by("id"),
        "trigger_form": trigger_form or TriggerForm(),
        "can_change": is_admin(request.user),
        "rules_url": reverse("admin:connections_rulesversion_changelist") + f"?connection__id__exact={connection.pk}",
    }
    return render(request, "connections/detail.html", context)


@staff_only
@require_safe
def connection_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return _render_detail(request, get_object_or_404(Connection.objects.select_related("active_rules"), pk=pk))


@staff_only
@require_safe
@never_cache
def connection_status(request: HttpRequest, pk: int) -> JsonResponse:
    """What the invitation page polls to learn that the other side accepted."""
    connection = get_object_or_404(Connection, pk=pk)
    return JsonResponse(
        {
            "status": connection.status,
            "status_display": connection.get_status_display(),
            "status_detail": connection.status_detail,
            "remote_name": connection.remote_name,
            "detail_url": reverse("connections:detail", args=[connection.pk]),
        }
    )


# --- pairing -----------------------------------------------------------------------------------


@admins_only
@require_form_methods
def connection_new(request: HttpRequest) -> HttpResponse:
    form = InvitationForm(request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        try:
            connection, code, _expires = handshake.create_invitation(
                form.cleaned_data["name"],
                project=form.cleaned_data["project"],
                author=request.user,
                hours=form.cleaned_data["hours_valid"],
                template=form.cleaned_data["rules_template"],
            )
        except handshake.HandshakeError as e:
            form.add_error(None, e.message)
        else:
            # The code is shown once, to its maker: the node keeps only its encrypted parts.
            request.session[_session_key(connection)] = {
                "code": code,
                "not_reachable": form.cleaned_data["not_reachable"],
            }
            return redirect("connections:invitation", pk=connection.pk)
    return render(request, "connections/new.html", {"form": form, "has_projects": has_projects()})


@admins_only
@require_safe
def connection_invitation(request: HttpRequest, pk: int) -> HttpResponse:
    connection = get_object_or_404(Connection, pk=pk, is_initiator=True)
    invitation = Invitation.objects.filter(connection=connection).order_by("-created").first()
    shown = request.session.get(_session_key(connection)) or {}
    if connection.status != Connection.Status.PENDING:
        # Used: the code is no use to anyone any more, so it leaves the session.
        request.session.pop(_session_key(connection), None)
    context = {
        "connection": connection,
        "invitation": invitation,
        "code": shown.get("code", "") if connection.status == Connection.Status.PENDING else "",
        "not_reachable": shown.get("not_reachable", False),
    }
    return render(request, "connections/invitation.html", context)


@admins_only
@require_form_methods
def connection_accept(request: HttpRequest) -> HttpResponse:
    form = AcceptForm(request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        try:
            connection = handshake.accept_invitation(
                form.cleaned_data["code"],
                name=form.cleaned_data["name"],
                project=form.cleaned_data["project"],
                author=request.user,
                template=form.cleaned_data["rules_template"],
                private=form.cleaned_data["private"],
            )
        except handshake.HandshakeError as e:
            # 502: the other node did not answer or refused; anything else is about the code itself.
            form.add_error(None if e.status == 502 else "code", e.message)
        else:
            messages.success(request, f"Connected to {connection.remote_name}. The connection is active.")
            return _to_detail(connection)
    return render(request, "connections/accept.html", {"form": form, "has_projects": has_projects()})


# --- buttons on a connection's page ------------------------------------------------------------


@admins_only
@require_POST
def set_active(request: HttpRequest, pk: int, active: bool) -> HttpResponse:
    connection = get_object_or_404(Connection, pk=pk)
    try:
        lifecycle.set_active(connection, active)
    except lifecycle.LifecycleError as e:
        messages.error(request, f"Could not change {connection.name}: {e}.")
    else:
        if active:
            messages.success(request, f"{connection.name} is active: changes flow both ways again.")
        else:
            messages.success(request, f"{connection.name} is deactivated; changes are kept until it is active again.")
    return _to_detail(connection)


@admins_only
@require_POST
def trigger_add(request: HttpRequest, pk: int) -> HttpResponse:
    connection = get_object_or_404(Connection.objects.select_related("active_rules"), pk=pk)
    form = TriggerForm(request.POST)
    if not form.is_valid():
        return _render_detail(request, connection, trigger_form=form)
    Trigger.objects.create(connection=connection, query=form.cleaned_data["query"])
    messages.success(request, f"Trigger added: {form.cleaned_data['query']}")
    return _to_detail(connection)


# Past this the run goes on in the background (a page answer must not wait minutes).
RUN_BUDGET_SECONDS = 20


@admins_only
@require_POST
def trigger_run(request: HttpRequest, pk: int) -> HttpResponse:
    """ "Sync all matches now" for one trigger."""
    # Imported here: the sync queue sits above connections, which must not depend on it at import time.
    from syncqueue import flow, triggers

    trigger = get_object_or_404(Trigger.objects.select_related("connection__active_rules"), pk=pk)
    try:
        queued = triggers.sync_all_matches(trigger, budget_seconds=RUN_BUDGET_SECONDS)
    except (flow.SyncRefused, TrackerError) as e:
        messages.error(request, f"Could not sync the matches of {trigger.query}: {e}.")
    else:
        messages.success(request, f"{queued} issue{'s' if queued != 1 else ''} queued for {trigger.connection.name}.")
    return _to_detail(trigger.connection)


# --- the tracker this node serves ----------------------------------------------------------------


def _render_tracker(request: HttpRequest, node: Node, form: TrackerSettingsForm) -> HttpResponse:
    config = node.tracker_config()
    try:
        # Asked afresh on every visit: it also tells whether the stored settings still work.
        account, account_error = node.tracker().sync_account(), ""
    except TrackerError as e:
        account, account_error = None, e.message
    context = {
        "node": node,
        "kind_label": TRACKER_KINDS.get(node.tracker_kind, node.tracker_kind),
        "config": {name: value for name, value in config.items() if name != "api_key"},
        "api_key_set": bool(config.get("api_key")),
        "maps": [
            (TrackerSettingsForm.base_fields[name].label, tracker_settings.format_map(config.get(name, {})))
            for name in tracker_settings.MAP_NAMES
        ],
        "account": account,
        "account_error": account_error,
        "form": form,
        "can_change": is_admin(request.user),
    }
    return render(request, "connections/tracker.html", context)


@staff_only
@require_safe
def tracker_settings_page(request: HttpRequest) -> HttpResponse:
    node = Node.local()
    return _render_tracker(request, node, TrackerSettingsForm.for_node(node))


@admins_only
@require_POST
def tracker_settings_change(request: HttpRequest) -> HttpResponse:
    node = Node.local()
    form = TrackerSettingsForm(request.POST)
    if form.is_valid():
        try:
            account = tracker_settings.save(node, **form.save_arguments())
        except tracker_settings.TrackerSettingsError as e:
            form.add_error(e.field if e.field in form.fields else None, capfirst(e.message))
        else:
            messages.success(
                request,
                f"Tracker settings saved. The sync writes as {account.name or account.id} "
                f"and looks for changes every {node.poll_interval()} seconds.",
            )
            return redirect("connections:tracker")
    return _render_tracker(request, node, form)
