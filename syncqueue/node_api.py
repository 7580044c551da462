"""The node-to-node endpoints under /api/v1/node/: pairing, message batches and attachment bytes.

Apart from the pairing handshake (authenticated by the invitation code's proof), every
request must be signed with the connection's secret; an unsigned, forged, stale or
replayed request gets 401 and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db import connection as db
from django.http import FileResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from connections import handshake, signing
from connections.models import Connection, SeenNonce
from exalate_web import jsonio
from exalate_web.api import error_body
from syncqueue import flow, worker
from syncqueue.every import Every
from syncqueue.models import Blob, Twin
from trackers.base import TrackerError

MAX_MESSAGES = 500


class Refused(Exception):
    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.message = message
        self.status = status


def _error(message: str, status: int) -> JsonResponse:
    return JsonResponse(error_body(message), status=status)


def authenticate(request, body: bytes | None = None) -> Connection:
    """The connection that signed ``request`` (whose body is ``body`` when already read), or Refused."""
    try:
        signed = signing.read_headers(request.headers)
    except signing.SignatureError as e:
        raise Refused(f"unsigned request: {e}") from None
    connection = Connection.objects.filter(uuid=_uuid_or_none(signed.connection_uuid)).first()
    if connection is None or not connection.secret:
        raise Refused("unknown connection")
    try:
        signing.verify(
            connection.secret, signed, request.method, request.get_full_path(), request.body if body is None else body
        )
    except signing.SignatureError as e:
        raise Refused(str(e)) from None
    if not _first_use(connection, signed.nonce):
        raise Refused("replayed request (nonce already used)")
    if connection.status == Connection.Status.DEACTIVATED:
        raise Refused("the connection is deactivated on this side; try again later", status=409)
    if connection.status != Connection.Status.ACTIVE:
        raise Refused(f"the connection is {connection.status} on this side", status=409)
    return connection


_RECORD_NONCE = (
    f"INSERT INTO {db.ops.quote_name(SeenNonce._meta.db_table)} (connection_id, nonce, seen) "  # noqa: S608 - the model's table
    "VALUES (%s, %s, %s) ON CONFLICT (connection_id, nonce) DO NOTHING RETURNING id"
)


def _first_use(connection: Connection, nonce: str) -> bool:
    """Record ``nonce`` for ``connection``; False when it was recorded before.

    One statement that needs no transaction: inserting in a transaction of its own, to tell
    a repeat by the IntegrityError, took three round trips in every signed request.
    """
    try:
        with db.cursor() as cursor:
            cursor.execute(_RECORD_NONCE, [connection.pk, nonce, db.ops.adapt_datetimefield_value(timezone.now())])
            return cursor.fetchone() is not None
    except IntegrityError:
        raise Refused("unknown connection") from None  # deleted since it was read


# Old nonces are forgotten at most this often per process; the time window refuses their
# requests anyway, so they need not go at every request.
_nonce_cleanup = Every(60.0)


def forget_old_nonces() -> None:
    if not _nonce_cleanup.due():
        return
    SeenNonce.objects.filter(seen__lt=timezone.now() - timedelta(seconds=2 * signing.WINDOW_SECONDS)).delete()


def _uuid_or_none(value: str):
    import uuid

    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@csrf_exempt
@require_POST
def handshake_view(request):
    try:
        payload = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return _error("The body must be JSON.", 400)
    try:
        return JsonResponse(handshake.answer_acceptance(payload))
    except handshake.HandshakeError as e:
        return _error(e.message, e.status)


def _not_json(constant: str):
    # Python reads NaN and Infinity, which JSON has not; the database would refuse them later.
    raise ValueError(f"{constant} is not JSON")


@csrf_exempt
@require_POST
def messages_view(request):
    try:
        connection = authenticate(request)
    except Refused as e:
        return _error(e.message, e.status)
    try:
        body = jsonio.loads(request.body, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        return _error("The body must be JSON.", 400)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return _error('Expected {"messages": [...]}.', 400)
    if len(messages) > MAX_MESSAGES:
        return _error(f"At most {MAX_MESSAGES} messages per request.", 413)
    forget_old_nonces()
    # JSON writes a NUL as \u0000 (or, in UTF-16 or -32, with NUL bytes): absent both, no replica
    # needs encoding again to look for one.
    nul_free = b"\\u0000" not in request.body and b"\x00" not in request.body
    return JsonResponse(flow.receive(connection, messages, nul_free=nul_free))


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@csrf_exempt
@require_GET
def attachment_view(request, sha256: str):
    try:
        connection = authenticate(request)
    except Refused as e:
        return _error(e.message, e.status)
    key = request.GET.get("key", "")
    if not _SHA256.match(sha256) or not key or "\x00" in key:
        return _error("Give the attachment's sha256 and ?key=.", 400)
    # Only attachments of entities under sync on this connection can be fetched.
    if not Twin.objects.filter(connection=connection, local_key=key).exists():
        return _error("No such entity under sync on this connection.", 404)
    try:
        entity = flow.local_tracker().get(key)
        attachment = next((a for a in entity.attachments if a.sha256 == sha256), None)
        if attachment is None:
            return _error("No such attachment.", 404)
        return FileResponse(attachment.open(), content_type="application/octet-stream")
    except TrackerError as e:
        return _error(str(e), 404 if e.permanent else 503)


# --- private remotes ---------------------------------------------------------------------------


@csrf_exempt
@require_POST
def pull_view(request):
    """A private remote fetches its messages: it confirms what it stored from the last pull, gets the next."""
    try:
        connection = authenticate(request)
    except Refused as e:
        return _error(e.message, e.status)
    if connection.remote_url:
        return _error("This connection's remote is reachable; messages are pushed to it.", 409)
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        return _error("The body must be JSON.", 400)
    confirmed = body.get("confirmed") if isinstance(body, dict) else None
    if (
        not isinstance(confirmed, list)
        or len(confirmed) > MAX_MESSAGES
        or not all(isinstance(i, str) for i in confirmed)
    ):
        return _error(f'Expected {{"confirmed": [message ids]}} with at most {MAX_MESSAGES} ids.', 400)
    events = worker.claim_for_pull(connection, confirmed)
    flow.note_contact(connection, answered=True)
    return JsonResponse({"messages": [flow.message_of(e) for e in events]})


@csrf_exempt
@require_http_methods(["PUT"])
def blob_view(request, sha256: str):
    """A private remote uploads attachment bytes ahead of the messages that name them."""
    if not _SHA256.match(sha256):
        return _error("Give the attachment's sha256 (64 hex digits).", 400)
    limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
    content = request.read(limit + 1)
    if len(content) > limit:
        return _error(f"Attachments are limited to {limit} bytes.", 413)
    try:
        connection = authenticate(request, content)
    except Refused as e:
        return _error(e.message, e.status)
    if hashlib.sha256(content).hexdigest() != sha256:
        return _error("The bytes do not match the sha256 in the URL.", 400)
    try:
        with transaction.atomic():
            Blob.objects.get_or_create(connection=connection, sha256=sha256, defaults={"content": content})
    except IntegrityError:
        pass  # uploaded twice at once: one copy is kept
    return JsonResponse({"stored": sha256})
