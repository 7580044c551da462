"""Polling: the watermark, the sweep for changes a tracker does not report, and the tracker's health."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection as db
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from connections.models import Node
from syncqueue import flow, health, tasks, triggers, worker
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import blue_issue, connect_red, tracker, use_rules
from trackers.base import Page, TrackerError, TrackerUnavailable, VersionPage
from trackers.builtin import actions
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Comment, Issue
from trackers.signals import entity_changed

DOWN = TrackerUnavailable("cannot reach Redmine at http://127.0.0.1:9: ConnectionError", permanent=False)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    # Only polling finds changes here: no post function, no worker kicks.
    monkeypatch.setattr(tasks, "kick", lambda: None)
    entity_changed.disconnect(dispatch_uid="syncqueue.triggers")
    yield
    triggers.connect()


@pytest.fixture
def red(project):
    return connect_red()


class Unreported(BuiltinTracker):
    """The built-in tracker as Redmine behaves: some changes move no timestamp."""

    reports_every_change = False

    def changed_since(self, since, *, cursor=None, limit=100):
        return Page(())

    def changed_versions(self, since, *, cursor=None, limit=100):
        return VersionPage(())


class Down(BuiltinTracker):
    def changed_since(self, since, *, cursor=None, limit=100):
        raise DOWN

    changed_versions = changed_since


def outgoing(connection) -> list[SyncEvent]:
    return list(SyncEvent.objects.filter(connection=connection, direction="outgoing").order_by("id"))


def test_a_pass_queues_what_changed_and_matches_and_then_nothing_more(red, alice):
    issue = blue_issue(alice)
    assert triggers.poll(red) == 1
    red.refresh_from_db()
    assert red.poll_watermark == issue.updated
    assert triggers.poll(red) == 0, "an unchanged entity seen again in the overlap is not sent again"
    assert [e.payload["replica"]["key"] for e in outgoing(red)] == [issue.key]


def test_a_pass_does_not_read_again_what_settled_before_the_last_pass(red, alice):
    """Issues imported in one second stay in the overlap of a watermark that no change moves:
    each pass would read them all again. The built-in tracker's watermark moves on by itself."""
    for _ in range(3):
        blue_issue(alice)
    Issue.objects.update(updated=timezone.now() - timedelta(minutes=5))

    class Counting(BuiltinTracker):
        read = 0

        def changed_versions(self, since, *, cursor=None, limit=100):
            page = super().changed_versions(since, cursor=cursor, limit=limit)
            Counting.read += len(page.versions)
            return page

    assert triggers.poll(red, Counting()) == 3
    red.refresh_from_db()
    assert red.poll_watermark > timezone.now() - triggers.SETTLED - timedelta(seconds=5)
    Counting.read = 0
    assert triggers.poll(red, Counting()) == 0
    assert Counting.read == 0
    late = blue_issue(alice)  # a change after the pass is still found
    assert triggers.poll(red, Counting()) == 1
    assert Counting.read == 1 and outgoing(red)[-1].payload["replica"]["key"] == late.key


def test_a_pass_runs_no_rules_for_an_issue_still_at_the_version_last_sent(red, alice):
    issue = blue_issue(alice)
    flow.sync_entity(red, issue.key)
    with mock.patch.object(flow.processors, "run_outgoing", wraps=flow.processors.run_outgoing) as rules:
        assert triggers.poll(red) == 0
        assert rules.call_count == 0, "the issue is as it was sent"
        actions.update_issue(issue, {"summary": "Changed since"}, actor=alice)
        assert triggers.poll(red) == 1
        assert rules.call_count == 1


def test_a_pass_reads_only_the_entities_it_runs_rules_on(red, alice):
    """After a bulk sync a pass finds thousands of the sync's own writes, sent already: the
    tracker lists their versions, and only a changed one is read."""
    sent, changed = blue_issue(alice), blue_issue(alice)
    for issue in (sent, changed):
        flow.sync_entity(red, issue.key)
    actions.update_issue(changed, {"summary": "Changed since"}, actor=alice)
    with mock.patch.object(BuiltinTracker, "get_many", autospec=True, side_effect=BuiltinTracker.get_many) as reads:
        assert triggers.poll(red) == 1
    assert [list(call.args[1]) for call in reads.call_args_list] == [[changed.key]]


def test_a_pass_without_a_version_listing_reads_its_pages(red, alice):
    """A tracker without ``changed_versions`` (Redmine) is polled through ``changed_since``."""

    class Plain(BuiltinTracker):
        changed_versions = None

    issue = blue_issue(alice)
    assert triggers.poll(red, Plain()) == 1
    assert outgoing(red)[-1].payload["replica"]["key"] == issue.key
    assert triggers.poll(red, Plain()) == 0


def test_a_pass_leaves_out_entities_no_trigger_matches(project, alice):
    red = connect_red(trigger=False)
    blue_issue(alice)
    assert triggers.poll(red) == 0
    assert outgoing(red) == []


def test_the_watermark_stays_where_it_was_when_a_pass_fails(red, alice):
    blue_issue(alice)
    broken = TrackerError("Redmine broke off", permanent=False)
    with mock.patch.object(flow, "sync_many", side_effect=broken), pytest.raises(TrackerError):
        triggers.poll(red)
    red.refresh_from_db()
    assert red.poll_watermark is None
    assert triggers.poll(red) == 1, "the next pass sees the entity again"


def test_a_sweep_finds_a_comment_edit_that_moved_no_timestamp(red, alice):
    issue = blue_issue(alice)
    note = actions.add_comment(issue, "First words", actor=alice)
    flow.sync_entity(red, issue.key)
    Comment.objects.filter(pk=note.pk).update(body="Edited words")  # as Redmine edits a journal
    assert triggers.poll(red, Unreported()) == 1
    [_, resent] = outgoing(red)
    assert [c["body"] for c in resent.payload["replica"]["comments"]] == ["Edited words"]
    assert Twin.objects.get(local_key=issue.key).last_checked is not None


def test_a_sweep_sends_nothing_for_twins_that_did_not_change(red, alice):
    for n in range(3):
        flow.sync_entity(red, blue_issue(alice, summary=f"Issue {n}").key)
    assert triggers.poll(red, Unreported()) == 0
    assert len(outgoing(red)) == 3


def test_a_sweep_reads_the_twins_looked_at_longest_ago_first(red, alice):
    first, second = (blue_issue(alice, summary=name) for name in ("First", "Second"))
    for issue in (first, second):
        flow.sync_entity(red, issue.key)
    Twin.objects.filter(local_key=first.key).update(last_checked=timezone.now())
    triggers.sweep(red, Unreported(), batch=1)
    checked = dict(Twin.objects.values_list("local_key", "last_checked"))
    assert checked[second.key] is not None and checked[second.key] > checked[first.key]


def test_trackers_that_report_every_change_are_not_swept(red, alice):
    flow.sync_entity(red, blue_issue(alice).key)
    assert triggers.sweep(red, tracker()) == 0
    assert Twin.objects.get().last_checked is None


def test_an_unreachable_tracker_is_recorded_and_cleared_when_it_answers(red, alice):
    blue_issue(alice)
    with mock.patch.object(flow, "local_tracker", return_value=Down()):
        assert triggers.poll_due() == 0
    problem = health.problem()
    assert problem.problem == str(DOWN) and not problem.needs_action
    red.refresh_from_db()
    assert red.poll_watermark is None
    red.__class__.objects.filter(pk=red.pk).update(polled_at=None)
    assert triggers.poll_due() == 1
    assert health.problem() is None


def test_the_poll_interval_comes_from_the_settings_by_default(red, settings):
    settings.SYNC_POLL_SECONDS = 45
    assert triggers.poll_interval() == 45


def test_the_node_sets_its_own_poll_interval(red):
    Node.local()
    Node.objects.update(poll_seconds=7)
    assert triggers.poll_interval() == 7


# --- many at once -----------------------------------------------------------------------------


def test_sync_many_queues_each_changed_entity_once_in_a_fixed_number_of_queries(red, alice):
    entities = [tracker().get(blue_issue(alice, summary=f"Bulk {n}").key) for n in range(50)]
    with CaptureQueriesContext(db) as queries:
        assert flow.sync_many(red, entities, tracker=tracker()) == 50
    # SQLite's limit of 999 parameters splits the twins' insert in two (a twin has 20 columns).
    assert len(queries) <= 13, "reads and writes go in bulk, not one round per entity"
    assert flow.sync_many(red, entities, tracker=tracker()) == 0, "nothing new to send the second time"
    assert sorted(e.seq for e in outgoing(red)) == [1] * 50


def test_sync_many_leaves_stopped_twins_and_blocks_only_the_failing_one(red, alice):
    stopped, failing, fine = (blue_issue(alice, summary=name) for name in ("Stopped", "boom", "Fine"))
    Twin.objects.create(connection=red, local_key=stopped.key, state=Twin.State.STOPPED)
    use_rules(red, outgoing='replica.summary = issue.summary\nif issue.summary == "boom":\n    x = 1 / 0\n')
    queued = flow.sync_many(red, [tracker().get(i.key) for i in (stopped, failing, fine)], tracker=tracker())
    assert queued == 1
    states = dict(Twin.objects.values_list("local_key", "state"))
    assert states == {stopped.key: "stopped", failing.key: "blocked", fine.key: "ok"}


def test_a_trigger_run_past_its_budget_goes_on_from_its_cursor_a_page_at_a_time(red, alice):
    for n in range(450):
        blue_issue(alice, summary=f"Many {n}")
    trigger = red.triggers.get()
    assert triggers.sync_all_matches(trigger, budget_seconds=0) == 200, "one page, then the budget is spent"
    trigger.refresh_from_db()
    assert trigger.running and trigger.last_run is None
    assert triggers.continue_runs() == 200
    assert triggers.continue_runs() == 50
    trigger.refresh_from_db()
    assert not trigger.running and trigger.last_run is not None
    assert triggers.continue_runs() == 0, "the run is over"
    assert len(outgoing(red)) == 450


def test_the_workers_carry_a_run_on_between_their_other_work(red, alice, monkeypatch):
    for n in range(250):
        blue_issue(alice, summary=f"Many {n}")
    assert triggers.sync_all_matches(red.triggers.get(), budget_seconds=0) == 200
    monkeypatch.setattr(worker, "send_outgoing", lambda owner: 0)  # no Blue to send to here
    worker.drain(budget_seconds=30)
    assert len(outgoing(red)) == 250 and not red.triggers.get().running


def test_a_run_the_connection_no_longer_takes_ends_with_a_warning(red, alice, caplog):
    for n in range(250):
        blue_issue(alice, summary=f"Many {n}")
    assert triggers.sync_all_matches(red.triggers.get(), budget_seconds=0) == 200
    red.__class__.objects.filter(pk=red.pk).update(status="pending")
    assert triggers.continue_runs() == 0
    assert not red.triggers.get().running
    assert "stopped: the connection is not active yet" in caplog.text
    assert len(outgoing(red)) == 200


def test_a_run_waits_while_the_tracker_is_out(red, alice):
    for n in range(250):
        blue_issue(alice, summary=f"Many {n}")
    assert triggers.sync_all_matches(red.triggers.get(), budget_seconds=0) == 200
    with (
        mock.patch.object(flow, "local_tracker", return_value=Down()),
        mock.patch.object(Down, "search", side_effect=DOWN),
    ):
        assert triggers.continue_runs() == 0
    assert red.triggers.get().running
    assert triggers.continue_runs() == 50
