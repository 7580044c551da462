"""Signed HTTP between nodes: pushing message batches and pulling attachment bytes.

One keep-alive session per thread; every request is signed with the connection's secret
(``connections.signing``). Failures are ``RemoteError``: transient ones (the remote is
down, slow or answering 5xx) are retried by the worker with backoff, permanent ones
(the remote refused what we sent) block the twin.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import requests

from connections import signing
from connections.models import Connection
from exalate_web import jsonio

MESSAGES_PATH = "/api/v1/node/messages/"
ATTACHMENTS_PATH = "/api/v1/node/attachments/"
PULL_PATH = "/api/v1/node/pull/"
BLOBS_PATH = "/api/v1/node/blobs/"
TIMEOUT = (5, 30)  # connect, read
_local = threading.local()


class RemoteError(Exception):
    def __init__(self, message: str, permanent: bool = False, *, refused_us: bool = False):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        # The remote no longer recognises this connection's signature: the pairing is broken.
        self.refused_us = refused_us


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def _request(
    connection: Connection,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    stream: bool = False,
    content_type: str = "application/json",
):
    if not connection.remote_url:
        raise RemoteError("the remote node has no URL (it is private and pulls its messages)", permanent=False)
    headers = signing.sign(connection.secret, str(connection.uuid), method, path, body)
    if body:
        headers["Content-Type"] = content_type
    url = connection.remote_url.rstrip("/") + path
    try:
        response = _session().request(method, url, data=body or None, headers=headers, timeout=TIMEOUT, stream=stream)
    except requests.RequestException as e:
        who = connection.remote_name or "the remote node"
        raise RemoteError(f"{who} does not answer at {url} ({type(e).__name__})") from None
    if response.status_code >= 500 or response.status_code in (408, 409, 425, 429, 503):
        raise RemoteError(f"the remote node answered HTTP {response.status_code}: {_error_text(response)}")
    if response.status_code >= 400:
        refused_us = response.status_code in (401, 403)
        raise RemoteError(
            f"the remote node refused the request (HTTP {response.status_code}): {_error_text(response)}",
            permanent=not refused_us,
            refused_us=refused_us,
        )
    return response


def _error_text(response) -> str:
    try:
        return str(response.json().get("error", ""))[:300]
    except (ValueError, AttributeError, requests.RequestException):
        # Not JSON, or (a streamed download's error) its body was cut off as it was read.
        return response.reason or ""


def post_messages(connection: Connection, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Deliver a batch; returns the receiver's answer ({"accepted": [...], "rejected": {...}})."""
    body = jsonio.dumps({"messages": messages})
    response = _request(connection, "POST", MESSAGES_PATH, body)
    try:
        answer = response.json()
    except ValueError:
        raise RemoteError("the remote node answered something that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("accepted"), list):
        raise RemoteError("the remote node's answer lacks the accepted message ids")
    return answer


def pull_messages(connection: Connection, confirmed: list[str]) -> list[dict[str, Any]]:
    """From a private node: confirm what we stored from the last pull and fetch the next messages."""
    body = jsonio.dumps({"confirmed": confirmed})
    response = _request(connection, "POST", PULL_PATH, body)
    try:
        answer = response.json()
    except ValueError:
        raise RemoteError("the remote node answered something that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("messages"), list):
        raise RemoteError("the remote node's answer lacks the messages")
    return answer["messages"]


def upload_blob(connection: Connection, sha256: str, content: bytes) -> None:
    """From a private node: attachment bytes the remote cannot fetch from us, ahead of the message naming them."""
    _request(connection, "PUT", f"{BLOBS_PATH}{sha256}/", content, content_type="application/octet-stream")


def fetch_attachment(connection: Connection, key: str, sha256: str, max_bytes: int) -> bytes:
    """The bytes of the sender's attachment with this hash on entity ``key``, checked against the hash."""
    if not connection.remote_url:
        return _uploaded_blob(connection, sha256)
    path = f"{ATTACHMENTS_PATH}{sha256}/?key={requests.utils.quote(key)}"
    response = _request(connection, "GET", path, stream=True)
    digest, chunks, size = hashlib.sha256(), [], 0
    with response:
        try:
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise RemoteError(f"attachment {sha256[:12]} is larger than the limit of {max_bytes} bytes", True)
                digest.update(chunk)
                chunks.append(chunk)
        except requests.RequestException as e:
            # Cut off midway: the bytes are still there; the next attempt fetches them whole.
            raise RemoteError(f"the download of attachment {sha256[:12]} broke off ({type(e).__name__})") from None
    if digest.hexdigest() != sha256:
        raise RemoteError(f"attachment {sha256[:12]} arrived damaged (its hash differs); will try again")
    return b"".join(chunks)


def _uploaded_blob(connection: Connection, sha256: str) -> bytes:
    from syncqueue.models import Blob

    blob = Blob.objects.filter(connection=connection, sha256=sha256).first()
    if blob is None:
        who = connection.remote_name or "the private remote node"
        raise RemoteError(f"attachment {sha256[:12]} has not been uploaded by {who} yet; will try again")
    return bytes(blob.content)
