"""The connection setup pages and the home page: what an admin sees and does in the browser.

alice (admin) may change, bob (staff) may look, charlie (no rights) and anonymous may not.
No live node: the other side of a pairing is simulated at ``handshake._post``.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from unittest import mock

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from connections import handshake, rules
from connections.models import Connection, Node, Trigger
from syncqueue import flow
from syncqueue.models import SyncEvent, Twin
from tests.test_handshake import Acceptor, RemoteInitiator
from trackers.builtin import actions

pytestmark = pytest.mark.django_db


def _url(name: str, *args) -> str:
    return reverse(f"connections:{name}", args=args)


def _messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.fixture
def connection(db, project):
    connection = Connection.objects.create(
        name="Red",
        status=Connection.Status.ACTIVE,
        secret="a" * 64,
        remote_name="Red node",
        remote_url="http://red.example:8000",
        project=project.key,
    )
    rules.install_defaults(connection)
    connection.refresh_from_db()
    return connection


@pytest.fixture
def pending(db, project):
    connection, _, _ = handshake.create_invitation("Green", project=project.key)
    return connection


# --- who may see what ----------------------------------------------------------------------


PAGES = [
    ("list", False),
    ("detail", True),
    ("status", True),
    ("new", False),
    ("accept", False),
    ("invitation", True),
]
ADMIN_ONLY = {"new", "accept", "invitation"}


@pytest.mark.parametrize(("name", "needs_pk"), PAGES)
def test_it_shows_each_page_only_to_whom_it_is_for(name, needs_pk, pending, alice, bob, charlie):
    url = _url(name, pending.pk) if needs_pk else _url(name)
    assert _client(alice).get(url).status_code == 200
    assert _client(bob).get(url).status_code == (403 if name in ADMIN_ONLY else 200)
    refused = _client(charlie).get(url)
    assert refused.status_code == 403
    assert "You do not have permission" in refused.content.decode()
    anonymous = _client().get(url)
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("login"))


def test_it_shows_the_home_page_to_every_signed_in_user(connection, alice, bob, charlie):
    for user in (alice, bob, charlie):
        response = _client(user).get(reverse("home"))
        assert response.status_code == 200
        assert response.context["node"].name in response.content.decode()
    assert _client().get(reverse("home"))["Location"].startswith(reverse("login"))


def test_it_keeps_connections_off_the_home_page_of_a_user_without_rights(connection, as_charlie):
    response = as_charlie.get(reverse("home"))
    page = response.content.decode()
    assert response.context["connections"] is None
    assert "Red node" not in page
    assert 'href="/sync/queue/"' not in page


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("new", {"name": "Green", "project": "BLUE", "hours_valid": "24"}),
        ("accept", {"code": "EXL1-abc", "project": "BLUE"}),
        ("activate", {}),
        ("deactivate", {}),
        ("trigger-add", {"query": "project:BLUE"}),
    ],
)
def test_it_lets_only_admins_change(name, data, connection, bob, charlie):
    url = _url(name) if name in ("new", "accept") else _url(name, connection.pk)
    with mock.patch.object(handshake, "_post") as post:
        assert _client(bob).post(url, data).status_code == 403
        assert _client(charlie).post(url, data).status_code == 403
        assert _client().post(url, data).status_code == 302
    post.assert_not_called()
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE
    assert Connection.objects.count() == 1
    assert not Trigger.objects.exists()


def test_it_lets_only_admins_sync_all_matches(connection, bob, charlie):
    trigger = Trigger.objects.create(connection=connection, query="project:BLUE")
    with mock.patch("syncqueue.triggers.sync_all_matches") as sync:
        assert _client(bob).post(_url("trigger-run", trigger.pk)).status_code == 403
        assert _client(charlie).post(_url("trigger-run", trigger.pk)).status_code == 403
    sync.assert_not_called()


def test_it_hides_the_buttons_from_staff_who_may_not_press_them(connection, as_alice, as_bob):
    Trigger.objects.create(connection=connection, query="project:BLUE")
    buttons = (
        ">Deactivate</button>",
        ">Add trigger</button>",
        ">Sync all matches now</button>",
        ">New connection</a>",
        ">Accept a code</a>",
    )
    pages = (_url("detail", connection.pk), _url("list"))
    admin_page = "".join(as_alice.get(url).content.decode() for url in pages)
    staff_page = "".join(as_bob.get(url).content.decode() for url in pages)
    assert all(button in admin_page for button in buttons)
    assert not any(button in staff_page for button in buttons)
    assert "project:BLUE" in staff_page


@pytest.mark.parametrize("name", ["activate", "deactivate", "trigger-add", "trigger-run"])
def test_it_changes_nothing_on_a_get(name, connection, as_alice):
    trigger = Trigger.objects.create(connection=connection, query="project:BLUE")
    pk = trigger.pk if name == "trigger-run" else connection.pk
    assert as_alice.get(_url(name, pk)).status_code == 405
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE


def test_it_refuses_a_change_without_the_csrf_token(connection, alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(_url("deactivate", connection.pk)).status_code == 403
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE


@pytest.mark.parametrize(
    ("method", "name"),
    [
        ("get", "detail"),
        ("get", "status"),
        ("get", "invitation"),
        ("post", "activate"),
        ("post", "deactivate"),
        ("post", "trigger-add"),
        ("post", "trigger-run"),
    ],
)
def test_it_answers_not_found_to_an_unknown_connection(method, name, as_alice):
    response = getattr(as_alice, method)(_url(name, 999))
    assert response.status_code == 404
    assert "Not found" in response.content.decode()


def test_it_has_no_invitation_page_for_a_connection_made_by_accepting(connection, as_alice):
    connection.is_initiator = False
    connection.save(update_fields=["is_initiator"])
    assert as_alice.get(_url("invitation", connection.pk)).status_code == 404


# --- inviting ------------------------------------------------------------------------------


def test_it_makes_an_invitation_and_shows_its_code_once(project, alice, as_alice):
    response = as_alice.post(_url("new"), {"name": "Green", "project": "BLUE", "hours_valid": "48"})
    connection = Connection.objects.get()
    assert response.status_code == 302
    assert response["Location"] == _url("invitation", connection.pk)
    assert (connection.name, connection.project, connection.status) == ("Green", "BLUE", Connection.Status.PENDING)

    page = as_alice.get(response["Location"])
    code = page.context["code"]
    html = page.content.decode()
    assert handshake.parse_code(code).connection_uuid == str(connection.uuid)
    assert f'readonly aria-labelledby="code-heading">{code}</textarea>' in html
    assert 'id="copy-code"' in html
    assert "navigator.clipboard" in html and "execCommand" in html
    assert _url("status", connection.pk) in html
    assert "Accept a code" in html
    expires = connection.invitations.get().expires
    assert expires - timezone.now() > timedelta(hours=47)
    assert expires.strftime("%Y-%m-%d") in html
    assert "not reachable" not in html

    # Another session, even alice's own, never sees the code.
    elsewhere = _client(alice).get(_url("invitation", connection.pk))
    assert elsewhere.context["code"] == ""
    assert code not in elsewhere.content.decode()
    assert "shown only once" in elsewhere.content.decode()


def test_it_warns_that_this_node_must_be_reachable(project, settings, as_alice):
    settings.NODE_URL = "http://blue.internal:8000"
    response = as_alice.post(
        _url("new"), {"name": "Green", "project": "BLUE", "hours_valid": "24", "not_reachable": "on"}, follow=True
    )
    html = response.content.decode()
    assert "You said this node is not reachable" in html
    assert "http://blue.internal:8000" in html
    assert response.context["code"]


@pytest.mark.parametrize(
    ("data", "field", "text"),
    [
        ({"project": "BLUE", "hours_valid": "24"}, "name", "This field is required."),
        ({"name": "Green", "hours_valid": "24"}, "project", "This field is required."),
        ({"name": "Green", "project": "NOPE", "hours_valid": "24"}, "project", "Select a valid choice."),
        ({"name": "Green", "project": "BLUE", "hours_valid": "0"}, "hours_valid", "greater than or equal to 1"),
        ({"name": "Green", "project": "BLUE", "hours_valid": "9999"}, "hours_valid", "less than or equal to 336"),
    ],
)
def test_it_shows_bad_invitation_input_on_the_form(data, field, text, project, as_alice):
    response = as_alice.post(_url("new"), data)
    assert response.status_code == 200
    assert text in " ".join(response.context["form"].errors[field])
    assert not Connection.objects.exists()


def test_it_says_why_it_cannot_invite_without_a_public_url(project, settings, as_alice):
    settings.NODE_URL = ""
    response = as_alice.post(_url("new"), {"name": "Green", "project": "BLUE", "hours_valid": "24"})
    assert response.status_code == 200
    assert "no public URL" in " ".join(response.context["form"].non_field_errors())
    assert not Connection.objects.exists()


def test_it_asks_for_a_project_before_a_connection(as_alice):
    for name in ("new", "accept"):
        html = as_alice.get(_url(name)).content.decode()
        assert "There are no projects yet" in html
        assert '<form method="post" class="stacked' not in html


def test_it_tells_the_waiting_page_when_the_other_side_accepts(project, as_alice, as_bob):
    response = as_alice.post(_url("new"), {"name": "Green", "project": "BLUE", "hours_valid": "24"})
    connection = Connection.objects.get()
    code = as_alice.get(response["Location"]).context["code"]
    assert as_bob.get(_url("status", connection.pk)).json()["status"] == "pending"

    handshake.answer_acceptance(Acceptor(code).payload())

    status = as_bob.get(_url("status", connection.pk))
    assert status["Content-Type"] == "application/json"
    assert "no-cache" in status["Cache-Control"]
    assert status.json() == {
        "status": "active",
        "status_display": "Active",
        "status_detail": "",
        "remote_name": "Red",
        "detail_url": _url("detail", connection.pk),
    }
    page = as_alice.get(_url("invitation", connection.pk))
    assert page.context["code"] == ""
    assert code not in page.content.decode()
    assert "Connected to Red." in page.content.decode()
    assert f"connections.invitation.{connection.pk}" not in as_alice.session


# --- accepting -----------------------------------------------------------------------------


def test_it_accepts_a_code(project, as_alice):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        response = as_alice.post(_url("accept"), {"code": initiator.code, "project": "BLUE"}, follow=True)
    connection = Connection.objects.get()
    assert response.redirect_chain == [(_url("detail", connection.pk), 302)]
    assert (connection.status, connection.name, connection.project) == ("active", "Blue", "BLUE")
    assert connection.secret == initiator.secret
    assert "Connected to Blue. The connection is active." in _messages(response)


def _already_used(project, as_alice) -> str:
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        as_alice.post(_url("accept"), {"code": initiator.code, "project": "BLUE"})
    return initiator.code


def _does_not_answer(*args, **kwargs):
    raise handshake.HandshakeError(
        "The other node does not answer at http://blue.example:8000/api/v1/node/handshake/ (ConnectionError).", 502
    )


@pytest.mark.parametrize(
    ("make_code", "answer", "field", "text"),
    [
        (
            lambda project, client: RemoteInitiator(expires=timezone.now() - timedelta(minutes=1)).code,
            None,
            "code",
            "The invitation code has expired; ask the other side for a new one.",
        ),
        (lambda project, client: RemoteInitiator().code, _does_not_answer, None, "The other node does not answer"),
        (_already_used, None, "code", "This code has already been used here."),
        (lambda project, client: "EXL1-abc", None, "code", "The invitation code is damaged; copy it again, whole."),
        (lambda project, client: "hello", None, "code", "This is not an invitation code: it should start with EXL1-."),
    ],
    ids=["expired", "not-answering", "already-used", "damaged", "not-a-code"],
)
def test_it_says_in_plain_words_why_a_code_was_not_accepted(make_code, answer, field, text, project, as_alice):
    code = make_code(project, as_alice)
    before = Connection.objects.count()
    with mock.patch.object(handshake, "_post", side_effect=answer) as post:
        response = as_alice.post(_url("accept"), {"code": code, "project": "BLUE"})
    assert response.status_code == 200
    errors = response.context["form"].errors.get(field or "__all__", [])
    assert any(text in error for error in errors), response.context["form"].errors
    assert text.split(";")[0] in response.content.decode().replace("&#x27;", "'")
    assert Connection.objects.count() == before
    assert post.called == (answer is not None)


def test_it_asks_for_a_code_and_a_project(project, as_alice):
    with mock.patch.object(handshake, "_post") as post:
        response = as_alice.post(_url("accept"), {"code": "", "project": ""})
    assert set(response.context["form"].errors) == {"code", "project"}
    post.assert_not_called()


# --- a connection's page -------------------------------------------------------------------


def test_it_shows_a_connection(connection, as_bob):
    response = as_bob.get(_url("detail", connection.pk))
    html = response.content.decode()
    assert "Red node" in html and "http://red.example:8000" in html
    assert "Version 1" in html
    assert f"/admin/connections/rulesversion/?connection__id__exact={connection.pk}" in html
    assert connection.secret not in html


def test_it_deactivates_and_activates_a_connection(connection, as_alice):
    response = as_alice.post(_url("deactivate", connection.pk), follow=True)
    connection.refresh_from_db()
    assert connection.status == Connection.Status.DEACTIVATED
    assert response.redirect_chain == [(_url("detail", connection.pk), 302)]
    assert "Red is deactivated; changes are kept until it is active again." in _messages(response)
    assert "Activate</button>" in response.content.decode()

    response = as_alice.post(_url("activate", connection.pk), follow=True)
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE
    assert "Red is active: changes flow both ways again." in _messages(response)


def test_it_explains_why_a_pending_connection_cannot_be_activated(pending, as_alice):
    response = as_alice.post(_url("activate", pending.pk), follow=True)
    pending.refresh_from_db()
    assert pending.status == Connection.Status.PENDING
    assert any("waiting for the other side" in message for message in _messages(response))


def test_it_adds_a_trigger(connection, as_alice):
    response = as_alice.post(_url("trigger-add", connection.pk), {"query": "project:BLUE label:sync"}, follow=True)
    trigger = Trigger.objects.get()
    assert (trigger.connection, trigger.query, trigger.active) == (connection, "project:BLUE label:sync", True)
    assert "<code>project:BLUE label:sync</code>" in response.content.decode()


@pytest.mark.parametrize(
    ("query", "text"),
    [("", "This field is required."), ('summary:"open', "unbalanced double quote"), ("x" * 1001, "at most 1000")],
)
def test_it_refuses_a_trigger_the_tracker_cannot_read(query, text, connection, as_alice):
    response = as_alice.post(_url("trigger-add", connection.pk), {"query": query})
    assert response.status_code == 200
    assert text in " ".join(response.context["trigger_form"].errors["query"])
    assert response.context["connection"] == connection
    assert not Trigger.objects.exists()


def test_it_syncs_all_matches_of_a_trigger(connection, project, alice, as_alice):
    actions.create_issue(project, {"summary": "One"}, actor=alice)
    actions.create_issue(project, {"summary": "Two"}, actor=alice)
    trigger = Trigger.objects.create(connection=connection, query="project:BLUE")
    response = as_alice.post(_url("trigger-run", trigger.pk), follow=True)
    assert "2 issues queued for Red." in _messages(response)
    assert set(Twin.objects.values_list("local_key", flat=True)) == {"BLUE-1", "BLUE-2"}
    trigger.refresh_from_db()
    assert trigger.last_run is not None


def test_it_says_why_the_matches_of_a_pending_connection_cannot_sync(pending, project, alice, as_alice):
    actions.create_issue(project, {"summary": "One"}, actor=alice)
    trigger = Trigger.objects.create(connection=pending, query="project:BLUE")
    response = as_alice.post(_url("trigger-run", trigger.pk), follow=True)
    assert response.status_code == 200
    assert any("the connection is not active yet" in message for message in _messages(response))
    assert not Twin.objects.exists()


# --- home page -----------------------------------------------------------------------------


def test_it_invites_an_admin_to_connect_when_there_is_no_connection(as_alice, as_bob, settings):
    html = as_alice.get(reverse("home")).content.decode()
    assert "Connect to another node" in html
    assert _url("new") in html
    assert settings.NODE_URL in html
    staff_html = as_bob.get(reverse("home")).content.decode()
    assert "An administrator can connect it to another node." in staff_html
    assert _url("new") not in staff_html


def test_it_links_every_part_of_the_node_from_the_home_page(connection, as_alice):
    html = as_alice.get(reverse("home")).content.decode()
    for link in (reverse("builtin:issue-list"), _url("list"), "/sync/queue/", reverse("admin:index")):
        assert f'href="{link}"' in html


def _events(connection: Connection, twin: Twin, count: int, status: str) -> None:
    SyncEvent.objects.bulk_create(
        SyncEvent(
            connection=connection,
            twin=twin,
            direction=SyncEvent.Direction.OUTGOING,
            seq=n,
            message_id=uuid.uuid4(),
            status=status,
        )
        for n in range(count)
    )


def test_it_sums_up_the_queue_of_each_connection_in_a_few_queries(
    connection, project, as_alice, django_assert_max_num_queries
):
    other = Connection.objects.create(
        name="Yellow", status=Connection.Status.ERROR, status_detail="The other node does not answer."
    )
    synced = timezone.now() - timedelta(minutes=5)
    twins = Twin.objects.bulk_create(
        [
            Twin(connection=connection, local_key="BLUE-1", last_synced=synced - timedelta(hours=1)),
            Twin(connection=connection, local_key="BLUE-2", last_synced=synced),
            Twin(connection=connection, local_key="BLUE-3", state=Twin.State.BLOCKED, blocked_reason="boom"),
            Twin(connection=other, local_key="BLUE-1", state=Twin.State.BLOCKED, blocked_reason="boom"),
        ]
    )
    _events(connection, twins[0], 1500, SyncEvent.Status.DONE)
    _events(connection, twins[1], 700, SyncEvent.Status.PENDING)
    _events(connection, twins[1], 300, SyncEvent.Status.SENT)
    _events(connection, twins[2], 40, SyncEvent.Status.FAILED)
    _events(other, twins[3], 3, SyncEvent.Status.FAILED)
    Node.local()  # made once, on a node's first request; not what this test counts

    # Session, user, node, two aggregates, the connections: however many events there are.
    with django_assert_max_num_queries(7):
        response = as_alice.get(reverse("home"))

    rows = {c.name: c.health for c in response.context["connections"]}
    assert rows["Red"] == {"pending": 1000, "failing": 40, "blocked": 1, "last_synced": synced}
    assert rows["Yellow"] == {"pending": 0, "failing": 3, "blocked": 1, "last_synced": None}
    html = response.content.decode()
    assert "The other node does not answer." in html
    assert "v1" in html


def test_it_shows_a_connection_without_queue_activity_as_quiet(connection, as_bob):
    response = as_bob.get(reverse("home"))
    assert [c.health for c in response.context["connections"]] == [
        {"pending": 0, "failing": 0, "blocked": 0, "last_synced": None}
    ]
    assert "Not yet" in response.content.decode()


def test_it_starts_a_connection_from_the_chosen_rules_template(client, alice, project):
    client.force_login(alice)
    response = client.post(
        "/connections/new/", {"name": "Red", "project": "BLUE", "hours_valid": 24, "rules_template": "fields"}
    )
    assert response.status_code == 302
    connection = Connection.objects.get()
    assert "merge_comments" not in connection.active_rules.incoming
    assert "comments_to_send" not in connection.active_rules.outgoing
    assert "replica.summary = issue.summary" in connection.active_rules.outgoing
    assert connection.active_rules.comment.startswith("Template: Fields only")


def test_it_refuses_an_unknown_rules_template(client, alice, project):
    client.force_login(alice)
    response = client.post(
        "/connections/new/", {"name": "Red", "project": "BLUE", "hours_valid": 24, "rules_template": "nope"}
    )
    assert response.status_code == 200
    assert "rules_template" in response.context["form"].errors
    assert not Connection.objects.exists()


def test_a_node_serving_redmine_names_its_project_instead_of_choosing_a_built_in_one(alice, as_alice):
    Node.local()
    Node.objects.update(tracker_kind="redmine", tracker_settings='{"project": "synctest"}')
    page = as_alice.get(_url("new"))
    assert 'name="project" value="synctest"' in page.content.decode(), "no built-in project is needed"
    response = as_alice.post(_url("new"), {"name": "Green", "project": "synctest", "hours_valid": "48"})
    assert response.status_code == 302
    assert Connection.objects.get().project == "synctest"


def test_issue_links_on_a_node_serving_another_tracker_lead_to_that_tracker(alice, as_alice, client):
    Node.local()
    Node.objects.update(tracker_kind="redmine", tracker_settings='{"project": "synctest"}')
    redmine = mock.Mock(web_url=lambda key: f"https://redmine.example/issues/{key}")
    with mock.patch.object(flow, "local_tracker", return_value=redmine):
        response = as_alice.get("/issues/42/")
    assert (response.status_code, response["Location"]) == (302, "https://redmine.example/issues/42")
    assert client.get("/issues/42/").status_code == 302
    assert "login" in client.get("/issues/42/")["Location"], "only for people who are logged in"
