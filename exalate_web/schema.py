"""The OpenAPI description of /api/v1/, served to staff at /api/v1/schema/.

drf-spectacular reads the DRF views by itself. What it cannot read is described here, so
that the API modules stay free of documentation-only code:

- the ``APIView``s that validate their input with a serializer they do not declare get
  their request and answer shapes from a view extension (``_describe``);
- the node-to-node endpoints and the webhook are plain Django views; the postprocessing
  hook ``describe_plain_views`` adds them, signed headers included.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from django.urls import NoReverseMatch, reverse
from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from drf_spectacular.views import SpectacularAPIView
from rest_framework import serializers

from connections import api as connections_api
from connections import signing
from syncqueue import api as sync_api
from syncqueue.webhooks import SIGNATURE_HEADER as WEBHOOK_SIGNATURE_HEADER
from trackers.builtin import api as tracker_api

schema_view = SpectacularAPIView.as_view()

ERROR = {
    "type": "object",
    "description": 'Every error: one line in "error"; "fields" names the invalid input.',
    "properties": {
        "error": {"type": "string"},
        "fields": {"type": "object", "additionalProperties": True},
    },
    "required": ["error"],
}


def _describe(target: type, **methods: dict[str, Any]) -> None:
    """Register the extend_schema arguments of ``target``'s methods (get, post, ...)."""

    def view_replacement(self):
        class Described(self.target):
            pass

        decorators = {method: extend_schema(**arguments) for method, arguments in methods.items()}
        return extend_schema_view(**decorators)(Described)

    type(
        f"Describe{target.__name__}",
        (OpenApiViewExtension,),
        {"target_class": f"{target.__module__}.{target.__qualname__}", "view_replacement": view_replacement},
    )


_connection = connections_api.ConnectionSerializer
_rules_version = connections_api.RulesVersionSerializer

_describe(
    connections_api.ConnectionDetail,
    patch=dict(request=connections_api.ConnectionSettings, responses=_connection),
)
_describe(
    connections_api.CreateInvitation,
    post=dict(
        request=connections_api.InvitationInput,
        responses={
            201: inline_serializer(
                "Invitation",
                {
                    "code": serializers.CharField(help_text="Give this to the other node's admin; single use."),
                    "expires": serializers.DateTimeField(),
                    "connection": _connection(),
                },
            )
        },
    ),
)
_describe(
    connections_api.AcceptInvitation, post=dict(request=connections_api.AcceptInput, responses={201: _connection})
)
_describe(connections_api.SetActive, post=dict(request=None, responses=_connection))
_describe(
    connections_api.RulesVersions,
    get=dict(responses=inline_serializer("RulesVersionList", {"results": _rules_version(many=True)})),
    post=dict(request=connections_api.RulesInput, responses={201: _rules_version}),
)
_describe(connections_api.ActivateRulesVersion, post=dict(request=None, responses=_rules_version))
_describe(
    sync_api.SyncNow,
    post=dict(
        request=sync_api.SyncInput,
        responses={
            202: inline_serializer(
                "SyncQueued",
                {
                    "queued": serializers.BooleanField(),
                    "event": serializers.IntegerField(required=False),
                    "status": serializers.CharField(required=False),
                    "error": serializers.CharField(required=False, allow_null=True),
                },
            )
        },
    ),
)
_describe(sync_api.QueueStats, get=dict(responses=OpenApiTypes.OBJECT))
_describe(
    sync_api.TwinAction,
    post=dict(
        request=None,
        responses=inline_serializer(
            "TwinActionDone",
            {"state": serializers.CharField(), "retried": serializers.IntegerField(required=False)},
        ),
    ),
)
_describe(
    sync_api.RunTrigger,
    post=dict(request=None, responses={202: inline_serializer("TriggerRun", {"queued": serializers.IntegerField()})}),
)


_describe(
    sync_api.TwinList,
    get=dict(
        parameters=[
            OpenApiParameter("local_key", str),
            OpenApiParameter("remote_key", str),
            OpenApiParameter("connection", int),
            OpenApiParameter("state", str, enum=["ok", "blocked", "stopped"]),
        ]
    ),
)
_describe(
    tracker_api.IssueList,
    get=dict(
        parameters=[
            *(OpenApiParameter(name, str, many=True) for name in tracker_api.ISSUE_FILTERS),
            OpenApiParameter("updated_after", OpenApiTypes.DATETIME),
            OpenApiParameter("q", str, description="A query in the tracker's language, e.g. project:BLUE status:Open"),
        ]
    ),
)
_describe(
    tracker_api.AttachmentContent,
    get=dict(responses={(200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY)}),
)


# --- the plain Django views under /api/v1/ -------------------------------------------------------

UUID = {"type": "string", "format": "uuid"}
BINARY = {"type": "string", "format": "binary"}
SHA256 = {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
SIGNED_HEADERS = [
    {"name": signing.CONNECTION_HEADER, "in": "header", "required": True, "schema": UUID},
    {"name": signing.TIMESTAMP_HEADER, "in": "header", "required": True, "schema": {"type": "string"}},
    {"name": signing.NONCE_HEADER, "in": "header", "required": True, "schema": {"type": "string"}},
    {"name": signing.SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"}},
]
SIGNED = (
    "Signed with the connection's shared secret: HMAC-SHA256 over the method, the path, the "
    "timestamp, the nonce and the body's SHA-256. A bad, stale or replayed signature gets 401."
)
MESSAGE = {
    "type": "object",
    "properties": {
        "id": UUID,
        "kind": {"type": "string", "enum": ["update", "ack", "stop"]},
        "seq": {"type": "integer", "minimum": 1},
        "key": {"type": "string", "minLength": 1, "maxLength": 100},
        "remote_key": {"type": "string", "minLength": 1, "maxLength": 100, "nullable": True},
        "replica": {"type": "object", "additionalProperties": True},
        "acks": {"type": "string", "nullable": True},
        "restart": {"type": "boolean"},
        "changed": {"type": "string", "maxLength": 40, "nullable": True},
        "policy": {"type": "string", "maxLength": 40, "nullable": True},
        "seen": {"type": "integer", "minimum": 0, "maximum": 2147483647, "nullable": True},
        "dates": {
            "type": "object",
            "maxProperties": 20,
            "additionalProperties": {"type": "string", "maxLength": 40},
            "nullable": True,
        },
    },
    "required": ["id", "kind", "seq", "key"],
}


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answers(ok: int, ok_schema: dict, *errors: int, media_type: str = "application/json") -> dict:
    answers = {str(ok): {"description": "Done.", "content": {media_type: {"schema": ok_schema}}}}
    for status in errors:
        answers[str(status)] = {"description": "Refused.", "content": {"application/json": {"schema": ERROR}}}
    return answers


PLAIN_VIEWS: dict[str, tuple[str, dict]] = {
    "node-handshake": (
        "post",
        {
            "summary": "Pairing: the acceptor of an invitation code proves it holds the code.",
            "requestBody": _json_body(
                {
                    "type": "object",
                    "properties": {
                        name: {"type": "string"}
                        for name in ("connection", "node_id", "name", "url", "public_key", "proof")
                    },
                    "required": ["connection", "node_id", "name", "url", "public_key", "proof"],
                }
            ),
            "responses": _answers(200, {"type": "object"}, 400, 403, 404, 410),
        },
    ),
    "node-messages": (
        "post",
        {
            "summary": "A batch of sync messages from the other node. " + SIGNED,
            "parameters": SIGNED_HEADERS,
            "requestBody": _json_body(
                {
                    "type": "object",
                    "properties": {"messages": {"type": "array", "items": MESSAGE, "maxItems": 500}},
                    "required": ["messages"],
                }
            ),
            "responses": _answers(200, {"type": "object"}, 400, 401, 409, 413),
        },
    ),
    "node-attachment": (
        "get",
        {
            "summary": "The bytes of an attachment of an entity under sync. " + SIGNED,
            "parameters": [
                SHA256,
                {"name": "key", "in": "query", "required": True, "schema": {"type": "string"}},
                *SIGNED_HEADERS,
            ],
            "responses": _answers(
                200,
                {"type": "string", "format": "binary"},
                400,
                401,
                404,
                409,
                503,
                media_type="application/octet-stream",
            ),
        },
    ),
    "node-pull": (
        "post",
        {
            "summary": "A private node fetches its messages, confirming those of the last pull. " + SIGNED,
            "parameters": SIGNED_HEADERS,
            "requestBody": _json_body(
                {
                    "type": "object",
                    "properties": {"confirmed": {"type": "array", "items": {"type": "string"}, "maxItems": 500}},
                    "required": ["confirmed"],
                }
            ),
            "responses": _answers(200, {"type": "object"}, 400, 401, 409),
        },
    ),
    "node-blob": (
        "put",
        {
            "summary": "A private node uploads attachment bytes. " + SIGNED,
            "parameters": [SHA256, *SIGNED_HEADERS],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": BINARY}},
            },
            "responses": _answers(200, {"type": "object"}, 400, 401, 409, 413),
        },
    ),
    "webhook-changed": (
        "post",
        {
            "summary": "A tracker tells that an entity changed; off unless WEBHOOK_SECRET is set.",
            "parameters": [
                {
                    "name": WEBHOOK_SIGNATURE_HEADER,
                    "in": "header",
                    "required": True,
                    "description": "sha256=<hex HMAC-SHA256 of the body with WEBHOOK_SECRET>",
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": _json_body(
                {
                    "type": "object",
                    "properties": {"key": {"type": "string", "minLength": 1, "maxLength": 100}},
                    "required": ["key"],
                }
            ),
            "responses": _answers(202, {"type": "object"}, 400, 401, 404),
        },
    ),
}


def _path_of(name: str, operation: dict) -> str | None:
    """The templated path of route ``name`` ({sha256} for its parameter), or None when it is not routed."""
    kwargs = {p["name"]: f"{{{p['name']}}}" for p in operation.get("parameters", ()) if p["in"] == "path"}
    try:
        return unquote(reverse(name, kwargs=kwargs))
    except NoReverseMatch:
        return None


def describe_plain_views(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: add the node API and the webhook, which need no user."""
    for name, (method, operation) in PLAIN_VIEWS.items():
        path = _path_of(name, operation)
        if path is None:
            continue
        tag = "webhooks" if name.startswith("webhook") else "node"
        result["paths"].setdefault(path, {})[method] = {
            "operationId": name.replace("-", "_"),
            "tags": [tag],
            "security": [],
            **operation,
        }
    return result
