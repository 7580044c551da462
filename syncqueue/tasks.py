"""The django-q2 tasks that run the queue: a kick when events are queued, and a steady tick.

``kick`` enqueues ``work`` unless one was queued just now and has not started; ``tick``
retries due events, reclaims expired leases, polls trackers and pulls from remotes (on a
private node) about once a second for most of a minute, then queues the next tick, so
nothing waits long for the next kick. One tick runs at a time across all clusters (a
lease in the database); ``runnode`` starts the chain, and a minute schedule restarts it
if it broke.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone
from django_q.brokers import Broker, get_broker
from django_q.brokers.redis_broker import Redis as RedisBroker
from django_q.tasks import async_task

from syncqueue import worker
from syncqueue.models import Lease

log = logging.getLogger(__name__)
KICK_KEY = "syncqueue:kick"
# A queued ``work`` that has not started holds later kicks off this long at most. It will
# see what they announce, but it may wait behind busy workers (a cluster's pusher takes
# tasks ahead of its workers) while another cluster's idle ones could have helped.
KICK_HOLD_MS = 300
TICK_SECONDS = 55
TICK_PAUSE = 1.0


def kick() -> None:
    """Have a worker look at the queue: queue ``work`` unless one was queued in the last
    KICK_HOLD_MS and has not started yet.

    With the Redis broker the mark is shared by the node's processes and ``work`` removes it
    as it starts: a commit after that start queues the next one, so no commit waits for the
    tick, and a burst of commits queues a task or two, not one each. The database broker
    (the demo's) has no such mark: each process queues at most a few a second.
    """
    broker = _broker()
    if isinstance(broker, RedisBroker):
        wanted = broker.connection.set(_kick_mark(broker), 1, nx=True, px=KICK_HOLD_MS)
    else:
        wanted = cache.add(KICK_KEY, 1, timeout=KICK_HOLD_MS / 1000)
    if wanted:
        async_task("syncqueue.tasks.work", task_name="syncqueue work", save=False, broker=broker)


def _kick_mark(broker: RedisBroker) -> str:
    return f"{broker.list_key}:kick"


_brokers: dict[int, Broker] = {}


def _broker() -> Broker:
    """This process's broker: without one, each task queued opened (and closed) a connection to Redis."""
    pid = os.getpid()  # a forked child must not share its parent's connection
    if pid not in _brokers:
        _brokers.clear()
        _brokers[pid] = get_broker()
    return _brokers[pid]


def on_connection_activated(sender, connection, **kwargs) -> None:
    kick()


def work() -> int:
    broker = _broker()
    if isinstance(broker, RedisBroker):
        broker.connection.delete(_kick_mark(broker))  # before the first look: a later commit kicks again
    return worker.drain(budget_seconds=45)


def tick() -> int:
    from syncqueue import triggers

    owner = worker.worker_id()
    if not take_lease(TICK_LEASE, owner, TICK_SECONDS + 10):
        return 0  # another tick runs (one started with the node, and the schedule fired too)
    handled = 0
    deadline = time.monotonic() + TICK_SECONDS
    try:
        while time.monotonic() < deadline:
            try:
                triggers.poll_due()
            except Exception:
                log.exception("polling failed")
            try:
                worker.reclaim_expired()
                handled += worker.drain(budget_seconds=max(0.0, deadline - time.monotonic()))
            except Exception:
                log.exception("working the queue failed")
            time.sleep(TICK_PAUSE)
        worker.cleanup()
    finally:
        Lease.objects.filter(name=TICK_LEASE, owner=owner).update(expires=timezone.now())
        # The next tick follows at once; the minute schedule only restarts the chain if it broke.
        _enqueue_tick()
    return handled


def _enqueue_tick() -> None:
    try:
        async_task("syncqueue.tasks.tick", task_name="syncqueue tick", save=False, broker=_broker())
    except Exception:
        log.exception("could not queue the next tick; the schedule starts one within a minute or two")


TICK_LEASE = "tick"


def take_lease(name: str, owner: str, seconds: float) -> bool:
    """Whether ``owner`` now holds lease ``name`` (free, or expired) for ``seconds``."""
    now = timezone.now()
    Lease.objects.get_or_create(name=name, defaults={"expires": now})
    return bool(
        Lease.objects.filter(name=name, expires__lte=now).update(owner=owner, expires=now + timedelta(seconds=seconds))
    )


def start() -> None:
    """At node start: begin a tick now rather than when the schedule next fires (up to a minute or so)."""
    Lease.objects.filter(name=TICK_LEASE).update(expires=timezone.now())  # its holder died with the old cluster
    _enqueue_tick()


def ensure_schedule(**kwargs) -> None:
    """Create the tick schedule once (called after migrate)."""
    from django_q.models import Schedule

    Schedule.objects.get_or_create(
        func="syncqueue.tasks.tick",
        defaults={"name": "syncqueue tick", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
