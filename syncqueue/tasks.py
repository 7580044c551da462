"""The django-q2 tasks that run the queue: a kick when events are queued, and a steady tick.

``kick`` enqueues ``work`` at most a few times a second per process; ``tick`` runs every
minute from a django-q2 schedule and, for most of that minute, retries due events,
reclaims expired leases and polls trackers, so nothing waits long for the next kick.
"""

from __future__ import annotations

import logging
import time

from django.core.cache import cache
from django_q.tasks import async_task

from syncqueue import worker

log = logging.getLogger(__name__)
KICK_KEY = "syncqueue:kick"
TICK_SECONDS = 55
TICK_PAUSE = 1.0


def kick() -> None:
    # Many commits in a burst need one worker pass, not one task each.
    if cache.add(KICK_KEY, 1, timeout=0.3):
        async_task("syncqueue.tasks.work", task_name="syncqueue work", save=False)


def on_connection_activated(sender, connection, **kwargs) -> None:
    kick()


def work() -> int:
    return worker.drain(budget_seconds=45)


def tick() -> int:
    from syncqueue import triggers

    handled = 0
    deadline = time.monotonic() + TICK_SECONDS
    while time.monotonic() < deadline:
        try:
            triggers.poll_due()
        except Exception:
            log.exception("polling failed")
        handled += worker.drain(budget_seconds=max(0.0, deadline - time.monotonic()))
        time.sleep(TICK_PAUSE)
    worker.cleanup()
    return handled


def ensure_schedule(**kwargs) -> None:
    """Create the tick schedule once (called after migrate)."""
    from django_q.models import Schedule

    Schedule.objects.get_or_create(
        func="syncqueue.tasks.tick",
        defaults={"name": "syncqueue tick", "schedule_type": Schedule.MINUTES, "minutes": 1, "repeats": -1},
    )
