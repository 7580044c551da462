"""The sync panel on an issue page: each twin's state and latest events, and its buttons."""

from __future__ import annotations

import pytest
from django.db import connection as db
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from connections.models import Connection
from syncqueue import tasks, views
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import blue_issue, connect_red

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_kick(monkeypatch):
    monkeypatch.setattr(tasks, "kick", lambda: None)


@pytest.fixture
def issue(project, alice):
    return blue_issue(alice)


@pytest.fixture
def red(project):
    return connect_red()


def page_of(issue) -> str:
    return reverse("builtin:issue-detail", args=[issue.key])


def panel(user, key: str) -> str:
    request = RequestFactory().get(f"/issues/{key}/")
    request.user = user
    return views.issue_panel(request, key)


def make_events(twin: Twin, count: int, **fields) -> list[SyncEvent]:
    fields.setdefault("direction", "outgoing")
    return SyncEvent.objects.bulk_create(
        SyncEvent(connection_id=twin.connection_id, twin=twin, seq=number, **fields) for number in range(1, count + 1)
    )


def test_it_shows_no_panel_to_people_who_are_not_staff(client, charlie, issue, red):
    Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1")
    client.force_login(charlie)
    content = client.get(page_of(issue)).content.decode()
    assert 'id="sync-heading"' not in content
    assert panel(charlie, issue.key) == ""


def test_it_says_when_there_is_no_connection(as_bob, issue):
    content = as_bob.get(page_of(issue)).content.decode()
    assert "No connection yet." in content


def test_it_offers_the_connections_an_issue_is_not_synced_with(as_bob, issue, red):
    content = as_bob.get(page_of(issue)).content.decode()
    assert f'<option value="{red.pk}">Red</option>' in content
    assert reverse("sync:sync-now", args=[issue.key]) in content


def test_it_shows_each_twin_with_its_links_state_and_latest_five_events(as_bob, issue, red):
    twin = Twin.objects.create(
        connection=red, local_key=issue.key, remote_key="RED-9", state="blocked", blocked_reason="outgoing rules: boom"
    )
    events = make_events(twin, 8, status="done")
    SyncEvent.objects.filter(pk=events[-1].pk).update(status="failed", error="the remote node refused it")
    content = as_bob.get(page_of(issue)).content.decode()
    assert 'href="http://red.example/issues/RED-9/"' in content
    assert "Blocked" in content and "outgoing rules: boom" in content
    assert reverse("sync:twin", args=[twin.pk]) in content
    shown = [e.pk for e in events if reverse("sync:event", args=[e.pk]) in content]
    assert shown == [e.pk for e in events[-5:]]
    assert "the remote node refused it" in content
    assert reverse("sync:sync-now", args=[issue.key]) in content
    for name in ("twin-retry", "twin-stop"):
        assert reverse(f"sync:{name}", args=[twin.pk]) in content
    assert f'<option value="{red.pk}">' not in content


def test_it_uses_two_queries_however_many_twins_and_events(bob, issue, red):
    for number in range(4):
        other = Connection.objects.create(name=f"Other {number}", status=Connection.Status.ACTIVE)
        make_events(Twin.objects.create(connection=other, local_key=issue.key), 30)
        make_events(Twin.objects.create(connection=other, local_key="BLUE-99"), 3)
    make_events(Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1"), 30)
    Twin.objects.create(connection=red, local_key="BLUE-98", remote_key="RED-98")
    Connection.objects.create(name="Not yet", status=Connection.Status.PENDING)
    with CaptureQueriesContext(db) as queries:
        html = panel(bob, issue.key)
    assert len(queries) == 2
    assert html.count('class="sync-twin ') == 5
    assert html.count('<li><a href="/sync/events/') == 25
    assert "RED-98" not in html and "Not yet" not in html


def test_it_offers_an_active_connection_next_to_the_twins_of_others(bob, issue, red):
    green = Connection.objects.create(name="Green", status=Connection.Status.ACTIVE)
    Twin.objects.create(connection=green, local_key="BLUE-99")
    Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1")
    html = panel(bob, issue.key)
    assert html.count('class="sync-twin ') == 1
    assert f'<option value="{green.pk}">Green</option>' in html


def test_it_keeps_the_issue_page_bounded_with_twins(as_bob, issue, red, django_assert_max_num_queries):
    twin = Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1")
    make_events(twin, 3000)
    with django_assert_max_num_queries(8):
        response = as_bob.get(page_of(issue))
    assert response.status_code == 200


def test_its_sync_now_button_queues_the_issue_and_comes_back(as_bob, issue, red):
    response = as_bob.post(reverse("sync:sync-now", args=[issue.key]), {"connection": red.pk, "next": page_of(issue)})
    assert response["Location"] == page_of(issue)
    twin = Twin.objects.get(connection=red, local_key=issue.key)
    assert twin.events.get().kind == "update"


def test_its_sync_now_button_goes_to_the_issue_page_by_default(as_bob, issue, red):
    response = as_bob.post(reverse("sync:sync-now", args=[issue.key]), {"connection": red.pk})
    assert response["Location"] == page_of(issue)


def test_its_stop_button_stops_the_twin(as_bob, issue, red):
    twin = Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1")
    response = as_bob.post(reverse("sync:twin-stop", args=[twin.pk]))
    assert response["Location"] == page_of(issue)
    twin.refresh_from_db()
    assert twin.state == "stopped"
    assert twin.events.get().kind == "stop"


def test_its_resolve_and_retry_button_unblocks_the_twin(as_bob, issue, red):
    twin = Twin.objects.create(connection=red, local_key=issue.key, remote_key="RED-1", state="blocked")
    [failed] = make_events(twin, 1, status="failed", direction="incoming")
    response = as_bob.post(reverse("sync:twin-retry", args=[twin.pk]), follow=True)
    assert response.redirect_chain[-1][0] == page_of(issue)
    twin.refresh_from_db()
    failed.refresh_from_db()
    assert (twin.state, failed.status) == ("ok", "pending")


def test_its_retry_goes_to_the_twin_page_when_there_is_no_local_issue_yet(as_bob, red):
    twin = Twin.objects.create(connection=red, remote_key="RED-1", state="blocked")
    response = as_bob.post(reverse("sync:twin-retry", args=[twin.pk]))
    assert response["Location"] == reverse("sync:twin", args=[twin.pk])
