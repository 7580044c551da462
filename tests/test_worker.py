from types import SimpleNamespace
from unittest import mock

from syncqueue import worker
from syncqueue.every import Every


def test_it_splits_a_batch_so_that_no_request_grows_too_large():
    events = [SimpleNamespace(size=size) for size in (400, 400, 400, 900, 50)]
    with mock.patch.object(worker.flow, "message_of", side_effect=lambda e: {"x": "y" * e.size}):
        parts = worker.split_by_size(events, limit=1000)
    assert [[e.size for e in part] for part in parts] == [[400, 400], [400], [900, 50]]


def test_it_sends_a_single_oversized_message_alone_for_the_receiver_to_refuse_clearly():
    events = [SimpleNamespace(size=5000)]
    with mock.patch.object(worker.flow, "message_of", side_effect=lambda e: {"x": "y" * e.size}):
        assert worker.split_by_size(events, limit=1000) == [events]


def test_it_kicks_the_workers_when_a_connection_is_activated_again(db, django_capture_on_commit_callbacks):
    from connections import lifecycle
    from connections.models import Connection

    connection = Connection.objects.create(name="Red", status=Connection.Status.DEACTIVATED, secret="a" * 64)
    with mock.patch("syncqueue.tasks.kick") as kick, django_capture_on_commit_callbacks(execute=True):
        lifecycle.set_active(connection, True)
    kick.assert_called_once()


def test_it_puts_a_connection_in_error_when_the_remote_no_longer_knows_it(project, alice):
    from connections import lifecycle
    from syncqueue import flow, transport
    from syncqueue.models import SyncEvent
    from tests.syncpair import connect_red
    from trackers.builtin import actions

    connection = connect_red()
    issue = actions.create_issue(project, {"summary": "Refused"}, alice)
    flow.sync_entity(connection, issue.key)
    refusal = transport.RemoteError("the remote node refused the request (HTTP 401): bad signature", refused_us=True)
    with mock.patch.object(transport, "post_messages", side_effect=refusal):
        worker.send_outgoing("test-worker")
    connection.refresh_from_db()
    assert (connection.status, connection.status_detail) == ("error", str(refusal))
    assert SyncEvent.objects.get(direction="outgoing").status == "pending", "nothing is lost"
    lifecycle.set_active(connection, True)
    connection.refresh_from_db()
    assert connection.status == "active"


def test_an_update_acknowledged_before_its_send_returns_stays_finished(project, alice):
    from syncqueue import flow, transport
    from syncqueue.models import SyncEvent
    from tests.syncpair import connect_red
    from trackers.builtin import actions

    connection = connect_red()
    event = flow.sync_entity(connection, actions.create_issue(project, {"summary": "Quick"}, alice).key)

    def post_and_ack_at_once(connection, messages):
        # The other side applied it and its ack was applied here before this answer is read.
        SyncEvent.objects.filter(pk=event.pk).update(status="done")
        return {"accepted": [m["id"] for m in messages], "rejected": {}}

    with mock.patch.object(transport, "post_messages", side_effect=post_and_ack_at_once):
        worker.send_outgoing("test-worker")
    event.refresh_from_db()
    assert event.status == "done", "not back to 'sent', waiting for an ack that already came"


def test_an_idle_pass_asks_one_query_and_a_ready_event_is_seen(project, alice, django_assert_num_queries):
    from syncqueue import flow
    from tests.syncpair import connect_red
    from trackers.builtin import actions

    connection = connect_red()
    worker.ready_work()  # compiled once per process
    with django_assert_num_queries(1):
        assert worker.drain(budget_seconds=5) == 0
    assert not worker.ready_work()
    flow.sync_entity(connection, actions.create_issue(project, {"summary": "Ready"}, alice).key)
    ready = worker.ready_work()
    assert (ready.outgoing, ready.incoming, ready.pulls, ready.runs) == (True, False, False, False)


def test_it_notes_contact_at_most_every_few_seconds_but_clears_a_problem_at_once(project, monkeypatch):
    from connections.models import Connection
    from syncqueue import flow
    from tests.syncpair import connect_red

    connection = connect_red()
    monkeypatch.setattr(flow, "_contact", Every(5.0))
    flow.note_contact(connection)
    first = Connection.objects.get(pk=connection.pk).last_contact
    assert first is not None
    flow.note_contact(connection)
    assert Connection.objects.get(pk=connection.pk).last_contact == first, "written again within 5 s"
    Connection.objects.filter(pk=connection.pk).update(status_detail="The other node does not answer.")
    connection.refresh_from_db()
    flow.note_contact(connection, answered=True)
    connection.refresh_from_db()
    assert connection.status_detail == "" and connection.last_contact > first
    monkeypatch.setattr(flow._contact, "seconds", 0.0)
    flow.note_contact(connection)
    assert Connection.objects.get(pk=connection.pk).last_contact > connection.last_contact


def test_a_working_tracker_is_noted_at_most_every_few_seconds_but_its_own_problem_clears_at_once(
    db, monkeypatch, django_assert_num_queries
):
    from syncqueue import health
    from syncqueue.models import TrackerState
    from trackers.base import TrackerUnavailable

    monkeypatch.setattr(health, "_ok", Every(5.0))
    health.tracker_ok()
    with django_assert_num_queries(0):
        health.tracker_ok()  # within 5 s: nothing to ask
    # Another process recorded a problem: it is cleared once 5 s have passed here.
    TrackerState.objects.create(pk=health.STATE_ID, problem="Redmine does not answer")
    health.tracker_ok()
    assert health.problem() is not None
    monkeypatch.setattr(health._ok, "seconds", 0.0)
    health.tracker_ok()
    assert health.problem() is None
    # A problem this process recorded is cleared at its next success, however soon.
    monkeypatch.setattr(health._ok, "seconds", 60.0)
    health.tracker_failed(TrackerUnavailable("Redmine does not answer", permanent=False))
    assert health.problem() is not None
    health.tracker_ok()
    assert health.problem() is None
