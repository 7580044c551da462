"""A claimed batch of incoming events applied in one transaction (worker._apply_batch).

What must hold is what holds one event at a time: each event done or failed on its own,
first syncs created once each, every update acknowledged, nothing of a failed event kept.
"""

from unittest import mock

import pytest
from django.db import connection as db
from django.test.utils import CaptureQueriesContext

from syncqueue import bulk, flow, worker
from syncqueue.every import Every
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import Red, blue_issue, comment, connect_red, replica, use_rules, work
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Issue


def _first_syncs(red: Red, count: int, **fields) -> list[dict]:
    return [
        red.update(f"RED-{n}", summary=f"Red issue {n}", comments=[comment(f"c{n}", f"Hello {n}")], **fields)
        for n in range(1, count + 1)
    ]


def test_a_batch_of_first_syncs_is_created_in_one_write_and_each_acknowledged(project):
    red = Red(connect_red())
    messages = _first_syncs(red, 6)
    red.send(*messages)
    calls, create_many = [], BuiltinTracker.create_many

    def spy(self, items):
        calls.append(len(items))
        return create_many(self, items)

    with mock.patch.object(BuiltinTracker, "create_many", spy):
        work()
    assert calls == [6], "one write for all six"
    for n, message in enumerate(messages, start=1):
        twin = red.twin(f"RED-{n}")
        issue = Issue.objects.get(key=twin.local_key)
        assert issue.summary == f"Red issue {n}"
        assert [c.body.splitlines()[2] for c in issue.comments.all()] == [f"Hello {n}"]
        assert twin.comment_map == {f"c{n}": str(issue.comments.get().pk)}
        assert (twin.in_seq, twin.out_seq, twin.state) == (1, 1, "ok")
        (ack,) = red.outgoing(twin=twin)
        assert (ack.kind, ack.payload["acks"], ack.payload["replica"]["summary"]) == (
            "ack",
            message["id"],
            issue.summary,
        )
    assert Issue.objects.count() == 6, "each created once"
    assert set(SyncEvent.objects.filter(direction="incoming").values_list("status", flat=True)) == {"done"}
    assert sorted(Issue.objects.values_list("number", flat=True)) == [1, 2, 3, 4, 5, 6]


def test_acks_that_change_nothing_here_take_no_savepoint_each_nor_write_our_replicas_back(project, alice):
    red = Red(connect_red())
    for n in range(20):
        flow.sync_entity(red.connection, blue_issue(alice, summary=f"Blue issue {n}").key)
    updates = red.outgoing()
    red.send(
        *(
            red.message(
                "ack",
                f"RED-{n}",
                remote_key=update.twin.local_key,
                acks=update.message_id,
                replica=replica(f"RED-{n}", summary=update.payload["replica"]["summary"], reporter=None),
            )
            | {"seen": 1}
            for n, update in enumerate(updates)
        )
    )
    with CaptureQueriesContext(db) as queries:
        work()
    assert all(red.twin(f"RED-{n}").in_seq == 1 for n in range(20))
    assert {e.status for e in red.outgoing()} == {"done"}, "each update acknowledged"
    savepoints = [q for q in queries.captured_queries if q["sql"].startswith("SAVEPOINT")]
    assert len(savepoints) < 5, "a savepoint per event costs two round trips, and these write nothing of their own"
    [twins_written] = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('UPDATE "syncqueue_twin"')]
    assert '"last_received" = ' in twins_written and '"last_sent" = ' not in twins_written, "ours did not change"


def test_a_first_sync_the_tracker_refuses_fails_alone_and_the_others_are_created(project):
    red = Red(connect_red())
    good = _first_syncs(red, 3)
    bad = red.update("RED-9", summary="Unknown status", status="Nonsense")
    red.send(good[0], bad, *good[1:])
    work()
    assert Issue.objects.count() == 3
    failed = SyncEvent.objects.get(direction="incoming", message_id=bad["id"])
    assert failed.status == "failed" and "Unknown status 'Nonsense'" in failed.error
    assert red.twin("RED-9").state == "blocked" and red.twin("RED-9").local_key is None
    assert not red.outgoing(twin=red.twin("RED-9")), "no ack for what was not applied"
    for n in (1, 2, 3):
        assert red.twin(f"RED-{n}").in_seq == 1 and len(red.outgoing(twin=red.twin(f"RED-{n}"))) == 1


def _synced_with_rules_that_fail_on_boom(count: int) -> Red:
    """``count`` first syncs applied, then rules whose run fails on a summary of "boom"."""
    red = Red(connect_red())
    red.send(*_first_syncs(red, count))
    work()
    use_rules(red.connection, incoming='if replica.summary == "boom":\n    1 / 0\nissue.summary = replica.summary\n')
    return red


def test_a_failing_event_in_a_batch_keeps_nothing_of_its_own_and_costs_the_others_nothing(project):
    # The rules fail on one issue only: its update is rolled back to its savepoint.
    red = _synced_with_rules_that_fail_on_boom(2)
    red.send(red.update("RED-1", summary="boom"), red.update("RED-2", summary="fine"))
    with mock.patch.object(worker, "_apply_each", wraps=worker._apply_each) as one_by_one:
        work()
    one_by_one.assert_not_called()
    assert Issue.objects.get(key=red.twin("RED-2").local_key).summary == "fine"
    boom = red.twin("RED-1")
    assert (boom.state, boom.in_seq) == ("blocked", 1) and "ZeroDivisionError" in boom.blocked_reason
    assert Issue.objects.get(key=boom.local_key).summary == "Red issue 1"
    assert len(red.outgoing(twin=boom)) == 1, "only the ack of its first sync"
    assert len(red.outgoing(twin=red.twin("RED-2"))) == 2


def test_a_batch_whose_transaction_fails_is_applied_again_one_by_one(project):
    red = Red(connect_red())
    red.send(*_first_syncs(red, 3))
    with mock.patch("syncqueue.flow.Batch.write", side_effect=worker.DatabaseError("the commit failed")):
        work(rounds=1)
    assert Issue.objects.count() == 3 and all(red.twin(f"RED-{n}").in_seq == 1 for n in (1, 2, 3))
    assert SyncEvent.objects.filter(direction="outgoing", kind="ack").count() == 3, "one ack each, none twice"


def test_update_rows_writes_json_dates_and_nulls_as_save_would(project):
    red = Red(connect_red())
    red.send(*_first_syncs(red, 2))
    work()
    twins = list(Twin.objects.order_by("id"))
    twins[0].last_sent, twins[0].sent_version, twins[0].out_seq = {"summary": 'it\'s "quoted"', "n": [1, 2]}, None, 7
    twins[1].last_sent, twins[1].sent_version, twins[1].out_seq = None, twins[1].last_synced, 8
    with CaptureQueriesContext(db) as queries:
        bulk.update_rows(twins, ["last_sent", "sent_version", "out_seq"])
    if db.vendor == "postgresql":
        assert len(queries) == 1
    first, second = Twin.objects.order_by("id")
    assert (first.last_sent, first.sent_version, first.out_seq) == ({"summary": 'it\'s "quoted"', "n": [1, 2]}, None, 7)
    assert (second.last_sent, second.sent_version, second.out_seq) == (None, twins[1].last_synced, 8)


@pytest.mark.skipif(db.vendor != "postgresql", reason="PostgreSQL only: how psycopg sends lists")
def test_lists_go_to_postgresql_as_binary_arrays_and_come_back_whole(project):
    from psycopg.adapt import PyFormat
    from psycopg.types.array import ListBinaryDumper

    db.ensure_connection()
    assert db.connection.adapters.get_dumper(list, PyFormat.AUTO) is ListBinaryDumper
    red = Red(connect_red())
    red.send(*_first_syncs(red, 1))
    twin = Twin.objects.get()
    odd = {"body": 'a "quote", a \\ backslash, {braces}, NULL, \u00e9\u4e2d \U0001f600', "list": [None, 1.5, True]}
    SyncEvent.objects.bulk_create(
        SyncEvent(connection=twin.connection, twin=twin, direction="outgoing", seq=n, payload={**odd, "n": n})
        for n in (1, 2, 3)
    )
    assert [e.payload for e in SyncEvent.objects.filter(direction="outgoing").order_by("seq")] == [
        {**odd, "n": n} for n in (1, 2, 3)
    ]


def test_get_many_answers_by_the_keys_given_and_leaves_out_those_missing(project):
    red = Red(connect_red())
    red.send(*_first_syncs(red, 2))
    work()
    keys = [t.local_key for t in Twin.objects.order_by("id")]
    found = BuiltinTracker().get_many([keys[1].lower(), keys[0], "BLUE-999"])
    assert set(found) == {keys[1].lower(), keys[0]}
    assert found[keys[0]] == BuiltinTracker().get(keys[0])
    assert found[keys[1].lower()].comments == BuiltinTracker().get(keys[1]).comments


def test_a_failure_after_an_earlier_event_of_the_same_twin_keeps_what_that_one_applied(project):
    red = _synced_with_rules_that_fail_on_boom(1)
    red.send(red.update("RED-1", summary="first"), red.update("RED-1", summary="boom"))
    # Both in one batch, as a claim never hands them out (the second waits for the first):
    # the first leaves the twin's row behind it until the batch writes, the second fails.
    events = list(SyncEvent.objects.filter(direction="incoming", status="pending").order_by("seq"))
    SyncEvent.objects.filter(pk__in=[e.pk for e in events]).update(status="processing", lease_owner="test")
    worker._apply_batch(events, BuiltinTracker())
    twin = red.twin("RED-1")
    assert (twin.in_seq, twin.state, twin.last_received["summary"]) == (2, "blocked", "first")
    assert "ZeroDivisionError" in twin.blocked_reason
    assert Issue.objects.get(key=twin.local_key).summary == "first"
    assert [e.status for e in SyncEvent.objects.filter(pk__in=[e.pk for e in events]).order_by("seq")] == [
        "done",
        "failed",
    ]
    assert len(red.outgoing(twin=twin, kind="ack")) == 2, "the first sync's ack and the first update's"


@pytest.mark.skipif(db.vendor != "postgresql", reason="PostgreSQL only: its statistics of the queue's tables")
@pytest.mark.django_db(transaction=True)
def test_a_busy_worker_analyzes_the_queue_tables_a_bulk_sync_grew(project, monkeypatch):
    red = Red(connect_red())
    red.send(*_first_syncs(red, 1))
    twin = Twin.objects.get()
    SyncEvent.objects.bulk_create(
        SyncEvent(connection=twin.connection, twin=twin, direction="outgoing", seq=n) for n in range(1, 3001)
    )
    with db.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")  # this session's counts, now
    monkeypatch.setattr(worker, "_analysis", Every(15.0))
    assert "syncqueue_syncevent" in worker.analyze_grown_tables()
    assert worker.analyze_grown_tables() == [], "at most once every 15 seconds"
    worker._analysis.reset()
    assert "syncqueue_syncevent" not in worker.analyze_grown_tables(), "analyzed, and not grown since"
