import json

import pytest

from connections import rules
from connections.models import Connection, Trigger
from syncqueue.models import SyncEvent
from syncqueue.webhooks import SIGNATURE_HEADER, signature
from trackers.builtin import actions

URL = "/api/v1/webhooks/changed/"
SECRET = "webhook-secret-for-tests"


@pytest.fixture
def connection(db, project):
    connection = Connection.objects.create(name="Red", status=Connection.Status.ACTIVE, secret="a" * 64)
    rules.install_defaults(connection)
    Trigger.objects.create(connection=connection, query="project:BLUE")
    return connection


def call(client, body, secret=SECRET):
    raw = json.dumps(body).encode()
    headers = {SIGNATURE_HEADER: signature(secret, raw)} if secret else {}
    return client.post(URL, raw, content_type="application/json", headers=headers)


def test_it_is_off_without_a_secret(client, settings, db):
    settings.WEBHOOK_SECRET = ""
    response = call(client, {"key": "BLUE-1"})
    assert response.status_code == 404
    assert "WEBHOOK_SECRET" in response.json()["error"]


@pytest.mark.parametrize("secret", [None, "another-secret"])
def test_it_refuses_a_call_without_the_right_signature(client, settings, connection, secret):
    settings.WEBHOOK_SECRET = SECRET
    response = call(client, {"key": "BLUE-1"}, secret=secret)
    assert response.status_code == 401
    assert not SyncEvent.objects.exists()


@pytest.mark.parametrize("body", [[], {"key": 5}, {"key": ""}, {}])
def test_it_refuses_a_malformed_body(client, settings, connection, body):
    settings.WEBHOOK_SECRET = SECRET
    assert call(client, body).status_code == 400


def test_it_syncs_the_named_entity_at_once(client, settings, connection, alice):
    settings.WEBHOOK_SECRET = SECRET
    issue = actions.create_issue("BLUE", {"summary": "Pushed"}, alice)
    response = call(client, {"key": issue.key})
    assert response.status_code == 202
    event = SyncEvent.objects.get(direction="outgoing")
    assert event.payload["replica"]["summary"] == "Pushed"
