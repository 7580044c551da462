"""Project-wide views: the health check and error pages that answer JSON under /api/."""

from __future__ import annotations

from django.db import DatabaseError, connection
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from exalate_web.api import error_body, wants_json


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
