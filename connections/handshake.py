"""Pairing two nodes: an invitation code made on one side, accepted on the other.

1. The initiator makes a pending connection, an X25519 key pair and a random token, and
   shows a code carrying its URL, node id, the connection id, the token and its public
   key. The code is single use and expires.
2. The acceptor decodes the code, makes its own key pair, derives the shared secret
   (X25519, then HKDF salted with the token) and sends its public key with a proof
   (HMAC of the secret) to the initiator.
3. The initiator derives the same secret, checks the proof, marks the code used and the
   connection active, and answers with its own proof; the acceptor checks it and stores
   its side of the connection, active.

The secret itself never travels; only someone holding the code can complete the pairing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.db import transaction
from django.utils import timezone

from connections import rules
from connections.models import Connection, Invitation, Node

CODE_PREFIX = "EXL1-"
HANDSHAKE_PATH = "/api/v1/node/handshake/"
TIMEOUT = 15


class HandshakeError(Exception):
    """Pairing failed; the message says why in plain words. ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def derive_secret(shared: bytes, token: bytes, connection_uuid: str) -> str:
    info = f"exalate connection {connection_uuid}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=token, info=info).derive(shared).hex()


def proof(secret: str, purpose: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "|".join([purpose, *parts]).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class InvitationCode:
    url: str
    node_id: str
    node_name: str
    connection_uuid: str
    token: bytes
    public_key: bytes
    expires: datetime


def make_code(invitation: InvitationCode) -> str:
    body = {
        "u": invitation.url,
        "n": invitation.node_id,
        "m": invitation.node_name,
        "c": invitation.connection_uuid,
        "t": _b64(invitation.token),
        "k": _b64(invitation.public_key),
        "e": int(invitation.expires.timestamp()),
    }
    return CODE_PREFIX + _b64(json.dumps(body, separators=(",", ":")).encode())


def parse_code(code: str) -> InvitationCode:
    code = "".join((code or "").split())
    if not code.startswith(CODE_PREFIX):
        raise HandshakeError("This is not an invitation code: it should start with EXL1-.")
    try:
        body = json.loads(_unb64(code[len(CODE_PREFIX) :]))
        invitation = InvitationCode(
            url=str(body["u"]),
            node_id=str(body["n"]),
            node_name=str(body["m"]),
            connection_uuid=str(body["c"]),
            token=_unb64(body["t"]),
            public_key=_unb64(body["k"]),
            expires=datetime.fromtimestamp(int(body["e"]), UTC),
        )
    except (ValueError, KeyError, TypeError, UnicodeError, OverflowError, OSError):
        raise HandshakeError("The invitation code is damaged; copy it again, whole.") from None
    if (
        len(invitation.node_name) > 100
        or len(invitation.url) > 300
        or not invitation.url.startswith(("http://", "https://"))
    ):
        raise HandshakeError("The invitation code is damaged; copy it again, whole.")
    if len(invitation.token) != 32 or len(invitation.public_key) != 32:
        raise HandshakeError("The invitation code is damaged; copy it again, whole.")
    if invitation.expires <= timezone.now():
        raise HandshakeError("The invitation code has expired; ask the other side for a new one.", status=410)
    return invitation


@transaction.atomic
def _check_template(template: str) -> None:
    if template not in rules.TEMPLATES:
        raise HandshakeError(f"Unknown rules template {template!r} (known: {', '.join(rules.TEMPLATES)}).")


def create_invitation(name: str, *, project: str = "", author=None, hours: int = 24, template: str = "default"):
    """A pending connection and its code, valid for ``hours``. Returns (connection, code, expires)."""
    _check_template(template)
    node = Node.local()
    if not node.url:
        raise HandshakeError("This node has no public URL (NODE_URL), so the other side cannot answer it.")
    connection = Connection.objects.create(name=name, project=project, is_initiator=True)
    connection.active_rules = rules.install_template(connection, template, author)
    key = X25519PrivateKey.generate()
    token = secrets.token_bytes(32)
    expires = timezone.now() + timedelta(hours=hours)
    Invitation.objects.create(
        connection=connection, token=_b64(token), private_key=_b64(_private_bytes(key)), expires=expires
    )
    code = make_code(
        InvitationCode(
            url=node.url,
            node_id=str(node.node_id),
            node_name=node.name,
            connection_uuid=str(connection.uuid),
            token=token,
            public_key=_public_bytes(key.public_key()),
            expires=expires,
        )
    )
    return connection, code, expires


def accept_invitation(
    code: str, *, name: str = "", project: str = "", author=None, template: str = "default", private: bool = False
) -> Connection:
    """Complete the pairing from this side; returns the active connection.

    ``private`` (or a node without a public URL): the other node cannot reach this one, so
    this side pulls its messages from there and uploads the attachment bytes it sends.
    """
    _check_template(template)
    invitation = parse_code(code)
    node = Node.local()
    if invitation.node_id == str(node.node_id):
        raise HandshakeError("This code was made on this node; accept it on the other node.")
    if Connection.objects.filter(uuid=invitation.connection_uuid).exists():
        raise HandshakeError("This code has already been used here.", status=409)
    key = X25519PrivateKey.generate()
    shared = key.exchange(X25519PublicKey.from_public_bytes(invitation.public_key))
    secret = derive_secret(shared, invitation.token, invitation.connection_uuid)
    public = _b64(_public_bytes(key.public_key()))
    payload = {
        "connection": invitation.connection_uuid,
        "node_id": str(node.node_id),
        "name": node.name,
        "url": "" if private or not node.url else node.url,
        "public_key": public,
        "proof": proof(secret, "accept", invitation.connection_uuid, str(node.node_id), public),
    }
    answer = _post(invitation.url.rstrip("/") + HANDSHAKE_PATH, payload)
    expected = proof(secret, "confirm", invitation.connection_uuid, invitation.node_id)
    if not _same(answer.get("proof"), expected):
        raise HandshakeError("The other node's answer could not be verified; the pairing was not completed.")
    with transaction.atomic():
        connection = Connection.objects.create(
            uuid=invitation.connection_uuid,
            name=name or invitation.node_name,
            project=project,
            is_initiator=False,
            status=Connection.Status.ACTIVE,
            remote_name=invitation.node_name,
            remote_node_id=invitation.node_id,
            remote_url=invitation.url,
            pulls=private or not node.url,
            secret=secret,
            last_contact=timezone.now(),
        )
        connection.active_rules = rules.install_template(connection, template, author)
    return connection


def _same(given, expected: str) -> bool:
    """Constant-time comparison that treats anything but text as a mismatch."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def _post(url: str, payload: dict) -> dict:
    try:
        response = requests.post(url, json=payload, timeout=TIMEOUT)
    except requests.RequestException as e:
        raise HandshakeError(f"The other node does not answer at {url} ({type(e).__name__}).", status=502) from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else None
        raise HandshakeError(message or f"The other node refused the pairing (HTTP {response.status_code}).", 502)
    if not isinstance(body, dict):
        raise HandshakeError("The other node gave an answer this node does not understand.", status=502)
    return body


def answer_acceptance(payload: dict) -> dict:
    """The initiator's side of step 3: check the acceptor's proof and activate the connection."""
    fields = ("connection", "node_id", "name", "url", "public_key", "proof")
    if not isinstance(payload, dict) or any(not isinstance(payload.get(f), str) for f in fields):
        raise HandshakeError(f"Expected an object with the text fields {', '.join(fields)}.")
    node = Node.local()
    with transaction.atomic():
        invitation = (
            Invitation.objects.select_for_update()
            .select_related("connection")
            .filter(connection__uuid=_uuid(payload["connection"]), connection__is_initiator=True)
            .order_by("-created")
            .first()
        )
        if invitation is None:
            raise HandshakeError("No invitation is waiting for this connection.", status=404)
        connection = invitation.connection
        try:
            public = X25519PublicKey.from_public_bytes(_unb64(payload["public_key"]))
            private = X25519PrivateKey.from_private_bytes(_unb64(invitation.private_key))
            # A degenerate public key (all zeros) makes the exchange itself fail.
            secret = derive_secret(private.exchange(public), _unb64(invitation.token), str(connection.uuid))
        except ValueError:
            raise HandshakeError("Malformed public key.") from None
        expected = proof(secret, "accept", str(connection.uuid), payload["node_id"], payload["public_key"])
        if not _same(payload["proof"], expected):
            raise HandshakeError("The acceptance could not be verified.", status=403)
        confirmation = {
            "node_id": str(node.node_id),
            "name": node.name,
            "proof": proof(secret, "confirm", str(connection.uuid), str(node.node_id)),
        }
        if invitation.used is not None:
            # The same acceptor retrying after a lost answer gets the same answer; anyone else is refused.
            if invitation.accepted_key == payload["public_key"]:
                return confirmation
            raise HandshakeError("This invitation code has already been used.", status=410)
        if invitation.expires <= timezone.now():
            raise HandshakeError("The invitation code has expired; ask for a new one.", status=410)
        invitation.used = timezone.now()
        invitation.accepted_key = payload["public_key"]
        invitation.save(update_fields=["used", "accepted_key"])
        connection.status = Connection.Status.ACTIVE
        connection.status_detail = ""
        connection.remote_name = payload["name"][:100]
        connection.remote_node_id = _uuid(payload["node_id"])
        connection.remote_url = payload["url"][:300]
        connection.secret = secret
        connection.last_contact = timezone.now()
        connection.save()
    return confirmation


def _uuid(value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise HandshakeError(f"Malformed id {value[:40]!r}.") from None
