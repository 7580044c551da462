"""Project-wide views: the home page, the health check and error pages that answer JSON under /api/."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db import DatabaseError, connection
from django.db.models import Count, Max, Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from connections.models import Connection, Node
from exalate_web import ratelimit
from exalate_web.api import error_body, wants_json
from syncqueue.models import SyncEvent, Twin

# Events still on their way: not yet applied on both sides, and not failed.
UNFINISHED = (
    SyncEvent.Status.PENDING,
    SyncEvent.Status.SENDING,
    SyncEvent.Status.SENT,
    SyncEvent.Status.PROCESSING,
)


def _queue_health() -> dict[int, dict]:
    """Per connection id: pending and failed events, blocked twins, last sync. Two queries, whatever the size."""
    health: dict[int, dict] = {}
    events = SyncEvent.objects.values("connection_id").annotate(
        pending=Count("id", filter=Q(status__in=UNFINISHED)),
        failing=Count("id", filter=Q(status=SyncEvent.Status.FAILED)),
    )
    for row in events.order_by():
        health.setdefault(row["connection_id"], {}).update(pending=row["pending"], failing=row["failing"])
    twins = Twin.objects.values("connection_id").annotate(
        blocked=Count("id", filter=Q(state=Twin.State.BLOCKED)), last_synced=Max("last_synced")
    )
    for row in twins.order_by():
        health.setdefault(row["connection_id"], {}).update(blocked=row["blocked"], last_synced=row["last_synced"])
    return health


@login_required
@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """This node at a glance: who it syncs with and how the queue is doing (connections are for staff)."""
    context = {"node": Node.local(), "connections": None}
    if request.user.is_staff:
        health = _queue_health()
        connections = list(Connection.objects.select_related("active_rules").order_by("name", "id"))
        empty = {"pending": 0, "failing": 0, "blocked": 0, "last_synced": None}
        for item in connections:
            item.health = {**empty, **health.get(item.pk, {})}
        context["connections"] = connections
    return render(request, "home.html", context)


@never_cache
def healthz(request):
    """200 when the database answers, 503 otherwise; load balancers poll this."""
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except DatabaseError as e:
        checks["database"] = f"error: {type(e).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if healthy else "error", "checks": checks}, status=200 if healthy else 503)


def _too_many_attempts(response: HttpResponse) -> HttpResponse:
    """A login page refused by the rate limit answers 429 Too Many Requests."""
    form = getattr(response, "context_data", None) and response.context_data.get("form")
    if ratelimit.is_refusal(form):
        response.status_code = 429
    return response


class LoginView(auth_views.LoginView):
    authentication_form = ratelimit.LoginForm

    def form_invalid(self, form):
        return _too_many_attempts(super().form_invalid(form))


def admin_login(request: HttpRequest) -> HttpResponse:
    """The admin's own login page, with the same limit."""
    return _too_many_attempts(admin.site.login(request))


def _error(request, status: int, message: str) -> HttpResponse:
    if wants_json(request):
        return JsonResponse(error_body(message), status=status)
    return render(request, "error.html", {"status": status, "message": message}, status=status)


def bad_request(request, exception=None):
    return _error(request, 400, "Bad request.")


def permission_denied(request, exception=None):
    return _error(request, 403, "You do not have permission to do this.")


def page_not_found(request, exception=None):
    return _error(request, 404, "Not found.")


def server_error(request):
    return _error(request, 500, "Internal error; it has been logged.")
