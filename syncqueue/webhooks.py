"""The post-function endpoint for trackers that push: POST /api/v1/webhooks/changed/.

The tracker (or a relay in front of it) sends ``{"key": "PROJ-1"}`` with the header
``X-Exalate-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body with WEBHOOK_SECRET>``.
A valid call syncs that entity at once on every connection it belongs to, exactly like
the built-in tracker's change signal. Without WEBHOOK_SECRET the endpoint is off.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from connections.models import Node
from exalate_web.api import error_body
from trackers.signals import entity_changed

SIGNATURE_HEADER = "X-Exalate-Webhook-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@csrf_exempt
@require_POST
def changed(request):
    secret = settings.WEBHOOK_SECRET
    if not secret:
        return JsonResponse(error_body("Webhooks are off on this node (WEBHOOK_SECRET is not set)."), status=404)
    given = request.headers.get(SIGNATURE_HEADER, "")
    if not hmac.compare_digest(given, signature(secret, request.body)):
        return JsonResponse(error_body(f"Missing or wrong {SIGNATURE_HEADER}."), status=401)
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return JsonResponse(error_body("The body must be JSON."), status=400)
    key = body.get("key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not 0 < len(key) <= 100 or "\x00" in key:
        return JsonResponse(error_body('Expected {"key": "<entity key>"}.'), status=400)
    entity_changed.send(sender=Node.local().tracker_kind, key=key, change="updated", actor=None)
    return JsonResponse({"accepted": key}, status=202)
