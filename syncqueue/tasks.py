"""The django-q2 tasks that run the queue: a kick when events are queued, and a steady tick.

``kick`` enqueues ``work`` at most a few times a second per process; ``tick`` retries due
events, reclaims expired leases, polls trackers and pulls from remotes (on a private node)
about once a second for most of a minute, then queues the next tick, so nothing waits
long for the next kick. One tick runs at a time across all clusters (a lease in the
database); ``runnode`` starts the chain, and a minute schedule restarts it if it broke.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from django.core.cache import cache
from django.utils import timezone
from django_q.brokers import Broker, get_broker
from django_q.tasks import async_task

from syncqueue import worker
from syncqueue.models import Lease

log = logging.getLogger(__name__)
KICK_KEY = "syncqueue:kick"
TICK_SECONDS = 55
TICK_PAUSE = 1.0


def kick() -> None:
    # Many commits in a burst need one worker pass, not one task each.
    if cache.add(KICK_KEY, 1, timeout=0.3):
        async_task("syncqueue.tasks.work", task_name="syncqueue work", save=False, broker=_broker())


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
