"""The REST API for connections and the sync: who may read, who may change, and the error shape.

Staff (bob) may read; only admins (alice) change; charlie, with no rights, sees nothing.
No live node: the other side of a pairing is simulated at ``handshake._post``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from connections import handshake, rules
from connections.models import Connection, Trigger
from syncqueue import flow
from syncqueue.models import SyncEvent, Twin
from tests.helpers import assert_error
from tests.test_handshake import RemoteInitiator
from trackers.builtin import actions

API = "/api/v1"


@pytest.fixture
def connection(db):
    connection = Connection.objects.create(
        name="Red",
        status=Connection.Status.ACTIVE,
        secret="a" * 64,
        remote_name="Red node",
        remote_url="http://red.example:8000",
        project="BLUE",
    )
    rules.install_defaults(connection)
    connection.refresh_from_db()
    return connection


@pytest.fixture
def pending(db):
    connection, _, _ = handshake.create_invitation("Green")
    return connection


@pytest.fixture
def issue(project, bob):
    return actions.create_issue(project, {"summary": "Login page is blank"}, actor=bob)


@pytest.fixture
def blocked_twin(connection):
    twin = Twin.objects.create(
        connection=connection, local_key="BLUE-1", remote_key="RED-1", state=Twin.State.BLOCKED, blocked_reason="boom"
    )
    SyncEvent.objects.create(
        connection=connection,
        twin=twin,
        direction=SyncEvent.Direction.INCOMING,
        seq=1,
        payload={"replica": {}},
        status=SyncEvent.Status.FAILED,
        error="incoming rules, line 3: boom",
    )
    return twin


# --- permissions -----------------------------------------------------------------------------


READS = ["/connections/", "/connections/{pk}/", "/connections/{pk}/rules/", "/connections/{pk}/triggers/",
         "/twins/", "/queue/stats/"]  # fmt: skip
CHANGES = [
    ("/connections/invitations/", {"name": "Green"}),
    ("/connections/accept/", {"code": "EXL1-x"}),
    ("/connections/{pk}/activate/", {}),
    ("/connections/{pk}/deactivate/", {}),
    ("/connections/{pk}/rules/", {"outgoing": "", "incoming": ""}),
    ("/connections/{pk}/triggers/", {"query": "project:BLUE"}),
    ("/connections/{pk}/rules/1/activate/", {}),
]
OPERATIONS = [
    ("/connections/{pk}/sync/", {"key": "BLUE-1"}),
    ("/twins/{twin}/stop/", {}),
    ("/twins/{twin}/retry/", {}),
]


@pytest.mark.parametrize("path", READS)
def test_it_lets_staff_read_and_nobody_else(path, connection, blocked_twin, bob_api, charlie_api, client):
    url = API + path.format(pk=connection.pk)
    assert bob_api.get(url).status_code == 200
    assert_error(charlie_api.get(url), 403, text="only staff")
    assert_error(client.get(url), 401)


@pytest.mark.parametrize(("path", "body"), CHANGES)
def test_it_lets_only_admins_change(path, body, connection, blocked_twin, bob_api, charlie_api):
    url = API + path.format(pk=connection.pk, twin=blocked_twin.pk)
    assert_error(bob_api.post(url, body, format="json"), 403, text="only administrators")
    assert_error(charlie_api.post(url, body, format="json"), 403)
    connection.refresh_from_db()
    blocked_twin.refresh_from_db()
    assert (connection.status, connection.active_rules.number) == (Connection.Status.ACTIVE, 1)
    assert blocked_twin.state == Twin.State.BLOCKED
    assert not Trigger.objects.exists()
    assert Connection.objects.count() == 1


@pytest.mark.parametrize(("path", "body"), OPERATIONS)
def test_it_lets_only_staff_operate_the_sync(path, body, connection, blocked_twin, charlie_api, client):
    url = API + path.format(pk=connection.pk, twin=blocked_twin.pk)
    assert_error(charlie_api.post(url, body, format="json"), 403, text="only staff")
    assert_error(client.post(url, body, format="json"), 401)
    blocked_twin.refresh_from_db()
    assert blocked_twin.state == Twin.State.BLOCKED


def test_it_rolls_back_to_an_older_rules_version(alice_api, connection):
    from connections import rules

    rules.save_rules(connection, "replica.summary = 'v2'\n", "", comment="v2")
    body = alice_api.post(API + f"/connections/{connection.pk}/rules/1/activate/", format="json").json()
    assert (body["number"], body["active"]) == (1, True)
    connection.refresh_from_db()
    assert connection.active_rules.number == 1
    assert alice_api.post(API + f"/connections/{connection.pk}/rules/9/activate/").status_code == 404


@pytest.mark.parametrize(
    "path",
    ["/connections/999/", "/connections/999/rules/", "/connections/999/triggers/"],
)
def test_it_answers_not_found_to_reads_of_a_missing_connection(path, bob_api):
    assert_error(bob_api.get(API + path), 404)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/connections/999/activate/", {}),
        ("/connections/999/deactivate/", {}),
        ("/connections/999/rules/", {"outgoing": "", "incoming": ""}),
        ("/connections/999/triggers/", {"query": "project:BLUE"}),
        ("/connections/999/sync/", {"key": "BLUE-1"}),
        ("/twins/999/stop/", {}),
        ("/twins/999/retry/", {}),
        ("/triggers/999/run/", {}),
    ],
)
def test_it_answers_not_found_to_changes_of_a_missing_object(path, body, alice_api):
    assert_error(alice_api.post(API + path, body, format="json"), 404)


# --- connections -----------------------------------------------------------------------------


def test_it_lists_the_connections_without_their_secrets(connection, pending, bob_api):
    body = bob_api.get(f"{API}/connections/").json()
    assert body["count"] == 2
    red, green = body["results"]
    assert (red["name"], red["status"], red["remote_name"], red["rules_version"]) == ("Red", "active", "Red node", 1)
    assert (green["name"], green["status"]) == ("Green", "pending")
    assert "secret" not in red
    assert "a" * 64 not in json.dumps(body)


def test_it_shows_one_connection(connection, bob_api):
    body = bob_api.get(f"{API}/connections/{connection.pk}/").json()
    assert (body["id"], body["uuid"], body["project"]) == (connection.pk, str(connection.uuid), "BLUE")
    assert "secret" not in body


def test_it_creates_an_invitation(alice_api):
    response = alice_api.post(
        f"{API}/connections/invitations/", {"name": "Green", "project": "BLUE", "hours_valid": 2}, format="json"
    )
    assert response.status_code == 201
    body = response.json()
    parsed = handshake.parse_code(body["code"])
    connection = Connection.objects.get()
    assert parsed.connection_uuid == str(connection.uuid)
    assert (body["connection"]["id"], body["connection"]["status"]) == (connection.pk, "pending")
    assert connection.project == "BLUE"


def test_it_shows_the_default_rules_of_a_new_invitation(alice_api):
    response = alice_api.post(f"{API}/connections/invitations/", {"name": "Green"}, format="json")
    assert response.json()["connection"]["rules_version"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": ["Green"]}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "Green", "hours_valid": "soon"}, "hours_valid"),
        ({"name": "Green", "hours_valid": 0}, "hours_valid"),
        ({"name": "Green", "hours_valid": 24 * 15}, "hours_valid"),
        ({"name": "Green", "expires": 3}, "expires"),
        ({"name": "Green", "project": "x" * 51}, "project"),
    ],
)
def test_it_refuses_a_bad_invitation(body, field, alice_api):
    assert_error(alice_api.post(f"{API}/connections/invitations/", body, format="json"), 400, field)
    assert not Connection.objects.exists()


def test_it_refuses_an_invitation_that_is_not_an_object(alice_api):
    assert_error(alice_api.post(f"{API}/connections/invitations/", ["Green"], format="json"), 400)


def test_it_says_why_it_cannot_invite_without_a_public_url(alice_api, settings):
    settings.NODE_URL = ""
    assert_error(alice_api.post(f"{API}/connections/invitations/", {"name": "Green"}, format="json"), 400, text="URL")


def test_it_accepts_a_code(alice_api):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        response = alice_api.post(
            f"{API}/connections/accept/", {"code": initiator.code, "project": "BLUE"}, format="json"
        )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["name"], body["remote_url"]) == ("active", "Blue", initiator.url)
    assert Connection.objects.get(pk=body["id"]).secret == initiator.secret


@pytest.mark.parametrize(
    ("body", "status", "field", "text"),
    [
        ({}, 400, "code", "required"),
        ({"code": 12345678}, 400, None, "should start with EXL1-"),
        ({"code": "EXL1-abc", "colour": "red"}, 400, "colour", "unknown field"),
        ({"code": "hello"}, 400, None, "should start with EXL1-"),
        ({"code": "EXL1-abc"}, 400, None, "damaged"),
    ],
)
def test_it_refuses_a_bad_code(body, status, field, text, alice_api):
    with mock.patch.object(handshake, "_post") as post:
        assert_error(alice_api.post(f"{API}/connections/accept/", body, format="json"), status, field, text)
    post.assert_not_called()
    assert not Connection.objects.exists()


def test_it_answers_gone_to_an_expired_code(alice_api):
    initiator = RemoteInitiator(expires=timezone.now() - timedelta(minutes=1))
    assert_error(alice_api.post(f"{API}/connections/accept/", {"code": initiator.code}, format="json"), 410)


def test_it_answers_bad_gateway_when_the_initiator_does_not_answer(alice_api):
    down = handshake.HandshakeError("The other node does not answer at http://blue.example:8000.", status=502)
    with mock.patch.object(handshake, "_post", side_effect=down):
        response = alice_api.post(f"{API}/connections/accept/", {"code": RemoteInitiator().code}, format="json")
    assert_error(response, 502, text="does not answer")
    assert not Connection.objects.exists()


def test_it_deactivates_and_activates_a_connection(connection, alice_api):
    response = alice_api.post(f"{API}/connections/{connection.pk}/deactivate/")
    assert (response.status_code, response.json()["status"]) == (200, "deactivated")
    response = alice_api.post(f"{API}/connections/{connection.pk}/activate/")
    assert (response.status_code, response.json()["status"]) == (200, "active")
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE


@pytest.mark.parametrize("action", ["activate", "deactivate"])
def test_it_refuses_to_switch_a_connection_still_waiting_for_its_invitation(action, pending, alice_api):
    assert_error(alice_api.post(f"{API}/connections/{pending.pk}/{action}/"), 409, text="waiting")
    pending.refresh_from_db()
    assert pending.status == Connection.Status.PENDING


# --- rules -----------------------------------------------------------------------------------


def test_it_lists_the_rules_versions_newest_first(connection, alice, bob_api):
    rules.save_rules(connection, "replica.summary = issue.summary\n", "", author=alice, comment="summary only")
    versions = bob_api.get(f"{API}/connections/{connection.pk}/rules/").json()["results"]
    assert [(v["number"], v["active"], v["author"]) for v in versions] == [(2, True, "alice"), (1, False, None)]
    assert versions[0]["comment"] == "summary only"
    assert versions[1]["outgoing"] == rules.DEFAULT_OUTGOING


def test_it_saves_new_rules_as_a_new_active_version(connection, alice_api):
    body = {"outgoing": "replica.summary = issue.summary\n", "incoming": "", "comment": "less"}
    response = alice_api.post(f"{API}/connections/{connection.pk}/rules/", body, format="json")
    assert response.status_code == 201
    assert (response.json()["number"], response.json()["active"], response.json()["author"]) == (2, True, "alice")
    connection.refresh_from_db()
    assert (connection.active_rules.number, connection.active_rules.comment) == (2, "less")


def test_it_keeps_the_active_rules_when_asked_not_to_activate(connection, alice_api):
    body = {"outgoing": "", "incoming": "", "activate": False}
    response = alice_api.post(f"{API}/connections/{connection.pk}/rules/", body, format="json")
    assert (response.status_code, response.json()["active"]) == (201, False)
    connection.refresh_from_db()
    assert connection.active_rules.number == 1


def test_it_refuses_a_script_that_does_not_compile_and_names_the_line(connection, alice_api):
    body = {"outgoing": "replica.summary = issue.summary\nreplica.labels = [\n", "incoming": ""}
    response = alice_api.post(f"{API}/connections/{connection.pk}/rules/", body, format="json")
    error = assert_error(response, 400, "outgoing", "line 2")
    assert error["line"] == 2
    assert connection.rules_versions.count() == 1


def test_it_refuses_a_script_that_tries_to_import(connection, alice_api):
    body = {"outgoing": "", "incoming": "import os\n"}
    response = alice_api.post(f"{API}/connections/{connection.pk}/rules/", body, format="json")
    assert assert_error(response, 400, "incoming")["line"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"incoming": ""}, "outgoing"),
        ({"outgoing": "", "incoming": None}, "incoming"),
        ({"outgoing": ["x = 1"], "incoming": ""}, "outgoing"),
        ({"outgoing": "", "incoming": "", "activate": "maybe"}, "activate"),
        ({"outgoing": "", "incoming": "", "author": "mallory"}, "author"),
        ({"outgoing": "", "incoming": "", "comment": "x" * 301}, "comment"),
    ],
)
def test_it_refuses_bad_rules_input(body, field, connection, alice_api):
    response = alice_api.post(f"{API}/connections/{connection.pk}/rules/", body, format="json")
    assert_error(response, 400, field)
    assert connection.rules_versions.count() == 1


# --- triggers --------------------------------------------------------------------------------


def test_it_adds_and_lists_triggers(connection, alice_api, bob_api):
    url = f"{API}/connections/{connection.pk}/triggers/"
    response = alice_api.post(url, {"query": "project:BLUE label:sync"}, format="json")
    assert response.status_code == 201
    assert (response.json()["query"], response.json()["active"]) == ("project:BLUE label:sync", True)
    listed = bob_api.get(url).json()
    assert [t["query"] for t in listed["results"]] == ["project:BLUE label:sync"]
    assert Trigger.objects.get().connection == connection


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"query": "colour:red"}, "query", "unknown field"),
        ({"query": ""}, "query", ""),
        ({}, "query", "required"),
        ({"query": "project:BLUE", "active": "sometimes"}, "active", ""),
        ({"query": "project:BLUE", "connection": 7}, "connection", "unknown field"),
    ],
)
def test_it_refuses_a_bad_trigger(body, field, text, connection, alice_api):
    response = alice_api.post(f"{API}/connections/{connection.pk}/triggers/", body, format="json")
    assert_error(response, 400, field, text)
    assert not Trigger.objects.exists()


def test_it_runs_a_trigger_on_every_match(connection, project, bob, alice_api):
    for summary in ("One", "Two"):
        actions.create_issue(project, {"summary": summary}, actor=bob)
    trigger = Trigger.objects.create(connection=connection, query="project:BLUE")
    response = alice_api.post(f"{API}/triggers/{trigger.pk}/run/")
    assert (response.status_code, response.json()) == (202, {"queued": 2})
    assert set(Twin.objects.values_list("local_key", flat=True)) == {"BLUE-1", "BLUE-2"}


# --- syncing one entity ----------------------------------------------------------------------


def test_it_syncs_an_entity_now(connection, issue, alice_api):
    response = alice_api.post(f"{API}/connections/{connection.pk}/sync/", {"key": issue.key}, format="json")
    assert response.status_code == 202
    body = response.json()
    assert (body["queued"], body["status"], body["error"]) == (True, "pending", None)
    event = SyncEvent.objects.get(pk=body["event"])
    assert (event.direction, event.kind, event.twin.local_key) == ("outgoing", "update", issue.key)
    assert event.payload["replica"]["summary"] == "Login page is blank"


def test_it_answers_not_found_for_an_entity_that_does_not_exist(connection, project, alice_api):
    response = alice_api.post(f"{API}/connections/{connection.pk}/sync/", {"key": "BLUE-99"}, format="json")
    assert_error(response, 404, text="BLUE-99")
    assert not Twin.objects.exists()


def test_it_refuses_to_sync_on_a_connection_still_pending(pending, issue, alice_api):
    response = alice_api.post(f"{API}/connections/{pending.pk}/sync/", {"key": issue.key}, format="json")
    assert_error(response, 409, text="not active")


def test_it_reports_an_outgoing_script_error_with_its_line(connection, issue, alice_api):
    rules.save_rules(connection, "replica.summary = issue.summary\nreplica.x = 1 / 0\n", "")
    response = alice_api.post(f"{API}/connections/{connection.pk}/sync/", {"key": issue.key}, format="json")
    body = response.json()
    assert (response.status_code, body["queued"], body["status"]) == (202, False, "failed")
    assert "line 2" in body["error"]
    assert Twin.objects.get().state == Twin.State.BLOCKED


@pytest.mark.parametrize(("body", "field"), [({}, "key"), ({"key": ["BLUE-1"]}, "key"), ({"key": "B", "x": 1}, "x")])
def test_it_refuses_a_bad_sync_request(body, field, connection, alice_api):
    assert_error(alice_api.post(f"{API}/connections/{connection.pk}/sync/", body, format="json"), 400, field)


# --- twins and the queue ---------------------------------------------------------------------


def test_it_lists_twins_with_their_errors(blocked_twin, bob_api):
    Twin.objects.create(connection=blocked_twin.connection, local_key="BLUE-2", remote_key="RED-2")
    results = bob_api.get(f"{API}/twins/", {"state": "blocked"}).json()["results"]
    assert [(t["local_key"], t["remote_key"], t["last_error"]) for t in results] == [("BLUE-1", "RED-1", "boom")]
    results = bob_api.get(f"{API}/twins/", {"local_key": "blue-2"}).json()["results"]
    assert [t["local_key"] for t in results] == ["BLUE-2"]
    results = bob_api.get(f"{API}/twins/", {"connection": blocked_twin.connection_id}).json()["results"]
    assert len(results) == 2


@pytest.mark.parametrize(("params", "field"), [({"state": "sad"}, "state"), ({"connection": "Red"}, "connection")])
def test_it_refuses_a_bad_twin_filter(params, field, bob_api):
    assert_error(bob_api.get(f"{API}/twins/", params), 400, field)


def test_it_counts_the_queue_per_connection(blocked_twin, pending, bob_api):
    connections = {c["name"]: c for c in bob_api.get(f"{API}/queue/stats/").json()["connections"]}
    assert connections["Red"]["incoming"] == {"failed": 1}
    assert connections["Red"]["blocked_twins"] == 1
    assert (connections["Green"]["outgoing"], connections["Green"]["blocked_twins"]) == ({}, 0)


def test_it_resolves_and_retries_a_blocked_twin(blocked_twin, alice_api):
    response = alice_api.post(f"{API}/twins/{blocked_twin.pk}/retry/")
    assert (response.status_code, response.json()) == (200, {"state": "ok", "retried": 1})
    blocked_twin.refresh_from_db()
    assert (blocked_twin.state, blocked_twin.blocked_reason) == (Twin.State.OK, "")
    assert blocked_twin.events.get().status == SyncEvent.Status.PENDING


def test_it_stops_a_twin_and_tells_the_remote(blocked_twin, alice_api):
    response = alice_api.post(f"{API}/twins/{blocked_twin.pk}/stop/")
    assert (response.status_code, response.json()) == (200, {"state": "stopped"})
    blocked_twin.refresh_from_db()
    assert blocked_twin.state == Twin.State.STOPPED
    stop = blocked_twin.events.get(direction=SyncEvent.Direction.OUTGOING)
    assert (stop.kind, stop.status) == (SyncEvent.Kind.STOP, SyncEvent.Status.PENDING)


def test_it_restarts_a_stopped_twin_when_synced_by_hand(connection, issue, alice_api):
    flow.sync_entity(connection, issue.key)
    flow.stop_twin(Twin.objects.get())
    response = alice_api.post(f"{API}/connections/{connection.pk}/sync/", {"key": issue.key}, format="json")
    assert response.json()["queued"] is True
    assert Twin.objects.get().state == Twin.State.OK


def test_it_shows_a_twin_with_its_replicas_and_events(bob_api, db):
    from connections.models import Connection
    from syncqueue.models import SyncEvent, Twin

    connection = Connection.objects.create(name="Red", status="active", secret="a" * 64)
    twin = Twin.objects.create(
        connection=connection,
        local_key="BLUE-1",
        remote_key="RED-1",
        state="blocked",
        blocked_reason="incoming rules, line 3: ZeroDivisionError: division by zero",
        last_received={"key": "RED-1", "summary": "boom"},
    )
    SyncEvent.objects.create(
        connection=connection,
        twin=twin,
        direction="incoming",
        seq=1,
        status="failed",
        error=twin.blocked_reason,
        error_line=3,
        payload={"replica": twin.last_received},
    )
    body = bob_api.get(f"/api/v1/twins/{twin.pk}/").json()
    assert body["last_received"] == {"key": "RED-1", "summary": "boom"}
    assert body["events"][0]["error_line"] == 3
    assert body["last_error"].startswith("incoming rules, line 3")


def test_it_invites_with_a_chosen_rules_template_and_refuses_an_unknown_one(alice_api):
    body = alice_api.post(
        f"{API}/connections/invitations/", {"name": "Green", "rules_template": "fields"}, format="json"
    ).json()
    connection = Connection.objects.get(pk=body["connection"]["id"])
    assert "merge_comments" not in connection.active_rules.incoming
    refused = alice_api.post(f"{API}/connections/invitations/", {"name": "G", "rules_template": "x"}, format="json")
    assert_error(refused, 400, "rules_template")


# --- settings --------------------------------------------------------------------------------


def test_admins_set_the_conflict_policy(connection, alice_api, bob_api):
    url = f"{API}/connections/{connection.pk}/"
    assert bob_api.get(url).json()["conflict_policy"] == "newest"
    assert_error(bob_api.patch(url, {"conflict_policy": "local"}, format="json"), 403, text="only administrators")
    answer = alice_api.patch(url, {"conflict_policy": "remote"}, format="json")
    assert answer.status_code == 200 and answer.json()["conflict_policy"] == "remote"
    connection.refresh_from_db()
    assert connection.conflict_policy == "remote"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"conflict_policy": "loudest"}, "conflict_policy"), ({"secret": "x"}, "secret"), ({"name": ""}, "name")],
)
def test_it_refuses_bad_connection_settings(body, field, connection, alice_api):
    assert_error(alice_api.patch(f"{API}/connections/{connection.pk}/", body, format="json"), 400, field=field)
    connection.refresh_from_db()
    assert (connection.conflict_policy, connection.name, connection.secret) == ("newest", "Red", "a" * 64)
