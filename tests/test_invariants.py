"""The promises of DESIGN.md, by name. Convergence (1) and conflicts (7) come with their own
issues.

Blue is this test database; Red is played by hand (tests/syncpair.py).
"""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from syncqueue import flow, health, processors, tasks, transport, worker
from syncqueue.models import Conflict, SyncEvent, Twin
from tests.syncpair import (
    WORKER,
    MemoryTracker,
    Red,
    attachment,
    blue_issue,
    comment,
    connect_red,
    serve,
    tracker,
    use_rules,
    work,
)
from trackers.base import TrackerUnavailable
from trackers.builtin import actions
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Attachment, Issue

RED_DOWN = transport.RemoteError("Red does not answer at http://red.example (ConnectionError)")


class WorkerKilled(BaseException):
    """The worker process dies here: nothing after this line of the sync runs."""


@pytest.fixture(autouse=True)
def no_kick(monkeypatch):
    monkeypatch.setattr(tasks, "kick", lambda: None)


@pytest.fixture
def red(project):
    return Red(connect_red())


def expire_leases() -> None:
    SyncEvent.objects.filter(status="processing").update(lease_expires=timezone.now() - timedelta(seconds=1))


def make_due() -> None:
    SyncEvent.objects.filter(status="pending").update(next_attempt=timezone.now())


# --- 2. no duplicates -------------------------------------------------------------------------


def test_it_never_creates_a_duplicate_twin(red):
    Twin.objects.create(connection=red.connection, local_key="BLUE-9", remote_key="RED-9")
    for keys in ({"local_key": "BLUE-9"}, {"remote_key": "RED-9"}):
        with pytest.raises(IntegrityError), transaction.atomic():
            Twin.objects.create(connection=red.connection, **keys)
    # Red sends its first update again under new ids, and changes it, before any ack came back.
    red.send(red.update(seq=1), red.update(seq=1), red.update(seq=2, summary="Changed on Red"))
    work()
    assert Twin.objects.filter(remote_key="RED-1").count() == 1
    assert list(Issue.objects.values_list("summary", flat=True)) == ["Changed on Red"]


def test_it_never_creates_a_second_issue_when_a_first_sync_is_retried(red):
    red.send(red.update(attachments=[attachment("a1", b"bytes")]))
    with mock.patch.object(transport, "fetch_attachment", side_effect=RED_DOWN):
        work()
    assert Issue.objects.count() == 0, "the failed first sync left nothing half-made behind"
    make_due()
    with mock.patch.object(transport, "fetch_attachment", return_value=b"bytes"):
        work()
    assert Issue.objects.count() == 1
    assert red.twin().local_key == Issue.objects.get().key


def test_it_never_creates_a_second_issue_when_the_worker_dies_between_create_and_ack(red):
    red.send(red.update())
    with mock.patch.object(processors, "run_outgoing", side_effect=WorkerKilled), pytest.raises(WorkerKilled):
        work()
    expire_leases()
    worker.reclaim_expired()
    work()
    assert Issue.objects.count() == 1
    assert len(red.outgoing(kind="ack")) == 1


def test_it_never_creates_a_second_entity_in_an_outside_tracker_when_a_first_sync_is_retried(red):
    outside = MemoryTracker()
    red.send(red.update(attachments=[attachment("a1", b"bytes")]))
    with (
        mock.patch.object(flow, "local_tracker", return_value=outside),
        mock.patch.object(transport, "fetch_attachment", side_effect=RED_DOWN),
    ):
        work()
        make_due()
        work()
    assert len(outside.entities) == 1


def test_it_never_adds_a_comment_twice(red):
    red.send(red.update(comments=[comment("c1", "Hello"), comment("c1", "Hello")]))
    red.send(red.update(comments=[comment("c1", "Hello"), comment("c2", "Again")]))
    work()
    bodies = [c.body for c in tracker().get(red.twin().local_key).comments]
    assert [b.split("\n\n")[1] for b in bodies] == ["Hello", "Again"]


def test_it_never_adds_a_comment_twice_when_the_worker_dies_between_writing_and_recording_it(red):
    # An outside tracker keeps the comment although the twin's record of it is rolled back.
    outside = MemoryTracker()
    red.send(red.update(comments=[comment("c1", "Hello")]))
    with (
        mock.patch.object(flow, "local_tracker", return_value=outside),
        mock.patch.object(processors, "run_outgoing", side_effect=WorkerKilled),
        pytest.raises(WorkerKilled),
    ):
        work()
    [entity] = outside.entities.values()
    assert len(entity.comments) == 1 and red.twin().comment_map == {}
    expire_leases()
    worker.reclaim_expired()
    with mock.patch.object(flow, "local_tracker", return_value=outside):
        work()
    [entity] = outside.entities.values()
    [written] = entity.comments
    assert red.twin().comment_map == {"c1": written.id}, "the retry links the comment it wrote before"
    [ack] = red.outgoing(kind="ack")
    assert ack.payload["replica"]["comments"] == [], "and does not send it back"


def test_it_never_adds_an_attachment_twice(red):
    files = [attachment("a1", b"one", "one.txt"), attachment("a2", b"two", "two.txt")]
    red.send(red.update(attachments=files[:1]), red.update(attachments=files), red.update(attachments=files))
    with mock.patch.object(transport, "fetch_attachment", side_effect=serve(b"one", b"two")):
        work()
    held = tracker().get(red.twin().local_key).attachments
    assert sorted((a.filename, a.read()) for a in held) == [("one.txt", b"one"), ("two.txt", b"two")]


def test_it_never_adds_an_attachment_listed_twice_in_one_replica(red):
    red.send(red.update(attachments=[attachment("a1", b"one"), attachment("a1", b"one")]))
    with mock.patch.object(transport, "fetch_attachment", return_value=b"one"):
        work()
    assert Attachment.objects.count() == 1


# --- 3. exactly-once effect -------------------------------------------------------------------


def test_it_applies_a_message_twice_with_the_effect_of_once(red):
    update = red.update(comments=[comment("c1", "Once")])
    red.send(update, update)
    work()
    red.send(update)
    work()
    assert SyncEvent.objects.filter(direction="incoming").count() == 1
    assert Issue.objects.count() == 1
    assert len(tracker().get(red.twin().local_key).comments) == 1
    assert len(red.outgoing(kind="ack")) == 1


def test_it_reclaims_work_from_a_dead_worker(red):
    red.send(red.update(summary="Survives"))
    with mock.patch.object(processors, "run_outgoing", side_effect=WorkerKilled), pytest.raises(WorkerKilled):
        work()
    event = SyncEvent.objects.get(direction="incoming")
    assert event.status == "processing"
    assert worker.reclaim_expired() == 0, "the lease still runs: the worker may be alive"
    expire_leases()
    assert worker.reclaim_expired() == 1
    work()
    event.refresh_from_db()
    assert event.status == "done"
    assert tracker().get(red.twin().local_key).summary == "Survives"


# --- 4. order per twin ------------------------------------------------------------------------


def test_it_applies_messages_of_a_twin_in_order_and_lets_other_twins_pass(red):
    first, second = red.update("RED-1", summary="First"), red.update("RED-1", summary="Second")
    red.send(second, red.update("RED-2", summary="Other"))
    work()
    assert tracker().get(red.twin("RED-2").local_key).summary == "Other"
    assert red.twin("RED-1").local_key is None, "seq 2 waits for seq 1"
    red.send(first)
    work()
    assert tracker().get(red.twin("RED-1").local_key).summary == "Second"


# --- 5. no echo -------------------------------------------------------------------------------


def test_it_does_not_echo_a_change_the_sync_wrote(red, alice, django_capture_on_commit_callbacks):
    files = [attachment("a1", b"file")]
    with (
        django_capture_on_commit_callbacks(execute=True),
        mock.patch.object(transport, "fetch_attachment", side_effect=serve(b"file")),
    ):
        red.send(red.update(summary="From Red", comments=[comment("c1", "Hi")], attachments=files))
        work()
        red.send(red.update(summary="Edited on Red", comments=[comment("c1", "Hi, edited")], attachments=files))
        work()
    acks = red.outgoing()
    assert [e.kind for e in acks] == ["ack", "ack"]
    assert [(a.payload["replica"]["comments"], a.payload["replica"]["attachments"]) for a in acks] == [([], [])] * 2
    key = red.twin().local_key
    with django_capture_on_commit_callbacks(execute=True):
        actions.update_issue(Issue.objects.get(key=key), {"summary": "Edited on Blue"}, actor=alice)
    assert [e.kind for e in red.outgoing()] == ["ack", "ack", "update"]
    assert flow.sync_entity(red.connection, key) is None, "an unchanged replica is not sent again"


LOOPING_RULES = 'if first_sync:\n    issue.project = connection.project\nissue.summary = replica.summary + "!"\n'


def bounce(red, capture) -> None:
    """Red answers Blue's latest message with an ack whose rules appended to the summary again."""
    key = red.twin().local_key
    last = red.outgoing()[-1]
    with capture(execute=True):
        red.send(red.ack(last.message_id, key="RED-1", remote_key=key, summary=tracker().get(key).summary + "!"))
        work()


def test_it_does_not_send_back_an_older_state_read_while_a_change_was_being_applied(red):
    red.send(red.update(summary="Version 1"))
    work()
    key = red.twin().local_key
    versions = flow.twin_versions(red.connection)
    read_before = tracker().get(key)
    red.send(red.update(summary="Version 2"))  # applied after the read, before the twin's lock
    work()
    assert flow.sync_many(red.connection, [read_before], tracker=tracker(), versions=versions) == 0
    assert [e.kind for e in red.outgoing()] == ["ack", "ack"], "Version 1 did not go back as a change"


def test_a_single_sync_does_not_send_back_an_older_state_either(red):
    red.send(red.update(summary="Version 1"))
    work()
    key = red.twin().local_key

    class Racing(BuiltinTracker):
        raced = False

        def get(self, key):
            entity = super().get(key)
            if not Racing.raced:
                Racing.raced = True
                red.send(red.update(summary="Version 2"))
                work()
            return entity

    assert flow.sync_entity(red.connection, key, tracker=Racing()) is None
    assert [e.kind for e in red.outgoing()] == ["ack", "ack"]


def test_a_poll_does_not_send_a_state_older_than_one_already_sent(red, alice):
    """A poll read the issue, a person changed it and its sync went first: the poll's older read
    must not follow it out, or the other side would undo the change (remove the new file, say)."""
    issue = blue_issue(alice, summary="First words")
    flow.sync_entity(red.connection, issue.key)
    versions = flow.twin_versions(red.connection)
    read_by_poll = tracker().get(issue.key)
    actions.update_issue(issue, {"summary": "Second thoughts"}, actor=alice)
    flow.sync_entity(red.connection, issue.key)
    flow.sync_many(red.connection, [read_by_poll], tracker=tracker(), versions=versions)
    assert [e.payload["replica"]["summary"] for e in red.outgoing()] == ["First words", "Second thoughts"]


def test_a_single_sync_does_not_send_a_state_older_than_one_already_sent(red, alice):
    issue = blue_issue(alice, summary="First words")
    flow.sync_entity(red.connection, issue.key)

    class Racing(BuiltinTracker):
        raced = False

        def get(self, key):
            entity = super().get(key)
            if not Racing.raced:
                Racing.raced = True  # a person's change and its sync, between this read and the twin's lock
                actions.update_issue(Issue.objects.get(key=key), {"summary": "Second thoughts"}, actor=alice)
                flow.sync_entity(red.connection, key)
            return entity

    flow.sync_entity(red.connection, issue.key, tracker=Racing())
    assert [e.payload["replica"]["summary"] for e in red.outgoing()] == ["First words", "Second thoughts"]


def test_it_stops_a_twin_that_bounces_without_settling(red, django_capture_on_commit_callbacks):
    use_rules(red.connection, incoming=LOOPING_RULES)
    with django_capture_on_commit_callbacks(execute=True):
        red.send(red.update(summary="x"))
        work()
    for _ in range(flow.MAX_BOUNCES * 2):
        bounce(red, django_capture_on_commit_callbacks)
        if red.twin().state == "blocked":
            break
    twin = red.twin()
    assert twin.state == "blocked" and twin.blocked_reason.startswith("sync loop")
    assert len(red.outgoing(kind="update", seq__gt=0)) == flow.MAX_BOUNCES, "it sent a bounded number of times"
    loop = SyncEvent.objects.get(twin=twin, status="failed")
    assert loop.payload["replica"]["summary"] == tracker().get(twin.local_key).summary
    assert loop.payload["last_received"]["summary"] + "!" == loop.payload["replica"]["summary"]
    use_rules(red.connection)
    flow.resolve_and_retry(twin)
    assert red.twin().state == "ok" and red.twin().bounces == 0


def test_a_twin_blocked_as_a_loop_is_not_blocked_again_on_every_look(red, django_capture_on_commit_callbacks):
    use_rules(red.connection, incoming=LOOPING_RULES)
    with django_capture_on_commit_callbacks(execute=True):
        red.send(red.update(summary="x"))
        work()
    for _ in range(flow.MAX_BOUNCES * 2):
        bounce(red, django_capture_on_commit_callbacks)
        if red.twin().state == "blocked":
            break
    twin = red.twin()
    assert twin.state == "blocked"
    for _ in range(3):  # polling passes and sweeps looking at the issue again
        assert flow.sync_entity(red.connection, twin.local_key) is None
        flow.sync_many(red.connection, [tracker().get(twin.local_key)], tracker=tracker())
    assert SyncEvent.objects.filter(twin=twin, status="failed").count() == 1


def test_a_person_changing_the_entity_ends_a_run_of_bounces(red, alice, django_capture_on_commit_callbacks):
    use_rules(red.connection, incoming=LOOPING_RULES)
    with django_capture_on_commit_callbacks(execute=True):
        red.send(red.update(summary="x"))
        work()
    for n in range(flow.MAX_BOUNCES):
        bounce(red, django_capture_on_commit_callbacks)
        assert red.twin().bounces == 1
        key = red.twin().local_key
        with django_capture_on_commit_callbacks(execute=True):
            actions.update_issue(Issue.objects.get(key=key), {"description": f"a person was here {n}"}, actor=alice)
    assert red.twin().state == "ok" and red.twin().bounces == 0


# --- 6. no silent failure ---------------------------------------------------------------------


def test_it_blocks_a_failing_twin_visibly_and_keeps_others_flowing(red, alice_api):
    use_rules(
        red.connection,
        incoming='issue.project = "BLUE"\nissue.summary = replica.summary\nif replica.summary == "boom":\n'
        "    issue.description = str(1 / 0)\n",
    )
    red.send(red.update("RED-1", summary="boom"), red.update("RED-2", summary="fine"))
    work()
    assert tracker().get(red.twin("RED-2").local_key).summary == "fine"
    [shown] = alice_api.get("/api/v1/twins/", {"remote_key": "RED-1"}).json()["results"]
    assert shown["state"] == "blocked"
    assert shown["last_error"] == "incoming rules, line 4: ZeroDivisionError: division by zero"
    failed = SyncEvent.objects.get(twin__remote_key="RED-1", direction="incoming")
    assert (failed.status, failed.error_line, failed.payload["replica"]["summary"]) == ("failed", 4, "boom")
    use_rules(red.connection)
    assert alice_api.post(f"/api/v1/twins/{shown['id']}/retry/").status_code == 200
    work()
    assert red.twin("RED-1").state == "ok"
    assert tracker().get(red.twin("RED-1").local_key).summary == "boom"


def test_a_write_failing_mid_apply_leaves_nothing_of_that_apply_behind(red):
    """The sync's writes skip their own savepoints (its transaction is all or nothing): a failure
    half-way must still undo the issue written before it, and the next message still applies."""
    too_long = "x" * (actions.MAX_COMMENT + 1)
    red.send(red.update("RED-1", summary="Half", comments=[comment("c1", "fine"), comment("c2", too_long)]))
    red.send(red.update("RED-2", summary="Whole", comments=[comment("c3", "fine")]))
    work()
    assert not Issue.objects.filter(summary="Half").exists()
    assert red.twin("RED-1").state == "blocked" and red.twin("RED-1").local_key is None
    failed = SyncEvent.objects.get(twin__remote_key="RED-1", direction="incoming")
    assert failed.status == "failed" and "body" in failed.error
    whole = tracker().get(red.twin("RED-2").local_key)
    assert (whole.summary, len(whole.comments)) == ("Whole", 1)


def test_it_retries_a_transient_failure_with_backoff(red):
    red.send(red.update(attachments=[attachment("a1", b"bytes")]))
    with mock.patch.object(transport, "fetch_attachment", side_effect=RED_DOWN):
        work()
    event = SyncEvent.objects.get(direction="incoming")
    assert (event.status, event.attempts, event.error) == ("pending", 1, str(RED_DOWN))
    assert event.next_attempt > timezone.now()
    assert red.twin().state == "ok"


def test_it_holds_the_queue_while_the_local_tracker_is_out_and_then_applies_everything(red):
    outside = MemoryTracker()
    red.send(red.update("RED-1", summary="One"), red.update("RED-2", summary="Two"))
    refused = TrackerUnavailable("Redmine refused the API key (HTTP 401 on GET /issues.json)", permanent=True)
    # Longer than MAX_ATTEMPTS retries would allow, were an outage counted against the events.
    for _ in range(flow.MAX_ATTEMPTS + 2):
        with (
            mock.patch.object(flow, "local_tracker", return_value=outside),
            mock.patch.object(outside, "create", side_effect=refused),
        ):
            make_due()
            work()
    held = SyncEvent.objects.filter(direction="incoming")
    assert {(e.status, e.attempts, e.error) for e in held} == {("pending", 0, str(refused))}
    assert {t.state for t in Twin.objects.all()} == {"ok"}, "no twin is blocked for the tracker's fault"
    assert health.problem().needs_action, "the problem is shown, and it needs someone to act"
    make_due()
    with mock.patch.object(flow, "local_tracker", return_value=outside):
        work()
    assert sorted(e.summary for e in outside.entities.values()) == ["One", "Two"]
    assert set(held.values_list("status", flat=True)) == {"done"}
    assert health.problem() is None


# --- 7. edits on both sides ---------------------------------------------------------------------


def test_edits_of_different_fields_on_both_sides_at_once_both_survive(red, alice):
    red.send(red.update(summary="Made on Red", description="Old words"))
    work()
    issue = Issue.objects.get(key=red.twin().local_key)
    # At the same moment: Blue edits the description, Red the summary (its replica still has the old words).
    actions.update_issue(issue, {"description": "New words from Blue"}, actor=alice)
    red.send(red.update(summary="Renamed on Red", description="Old words"))
    work()
    entity = tracker().get(issue.key)
    assert (entity.summary, entity.description) == ("Renamed on Red", "New words from Blue")
    assert not Conflict.objects.exists()


def test_an_edit_made_before_the_first_sync_is_acknowledged_survives_the_acknowledgement(red, alice):
    issue = blue_issue(alice, summary="First words")
    first = flow.sync_entity(red.connection, issue.key)
    actions.update_issue(issue, {"summary": "Second thoughts"}, actor=alice)
    flow.sync_entity(red.connection, issue.key)  # on its way too, after the first
    # Red's acknowledgement of the first update shows Red before the second one.
    red.send(red.ack(first.message_id, key="RED-1", remote_key=issue.key, summary="First words"))
    work()
    assert tracker().get(issue.key).summary == "Second thoughts"
    assert [e.kind for e in red.outgoing()] == ["update", "update"], "nothing was undone, so nothing goes again"


def test_an_edit_whose_sync_waits_for_the_twin_survives_the_first_syncs_acknowledgement(red, alice):
    """The acknowledgement is applied between a person's edit and its sync (which waits on the twin's lock)."""
    issue = blue_issue(alice, summary="First words")
    first = flow.sync_entity(red.connection, issue.key)
    Issue.objects.filter(pk=issue.pk).update(summary="Second thoughts")  # its own sync has not run yet
    red.send(red.ack(first.message_id, key="RED-1", remote_key=issue.key, summary="First words"))
    work()
    assert tracker().get(issue.key).summary == "Second thoughts", "the acknowledgement undid the edit"
    flow.sync_entity(red.connection, issue.key)
    assert red.outgoing()[-1].payload["replica"]["summary"] == "Second thoughts"


def test_a_field_edited_on_both_sides_at_once_is_settled_the_same_way_on_both(red, alice):
    """Blue's and Red's updates cross; each side settles the conflict on its own, and they agree."""
    red.send(red.update(summary="Made on Red"))
    work()
    issue = Issue.objects.get(key=red.twin().local_key)
    actions.update_issue(issue, {"summary": "Blue's title"}, actor=alice)
    blues = flow.sync_entity(red.connection, issue.key)
    # Red's edit was made before Blue's: Red's message is dated earlier, and Red's own settling
    # (the same rule, from its side) keeps Blue's title, so its ack of Blue's update says so.
    earlier = (timezone.now() - timedelta(minutes=1)).isoformat()
    crossing = red.update(summary="Red's title")
    crossing["changed"] = earlier
    red.send(crossing)
    work()
    assert tracker().get(issue.key).summary == "Blue's title"
    [conflict] = Conflict.objects.all()
    assert (conflict.chosen, conflict.policy) == ("local", "newest")
    red.send(red.ack(blues.message_id, key="RED-1", remote_key=issue.key, summary="Blue's title"))
    work()
    assert tracker().get(issue.key).summary == "Blue's title"
    acks = [e for e in red.outgoing() if e.kind == "ack"]
    assert acks[-1].payload["replica"]["summary"] == "Blue's title", "Blue told Red it kept its title"
    assert [e.kind for e in red.outgoing()][-2:] == ["update", "ack"], "nothing goes back and forth"


def seen(message: dict, seq: int) -> dict:
    """``message`` as Red made it, having applied Blue's messages up to ``seq``."""
    return {**message, "seen": seq}


def test_a_change_first_carried_by_an_ack_older_than_our_latest_update_still_arrives(red, alice):
    """Red's person changed a field just as Red applied our first update: only that ack carries it."""
    issue = blue_issue(alice, summary="First words")
    first = flow.sync_entity(red.connection, issue.key)
    actions.update_issue(issue, {"description": "Second thoughts"}, actor=alice)
    second = flow.sync_entity(red.connection, issue.key)
    # The ack of the first update is older than our second: its description is ours as Red had
    # it then (not a change of Red's), while its summary is Red's own change.
    red.send(seen(red.ack(first.message_id, key="RED-1", remote_key=issue.key, summary="Red's words"), 1))
    work()
    entity = tracker().get(issue.key)
    assert (entity.summary, entity.description) == ("Red's words", "Second thoughts"), "Red's change was lost"
    red.send(
        seen(
            red.ack(
                second.message_id,
                key="RED-1",
                remote_key=issue.key,
                summary="Red's words",
                description="Second thoughts",
            ),
            2,
        )
    )
    work()
    entity = tracker().get(issue.key)
    assert (entity.summary, entity.description) == ("Red's words", "Second thoughts")


def test_a_value_of_ours_red_held_before_it_saw_our_latest_update_is_not_taken_for_its_change(red, alice):
    """Blue clears a field before Red's ack of the first update comes; Red's messages made before
    it saw the clearing still carry Blue's old value (a sync loop once grew from this)."""
    issue = blue_issue(alice, summary="First words", description="Blue's words")
    first = flow.sync_entity(red.connection, issue.key)
    actions.update_issue(issue, {"description": ""}, actor=alice)
    flow.sync_entity(red.connection, issue.key)
    red.send(
        seen(
            red.ack(
                first.message_id, key="RED-1", remote_key=issue.key, summary="First words", description="Blue's words"
            ),
            1,
        )
    )
    # Red's person changes the summary; Red's update still has Blue's old description.
    red.send(seen(red.update(remote_key=issue.key, summary="Red's words", description="Blue's words"), 1))
    work()
    entity = tracker().get(issue.key)
    assert (entity.summary, entity.description) == ("Red's words", ""), "Blue's clearing was undone"


def test_red_setting_a_field_back_to_a_value_it_had_from_blue_is_its_own_change(red, alice):
    """Red takes Blue's words, changes them, and back: the last change is Red's, though the words were Blue's."""
    issue = blue_issue(alice, summary="Blue's words")
    first = flow.sync_entity(red.connection, issue.key)
    red.send(seen(red.ack(first.message_id, key="RED-1", remote_key=issue.key, summary="Blue's words"), 1))
    red.send(seen(red.update(remote_key=issue.key, summary="Red's words"), 1))
    work()
    assert tracker().get(issue.key).summary == "Red's words"
    # Before Red has applied Blue's ack of that update, Red's person sets the first words again.
    red.send(seen(red.update(remote_key=issue.key, summary="Blue's words"), 1))
    work()
    assert tracker().get(issue.key).summary == "Blue's words", "Red's last change was taken for Blue's own value"


def test_an_older_change_in_a_backlog_does_not_undo_a_newer_edit_here(red, alice):
    red.send(red.update(summary="Shared", status="Open"))
    work()
    issue = Issue.objects.get(key=red.twin().local_key)
    # Red's messages, made first but delivered late: Resolved, then In Progress.
    backlog = [red.update(summary="Shared", status="Resolved"), red.update(summary="Shared", status="In Progress")]
    # Later, a person here sets Resolved too, and it goes out.
    actions.update_issue(issue, {"status": "Resolved"}, actor=alice)
    flow.sync_entity(red.connection, issue.key)
    red.send(*backlog)
    work()
    assert tracker().get(issue.key).status == "Resolved", "Red's older In Progress undid the newer edit here"


def test_an_edit_of_the_same_field_on_both_sides_is_settled_by_the_policies_and_recorded(red, alice, bob_api):
    red.send(red.update(summary="Made on Red"))
    work()
    issue = Issue.objects.get(key=red.twin().local_key)
    actions.update_issue(issue, {"summary": "Blue's title"}, actor=alice)
    red.send(red.update(summary="Red's title"))
    work()
    assert tracker().get(issue.key).summary == "Red's title", "the default policy: the newer change wins"
    [conflict] = Conflict.objects.all()
    assert (conflict.field, conflict.base, conflict.local, conflict.remote, conflict.chosen) == (
        "summary",
        "Made on Red",
        "Blue's title",
        "Red's title",
        "remote",
    )
    [shown] = bob_api.get(f"/api/v1/twins/{red.twin().pk}/").json()["conflicts"]
    assert (shown["field"], shown["local"], shown["remote"], shown["chosen"]) == (
        "summary",
        "Blue's title",
        "Red's title",
        "remote",
    )


# --- delivery ---------------------------------------------------------------------------------


def test_it_never_loses_an_accepted_message(red, alice):
    update = red.update(summary="Stored before the answer")
    assert red.send(update)["accepted"] == [update["id"]]
    assert SyncEvent.objects.filter(message_id=update["id"], direction="incoming").exists()
    event = flow.sync_entity(red.connection, blue_issue(alice).key)
    with mock.patch.object(transport, "post_messages", side_effect=RED_DOWN):
        for _ in range(3):
            make_due()
            worker.send_outgoing(WORKER)
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("pending", 3)
    make_due()
    with mock.patch.object(transport, "post_messages") as post:
        post.return_value = {"accepted": [str(event.message_id)], "rejected": {}}
        worker.send_outgoing(WORKER)
    [(_, messages)] = [c.args for c in post.call_args_list]
    assert [m["id"] for m in messages] == [str(event.message_id)]
    event.refresh_from_db()
    assert event.status == "sent"
