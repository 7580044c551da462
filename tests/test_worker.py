from types import SimpleNamespace
from unittest import mock

from syncqueue import worker


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
