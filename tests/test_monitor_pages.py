"""The sync monitor pages: the queue, an event, a twin, and the queue actions (retry, discard)."""

from __future__ import annotations

import re
from datetime import timedelta
from unittest import mock

import pytest
from django.urls import reverse
from django.utils import timezone

from connections.models import Connection
from syncqueue import flow, health, monitor, tasks
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import Red, blue_issue, connect_red, tracker, use_rules, work
from trackers.base import TrackerUnavailable
from trackers.builtin import actions
from trackers.builtin.models import Issue

pytestmark = pytest.mark.django_db

MONITOR = reverse("sync:monitor")
BULK = reverse("sync:events-bulk")
BOOM_RULES = """\
if first_sync:
    issue.project = connection.project
issue.summary = replica.summary
if replica.summary == "boom":
    issue.description = str(1 / 0)
"""


@pytest.fixture(autouse=True)
def no_kick(monkeypatch):
    monkeypatch.setattr(tasks, "kick", lambda: None)


@pytest.fixture
def red(project):
    return Red(connect_red())


@pytest.fixture
def twin(red):
    return Twin.objects.create(connection=red.connection, local_key="BLUE-1", remote_key="RED-1")


def make_events(twin: Twin, count: int, **fields) -> list[SyncEvent]:
    """``count`` events of ``twin`` in one INSERT, numbered 1.. in order."""
    fields.setdefault("direction", "incoming")
    return SyncEvent.objects.bulk_create(
        SyncEvent(connection_id=twin.connection_id, twin=twin, seq=number, **fields) for number in range(1, count + 1)
    )


def blocked_by_boom(red: Red) -> Twin:
    """RED-1's first update fails on Blue's rules; its second waits behind it."""
    use_rules(red.connection, incoming=BOOM_RULES)
    red.send(red.update(summary="boom"), red.update(summary="Second"))
    work()
    twin = red.twin()
    assert twin.state == "blocked"
    return twin


def _messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# --- who may see and act ----------------------------------------------------------------------


def _urls(twin: Twin, event: SyncEvent) -> list[tuple[str, str]]:
    return [
        ("get", MONITOR),
        ("get", reverse("sync:event", args=[event.pk])),
        ("get", reverse("sync:twin", args=[twin.pk])),
        ("post", reverse("sync:event-retry", args=[event.pk])),
        ("post", reverse("sync:event-discard", args=[event.pk])),
        ("post", BULK),
        ("post", reverse("sync:twin-retry", args=[twin.pk])),
        ("post", reverse("sync:twin-stop", args=[twin.pk])),
        ("post", reverse("sync:sync-now", args=["BLUE-1"])),
    ]


def test_it_sends_anonymous_people_to_the_login_page(client, twin):
    [event] = make_events(twin, 1, status="failed")
    for method, url in _urls(twin, event):
        response = getattr(client, method)(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url


def test_it_refuses_people_who_are_not_staff(client, charlie, twin):
    [event] = make_events(twin, 1, status="failed")
    client.force_login(charlie)
    for method, url in _urls(twin, event):
        assert getattr(client, method)(url).status_code == 403, url
    event.refresh_from_db()
    assert event.status == "failed"


def test_it_shows_every_page_to_staff(as_bob, twin):
    [event] = make_events(twin, 1, status="failed", error="incoming rules, line 1: boom")
    for url in (MONITOR, reverse("sync:event", args=[event.pk]), reverse("sync:twin", args=[twin.pk])):
        assert as_bob.get(url).status_code == 200, url


def test_it_refuses_get_on_the_actions(as_bob, twin):
    [event] = make_events(twin, 1, status="failed")
    assert as_bob.get(reverse("sync:event-discard", args=[event.pk])).status_code == 405
    assert as_bob.get(BULK).status_code == 405


def test_it_answers_404_for_a_missing_event_or_twin(as_bob, db):
    assert as_bob.get(reverse("sync:event", args=[999])).status_code == 404
    assert as_bob.get(reverse("sync:twin", args=[999])).status_code == 404


# --- the monitor ------------------------------------------------------------------------------


def test_it_shows_an_empty_node(as_bob, django_assert_max_num_queries):
    with django_assert_max_num_queries(9):
        response = as_bob.get(MONITOR)
    content = response.content.decode()
    assert "No connections yet" in content
    assert "The queue is empty." in content
    assert "No twin is blocked." in content
    assert "<svg" in content and 'class="bar ' not in content
    assert "No event finished in the last 60 minutes." in content


def test_it_counts_events_by_connection_direction_and_status(as_bob, red, twin):
    green = Connection.objects.create(name="Green", status=Connection.Status.ACTIVE)
    green_twin = Twin.objects.create(connection=green, local_key="BLUE-1", state="blocked")
    make_events(twin, 3, status="pending")
    make_events(twin, 2, status="done", direction="outgoing")
    make_events(green_twin, 4, status="failed")
    response = as_bob.get(MONITOR)
    counts = {c.connection.name: c for c in response.context["counts"]}
    statuses = SyncEvent.Status.values
    red_rows, green_rows = dict(counts["Red"].rows), dict(counts["Green"].rows)
    assert red_rows["Incoming"][statuses.index("pending")] == 3
    assert red_rows["Outgoing"][statuses.index("done")] == 2
    assert green_rows["Incoming"][statuses.index("failed")] == 4
    assert sum(green_rows["Outgoing"]) == 0
    assert (counts["Red"].blocked, counts["Green"].blocked) == (0, 1)
    assert response.context["blocked_total"] == 1


def test_it_draws_done_and_failed_events_per_minute_as_svg_bars(as_bob, twin):
    now = timezone.now()

    def finished(minutes_ago: int, count: int, status: str) -> None:
        make_events(twin, count, status=status, finished=now - timedelta(minutes=minutes_ago))

    finished(3, 3, "done")
    finished(10, 2, "done")
    finished(10, 1, "failed")
    finished(20, 1, "failed")
    finished(120, 5, "done")  # older than the chart
    make_events(twin, 4, status="pending")  # not finished
    content = as_bob.get(MONITOR).content.decode()
    svg = re.search(r"<svg.*?</svg>", content, re.S).group(0)
    assert 'role="img"' in svg and 'aria-labelledby="chart-title chart-desc"' in svg
    assert '<title id="chart-title">' in svg
    assert "5 event(s) were done and 2 failed; the busiest minute finished 3." in svg
    assert svg.count('class="bar bar-done"') == 2
    assert svg.count('class="bar bar-failed"') == 2


def test_it_stacks_a_minutes_bars_and_scales_them_to_the_busiest_minute(twin):
    now = timezone.now()
    make_events(twin, 2, status="done", finished=now - timedelta(minutes=10))
    make_events(twin, 2, status="failed", finished=now - timedelta(minutes=10))
    make_events(twin, 1, status="done", finished=now - timedelta(minutes=5))
    chart = monitor.throughput(now)
    done, failed, small = chart.bars
    full = monitor.PLOT_BOTTOM - monitor.PLOT_TOP
    assert (done.status, failed.status, small.status) == ("done", "failed", "done")
    assert [done.height, failed.height, small.height] == pytest.approx([full / 2, full / 2, full / 4], abs=0.1)
    assert done.x == failed.x < small.x
    assert failed.y + failed.height == done.y
    assert done.y + done.height == monitor.PLOT_BOTTOM


def test_it_lists_events_newest_first_fifty_a_page(as_bob, twin):
    events = make_events(twin, 120)
    newest = sorted(e.pk for e in events)[::-1]
    first = as_bob.get(MONITOR)
    assert [e.pk for e in first.context["page"].object_list] == newest[:50]
    assert "120 events · page 1 of 3" in first.content.decode()
    third = as_bob.get(MONITOR, {"page": 3})
    assert [e.pk for e in third.context["page"].object_list] == newest[100:]


@pytest.mark.parametrize("page", ["abc", "0", "-1", "99999", "1e3", ""])
def test_it_survives_a_bad_page_number(as_bob, twin, page):
    make_events(twin, 60)
    response = as_bob.get(MONITOR, {"page": page})
    assert response.status_code == 200
    assert len(response.context["page"].object_list) in (50, 10)


def test_it_filters_events(as_bob, red, twin):
    green = Connection.objects.create(name="Green", status=Connection.Status.ACTIVE)
    other = Twin.objects.create(connection=green, local_key="BLUE-7", remote_key="GRN-3")
    make_events(twin, 2, status="failed")
    make_events(twin, 3, status="pending", direction="outgoing", kind="ack")
    make_events(other, 4, status="done")

    def listed(**filters) -> int:
        response = as_bob.get(MONITOR, filters)
        assert response.status_code == 200
        return len(response.context["page"].object_list)

    assert listed() == 9
    assert listed(connection=green.pk) == 4
    assert listed(direction="outgoing") == 3
    assert listed(status="failed") == 2
    assert listed(kind="ack") == 3
    assert listed(key="grn") == 4
    assert listed(key="blue-1") == 5
    assert listed(connection=red.connection.pk, direction="incoming", status="failed") == 2
    assert listed(status="done", key="RED") == 0


def test_it_ignores_an_invalid_filter_and_says_so(as_bob, red, twin):
    make_events(twin, 2, status="failed")
    make_events(twin, 3, status="done")
    response = as_bob.get(MONITOR, {"status": "exploded", "connection": "x", "key": "k" * 200, "kind": "update"})
    assert response.status_code == 200
    assert set(response.context["form"].errors) == {"status", "connection", "key"}
    assert len(response.context["page"].object_list) == 5
    assert 'aria-invalid="true"' in response.content.decode()
    nul = as_bob.get(MONITOR, {"key": "a\x00b"})
    assert nul.status_code == 200 and "key" in nul.context["form"].errors


def test_it_lists_blocked_twins_with_the_reason_and_the_failing_line(as_bob, red):
    twin = blocked_by_boom(red)
    content = as_bob.get(MONITOR).content.decode()
    blocked = content.split('id="blocked-heading"')[1].split('id="events-heading"')[0]
    assert "RED-1" in blocked and "ZeroDivisionError" in blocked
    assert "Line 5: <code>issue.description = str(1 / 0)</code>" in blocked
    assert reverse("sync:twin", args=[twin.pk]) in blocked
    assert reverse("sync:twin-retry", args=[twin.pk]) in blocked
    assert 'href="http://red.example/issues/RED-1/"' in blocked


def test_it_shows_thousands_of_events_in_a_bounded_number_of_queries(as_bob, red, django_assert_max_num_queries):
    green = Connection.objects.create(name="Green", status=Connection.Status.ACTIVE)
    twins = [
        Twin.objects.create(connection=connection, local_key=f"BLUE-{n}", remote_key=f"X-{n}", state=state)
        for n, (connection, state) in enumerate(
            [(red.connection, "ok"), (red.connection, "blocked"), (green, "blocked"), (green, "ok")], start=1
        )
    ]
    now = timezone.now()
    for number, twin in enumerate(twins):
        make_events(twin, 500, status="done", finished=now - timedelta(minutes=number * 7))
        make_events(twin, 250, status="failed", direction="outgoing", error="refused", finished=now)
    assert SyncEvent.objects.count() == 3000
    for params in ({}, {"status": "failed", "key": "blue", "page": "7"}, {"page": "last"}):
        with django_assert_max_num_queries(11):
            response = as_bob.get(MONITOR, params)
        assert response.status_code == 200
    assert "3000 events" in as_bob.get(MONITOR).content.decode()
    with django_assert_max_num_queries(9):
        assert as_bob.get(reverse("sync:twin", args=[twins[0].pk]), {"page": 4}).status_code == 200
    with django_assert_max_num_queries(7):
        assert as_bob.get(reverse("sync:event", args=[SyncEvent.objects.first().pk])).status_code == 200


def test_it_stops_counting_at_the_limit(as_bob, twin):
    make_events(twin, 30)
    with mock.patch.object(monitor.CappedPaginator, "limit", 20):
        response = as_bob.get(MONITOR)
    assert "More than 20 events" in response.content.decode()
    assert response.context["page"].paginator.num_pages == 1


# --- an event and a twin ----------------------------------------------------------------------


def test_it_shows_an_event_with_its_payload_escaped_and_its_failing_line(as_bob, red):
    twin = blocked_by_boom(red)
    event = twin.events.get(status="failed")
    SyncEvent.objects.filter(pk=event.pk).update(
        payload={"replica": {"summary": "<script>alert(1)</script>"}},
        lease_owner="worker-7",
        lease_expires=timezone.now(),
    )
    content = as_bob.get(reverse("sync:event", args=[event.pk])).content.decode()
    assert "<script>alert(1)</script>" not in content
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content
    assert "{\n  &quot;replica&quot;: {\n    &quot;summary&quot;" in content
    assert "ZeroDivisionError" in content
    assert "Script line 5: <code>issue.description = str(1 / 0)</code>" in content
    assert "worker-7" in content
    assert reverse("sync:twin", args=[twin.pk]) in content
    assert reverse("sync:event-retry", args=[event.pk]) in content


def test_it_shows_a_twin_with_its_replicas_maps_and_events(as_bob, red, twin):
    Twin.objects.filter(pk=twin.pk).update(
        last_sent={"summary": "Sent <b>"},
        last_received={"summary": "Received"},
        comment_map={"r-c-1": "7"},
        attachment_map={"r-a-9": "3"},
        state="blocked",
        blocked_reason="incoming rules, line 2: NameError",
    )
    make_events(twin, 55)
    response = as_bob.get(reverse("sync:twin", args=[twin.pk]))
    content = response.content.decode()
    assert 'href="/issues/BLUE-1/"' in content
    assert 'href="http://red.example/issues/RED-1/"' in content
    assert "Sent &lt;b&gt;" in content and "Received" in content
    assert "r-c-1" in content and "r-a-9" in content
    assert "incoming rules, line 2: NameError" in content
    assert len(response.context["page"].object_list) == 50
    assert len(as_bob.get(reverse("sync:twin", args=[twin.pk]), {"page": 2}).context["page"].object_list) == 5


def test_it_shows_a_twin_whose_keys_are_not_known_yet(as_bob, red):
    twin = Twin.objects.create(connection=red.connection, remote_key="RED-5")
    Connection.objects.filter(pk=red.connection.pk).update(remote_url="")
    content = as_bob.get(reverse("sync:twin", args=[twin.pk])).content.decode()
    assert "not created here yet" in content
    assert "red.example" not in content


# --- actions ----------------------------------------------------------------------------------


def test_it_retries_a_failed_event_through_its_twin_so_order_holds(as_bob, red):
    twin = blocked_by_boom(red)
    failed = twin.events.get(status="failed")
    use_rules(red.connection)
    response = as_bob.post(reverse("sync:event-retry", args=[failed.pk]), follow=True)
    assert "Put 1 failed event(s) back in the queue." in _messages(response)
    twin.refresh_from_db()
    assert twin.state == "ok"
    work()
    events = list(twin.events.filter(direction="incoming"))
    assert [e.status for e in events] == ["done", "done"]
    assert [e.seq for e in sorted(events, key=lambda e: e.finished)] == [1, 2]
    twin.refresh_from_db()
    assert (twin.in_seq, tracker().get(twin.local_key).summary) == (2, "Second")


def test_it_does_not_retry_an_event_that_did_not_fail(as_bob, twin):
    [event] = make_events(twin, 1, status="done")
    response = as_bob.post(reverse("sync:event-retry", args=[event.pk]), follow=True)
    assert f"Event {event.pk} is done, not failed." in _messages(response)


def test_it_discards_the_failed_event_that_blocks_a_twin_and_moves_on(as_bob, red):
    twin = blocked_by_boom(red)
    failed = twin.events.get(status="failed")
    response = as_bob.post(reverse("sync:event-discard", args=[failed.pk]), {"next": MONITOR})
    assert response["Location"] == MONITOR
    failed.refresh_from_db()
    assert (failed.status, failed.error) == ("done", "discarded by bob")
    assert failed.finished is not None
    twin.refresh_from_db()
    assert (twin.state, twin.blocked_reason, twin.in_seq) == ("ok", "", 1)
    work()
    twin.refresh_from_db()
    assert twin.in_seq == 2
    assert tracker().get(twin.local_key).summary == "Second"


def test_it_discards_a_pending_incoming_update_by_skipping_it(as_bob, red, twin):
    first, _ = make_events(twin, 2, status="pending")
    as_bob.post(reverse("sync:event-discard", args=[first.pk]))
    first.refresh_from_db()
    twin.refresh_from_db()
    assert (first.status, twin.in_seq) == ("done", 1)


def test_it_refuses_to_discard_an_incoming_message_after_a_gap(as_bob, twin):
    [event] = SyncEvent.objects.bulk_create(
        [SyncEvent(connection_id=twin.connection_id, twin=twin, direction="incoming", seq=3)]
    )
    response = as_bob.post(reverse("sync:event-discard", args=[event.pk]), follow=True)
    assert any("it waits for message 1 of its twin" in m for m in _messages(response))
    event.refresh_from_db()
    assert event.status == "pending"


def test_it_refuses_to_discard_a_done_event(as_bob, twin):
    [event] = make_events(twin, 1, status="done", error="")
    response = as_bob.post(reverse("sync:event-discard", args=[event.pk]), follow=True)
    assert f"Event {event.pk} was not discarded: it is done." in _messages(response)
    event.refresh_from_db()
    assert event.error == ""


def test_it_takes_back_a_refused_last_outgoing_message_but_not_an_earlier_one(as_bob, twin):
    earlier, last = make_events(twin, 2, direction="outgoing", status="failed", attempts=1)
    Twin.objects.filter(pk=twin.pk).update(out_seq=2, last_sent_hash="abc", state="blocked")
    response = as_bob.post(BULK, {"action": "discard", "event": [earlier.pk, last.pk]}, follow=True)
    assert "Discarded 1 event(s)." in _messages(response)
    assert any("would wait for it forever" in m for m in _messages(response))
    earlier.refresh_from_db()
    last.refresh_from_db()
    twin.refresh_from_db()
    assert (earlier.status, last.status) == ("failed", "done")
    assert (twin.out_seq, twin.last_sent_hash, twin.state) == (1, "", "blocked")


def test_it_discards_a_failed_outgoing_rules_run(as_bob, red, alice):
    use_rules(red.connection, outgoing="replica.size = 1 / 0\n")
    failed = flow.sync_entity(red.connection, blue_issue(alice).key)
    as_bob.post(reverse("sync:event-discard", args=[failed.pk]))
    failed.refresh_from_db()
    failed.twin.refresh_from_db()
    assert (failed.status, failed.twin.state) == ("done", "ok")


def test_it_retries_and_discards_in_bulk(as_bob, red):
    use_rules(red.connection, incoming=BOOM_RULES)
    red.send(
        red.update("RED-1", summary="boom"), red.update("RED-2", summary="boom"), red.update("RED-3", summary="boom")
    )
    work()
    one, two, three = (red.twin(key) for key in ("RED-1", "RED-2", "RED-3"))
    failures = {t.pk: t.events.get(status="failed").pk for t in (one, two, three)}
    response = as_bob.post(BULK, {"action": "retry", "event": [failures[one.pk], failures[two.pk]], "next": MONITOR})
    assert response["Location"] == MONITOR
    assert [t.state for t in Twin.objects.filter(pk__in=[one.pk, two.pk])] == ["ok", "ok"]
    assert SyncEvent.objects.get(pk=failures[one.pk]).status == "pending"
    response = as_bob.post(BULK, {"action": "discard", "event": [failures[three.pk]]}, follow=True)
    assert "Discarded 1 event(s)." in _messages(response)
    three.refresh_from_db()
    assert (three.state, SyncEvent.objects.get(pk=failures[three.pk]).error) == ("ok", "discarded by bob")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"action": "explode", "event": ["1"]}, "Choose retry or discard."),
        ({"action": "retry"}, "Tick the events to act on first."),
        ({"action": "retry", "event": ["x", "-3", "99999"]}, "Tick the events to act on first."),
    ],
)
def test_it_explains_a_bulk_form_it_cannot_act_on(as_bob, twin, data, message):
    response = as_bob.post(BULK, data, follow=True)
    assert message in _messages(response)


def test_it_does_not_follow_a_next_address_off_this_site(as_bob, twin):
    [event] = make_events(twin, 1, status="done")
    response = as_bob.post(reverse("sync:event-retry", args=[event.pk]), {"next": "https://evil.example/"})
    assert response["Location"] == reverse("sync:event", args=[event.pk])


def test_it_resolves_and_retries_a_twin_from_the_monitor(as_bob, red):
    twin = blocked_by_boom(red)
    use_rules(red.connection)
    response = as_bob.post(reverse("sync:twin-retry", args=[twin.pk]), {"next": MONITOR})
    assert response["Location"] == MONITOR
    work()
    twin.refresh_from_db()
    assert (twin.state, twin.in_seq) == ("ok", 2)
    assert "ZeroDivisionError" not in as_bob.get(MONITOR).content.decode()


# --- the local tracker's health ---------------------------------------------------------------


def test_staff_see_on_the_sync_pages_why_the_tracker_cannot_be_used(red, as_bob, as_charlie, bob_api):
    refused = TrackerUnavailable("Redmine refused the API key (HTTP 401 on GET /issues.json)", permanent=True)
    health.tracker_failed(refused)
    connection_page = reverse("connections:detail", args=[red.connection.pk])
    for page in (MONITOR, connection_page, reverse("connections:list")):
        shown = as_bob.get(page).content.decode()
        assert "Redmine refused the API key (HTTP 401 on GET /issues.json)" in shown
        assert "waits until the tracker's settings are fixed" in shown
    assert 'id="tracker-problem"' not in as_charlie.get(MONITOR).content.decode(), "only staff see node problems"
    assert bob_api.get(f"/api/v1/connections/{red.connection.pk}/").json()["tracker_problem"] == str(refused)
    health.tracker_ok()
    assert 'id="tracker-problem"' not in as_bob.get(MONITOR).content.decode()
    assert bob_api.get(f"/api/v1/connections/{red.connection.pk}/").json()["tracker_problem"] is None


def test_the_twin_page_shows_its_conflicts(red, alice, as_bob):
    red.send(red.update(summary="Made on Red"))
    work()
    issue = Issue.objects.get(key=red.twin().local_key)
    actions.update_issue(issue, {"summary": "Blue's title"}, actor=alice)
    red.send(red.update(summary="Red's title"))
    work()
    page = as_bob.get(reverse("sync:twin", args=[red.twin().pk])).content.decode()
    conflicts = page.split('id="conflicts-heading"')[1].split("</section>")[0]
    for shown in ("summary", "Made on Red", "Blue&#x27;s title", "Red&#x27;s title", "Remote value taken"):
        assert shown in conflicts
