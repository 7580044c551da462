"""The tick: one at a time across clusters, and always followed by the next; the kick: no commit waits for the tick."""

from __future__ import annotations

import time
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


# --- kicks ---------------------------------------------------------------------------------


@pytest.fixture
def redis_broker(monkeypatch, queued):
    """A Redis broker of its own (on the tests' Redis database), as a node with REDIS_URL has."""
    import os

    import redis
    from django_q.brokers.redis_broker import Redis
    from django_q.conf import Conf

    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis does not answer at {url}: {e}")
    monkeypatch.setattr(Conf, "REDIS", url)
    broker = Redis(list_key="kick-test")
    broker.connection.delete(tasks._kick_mark(broker))
    monkeypatch.setattr(tasks, "_broker", lambda: broker)
    yield broker
    broker.connection.delete(tasks._kick_mark(broker))


def test_a_burst_of_kicks_queues_one_work_and_a_kick_after_it_starts_queues_the_next(redis_broker, queued):
    for _ in range(5):
        tasks.kick()
    assert queued == ["syncqueue.tasks.work"], "one worker pass sees the whole burst"
    with mock.patch.object(worker, "drain", side_effect=lambda **kwargs: tasks.kick() or 0):
        tasks.work()  # a commit while it works: it may have looked already, so another pass comes
    assert queued == ["syncqueue.tasks.work"] * 2
    tasks.kick()
    assert queued == ["syncqueue.tasks.work"] * 2, "the second is queued and has not started"


def test_a_kick_waits_for_a_queued_work_no_longer_than_its_hold(redis_broker, queued):
    tasks.kick()
    time.sleep(tasks.KICK_HOLD_MS / 1000 + 0.05)
    tasks.kick()
    assert queued == ["syncqueue.tasks.work"] * 2, "a work that waits behind busy workers holds kicks off only so long"


def test_without_redis_a_process_queues_at_most_a_few_works_a_second(queued, monkeypatch):
    from django.core.cache import cache
    from django_q.brokers.orm import ORM

    monkeypatch.setattr(tasks, "_broker", lambda: ORM.__new__(ORM))
    cache.delete(tasks.KICK_KEY)
    for _ in range(5):
        tasks.kick()
    assert queued == ["syncqueue.tasks.work"]
    cache.delete(tasks.KICK_KEY)  # as 0.3 s later
    tasks.kick()
    assert queued == ["syncqueue.tasks.work"] * 2
