"""Signing node-to-node requests with a connection's shared secret.

The signature is HMAC-SHA256 over the method, the path (with query string), a
timestamp, a nonce and the body's SHA-256. The receiver refuses a request outside a
short time window, with a nonce it has seen, or with a wrong signature.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

CONNECTION_HEADER = "X-Exalate-Connection"
TIMESTAMP_HEADER = "X-Exalate-Timestamp"
NONCE_HEADER = "X-Exalate-Nonce"
SIGNATURE_HEADER = "X-Exalate-Signature"
WINDOW_SECONDS = 300


class SignatureError(Exception):
    """Why a request's signature was refused (safe to tell the caller)."""


def _message(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join([method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()]).encode()


def sign(secret: str, connection_uuid: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    """The headers that make this request verifiable by the other side."""
    timestamp = str(int(time.time()))
    nonce = secrets.token_hex(16)
    signature = hmac.new(secret.encode(), _message(method, path, timestamp, nonce, body), hashlib.sha256).hexdigest()
    return {
        CONNECTION_HEADER: connection_uuid,
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature,
    }


@dataclass(frozen=True)
class SignedRequest:
    connection_uuid: str
    timestamp: int
    nonce: str
    signature: str


def read_headers(headers) -> SignedRequest:
    values = {
        name: headers.get(name, "") for name in (CONNECTION_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
    }
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise SignatureError(f"missing header {missing[0]}")
    try:
        timestamp = int(values[TIMESTAMP_HEADER])
    except ValueError:
        raise SignatureError("malformed timestamp") from None
    nonce = values[NONCE_HEADER]
    if not (8 <= len(nonce) <= 64) or not nonce.isalnum():
        raise SignatureError("malformed nonce")
    return SignedRequest(values[CONNECTION_HEADER], timestamp, nonce, values[SIGNATURE_HEADER])


def verify(
    secret: str, request: SignedRequest, method: str, path: str, body: bytes, *, now: float | None = None
) -> None:
    """Raise SignatureError unless the signature is right and fresh. Nonce reuse is checked by the caller."""
    now = time.time() if now is None else now
    if abs(now - request.timestamp) > WINDOW_SECONDS:
        raise SignatureError("request timestamp outside the allowed window (check both clocks)")
    expected = hmac.new(
        secret.encode(), _message(method, path, str(request.timestamp), request.nonce, body), hashlib.sha256
    ).hexdigest()
    # As bytes: compare_digest refuses text with non-ASCII characters, which a forged header may carry.
    if not hmac.compare_digest(expected.encode(), request.signature.encode()):
        raise SignatureError("bad signature")
