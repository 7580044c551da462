"""Secrets stay secret: a connection's shared secret, a pending invitation's token and private
key, and the Redmine API key in the node's tracker settings.

They are encrypted in their database columns, and they appear in no log line (captured at
DEBUG, SQL included, through a sync and through failing handshakes), no error page and no
API or page output. Every remote here is a closed port on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import uuid
from unittest import mock

import pytest
from django.db import connection as db
from django.test import Client

from connections import handshake, rules, signing
from connections.models import Connection, Invitation, Node
from syncqueue import flow, triggers, worker
from syncqueue.models import SyncEvent
from tests.test_handshake import Acceptor, RemoteInitiator
from trackers.builtin import actions

SECRET = "5ec7e7" + "ab" * 29
API_KEY = "redmine-key-0f1e2d3c4b5a69788796a5b4"
CLOSED = "http://127.0.0.1:9"


def raw(table: str, column: str, pk: int) -> str:
    with db.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [pk])  # noqa: S608 - names are constants
        return cursor.fetchone()[0]


@pytest.fixture
def everything_logged(caplog, settings):
    """Every logger at DEBUG, SQL with its parameters included."""
    settings.DEBUG = True  # Django logs SQL only then
    caplog.set_level(logging.DEBUG)
    for name in ("django.db.backends", "django-q", "urllib3", "requests"):
        caplog.set_level(logging.DEBUG, logger=name)
    db.force_debug_cursor = True
    yield caplog
    db.force_debug_cursor = False


@pytest.fixture
def red(db):
    connection = Connection.objects.create(
        name="Red", status=Connection.Status.ACTIVE, secret=SECRET, remote_name="Red", remote_url=CLOSED,
        project="BLUE",
    )  # fmt: skip
    connection.active_rules = rules.install_template(connection, "default", None)
    connection.save()
    return connection


@pytest.fixture
def redmine_node(db):
    node = Node.local()
    node.tracker_kind = "redmine"
    node.tracker_settings = json.dumps({"url": CLOSED, "api_key": API_KEY, "project": "synctest"})
    node.save()
    return node


def assert_nowhere(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text
        assert secret.upper() not in text.upper()


# --- at rest ---------------------------------------------------------------------------------


def test_the_connection_secret_is_encrypted_in_its_column(red):
    stored = raw("connections_connection", "secret", red.pk)
    assert stored.startswith("fernet:")
    assert_nowhere(stored, SECRET)
    assert Connection.objects.get().secret == SECRET


def test_the_redmine_key_is_encrypted_in_the_node_settings_column(redmine_node):
    stored = raw("connections_node", "tracker_settings", redmine_node.pk)
    assert stored.startswith("fernet:")
    assert_nowhere(stored, API_KEY, CLOSED)
    assert Node.objects.get().tracker_config()["api_key"] == API_KEY


def test_the_same_secret_is_stored_differently_each_time(red):
    other = Connection.objects.create(name="Green", secret=SECRET)
    assert raw("connections_connection", "secret", red.pk) != raw("connections_connection", "secret", other.pk)


def test_a_decrypted_secret_does_not_show_itself_in_a_repr(red):
    secret = Connection.objects.get().secret
    assert SECRET not in repr(secret)
    assert SECRET not in repr({"secret": secret})


# --- in logs ---------------------------------------------------------------------------------


def test_a_sync_logs_no_secret(everything_logged, red, project, alice, client):
    """Out (to a remote that does not answer), in (a signed batch), applied, and the ack that cannot go."""
    issue = actions.create_issue(project, {"summary": "Printer on fire"}, actor=alice)
    flow.sync_entity(red, issue.key, force=True)
    message = {
        "id": str(uuid.uuid4()), "kind": "update", "seq": 1, "key": "RED-7", "remote_key": None,
        "replica": {"key": "RED-7", "summary": "From Red", "description": "", "comments": [], "attachments": []},
    }  # fmt: skip
    body = json.dumps({"messages": [message]}).encode()
    path = "/api/v1/node/messages/"
    headers = signing.sign(SECRET, str(red.uuid), "POST", path, body)
    assert client.post(path, body, content_type="application/json", headers=headers).status_code == 200
    worker.drain(budget_seconds=5)
    sent = SyncEvent.objects.filter(direction="outgoing").first()
    assert sent is not None and sent.attempts > 0 and "127.0.0.1" in sent.error, "nothing was sent"
    assert any("SELECT" in r.getMessage() for r in everything_logged.records), "SQL was not logged"
    assert_nowhere(everything_logged.text, SECRET)
    errors = " ".join(SyncEvent.objects.values_list("error", flat=True))
    assert_nowhere(errors, SECRET)


def test_a_node_serving_an_unreachable_redmine_logs_no_key(everything_logged, redmine_node, red):
    triggers.poll_due()
    worker.drain(budget_seconds=2)
    assert "127.0.0.1" in everything_logged.text, "the node never tried its Redmine"
    assert_nowhere(everything_logged.text, API_KEY)


def test_a_failing_acceptance_logs_no_secret(everything_logged, db):
    code = handshake.make_code(initiator_code_at(RemoteInitiator(), CLOSED))
    with pytest.raises(handshake.HandshakeError, match="does not answer"):
        handshake.accept_invitation(code)
    assert not Connection.objects.exists()
    token = handshake.parse_code(code).token
    assert_nowhere(everything_logged.text, code, handshake._b64(token), token.hex())


def test_a_refused_acceptance_logs_no_secret(everything_logged, client, db):
    _, code, _ = handshake.create_invitation("Red")
    invitation = Invitation.objects.get()
    acceptor = Acceptor(code)
    response = client.post("/api/v1/node/handshake/", acceptor.payload(proof="0" * 64), content_type="application/json")
    assert response.status_code == 403
    secrets = (code, invitation.token, invitation.private_key, acceptor.secret)
    assert_nowhere(everything_logged.text, *secrets)
    assert_nowhere(response.content.decode(), *secrets)


def initiator_code_at(initiator: RemoteInitiator, url: str) -> handshake.InvitationCode:
    parsed = handshake.parse_code(initiator.code)
    return handshake.InvitationCode(**{**parsed.__dict__, "url": url})


# --- in error pages and output ---------------------------------------------------------------


def test_a_server_error_shows_no_secret_and_no_trace(caplog, red):
    """Whatever breaks while a signed batch is handled, the answer is a bare 500 (DEBUG is off, as it must be)."""
    caplog.set_level(logging.DEBUG)
    body = b'{"messages": []}'
    path = "/api/v1/node/messages/"
    headers = signing.sign(SECRET, str(red.uuid), "POST", path, body)
    client = Client(raise_request_exception=False)
    with mock.patch.object(flow, "receive", side_effect=RuntimeError("the database went away")):
        response = client.post(path, body, content_type="application/json", headers=headers)
    assert response.status_code == 500
    assert response.json() == {"error": "Internal error; it has been logged."}
    assert "the database went away" in caplog.text
    assert_nowhere(caplog.text, SECRET)


def test_refusals_of_the_node_api_tell_nothing_secret(client, red):
    body = b'{"messages": []}'
    path = "/api/v1/node/messages/"
    headers = signing.sign("x" * 64, str(red.uuid), "POST", path, body)
    response = client.post(path, body, content_type="application/json", headers=headers)
    assert response.status_code == 401
    expected = signing.sign(SECRET, str(red.uuid), "POST", path, body)[signing.SIGNATURE_HEADER]
    assert_nowhere(response.content.decode(), SECRET, expected[:16])


def test_the_apis_never_show_a_secret(alice_api, red, redmine_node):
    invited = alice_api.post("/api/v1/connections/invitations/", {"name": "Green"}, format="json")
    assert invited.status_code == 201
    invitation = Invitation.objects.get()
    outputs = [
        invited.content,
        alice_api.get("/api/v1/connections/").content,
        alice_api.get(f"/api/v1/connections/{red.pk}/").content,
        alice_api.get("/api/v1/queue/stats/").content,
        alice_api.get("/api/v1/schema/", {"format": "json"}).content,
    ]
    for output in outputs:
        assert_nowhere(output.decode(), SECRET, API_KEY, invitation.private_key)


def test_the_pages_never_show_a_secret(as_alice, as_bob, red, redmine_node):
    pages = ["/", f"/connections/{red.pk}/", "/connections/", "/connections/tracker/", "/sync/queue/",
             f"/admin/connections/connection/{red.pk}/change/", "/admin/connections/connection/"]  # fmt: skip
    for client in (as_alice, as_bob):
        for page in pages:
            response = client.get(page)
            assert response.status_code == 200, page
            assert_nowhere(response.content.decode(), SECRET, API_KEY)
