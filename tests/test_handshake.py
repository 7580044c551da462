"""Pairing two nodes with an invitation code: the initiator's side and the acceptor's side.

The other node is simulated inside the test with the same primitives (X25519, derive_secret,
proof); the network is patched at its one choke point, ``handshake._post``.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import uuid
from datetime import timedelta
from unittest import mock

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from django.db import connection as db
from django.utils import timezone

from connections import handshake
from connections.handshake import HandshakeError
from connections.models import Connection, Invitation, Node


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def code_with(**changes) -> str:
    """An invitation code of another node, with some of its parts changed."""
    parts = {
        "url": "http://blue.example:8000",
        "node_id": str(uuid.uuid4()),
        "node_name": "Blue",
        "connection_uuid": str(uuid.uuid4()),
        "token": secrets.token_bytes(32),
        "public_key": public_bytes(X25519PrivateKey.generate()),
        "expires": timezone.now() + timedelta(hours=1),
    }
    return handshake.make_code(handshake.InvitationCode(**{**parts, **changes}))


def raw_body(code: str) -> dict:
    return json.loads(unb64(code[len(handshake.CODE_PREFIX) :]))


def code_of(body: dict) -> str:
    return handshake.CODE_PREFIX + b64(json.dumps(body).encode())


class Acceptor:
    """The other node accepting this node's code: what it sends to our handshake endpoint."""

    def __init__(self, code: str):
        self.invitation = handshake.parse_code(code)
        self.key = X25519PrivateKey.generate()
        self.node_id = str(uuid.uuid4())
        shared = self.key.exchange(X25519PublicKey.from_public_bytes(self.invitation.public_key))
        self.secret = handshake.derive_secret(shared, self.invitation.token, self.invitation.connection_uuid)

    def payload(self, **changes) -> dict:
        public = b64(public_bytes(self.key))
        uuid_ = self.invitation.connection_uuid
        return {
            "connection": uuid_,
            "node_id": self.node_id,
            "name": "Red",
            "url": "http://red.example:8000",
            "public_key": public,
            "proof": handshake.proof(self.secret, "accept", uuid_, self.node_id, public),
            **changes,
        }

    def expected_confirmation(self) -> str:
        node_id = str(Node.local().node_id)
        return handshake.proof(self.secret, "confirm", self.invitation.connection_uuid, node_id)


class RemoteInitiator:
    """The other node, which made the code: answers an acceptance as ``answer_acceptance`` does.

    Patch it in with ``mock.patch.object(handshake, "_post", initiator.answer)``.
    """

    def __init__(self, *, name: str = "Blue", wrong_proof: bool = False, expires=None):
        self.key = X25519PrivateKey.generate()
        self.name = name
        self.node_id = str(uuid.uuid4())
        self.connection_uuid = str(uuid.uuid4())
        self.token = secrets.token_bytes(32)
        self.url = "http://blue.example:8000"
        self.wrong_proof = wrong_proof
        self.received: list[tuple[str, dict]] = []
        self.secret = ""
        self.code = handshake.make_code(
            handshake.InvitationCode(
                url=self.url,
                node_id=self.node_id,
                node_name=name,
                connection_uuid=self.connection_uuid,
                token=self.token,
                public_key=public_bytes(self.key),
                expires=expires or timezone.now() + timedelta(hours=1),
            )
        )

    def answer(self, url: str, payload: dict) -> dict:
        self.received.append((url, payload))
        shared = self.key.exchange(X25519PublicKey.from_public_bytes(unb64(payload["public_key"])))
        self.secret = handshake.derive_secret(shared, self.token, self.connection_uuid)
        parts = (self.connection_uuid, payload["node_id"], payload["public_key"])
        if payload["proof"] != handshake.proof(self.secret, "accept", *parts):
            raise HandshakeError("The acceptance could not be verified.", status=502)
        signing_secret = "0" * 64 if self.wrong_proof else self.secret
        return {
            "node_id": self.node_id,
            "name": self.name,
            "proof": handshake.proof(signing_secret, "confirm", self.connection_uuid, self.node_id),
        }


def raw_columns(model, pk: int, *columns: str) -> tuple:
    with db.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(columns)} FROM {model._meta.db_table} WHERE id = %s", [pk])  # noqa: S608
        return cursor.fetchone()


# --- invitation codes ------------------------------------------------------------------------


def test_it_reads_back_the_code_it_made():
    token = secrets.token_bytes(32)
    parsed = handshake.parse_code(code_with(node_name="Blue", token=token))
    assert (parsed.node_name, parsed.token, parsed.url) == ("Blue", token, "http://blue.example:8000")


def test_it_tolerates_a_code_broken_over_lines_by_copy_and_paste():
    code = code_with()
    pasted = "\n  ".join(code[i : i + 40] for i in range(0, len(code), 40))
    assert handshake.parse_code(pasted) == handshake.parse_code(code)


@pytest.mark.parametrize("code", ["", "hello", "EXL2-abc", "exl1-" + "a" * 40])
def test_it_refuses_a_code_with_the_wrong_prefix(code):
    with pytest.raises(HandshakeError, match="should start with EXL1-") as caught:
        handshake.parse_code(code)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "damage",
    [
        lambda code: code[:-10],
        lambda code: code + "!!",
        lambda code: handshake.CODE_PREFIX + "not base64 at all ~",
        lambda code: handshake.CODE_PREFIX + b64(b"[1, 2, 3]"),
        lambda code: handshake.CODE_PREFIX + b64(b"\xff\xfe"),
        lambda code: code_of({k: v for k, v in raw_body(code).items() if k != "t"}),
        lambda code: code_of({**raw_body(code), "t": b64(b"short")}),
        lambda code: code_of({**raw_body(code), "k": b64(b"x" * 31)}),
        lambda code: code_of({**raw_body(code), "e": "tomorrow"}),
    ],
    ids=["truncated", "trailing junk", "not base64", "not an object", "not utf-8", "no token", "short token",
         "short key", "expiry not a number"],
)  # fmt: skip
def test_it_refuses_a_damaged_code(damage):
    with pytest.raises(HandshakeError, match="damaged") as caught:
        handshake.parse_code(damage(code_with()))
    assert caught.value.status == 400


@pytest.mark.parametrize("expiry", [10**20, "Infinity"])
def test_it_refuses_a_code_with_an_impossible_expiry(expiry):
    code = code_with()
    text = json.dumps({**raw_body(code), "e": 0}).replace('"e": 0', f'"e": {expiry}')
    with pytest.raises(HandshakeError, match="damaged"):
        handshake.parse_code(handshake.CODE_PREFIX + b64(text.encode()))


def test_it_refuses_an_expired_code_with_gone():
    with pytest.raises(HandshakeError, match="expired") as caught:
        handshake.parse_code(code_with(expires=timezone.now() - timedelta(seconds=1)))
    assert caught.value.status == 410


# --- creating an invitation ------------------------------------------------------------------


def test_it_creates_a_pending_connection_with_default_rules_and_a_code(alice):
    connection, code, expires = handshake.create_invitation("Red", project="BLUE", author=alice, hours=2)
    connection.refresh_from_db()
    assert connection.status == Connection.Status.PENDING
    assert connection.is_initiator
    assert (connection.project, connection.secret) == ("BLUE", "")
    assert connection.active_rules.number == 1
    assert connection.active_rules.author == alice
    parsed = handshake.parse_code(code)
    node = Node.local()
    assert (parsed.url, parsed.node_id, parsed.node_name) == (node.url, str(node.node_id), node.name)
    assert parsed.connection_uuid == str(connection.uuid)
    assert timedelta(hours=2) - timedelta(minutes=1) < expires - timezone.now() <= timedelta(hours=2)


STALE_RULES = (
    "create_invitation and accept_invitation return the Connection object they created, but "
    "rules.install_defaults saves the active rules on a copy it re-reads (select_for_update): the returned "
    "object has active_rules None, so the API's invite/accept responses say rules_version null; set "
    "connection.active_rules = rules.install_defaults(...) in handshake.py"
)


def test_it_returns_the_new_connection_with_its_default_rules(db):
    connection, _, _ = handshake.create_invitation("Red")
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        accepted = handshake.accept_invitation(initiator.code)
    assert connection.active_rules is not None
    assert accepted.active_rules is not None


def test_it_stores_the_token_and_the_private_key_encrypted(db):
    connection, code, _ = handshake.create_invitation("Red")
    parsed = handshake.parse_code(code)
    invitation = connection.invitations.get()
    assert invitation.token == b64(parsed.token)
    private = X25519PrivateKey.from_private_bytes(unb64(invitation.private_key))
    assert public_bytes(private) == parsed.public_key
    raw_token, raw_private = raw_columns(Invitation, invitation.pk, "token", "private_key")
    assert raw_token.startswith("fernet:") and raw_private.startswith("fernet:")
    assert invitation.token not in raw_token
    assert invitation.private_key not in raw_private
    assert str(invitation.private_key) not in code


def test_it_refuses_to_invite_without_a_public_url(db, settings):
    settings.NODE_URL = ""
    with pytest.raises(HandshakeError, match="no public URL"):
        handshake.create_invitation("Red")
    assert not Connection.objects.exists()


# --- answering an acceptance (this node made the code) ---------------------------------------


@pytest.fixture
def invitation(db):
    connection, code, _ = handshake.create_invitation("Red", project="BLUE")
    return connection, code


def test_it_activates_the_connection_with_the_secret_both_sides_derived(invitation):
    connection, code = invitation
    acceptor = Acceptor(code)
    answer = handshake.answer_acceptance(acceptor.payload())
    assert answer["proof"] == acceptor.expected_confirmation()
    assert answer["node_id"] == str(Node.local().node_id)
    assert "secret" not in json.dumps(answer)
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE
    assert connection.secret == acceptor.secret
    assert (connection.remote_name, connection.remote_url) == ("Red", "http://red.example:8000")
    assert str(connection.remote_node_id) == acceptor.node_id
    assert connection.invitations.get().used is not None
    (raw_secret,) = raw_columns(Connection, connection.pk, "secret")
    assert acceptor.secret not in raw_secret


def test_it_refuses_a_second_acceptor_of_a_used_code(invitation):
    connection, code = invitation
    first = Acceptor(code)
    handshake.answer_acceptance(first.payload())
    with pytest.raises(HandshakeError, match="already been used") as caught:
        handshake.answer_acceptance(Acceptor(code).payload())
    assert caught.value.status == 410
    connection.refresh_from_db()
    assert connection.secret == first.secret
    assert str(connection.remote_node_id) == first.node_id


def test_it_gives_the_same_answer_to_the_same_acceptor_retrying(invitation):
    connection, code = invitation
    acceptor = Acceptor(code)
    first = handshake.answer_acceptance(acceptor.payload())
    again = handshake.answer_acceptance(acceptor.payload())
    assert again == first
    connection.refresh_from_db()
    assert connection.secret == acceptor.secret


def test_it_refuses_a_wrong_proof_and_keeps_the_code_usable(invitation):
    connection, code = invitation
    acceptor = Acceptor(code)
    with pytest.raises(HandshakeError, match="could not be verified") as caught:
        handshake.answer_acceptance(acceptor.payload(proof="0" * 64))
    assert caught.value.status == 403
    connection.refresh_from_db()
    assert connection.status == Connection.Status.PENDING
    assert connection.invitations.get().is_usable
    handshake.answer_acceptance(acceptor.payload())
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE


def test_it_refuses_a_proof_made_for_another_node_id(invitation):
    _, code = invitation
    acceptor = Acceptor(code)
    with pytest.raises(HandshakeError) as caught:
        handshake.answer_acceptance(acceptor.payload(node_id=str(uuid.uuid4())))
    assert caught.value.status == 403


def test_it_refuses_an_acceptance_after_the_code_expired(invitation):
    connection, code = invitation
    acceptor = Acceptor(code)
    Invitation.objects.filter(connection=connection).update(expires=timezone.now() - timedelta(seconds=1))
    with pytest.raises(HandshakeError, match="expired") as caught:
        handshake.answer_acceptance(acceptor.payload())
    assert caught.value.status == 410
    connection.refresh_from_db()
    assert (connection.status, connection.secret) == (Connection.Status.PENDING, "")


def test_it_answers_not_found_for_a_connection_it_never_invited(invitation):
    _, code = invitation
    with pytest.raises(HandshakeError, match="No invitation") as caught:
        handshake.answer_acceptance(Acceptor(code).payload(connection=str(uuid.uuid4())))
    assert caught.value.status == 404


@pytest.mark.parametrize(
    "malformed",
    [
        lambda payload: [payload],
        lambda payload: "acceptance",
        lambda payload: {k: v for k, v in payload.items() if k != "proof"},
        lambda payload: {**payload, "name": 42},
        lambda payload: {**payload, "public_key": None},
        lambda payload: {**payload, "connection": "not-a-uuid"},
        lambda payload: {**payload, "public_key": b64(b"k" * 31)},
        lambda payload: {**payload, "public_key": "*not base64*"},
    ],
    ids=["a list", "a string", "no proof", "name not text", "key not text", "bad connection id", "short key",
         "key not base64"],
)  # fmt: skip
def test_it_refuses_a_malformed_acceptance(invitation, malformed):
    connection, code = invitation
    with pytest.raises(HandshakeError) as caught:
        handshake.answer_acceptance(malformed(Acceptor(code).payload()))
    assert caught.value.status == 400
    assert connection.invitations.get().is_usable


def test_it_refuses_a_low_order_public_key_as_malformed(invitation):
    _, code = invitation
    with pytest.raises(HandshakeError) as caught:
        handshake.answer_acceptance(Acceptor(code).payload(public_key=b64(bytes(32))))
    assert caught.value.status == 400


def test_it_refuses_a_proof_with_non_ascii_characters(invitation):
    _, code = invitation
    with pytest.raises(HandshakeError) as caught:
        handshake.answer_acceptance(Acceptor(code).payload(proof="é" * 64))
    assert caught.value.status == 403


# --- accepting a code (the other node made it) -----------------------------------------------


def test_it_accepts_a_code_and_stores_an_active_connection(alice):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        connection = handshake.accept_invitation(initiator.code, project="BLUE", author=alice)
    url, payload = initiator.received[0]
    assert url == "http://blue.example:8000" + handshake.HANDSHAKE_PATH
    assert payload["node_id"] == str(Node.local().node_id)
    assert initiator.secret not in json.dumps(payload)
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE
    assert not connection.is_initiator
    assert connection.secret == initiator.secret
    assert str(connection.uuid) == initiator.connection_uuid
    assert (connection.name, connection.remote_name, connection.project) == ("Blue", "Blue", "BLUE")
    assert (connection.remote_url, str(connection.remote_node_id)) == (initiator.url, initiator.node_id)
    assert connection.active_rules.author == alice


def test_it_refuses_a_code_whose_node_name_is_too_long_as_damaged(db):
    initiator = RemoteInitiator(name="B" * 150)
    with (
        mock.patch.object(handshake, "_post", initiator.answer),
        pytest.raises(HandshakeError, match="damaged"),
    ):
        handshake.accept_invitation(initiator.code)
    assert not Connection.objects.exists()


def test_it_names_the_accepted_connection_as_asked(db):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        connection = handshake.accept_invitation(initiator.code, name="Blue tracker")
    assert connection.name == "Blue tracker"


def test_it_stores_nothing_when_the_initiators_proof_is_wrong(db):
    initiator = RemoteInitiator(wrong_proof=True)
    with (
        mock.patch.object(handshake, "_post", initiator.answer),
        pytest.raises(HandshakeError, match="could not be verified"),
    ):
        handshake.accept_invitation(initiator.code)
    assert not Connection.objects.exists()


def test_it_stores_nothing_when_the_initiators_proof_is_not_even_ascii(db):
    answer = {"node_id": str(uuid.uuid4()), "name": "Blue", "proof": "é" * 64}
    with mock.patch.object(handshake, "_post", return_value=answer), pytest.raises(HandshakeError):
        handshake.accept_invitation(RemoteInitiator().code)
    assert not Connection.objects.exists()


def test_it_stores_nothing_when_the_initiator_does_not_answer(db):
    down = HandshakeError("The other node does not answer at http://blue.example:8000.", status=502)
    with mock.patch.object(handshake, "_post", side_effect=down), pytest.raises(HandshakeError) as caught:
        handshake.accept_invitation(RemoteInitiator().code)
    assert caught.value.status == 502
    assert not Connection.objects.exists()


def test_it_refuses_a_code_it_made_itself(invitation):
    _, code = invitation
    with mock.patch.object(handshake, "_post") as post, pytest.raises(HandshakeError, match="made on this node"):
        handshake.accept_invitation(code)
    post.assert_not_called()
    assert Connection.objects.count() == 1


def test_it_refuses_a_code_it_already_accepted(db):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        handshake.accept_invitation(initiator.code)
        with pytest.raises(HandshakeError, match="already been used here") as caught:
            handshake.accept_invitation(initiator.code)
    assert caught.value.status == 409
    assert len(initiator.received) == 1


def test_it_does_not_call_the_initiator_with_an_expired_code(db):
    initiator = RemoteInitiator(expires=timezone.now() - timedelta(minutes=1))
    with mock.patch.object(handshake, "_post") as post, pytest.raises(HandshakeError, match="expired"):
        handshake.accept_invitation(initiator.code)
    post.assert_not_called()


def test_it_answers_an_acceptance_over_http(invitation, client):
    """The acceptor's payload as it arrives at the node endpoint: JSON in, the confirmation out."""
    _, code = invitation
    acceptor = Acceptor(code)
    response = client.post("/api/v1/node/handshake/", acceptor.payload(), content_type="application/json")
    assert response.status_code == 200
    assert response.json()["proof"] == acceptor.expected_confirmation()
    again = client.post("/api/v1/node/handshake/", Acceptor(code).payload(), content_type="application/json")
    assert again.status_code == 410


# --- the one network call --------------------------------------------------------------------


def test_it_reports_an_unreachable_initiator_as_bad_gateway():
    with (
        mock.patch.object(requests, "post", side_effect=requests.ConnectionError("refused")),
        pytest.raises(HandshakeError, match="does not answer") as caught,
    ):
        handshake._post("http://blue.example/api/v1/node/handshake/", {})
    assert caught.value.status == 502


def test_it_passes_on_the_initiators_refusal():
    refusal = mock.Mock(status_code=410, json=lambda: {"error": "This invitation code has already been used."})
    with (
        mock.patch.object(requests, "post", return_value=refusal),
        pytest.raises(HandshakeError, match="already been used") as caught,
    ):
        handshake._post("http://blue.example/api/v1/node/handshake/", {})
    assert caught.value.status == 502


@pytest.mark.django_db(transaction=True)
def test_every_process_of_a_new_node_gets_the_same_identity():
    # A new node's web and queue processes all ask for its identity at once. Had two of them
    # made a row each, an invitation could carry one node_id and its confirmation the other,
    # and the pairing would fail as "could not be verified".
    if db.vendor == "sqlite":
        pytest.skip("SQLite serialises writers; the race needs PostgreSQL (run with DATABASE_URL)")
    Node.objects.all().delete()
    start = threading.Barrier(6)
    seen, errors = [], []
    save = Node.save

    def slow_save(self, *args, **kwargs):
        time.sleep(0.2)  # widens the race: all six have looked before any one has written
        return save(self, *args, **kwargs)

    def ask():
        try:
            start.wait(timeout=10)
            seen.append(Node.local().node_id)
        except Exception as e:  # reported below; a thread must not die silently
            errors.append(e)
        finally:
            db.close()

    threads = [threading.Thread(target=ask) for _ in range(6)]
    with mock.patch.object(Node, "save", slow_save):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert errors == []
    assert Node.objects.count() == 1
    assert set(seen) == {Node.local().node_id}
