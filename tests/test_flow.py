"""The flow of messages through Blue's queue, in process: Red is played by hand (tests/syncpair.py)."""

from __future__ import annotations

from datetime import timedelta
from importlib import import_module
from unittest import mock

import pytest
from django.apps import apps
from django.utils import timezone

from syncqueue import flow, tasks, transport, worker
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import WORKER, Red, attachment, blue_issue, comment, connect_red, tracker, use_rules, work
from trackers.base import TrackerError
from trackers.builtin import actions
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Issue

BOOM_RULES = """\
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


def first_sync(red: Red, key: str = "RED-1", **fields) -> str:
    """Red's issue ``key`` arrives and is created here; returns the local key."""
    red.send(red.update(key, **fields))
    work()
    return red.twin(key).local_key


def events(twin: Twin, direction: str = "incoming") -> list[SyncEvent]:
    return list(twin.events.filter(direction=direction).order_by("seq", "id"))


def make_due(twin: Twin) -> None:
    twin.events.filter(status="pending").update(next_attempt=timezone.now())


# --- incoming ---------------------------------------------------------------------------------


def test_it_creates_the_local_issue_on_a_first_update_and_queues_an_ack(red):
    update = red.update(summary="Hello", description="From Red", labels=["sync"], priority="High")
    assert red.send(update) == {"accepted": [update["id"]], "rejected": {}}
    work()
    twin = red.twin()
    issue = tracker().get(twin.local_key)
    assert (issue.project, issue.summary, issue.description, issue.labels, issue.priority) == (
        "BLUE",
        "Hello",
        "From Red",
        ("sync",),
        "High",
    )
    [ack] = red.outgoing()
    message = flow.message_of(ack)
    assert (message["kind"], message["acks"], message["key"], message["remote_key"]) == (
        "ack",
        update["id"],
        issue.key,
        "RED-1",
    )
    assert message["replica"]["summary"] == "Hello"
    assert message["replica"]["key"] == issue.key


def test_it_changes_only_what_changed_on_a_later_update(red):
    key = first_sync(red, summary="Before", description="Kept", labels=["a"])
    red.send(red.update(summary="After", description="Kept", labels=["a"]))
    with mock.patch.object(BuiltinTracker, "update", autospec=True, side_effect=BuiltinTracker.update) as update:
        work()
    assert update.call_args.args[1:] == (key, {"summary": "After"})
    assert tracker().get(key).summary == "After"
    assert [e.status for e in events(red.twin())] == ["done", "done"]


def test_it_waits_for_a_missing_message_then_applies_both_in_order(red):
    first, second = red.update(summary="One"), red.update(summary="Two")
    red.send(second)
    work()
    twin = red.twin()
    assert twin.local_key is None
    assert events(twin)[0].status == "pending"
    red.send(first)
    work()
    twin.refresh_from_db()
    assert tracker().get(twin.local_key).summary == "Two"
    assert twin.in_seq == 2
    assert [e.status for e in events(twin)] == ["done", "done"]


def test_it_stores_and_applies_a_message_delivered_twice_once(red):
    update = red.update()
    assert red.send(update)["accepted"] == [update["id"]]
    assert red.send(update)["accepted"] == [update["id"]]
    work()
    red.send(update)
    work()
    assert SyncEvent.objects.filter(direction="incoming").count() == 1
    assert Issue.objects.count() == 1
    assert len(red.outgoing(kind="ack")) == 1


def test_it_finishes_a_redelivered_applied_seq_without_effect(red):
    key = first_sync(red, summary="Applied")
    red.send(red.update(seq=1, summary="Stale"))
    stale = events(red.twin())[-1]
    flow.apply_incoming(stale, tracker())
    stale.refresh_from_db()
    assert stale.status == "done"
    assert tracker().get(key).summary == "Applied"
    assert len(red.outgoing(kind="ack")) == 1


def test_it_lets_the_worker_finish_a_redelivered_applied_seq(red):
    first_sync(red)
    red.send(red.update(seq=1, summary="Stale"))
    work()
    assert [e.status for e in events(red.twin())] == ["done", "done"]


def test_it_stops_the_twin_on_a_stop_message(red, alice, django_capture_on_commit_callbacks):
    key = first_sync(red)
    red.send(red.stop())
    work()
    assert red.twin().state == "stopped"
    with django_capture_on_commit_callbacks(execute=True):
        actions.update_issue(Issue.objects.get(key=key), {"summary": "Not for Red"}, actor=alice)
    assert len(red.outgoing()) == 1  # only the ack of the first sync


def test_it_tells_red_when_a_twin_is_stopped_here(red):
    first_sync(red)
    flow.stop_twin(red.twin())
    stop = red.outgoing()[-1]
    assert (red.twin().state, stop.kind, flow.message_of(stop)["replica"]) == ("stopped", "stop", None)


def test_it_keeps_a_twin_stopped_here_when_an_update_crosses_the_stop(red):
    key = first_sync(red)
    flow.stop_twin(red.twin())
    red.send(red.update(summary="Sent before Red got the stop"))
    work()
    assert red.twin().state == "stopped"
    assert tracker().get(key).summary == "Made on Red"


def test_it_blocks_the_twin_whose_rule_raises_and_applies_the_others(red):
    use_rules(red.connection, incoming="if first_sync:\n    issue.project = connection.project\n" + BOOM_RULES)
    red.send(red.update("RED-1", summary="boom"), red.update("RED-2", summary="fine"))
    work()
    bad, good = red.twin("RED-1"), red.twin("RED-2")
    assert bad.state == "blocked"
    assert "ZeroDivisionError" in bad.blocked_reason
    [failed] = events(bad)
    assert (failed.status, failed.error_line) == ("failed", 5)
    assert "line 5" in failed.error
    assert good.state == "ok"
    assert tracker().get(good.local_key).summary == "fine"


def test_it_leaves_a_message_after_a_gap_waiting_when_applied_directly(red):
    red.send(red.update(seq=2))
    early = events(red.twin())[0]
    flow.apply_incoming(early, tracker())
    early.refresh_from_db()
    assert early.status == "pending"
    assert (red.twin().in_seq, Issue.objects.count()) == (0, 0)


def test_it_blocks_the_twin_when_the_outgoing_rules_fail_and_reruns_them_on_retry(
    red, alice, django_capture_on_commit_callbacks
):
    use_rules(red.connection, outgoing="replica.summary = issue.summary\nreplica.size = 1 / 0\n")
    key = blue_issue(alice).key
    failed = flow.sync_entity(red.connection, key)
    twin = failed.twin
    assert (failed.status, failed.error_line, twin.state) == ("failed", 2, "blocked")
    assert "line 2: ZeroDivisionError" in twin.blocked_reason
    use_rules(red.connection)
    with django_capture_on_commit_callbacks(execute=True):
        flow.resolve_and_retry(twin)
    update = red.outgoing(kind="update", status="pending")[0]
    assert (update.twin_id, update.payload["replica"]["summary"]) == (twin.pk, "Made on Blue")
    twin.refresh_from_db()
    assert twin.state == "ok"


def test_it_retries_a_transient_tracker_error_with_backoff_then_blocks(red):
    key = first_sync(red)
    red.send(red.update(summary="Later"))
    outage = TrackerError("database unavailable", permanent=False)
    with mock.patch.object(BuiltinTracker, "update", side_effect=outage):
        work()
        event = events(red.twin())[-1]
        assert (event.status, event.attempts, event.error) == ("pending", 1, "database unavailable")
        assert event.next_attempt > timezone.now()
        assert red.twin().state == "ok"
        for _ in range(flow.MAX_ATTEMPTS - 1):
            make_due(red.twin())
            work()
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("failed", flow.MAX_ATTEMPTS)
    assert red.twin().state == "blocked"
    assert tracker().get(key).summary == "Made on Red"


def test_it_drains_a_resolved_twin_in_order(red):
    use_rules(red.connection, incoming="if first_sync:\n    issue.project = connection.project\n" + BOOM_RULES)
    red.send(red.update(summary="boom"), red.update(summary="Second"), red.update(summary="Third"))
    work()
    twin = red.twin()
    assert twin.state == "blocked"
    assert [e.status for e in events(twin)] == ["failed", "pending", "pending"]
    use_rules(red.connection)
    assert flow.resolve_and_retry(twin) == 1
    work()
    twin.refresh_from_db()
    assert (twin.state, twin.in_seq) == ("ok", 3)
    assert tracker().get(twin.local_key).summary == "Third"
    assert [e.status for e in events(twin)] == ["done", "done", "done"]
    assert [e.seq for e in sorted(events(twin), key=lambda e: e.finished)] == [1, 2, 3]


def test_it_reclaims_an_event_whose_lease_expired(red):
    red.send(red.update(summary="Orphaned"))
    SyncEvent.objects.update(
        status="processing", lease_owner="dead-worker", lease_expires=timezone.now() - timedelta(seconds=1)
    )
    assert work() == 0
    assert worker.reclaim_expired() == 1
    work()
    assert tracker().get(red.twin().local_key).summary == "Orphaned"


def test_it_leaves_an_event_whose_lease_is_still_running(red):
    red.send(red.update())
    SyncEvent.objects.update(status="processing", lease_owner="busy", lease_expires=timezone.now() + worker.LEASE)
    assert worker.reclaim_expired() == 0
    assert SyncEvent.objects.get().status == "processing"


def test_it_adds_an_attachment_with_the_bytes_fetched_from_red(red):
    content = b"attached on Red"
    with mock.patch.object(transport, "fetch_attachment", return_value=content) as fetch:
        key = first_sync(red, attachments=[attachment("a1", content)])
    [added] = tracker().get(key).attachments
    assert (added.filename, added.read()) == ("notes.txt", content)
    assert fetch.call_args.args[1:3] == ("RED-1", added.sha256)
    assert red.twin().attachment_map == {"a1": added.id}


def test_it_adds_comments_with_attribution_and_keeps_them_out_of_the_ack(red):
    key = first_sync(red, comments=[comment("c1", "Hello from Red")])
    [added] = tracker().get(key).comments
    assert added.body == f"Rita Red (Red) wrote:\n\nHello from Red\n\n[sync {red.connection.uuid.hex[:8]}:c1]"
    assert red.twin().comment_map == {"c1": added.id}
    [ack] = red.outgoing()
    assert ack.payload["replica"]["comments"] == []


# --- outgoing ---------------------------------------------------------------------------------


def test_it_queues_a_change_once_and_not_again_when_nothing_changed(red, alice):
    key = blue_issue(alice).key
    first = flow.sync_entity(red.connection, key)
    assert (first.kind, first.seq, first.payload["replica"]["summary"]) == ("update", 1, "Made on Blue")
    assert flow.sync_entity(red.connection, key) is None
    actions.update_issue(Issue.objects.get(key=key), {"summary": "Changed"}, actor=alice)
    second = flow.sync_entity(red.connection, key)
    assert (second.seq, second.payload["replica"]["summary"]) == (2, "Changed")
    assert len(red.outgoing()) == 2


def test_it_syncs_a_new_issue_through_its_trigger(red, alice, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        key = blue_issue(alice, summary="Triggered").key
    [event] = red.outgoing()
    assert (event.twin.local_key, event.payload["replica"]["summary"]) == (key, "Triggered")


def test_it_learns_the_remote_key_from_red_ack_and_finishes_the_update(red, alice, django_capture_on_commit_callbacks):
    key = blue_issue(alice).key
    update = flow.sync_entity(red.connection, key)
    SyncEvent.objects.filter(pk=update.pk).update(status="sent")
    with django_capture_on_commit_callbacks(execute=True):
        red.send(red.ack(update.message_id, key="RED-7", remote_key=key, summary="Made on Blue"))
        work()
    twin = Twin.objects.get(connection=red.connection, local_key=key)
    assert twin.remote_key == "RED-7"
    update.refresh_from_db()
    assert update.status == "done"
    assert len(red.outgoing()) == 1, "an ack is not answered"


def test_it_does_not_send_back_what_the_sync_wrote(red, django_capture_on_commit_callbacks):
    key = first_sync(red, summary="From Red")
    with django_capture_on_commit_callbacks(execute=True):
        red.send(red.update(summary="Edited on Red", comments=[comment("c1", "Hi")]))
        work()
    assert [e.kind for e in red.outgoing()] == ["ack", "ack"]
    assert flow.sync_entity(red.connection, key) is None


def test_it_marks_accepted_messages_sent_or_done(red, alice):
    update = flow.sync_entity(red.connection, blue_issue(alice).key)
    ack_key = first_sync(red)
    [ack] = red.outgoing(kind="ack")
    with mock.patch.object(transport, "post_messages") as post:
        post.side_effect = lambda connection, messages: {"accepted": [m["id"] for m in messages], "rejected": {}}
        assert worker.send_outgoing(WORKER) == 2
    [(connection, messages)] = [c.args for c in post.call_args_list]
    assert connection == red.connection
    assert {m["key"] for m in messages} == {update.twin.local_key, ack_key}
    update.refresh_from_db()
    ack.refresh_from_db()
    assert (update.status, ack.status) == ("sent", "done")


def test_it_keeps_messages_pending_while_red_does_not_answer(red, alice):
    event = flow.sync_entity(red.connection, blue_issue(alice).key)
    down = transport.RemoteError("Red does not answer at http://red.example (ConnectionError)")
    with mock.patch.object(transport, "post_messages", side_effect=down):
        worker.send_outgoing(WORKER)
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("pending", 1)
    assert "does not answer" in event.error
    assert event.next_attempt > timezone.now()
    red.connection.refresh_from_db()
    assert "does not answer" in red.connection.status_detail


def test_it_blocks_the_twin_of_a_rejected_message(red, alice):
    event = flow.sync_entity(red.connection, blue_issue(alice).key)
    answer = {"accepted": [], "rejected": {str(event.message_id): "replica must be an object"}}
    with mock.patch.object(transport, "post_messages", return_value=answer):
        worker.send_outgoing(WORKER)
    event.refresh_from_db()
    assert event.status == "failed"
    assert "replica must be an object" in event.error
    event.twin.refresh_from_db()
    assert event.twin.state == "blocked"


def test_it_holds_outgoing_messages_of_a_deactivated_connection(red, alice):
    event = flow.sync_entity(red.connection, blue_issue(alice).key)
    red.connection.status = "deactivated"
    red.connection.save()
    with mock.patch.object(transport, "post_messages") as post:
        assert worker.send_outgoing(WORKER) == 0
        post.assert_not_called()
        red.connection.status = "active"
        red.connection.save()
        post.return_value = {"accepted": [str(event.message_id)], "rejected": {}}
        assert worker.send_outgoing(WORKER) == 1
    event.refresh_from_db()
    assert event.status == "sent"


def test_it_answers_an_update_to_a_stopped_twin_with_a_stop(red):
    first_sync(red)
    flow.stop_twin(red.twin(), tell_remote=False)
    red.send(red.update(summary="Red did not hear of the stop"))
    work()
    [stop] = red.twin().events.filter(direction="outgoing", kind="stop")
    assert stop.status == "pending", "the other side must learn the twin is stopped"


def test_it_tells_the_other_side_when_the_incoming_rules_stop_a_twin(red):
    use_rules(red.connection, incoming='helpers.stop_sync("not ours")\n')
    red.send(red.update(summary="Stop me"))
    work()
    twin = red.twin()
    assert (twin.state, twin.blocked_reason) == ("stopped", "not ours")
    assert twin.events.filter(direction="outgoing", kind="stop").count() == 1


def test_it_closes_its_unacknowledged_updates_when_the_other_side_stops(red):
    key = first_sync(red)
    actions.update_issue(Issue.objects.get(key=key), {"summary": "Changed here"})
    flow.sync_entity(red.connection, key)
    update = red.twin().events.get(direction="outgoing", kind="update")
    SyncEvent.objects.filter(pk=update.pk).update(status="sent")
    red.send(red.stop())
    work()
    update.refresh_from_db()
    assert update.status == "done"
    assert red.twin().state == "stopped"


def test_it_keeps_a_stopped_twin_stopped_on_resolve_and_retry(red):
    first_sync(red)
    flow.stop_twin(red.twin(), tell_remote=False)
    flow.resolve_and_retry(red.twin())
    assert red.twin().state == "stopped"


def test_it_records_which_rules_version_failed(red):
    use_rules(red.connection, incoming="helpers.debug(1 / 0)\n")
    red.send(red.update(summary="boom"))
    work()
    [failed] = events(red.twin())
    assert failed.status == "failed"
    assert failed.rules_version == red.connection.rules_versions.get(number=2)


# Real commits, for the announcement after the commit.
@pytest.mark.django_db(transaction=True)
def test_the_write_of_an_applied_update_does_not_run_the_outgoing_rules_again(red, alice, monkeypatch):
    """Its ack was computed as it was applied: the announcement of that write is the sync's own echo."""
    # Another transactional test's flush removes the statuses the migrations made.
    import_module("trackers.builtin.migrations.0002_default_vocabulary").add_defaults(apps, None)
    synced = []
    real = flow.sync_entity
    monkeypatch.setattr(
        flow, "sync_entity", lambda connection, key, **kw: synced.append(key) or real(connection, key, **kw)
    )
    key = first_sync(red, summary="Hello")
    red.send(red.update(summary="Hello again"))
    work()
    assert (tracker().get(key).summary, synced) == ("Hello again", [])
    actions.update_issue(Issue.objects.get(key=key), {"summary": "A person's words"}, actor=alice)
    assert synced == [key], "a person's write is synced as ever"
    assert events(red.twin(), "outgoing")[-1].payload["replica"]["summary"] == "A person's words"
