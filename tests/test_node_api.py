"""The node-to-node endpoints refuse anything not signed right, and store each message once."""

from __future__ import annotations

import json
import uuid

import pytest

from connections import signing
from connections.models import Connection
from syncqueue.models import SyncEvent, Twin

PATH = "/api/v1/node/messages/"


@pytest.fixture
def connection(db):
    return Connection.objects.create(
        name="Red", status=Connection.Status.ACTIVE, secret="a" * 64, remote_name="Red", project="BLUE"
    )


@pytest.fixture
def other_connection(db):
    return Connection.objects.create(name="Green", status=Connection.Status.ACTIVE, secret="b" * 64)


def message(**overrides):
    return {
        "id": str(uuid.uuid4()),
        "kind": "update",
        "seq": 1,
        "key": "RED-1",
        "remote_key": None,
        "replica": {"key": "RED-1", "summary": "From Red"},
        **overrides,
    }


def post(client, connection, messages, *, secret=None, headers=None, path=PATH):
    body = json.dumps({"messages": messages}).encode()
    signed = headers or signing.sign(secret or connection.secret, str(connection.uuid), "POST", path, body)
    return client.post(path, body, content_type="application/json", headers=signed), signed


def test_it_stores_a_signed_batch(client, connection, django_capture_on_commit_callbacks):
    first = message()
    response, _ = post(client, connection, [first])
    assert response.status_code == 200
    assert response.json() == {"accepted": [first["id"]], "rejected": {}}
    event = SyncEvent.objects.get()
    assert (event.direction, event.kind, event.seq, event.twin.remote_key) == ("incoming", "update", 1, "RED-1")


def test_it_stores_a_message_delivered_twice_once(client, connection):
    again = message()
    for _ in range(2):
        response, _ = post(client, connection, [again])
        assert response.json()["accepted"] == [again["id"]]
    assert SyncEvent.objects.count() == 1
    assert Twin.objects.count() == 1


def test_it_stores_a_batch_of_one_new_twin_in_order_with_one_twin(client, connection):
    batch = [message(seq=n, replica={"key": "RED-1", "summary": f"v{n}"}) for n in (1, 2, 3)]
    response, _ = post(client, connection, batch)
    assert response.json() == {"accepted": [m["id"] for m in batch], "rejected": {}}
    assert Twin.objects.count() == 1
    assert list(SyncEvent.objects.order_by("seq").values_list("seq", "twin__remote_key")) == [
        (1, "RED-1"),
        (2, "RED-1"),
        (3, "RED-1"),
    ]


def test_a_message_refused_in_a_batch_costs_the_others_nothing(client, connection):
    Twin.objects.create(connection=connection, local_key="BLUE-1", remote_key="RED-1")
    wrong_pair = message(key="RED-2", remote_key="BLUE-1")  # BLUE-1 is paired with RED-1
    good = message(key="RED-3")
    again = message(key="RED-1", remote_key="BLUE-1")
    response, _ = post(client, connection, [wrong_pair, good, again, again])
    answer = response.json()
    assert answer["accepted"] == [good["id"], again["id"], again["id"]]
    assert list(answer["rejected"]) == [wrong_pair["id"]]
    assert "already paired with RED-1" in answer["rejected"][wrong_pair["id"]]
    assert sorted(SyncEvent.objects.values_list("twin__remote_key", flat=True)) == ["RED-1", "RED-3"]


def test_a_batch_that_cannot_be_stored_whole_is_stored_message_by_message(client, connection):
    # BLUE-1 waits for its remote key; the first message gives RED-7 a twin of its own, the
    # second would pair BLUE-1 with RED-7 too: the batch fails whole, the first stands alone.
    Twin.objects.create(connection=connection, local_key="BLUE-1")
    first = message(key="RED-7")
    clash = message(key="RED-7", seq=2, remote_key="BLUE-1")
    response, _ = post(client, connection, [first, clash])
    answer = response.json()
    assert answer["accepted"] == [first["id"]]
    assert list(answer["rejected"]) == [clash["id"]]
    assert SyncEvent.objects.get().message_id == uuid.UUID(first["id"])


def test_it_refuses_a_replayed_request(client, connection):
    body = json.dumps({"messages": [message()]}).encode()
    headers = signing.sign(connection.secret, str(connection.uuid), "POST", PATH, body)
    response = client.post(PATH, body, content_type="application/json", headers=headers)
    assert response.status_code == 200
    replay = client.post(PATH, body, content_type="application/json", headers=headers)
    assert replay.status_code == 401
    assert "replayed" in replay.json()["error"]


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        ("unsigned", "unsigned request"),
        ("wrong secret", "bad signature"),
        ("other connection's secret", "bad signature"),
        ("unknown connection", "unknown connection"),
        ("stale", "outside the allowed window"),
    ],
)
def test_it_refuses_a_forged_request_and_changes_nothing(client, connection, other_connection, tamper, error):
    body = json.dumps({"messages": [message()]}).encode()
    headers = signing.sign(connection.secret, str(connection.uuid), "POST", PATH, body)
    if tamper == "unsigned":
        headers = {}
    elif tamper == "wrong secret":
        headers = signing.sign("x" * 64, str(connection.uuid), "POST", PATH, body)
    elif tamper == "other connection's secret":
        headers = signing.sign(other_connection.secret, str(connection.uuid), "POST", PATH, body)
    elif tamper == "unknown connection":
        headers = signing.sign(connection.secret, str(uuid.uuid4()), "POST", PATH, body)
    elif tamper == "stale":
        headers[signing.TIMESTAMP_HEADER] = str(int(headers[signing.TIMESTAMP_HEADER]) - 3600)
    response = client.post(PATH, body, content_type="application/json", headers=headers)
    assert response.status_code == 401
    assert error in response.json()["error"]
    assert not SyncEvent.objects.exists()


def test_it_asks_a_deactivated_connections_sender_to_wait(client, connection):
    Connection.objects.filter(pk=connection.pk).update(status=Connection.Status.DEACTIVATED)
    response, _ = post(client, connection, [message()])
    assert response.status_code == 409
    assert not SyncEvent.objects.exists()


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"kind": "explode"}, "kind must be one of"),
        ({"seq": 0}, "seq must be a positive"),
        ({"seq": "1"}, "seq must be a positive"),
        ({"id": "not-a-uuid"}, "id must be a UUID"),
        ({"key": ""}, "key must be"),
        ({"replica": []}, "replica must be an object"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_it_rejects_a_malformed_message_and_keeps_the_good_ones(client, connection, bad, problem):
    good, broken = message(), message(**{"key": "RED-2", **bad})
    response, _ = post(client, connection, [good, broken])
    assert response.status_code == 200
    answer = response.json()
    assert answer["accepted"] == [good["id"]]
    assert problem in next(iter(answer["rejected"].values()))
    assert SyncEvent.objects.count() == 1


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"messages": {}}'])
def test_it_answers_a_bad_body_with_400(client, connection, body):
    headers = signing.sign(connection.secret, str(connection.uuid), "POST", PATH, body)
    response = client.post(PATH, body, content_type="application/json", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]


def test_it_only_serves_attachments_of_entities_under_sync(client, connection):
    path = f"/api/v1/node/attachments/{'0' * 64}/?key=BLUE-1"
    headers = signing.sign(connection.secret, str(connection.uuid), "GET", path)
    response = client.get(path, headers=headers)
    assert response.status_code == 404
    assert "under sync" in response.json()["error"]
