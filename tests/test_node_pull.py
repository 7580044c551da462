"""The public side of a private remote: it hands out messages on pull and keeps uploaded attachment bytes."""

from __future__ import annotations

import hashlib
import json

import pytest

from connections import signing
from syncqueue import flow, tasks, transport, worker
from syncqueue.models import Blob, SyncEvent
from tests.syncpair import blue_issue, connect_red
from tests.test_node_api import message

PULL = "/api/v1/node/pull/"


@pytest.fixture(autouse=True)
def no_kick(monkeypatch):
    monkeypatch.setattr(tasks, "kick", lambda: None)


@pytest.fixture
def private_red(project):
    """Red accepted with `private`: it has no URL here, and pulls."""
    connection = connect_red()
    connection.remote_url = ""
    connection.save(update_fields=["remote_url"])
    return connection


def signed(connection, method: str, path: str, body: bytes) -> dict:
    return signing.sign(connection.secret, str(connection.uuid), method, path, body)


def pull(client, connection, confirmed: list[str]):
    body = json.dumps({"confirmed": confirmed}).encode()
    return client.post(PULL, body, content_type="application/json", headers=signed(connection, "POST", PULL, body))


def put_blob(client, connection, content: bytes, sha256: str | None = None):
    sha256 = sha256 or hashlib.sha256(content).hexdigest()
    path = f"/api/v1/node/blobs/{sha256}/"
    return client.put(
        path, content, content_type="application/octet-stream", headers=signed(connection, "PUT", path, content)
    )


def test_it_is_not_pushed_to_and_hands_out_its_messages_on_pull_until_confirmed(client, private_red, alice):
    event = flow.sync_entity(private_red, blue_issue(alice).key)
    assert worker.send_outgoing("w") == 0, "nothing is pushed to a remote without a URL"
    first = pull(client, private_red, [])
    assert [m["id"] for m in first.json()["messages"]] == [str(event.message_id)]
    again = pull(client, private_red, [])
    assert [m["id"] for m in again.json()["messages"]] == [str(event.message_id)], "unconfirmed: it goes again"
    done = pull(client, private_red, [str(event.message_id)])
    assert done.json() == {"messages": []}
    event.refresh_from_db()
    assert event.status == "sent", "an update waits for its acknowledgement"


def test_it_refuses_a_pull_on_a_connection_that_pushes(client, project):
    pushing = connect_red()
    response = pull(client, pushing, [])
    assert response.status_code == 409 and "pushed" in response.json()["error"]


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"confirmed": "x"}', b'{"confirmed": [1]}', b"not json"])
def test_it_answers_a_malformed_pull_with_400(client, private_red, body):
    headers = signed(private_red, "POST", PULL, body)
    response = client.post(PULL, body, content_type="application/json", headers=headers)
    assert response.status_code == 400 and response.json()["error"]


def test_it_refuses_an_unsigned_or_forged_pull(client, private_red, alice):
    flow.sync_entity(private_red, blue_issue(alice).key)
    body = b'{"confirmed": []}'
    assert client.post(PULL, body, content_type="application/json").status_code == 401
    forged = signing.sign("f" * 64, str(private_red.uuid), "POST", PULL, body)
    assert client.post(PULL, body, content_type="application/json", headers=forged).status_code == 401
    assert SyncEvent.objects.get().status == "pending", "nothing was handed out"


def test_it_keeps_uploaded_bytes_once_and_serves_them_to_the_attachment_fetch(client, private_red):
    content = b"bytes from behind a firewall"
    for _ in range(2):
        assert put_blob(client, private_red, content).status_code == 200
    assert Blob.objects.count() == 1
    sha256 = hashlib.sha256(content).hexdigest()
    assert transport.fetch_attachment(private_red, "RED-1", sha256, 1000) == content
    with pytest.raises(transport.RemoteError, match="not been uploaded"):
        transport.fetch_attachment(private_red, "RED-1", "0" * 64, 1000)


def test_it_refuses_bytes_that_do_not_match_their_hash_or_are_too_large(client, private_red, settings):
    assert put_blob(client, private_red, b"one", hashlib.sha256(b"two").hexdigest()).status_code == 400
    assert put_blob(client, private_red, b"x", "not-a-hash").status_code == 400
    settings.TRACKER_MAX_ATTACHMENT_BYTES = 10
    assert put_blob(client, private_red, b"x" * 11).status_code == 413
    assert not Blob.objects.exists()


def test_a_pulled_message_is_stored_once_however_often_it_comes(private_red, monkeypatch):
    private_red.pulls, private_red.remote_url = True, "http://blue.example"
    private_red.save()
    update = message(key="BLUE-7")
    batches = [[update], [update], []]
    confirmations = []

    def fake_pull(connection, confirmed):
        confirmations.append(list(confirmed))
        return batches.pop(0)

    monkeypatch.setattr(transport, "pull_messages", fake_pull)
    assert worker.pull_all() == 2
    assert confirmations == [[], [update["id"]], [update["id"]]]
    assert SyncEvent.objects.filter(direction="incoming").count() == 1
