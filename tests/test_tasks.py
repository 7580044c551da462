"""The tick: one at a time across clusters, and always followed by the next."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from syncqueue import tasks, worker
from syncqueue.models import Lease

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks, "async_task", lambda func, **kwargs: calls.append(func))
    return calls


def test_a_tick_runs_releases_its_lease_and_queues_the_next(monkeypatch, queued):
    monkeypatch.setattr(tasks, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(tasks, "TICK_PAUSE", 0.01)
    tasks.tick()
    assert queued == ["syncqueue.tasks.tick"]
    assert Lease.objects.get(name=tasks.TICK_LEASE).expires <= timezone.now()


def test_a_second_tick_leaves_at_once_while_one_runs(queued):
    Lease.objects.create(name=tasks.TICK_LEASE, owner="elsewhere", expires=timezone.now() + timedelta(seconds=60))
    with mock.patch.object(worker, "drain") as drain:
        assert tasks.tick() == 0
    drain.assert_not_called()
    assert queued == [], "the running tick queues the next one, not this one"
    assert Lease.objects.get().owner == "elsewhere"


def test_a_tick_that_fails_still_hands_over_to_the_next(monkeypatch, queued):
    monkeypatch.setattr(tasks, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(tasks, "TICK_PAUSE", 0.01)
    monkeypatch.setattr(worker, "cleanup", mock.Mock(side_effect=RuntimeError("database went away")))
    with pytest.raises(RuntimeError):
        tasks.tick()
    assert queued == ["syncqueue.tasks.tick"]
    assert Lease.objects.get().expires <= timezone.now()


def test_starting_the_node_frees_a_dead_clusters_lease_and_starts_a_tick(queued):
    Lease.objects.create(name=tasks.TICK_LEASE, owner="killed", expires=timezone.now() + timedelta(seconds=60))
    tasks.start()
    assert queued == ["syncqueue.tasks.tick"]
    assert Lease.objects.get().expires <= timezone.now()
