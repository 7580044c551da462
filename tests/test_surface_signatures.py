"""Signed node requests and invitation codes, over HTTP: what test_signing, test_node_api and
test_handshake leave out.

A refused request gets a clear JSON error and changes nothing: no event, no twin, no
nonce, no contact recorded. A connection's signature is good for that connection only, on
that path, that body, inside the time window, once. An invitation code pairs once and
not after it expired, whichever way it arrives.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import timedelta
from unittest import mock

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from connections import handshake, signing
from connections.models import Connection, Invitation, SeenNonce
from syncqueue import node_api
from syncqueue.every import Every
from syncqueue.models import SyncEvent, Twin
from tests.helpers import assert_error
from tests.test_handshake import Acceptor, RemoteInitiator
from trackers.builtin import actions

MESSAGES = "/api/v1/node/messages/"
HANDSHAKE = "/api/v1/node/handshake/"


@pytest.fixture
def red(db):
    return Connection.objects.create(
        name="Red", status=Connection.Status.ACTIVE, secret="a" * 64, remote_name="Red", project="BLUE"
    )


@pytest.fixture
def green(db):
    return Connection.objects.create(
        name="Green", status=Connection.Status.ACTIVE, secret="b" * 64, remote_name="Green", project="BLUE"
    )


def batch(key: str = "RED-1", **fields) -> bytes:
    message = {"id": str(uuid.uuid4()), "kind": "update", "seq": 1, "key": key, "replica": {"summary": "x"}}
    return json.dumps({"messages": [{**message, **fields}]}).encode()


def signed(connection, method: str, path: str, body: bytes = b"", *, secret: str | None = None, **changes):
    headers = signing.sign(secret or connection.secret, str(connection.uuid), method, path, body)
    return {**headers, **changes}


def post(client, body: bytes, headers: dict, path: str = MESSAGES):
    return client.post(path, body, content_type="application/json", headers=headers)


def assert_nothing_stored(*connections) -> None:
    assert not SyncEvent.objects.exists()
    assert not Twin.objects.exists()
    assert not SeenNonce.objects.exists()
    for connection in connections:
        connection.refresh_from_db()
        assert connection.last_contact is None


# --- forged ----------------------------------------------------------------------------------


def test_it_refuses_a_body_changed_after_signing(client, red):
    headers = signed(red, "POST", MESSAGES, batch())
    assert_error(post(client, batch(key="RED-666"), headers), 401, text="bad signature")
    assert_nothing_stored(red)


def test_it_refuses_a_signature_made_for_another_path(client, red):
    body = batch()
    headers = signed(red, "POST", "/api/v1/node/pull/", body)
    assert_error(post(client, body, headers), 401, text="bad signature")
    assert_nothing_stored(red)


def test_it_refuses_a_signature_made_for_another_method(client, red):
    path = f"/api/v1/node/attachments/{'0' * 64}/?key=BLUE-1"
    headers = signed(red, "POST", path)
    assert_error(client.get(path, headers=headers), 401, text="bad signature")
    assert not SeenNonce.objects.exists()


@pytest.mark.parametrize(
    ("header", "value", "text"),
    [
        (signing.SIGNATURE_HEADER, "", "missing header"),
        (signing.SIGNATURE_HEADER, "0" * 64, "bad signature"),
        (signing.SIGNATURE_HEADER, "é" * 64, "bad signature"),
        (signing.NONCE_HEADER, "short", "malformed nonce"),
        (signing.TIMESTAMP_HEADER, "1e9", "malformed timestamp"),
        (signing.CONNECTION_HEADER, "not-a-uuid", "unknown connection"),
    ],
    ids=["no signature", "zero signature", "non-ascii signature", "short nonce", "timestamp not whole",
         "connection not a uuid"],
)  # fmt: skip
def test_it_refuses_forged_headers_with_a_clear_error(client, red, header, value, text):
    body = batch()
    headers = signed(red, "POST", MESSAGES, body, **{header: value})
    assert_error(post(client, body, headers), 401, text=text)
    assert_nothing_stored(red)


def test_it_refuses_a_pending_connection_that_has_no_secret_yet(client, db):
    pending = Connection.objects.create(name="Pending", status=Connection.Status.PENDING)
    body = batch()
    headers = signing.sign("", str(pending.uuid), "POST", MESSAGES, body)
    assert_error(post(client, body, headers), 401, text="unknown connection")
    assert not SyncEvent.objects.exists()


# --- expired ---------------------------------------------------------------------------------


# Margins of a minute: the first request of a test run may take seconds to load the URLs.
@pytest.mark.parametrize("offset", [-signing.WINDOW_SECONDS - 60, signing.WINDOW_SECONDS + 60])
def test_it_refuses_a_request_signed_outside_the_window(client, red, offset):
    body = batch()
    with mock.patch.object(time, "time", return_value=time.time() + offset):
        headers = signed(red, "POST", MESSAGES, body)
    assert_error(post(client, body, headers), 401, text="outside the allowed window")
    assert_nothing_stored(red)


def test_it_accepts_a_request_signed_just_inside_the_window(client, red):
    body = batch()
    with mock.patch.object(time, "time", return_value=time.time() - signing.WINDOW_SECONDS + 60):
        headers = signed(red, "POST", MESSAGES, body)
    assert post(client, body, headers).status_code == 200


# --- replayed --------------------------------------------------------------------------------


def test_it_refuses_a_replay_after_old_nonces_were_cleaned_up(client, red, monkeypatch):
    """Cleaning up forgets only nonces older than any request the window still lets in."""
    body = batch()
    headers = signed(red, "POST", MESSAGES, body)
    assert post(client, body, headers).status_code == 200
    SeenNonce.objects.update(seen=timezone.now() - timedelta(seconds=signing.WINDOW_SECONDS - 1))
    stale = SeenNonce.objects.create(
        connection=red, nonce="0" * 32, seen=timezone.now() - timedelta(seconds=2 * signing.WINDOW_SECONDS + 1)
    )
    monkeypatch.setattr(node_api, "_nonce_cleanup", Every(60.0))
    other = batch(key="RED-2")
    assert post(client, other, signed(red, "POST", MESSAGES, other)).status_code == 200  # runs the cleanup
    assert not SeenNonce.objects.filter(pk=stale.pk).exists()
    assert_error(post(client, body, headers), 401, text="replayed")
    assert SyncEvent.objects.count() == 2


def test_old_nonces_are_cleaned_up_at_most_once_a_minute_per_process(client, red, monkeypatch):
    monkeypatch.setattr(node_api, "_nonce_cleanup", Every(60.0))
    first = batch()
    assert post(client, first, signed(red, "POST", MESSAGES, first)).status_code == 200
    stale = SeenNonce.objects.create(
        connection=red, nonce="0" * 32, seen=timezone.now() - timedelta(seconds=2 * signing.WINDOW_SECONDS + 1)
    )
    second = batch(key="RED-2")
    assert post(client, second, signed(red, "POST", MESSAGES, second)).status_code == 200
    assert SeenNonce.objects.filter(pk=stale.pk).exists(), "cleaned again within a minute"
    monkeypatch.setattr(node_api._nonce_cleanup, "seconds", 0.0)
    third = batch(key="RED-3")
    assert post(client, third, signed(red, "POST", MESSAGES, third)).status_code == 200
    assert not SeenNonce.objects.filter(pk=stale.pk).exists()


def test_it_refuses_a_replayed_attachment_request(client, red, issue_with_attachment):
    issue, attachment = issue_with_attachment
    Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1")
    path = f"/api/v1/node/attachments/{attachment.sha256}/?key={issue.key}"
    headers = signed(red, "GET", path)
    assert client.get(path, headers=headers).status_code == 200
    assert_error(client.get(path, headers=headers), 401, text="replayed")


def test_a_nonce_used_by_one_connection_does_not_block_another(client, red, green):
    nonce = "f" * 32
    for connection in (red, green):
        body = batch()
        with mock.patch.object(signing.secrets, "token_hex", return_value=nonce):
            headers = signed(connection, "POST", MESSAGES, body)
        assert post(client, body, headers).status_code == 200
    assert SeenNonce.objects.filter(nonce=nonce).count() == 2


# --- cross-connection ------------------------------------------------------------------------


@pytest.fixture
def issue_with_attachment(project, alice):
    issue = actions.create_issue(project, {"summary": "Shared"}, actor=alice)
    upload = SimpleUploadedFile("notes.txt", b"secret notes", content_type="text/plain")
    attachment = actions.add_attachment(issue, "notes.txt", upload, actor=alice)
    return issue, attachment


def test_it_refuses_a_request_signed_by_one_connection_in_the_name_of_another(client, red, green):
    body = batch()
    headers = signing.sign(green.secret, str(red.uuid), "POST", MESSAGES, body)
    assert_error(post(client, body, headers), 401, text="bad signature")
    assert_nothing_stored(red, green)


def test_it_serves_an_attachment_only_to_the_connection_its_entity_is_synced_with(
    client, red, green, issue_with_attachment
):
    issue, attachment = issue_with_attachment
    Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1")
    path = f"/api/v1/node/attachments/{attachment.sha256}/?key={issue.key}"
    refused = client.get(path, headers=signed(green, "GET", path))
    assert_error(refused, 404, text="under sync on this connection")
    served = client.get(path, headers=signed(red, "GET", path))
    assert served.status_code == 200
    assert b"".join(served.streaming_content) == b"secret notes"
    assert hashlib.sha256(b"secret notes").hexdigest() == attachment.sha256


def test_a_message_from_one_connection_never_lands_on_anothers_twin(client, red, green):
    reds = Twin.objects.create(connection=red, local_key="BLUE-1", remote_key="RED-1")
    body = batch(key="GREEN-1", remote_key="BLUE-1")
    response = post(client, body, signed(green, "POST", MESSAGES, body))
    assert response.status_code == 200
    event = SyncEvent.objects.get()
    assert event.connection == green
    assert event.twin.connection == green
    assert event.twin != reds
    reds.refresh_from_db()
    assert reds.remote_key == "RED-1"
    assert not reds.events.exists()


# --- invitation codes ------------------------------------------------------------------------


@pytest.fixture
def invitation(db):
    connection, code, _ = handshake.create_invitation("Red", project="BLUE")
    return connection, code


def test_an_expired_invitation_is_refused_over_http_and_stays_pending(client, invitation):
    connection, code = invitation
    acceptor = Acceptor(code)
    Invitation.objects.filter(connection=connection).update(expires=timezone.now() - timedelta(seconds=1))
    response = client.post(HANDSHAKE, acceptor.payload(), content_type="application/json")
    assert_error(response, 410, text="expired")
    connection.refresh_from_db()
    assert (connection.status, connection.secret, connection.remote_node_id) == (Connection.Status.PENDING, "", None)
    assert connection.invitations.get().used is None


def test_a_used_invitation_cannot_be_taken_over_by_another_acceptor_over_http(client, invitation):
    connection, code = invitation
    first = Acceptor(code)
    assert client.post(HANDSHAKE, first.payload(), content_type="application/json").status_code == 200
    thief = Acceptor(code)
    response = client.post(HANDSHAKE, thief.payload(), content_type="application/json")
    assert_error(response, 410, text="already been used")
    connection.refresh_from_db()
    assert connection.secret == first.secret
    assert str(connection.remote_node_id) == first.node_id


def test_a_wrong_proof_over_http_is_refused_with_forbidden(client, invitation):
    connection, code = invitation
    response = client.post(HANDSHAKE, Acceptor(code).payload(proof="0" * 64), content_type="application/json")
    assert_error(response, 403, text="could not be verified")
    connection.refresh_from_db()
    assert connection.status == Connection.Status.PENDING


def test_accepting_an_expired_code_through_the_api_stores_nothing(alice_api):
    initiator = RemoteInitiator(expires=timezone.now() - timedelta(minutes=1))
    with mock.patch.object(handshake, "_post") as remote:
        response = alice_api.post("/api/v1/connections/accept/", {"code": initiator.code}, format="json")
    assert_error(response, 410, text="expired")
    remote.assert_not_called()
    assert not Connection.objects.exists()


def test_accepting_a_code_twice_through_the_api_pairs_once(alice_api):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        first = alice_api.post("/api/v1/connections/accept/", {"code": initiator.code}, format="json")
        again = alice_api.post("/api/v1/connections/accept/", {"code": initiator.code}, format="json")
    assert first.status_code == 201
    assert_error(again, 409, text="already been used")
    assert Connection.objects.count() == 1
    assert len(initiator.received) == 1


def test_an_invitation_made_through_the_api_expires_when_it_says(alice_api):
    response = alice_api.post("/api/v1/connections/invitations/", {"name": "Red", "hours_valid": 1}, format="json")
    assert response.status_code == 201
    invitation = Invitation.objects.get()
    assert invitation.is_usable
    assert timedelta(minutes=59) < invitation.expires - timezone.now() <= timedelta(hours=1)
    acceptor = Acceptor(response.json()["code"])
    with mock.patch.object(timezone, "now", return_value=invitation.expires + timedelta(seconds=1)):
        assert not invitation.is_usable
        with pytest.raises(handshake.HandshakeError, match="expired"):
            handshake.answer_acceptance(acceptor.payload())
