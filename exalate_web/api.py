"""Shared REST conventions: the error shape, pagination and the request-size guard.

Every API error is ``{"error": "<one line>", "fields": {...}}`` (``fields`` only for
invalid input), so a client never has to parse an HTML page or a stack trace.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import JsonResponse
from rest_framework import exceptions, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from trackers.base import NotFound, TrackerError


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_paginated_response(self, data):
        return Response(
            {
                "count": self.page.paginator.count,
                "page": self.page.number,
                "pages": self.page.paginator.num_pages,
                "next": self.get_next_link(),
                "previous": self.get_previous_link(),
                "results": data,
            }
        )


def _first_message(detail, path: str = "") -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            prefix = path if key == "non_field_errors" else (f"{path}.{key}" if path else str(key))
            return _first_message(value, prefix)
    if isinstance(detail, list) and detail:
        return _first_message(detail[0], path)
    return f"{path}: {detail}" if path else str(detail)


def error_body(message: str, fields=None) -> dict:
    body = {"error": message}
    if fields:
        body["fields"] = fields
    return body


def exception_handler(exc, context):
    if isinstance(exc, NotFound):
        return Response(error_body(str(exc)), status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, TrackerError):
        code = status.HTTP_400_BAD_REQUEST if exc.permanent else status.HTTP_503_SERVICE_UNAVAILABLE
        return Response(error_body(str(exc)), status=code)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, SuspiciousOperation):
        return Response(error_body(f"Bad request: {exc}"), status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return Response(error_body(_first_message(exc.detail), fields), status=exc.status_code)
    response = drf_exception_handler(exc, context)
    if response is not None:
        detail = response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
        response.data = error_body(_first_message(detail))
    return response


def wants_json(request) -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def body_too_large(request) -> JsonResponse | None:
    """413 when the declared body exceeds its limit; file uploads get the attachment limit."""
    declared = request.META.get("CONTENT_LENGTH")
    if not declared and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        # Without a length the body could only be limited while reading it; ask for one.
        return JsonResponse(error_body("Send a Content-Length header; chunked bodies are not accepted."), status=411)
    try:
        length = int(declared or 0)
    except ValueError:
        return JsonResponse(error_body("Invalid Content-Length header."), status=400)
    if request.content_type in ("multipart/form-data", "application/octet-stream"):
        limit = settings.TRACKER_MAX_ATTACHMENT_BYTES + 1024 * 1024
    else:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if length > limit:
        return JsonResponse(error_body(f"Request body too large: {length} bytes, the limit is {limit}."), status=413)
    return None


class BodySizeLimitMiddleware:
    """Refuse oversized API bodies before anything reads them (DRF streams JSON unbounded)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if wants_json(request):
            refused = body_too_large(request)
            if refused is not None:
                return refused
        return self.get_response(request)
