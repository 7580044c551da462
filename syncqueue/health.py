"""Whether the local tracker can be used: recorded by the worker and the poller, shown in the pages.

A tracker that cannot be used as a whole (``TrackerUnavailable``: unreachable, down, or
refusing the sync's key) is not the fault of the entity at hand, so no twin is blocked
for it: the queue waits, the problem is shown on every connection, and work resumes by
itself at the first call that succeeds.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from syncqueue.every import Every
from syncqueue.models import TrackerState
from trackers.base import TrackerError

log = logging.getLogger(__name__)
STATE_ID = 1
# A process that found the tracker working asks again to clear a problem at most this often:
# every applied batch asked, a write each time, though there is almost never a problem. A
# problem this process recorded is cleared at its next success all the same.
_ok = Every(5.0)


def tracker_failed(error: TrackerError) -> None:
    _ok.reset()
    now = timezone.now()
    state, created = TrackerState.objects.get_or_create(
        pk=STATE_ID, defaults={"problem": str(error), "needs_action": error.permanent, "since": now, "checked": now}
    )
    if created or state.problem != str(error):
        log.warning("the local tracker cannot be used: %s", error)
    if not created:
        TrackerState.objects.filter(pk=STATE_ID).update(
            problem=str(error), needs_action=error.permanent, since=state.since or now, checked=now
        )


def tracker_ok() -> None:
    """The tracker answered: clear a recorded problem (one cheap UPDATE, at most every few seconds)."""
    if not _ok.due():
        return
    if (
        TrackerState.objects.filter(pk=STATE_ID)
        .exclude(problem="")
        .update(problem="", needs_action=False, since=None, checked=timezone.now())
    ):
        log.warning("the local tracker works again")


def problem() -> TrackerState | None:
    """The current problem with the local tracker, or None when it works."""
    return TrackerState.objects.filter(pk=STATE_ID).exclude(problem="").first()
