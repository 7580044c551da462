"""What brings entities under sync: the post function, filter triggers and polling.

- post function: the built-in tracker's ``entity_changed`` signal syncs the entity at once
  on every connection where it is a twin or matches an active trigger;
- filter triggers: "sync all matches now" brings every match of a trigger's query under sync;
- polling: per connection, entities changed since its watermark; the watermark advances
  only after a fully successful pass (the adapter overlaps the boundary a little).
The manual operation and the REST API call ``flow.sync_entity`` directly.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.db import connection as db
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from connections.models import Connection, Node, Trigger
from syncqueue import flow, health
from syncqueue.models import Twin
from trackers.base import Tracker, TrackerError, TrackerUnavailable
from trackers.signals import entity_changed

log = logging.getLogger(__name__)
SYNCING = (Connection.Status.ACTIVE, Connection.Status.DEACTIVATED)


def connect() -> None:
    entity_changed.connect(on_entity_changed, dispatch_uid="syncqueue.triggers")


def _matches(trigger: Trigger, key: str, tracker: Tracker) -> bool:
    try:
        return tracker.matches(trigger.query, key)
    except TrackerUnavailable:
        raise
    except TrackerError as e:
        # A query the tracker refuses matches nothing; the trigger's page shows the error when run.
        log.warning("trigger %s cannot be tested: %s", trigger.pk, e)
        return False


def unanswered_connections(key: str) -> list[Connection]:
    """Syncing connections, less those on which the sync itself just answered a change of ``key``."""
    syncing = flow.remembered(
        "syncing connections",
        lambda: list(Connection.objects.filter(status__in=SYNCING).select_related("active_rules")),
    )
    return [c for c in syncing if not flow.answered_already(c.pk, key)]


def connections_for(key: str, tracker: Tracker, connections: list[Connection]) -> list[Connection]:
    """Those of ``connections`` on which ``key`` is (or should come) under sync."""
    twinned = set(
        Twin.objects.filter(connection__in=connections, local_key=key)
        .exclude(state=Twin.State.STOPPED)
        .values_list("connection_id", flat=True)
    )
    return [
        c
        for c in connections
        if c.pk in twinned or any(_matches(t, key, tracker) for t in c.triggers.filter(active=True))
    ]


def on_entity_changed(sender, key: str, change: str, actor=None, **kwargs) -> None:
    if change == "deleted":
        return
    try:
        connections = unanswered_connections(key)
        if not connections:
            return  # the sync's own write, answered already: no tracker needed
        tracker = flow.local_tracker()
        for connection in connections_for(key, tracker, connections):
            flow.sync_entity(connection, key, tracker=tracker)
    except (TrackerError, flow.SyncRefused) as e:
        log.warning("could not sync %s after a change: %s", key, e)


def sync_all_matches(trigger: Trigger, tracker: Tracker | None = None, *, budget_seconds: float | None = None) -> int:
    """Bring every entity matching ``trigger`` under sync; returns how many were queued.

    With ``budget_seconds``, pages stop once the budget is spent: the trigger keeps the
    cursor of the next page (``Trigger.run_cursor``), and the queue's workers go on from
    there a page at a time between their other work (``continue_runs``). A trigger matching
    tens of thousands of entities never holds a web request past its time limit, its run
    survives a restart, and its replicas go out while the rest are still being made.
    """
    tracker = tracker or flow.local_tracker()
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    queued, cursor = 0, None
    # Read once, before any page: a twin that applies a message during the pass has its entity
    # read again under its lock, and each twin is on one page only.
    versions = flow.twin_versions(trigger.connection)
    while True:
        added, cursor = _run_page(trigger, tracker, cursor, versions)
        queued += added
        if cursor is None:
            return queued
        if deadline is not None and time.monotonic() > deadline:
            Trigger.objects.filter(pk=trigger.pk).update(run_cursor=cursor)
            flow.kick()
            return queued


RUN_PAGE = 200


def _run_page(trigger: Trigger, tracker: Tracker, cursor: str | None, versions: dict[str, int]):
    """One page of a trigger's run: how many were queued, and the next page's cursor (None: the run is over)."""
    page = tracker.search(trigger.query, cursor=cursor, limit=RUN_PAGE)
    queued = flow.sync_many(trigger.connection, page.entities, tracker=tracker, versions=versions)
    if page.next_cursor is None:
        Trigger.objects.filter(pk=trigger.pk).update(last_run=timezone.now(), run_cursor="")
    return queued, page.next_cursor


def runs_under_way():
    return Trigger.objects.exclude(run_cursor="")


def continue_runs() -> int:
    """The next page of a trigger run under way (see ``sync_all_matches``); 0 when none is.

    The trigger's row is locked while its page is made, so that on PostgreSQL two workers
    never make the same page (each skips a run another has). A run whose connection or
    rules refuse it, or whose tracker refuses its query, ends with a warning in the log;
    while the tracker is out it waits for the next pass.
    """
    # Called only when the worker's probe (``worker.ready_work``) saw a run under way.
    runs = runs_under_way().select_related("connection__active_rules").order_by("id")
    with transaction.atomic():
        if db.vendor == "postgresql":
            runs = runs.select_for_update(skip_locked=True, of=("self",))
        trigger = runs.first()
        if trigger is None:
            return 0
        try:
            tracker = flow.local_tracker()
            versions = flow.twin_versions(trigger.connection)  # before the page is read, as above
            with transaction.atomic():
                queued, cursor = _run_page(trigger, tracker, trigger.run_cursor, versions)
        except TrackerUnavailable:
            return 0
        except (TrackerError, flow.SyncRefused) as e:
            log.warning("running trigger %s stopped: %s", trigger.pk, e)
            Trigger.objects.filter(pk=trigger.pk).update(run_cursor="")
            return 0
        if cursor is not None:
            Trigger.objects.filter(pk=trigger.pk).update(run_cursor=cursor)
    return max(queued, 1)  # a page was made: there may be more


def _should_sync(connection: Connection, key: str, tracker: Tracker, twinned: set[str]) -> bool:
    return key in twinned or any(_matches(t, key, tracker) for t in connection.triggers.filter(active=True))


def _unsent(connection: Connection, versions: dict[str, datetime | None], tracker: Tracker) -> list[str]:
    """The keys of ``versions`` (key -> ``updated``) not at the version our last message was made from.

    For a tracker whose every change moves ``updated`` to a new instant (the built-in one): an
    entity still at that version was sent already, and needs no run of the rules (the sync's
    own writes among them). Redmine's timestamps are whole seconds, and some of its changes
    move none: there every key is kept.
    """
    if not getattr(tracker, "shares_database", False) or not versions:
        return list(versions)
    sent = dict(
        Twin.objects.filter(connection=connection, local_key__in=list(versions), sent_version__isnull=False)
        .order_by()
        .values_list("local_key", "sent_version")
    )
    return [key for key, updated in versions.items() if sent.get(key) != updated]


def _changed_page(connection: Connection, tracker: Tracker, since, cursor: str | None, twinned: set[str]):
    """One page of changes: the entities to run the rules on, the next cursor and the page's high water.

    A tracker that can list what changed without reading it (``changed_versions``) reads
    only the entities that need the rules; a poll after a bulk sync finds thousands of the
    sync's own writes, already sent.
    """
    listing = getattr(tracker, "changed_versions", None)
    if listing is not None:
        page = listing(since, cursor=cursor, limit=POLL_PAGE)
        keys = [
            k
            for k in _unsent(connection, dict(page.versions), tracker)
            if _should_sync(connection, k, tracker, twinned)
        ]
        entities = list(tracker.get_many(keys).values()) if keys else []
    else:
        page = tracker.changed_since(since, cursor=cursor, limit=POLL_PAGE)
        keys = set(_unsent(connection, {e.key: e.updated for e in page.entities}, tracker))
        entities = [e for e in page.entities if e.key in keys and _should_sync(connection, e.key, tracker, twinned)]
    return entities, page.next_cursor, page.high_water


POLL_PAGE = 200


def poll(connection: Connection, tracker: Tracker | None = None) -> int:
    """One polling pass for ``connection``; the watermark moves only if the whole pass worked."""
    tracker = tracker or flow.local_tracker()
    pass_started = timezone.now()
    started = connection.poll_watermark
    high_water = started
    twinned = set(
        Twin.objects.filter(connection=connection)
        .exclude(Q(state=Twin.State.STOPPED) | Q(local_key=None))
        .order_by()
        .values_list("local_key", flat=True)
    )
    queued, cursor = 0, None
    versions = flow.twin_versions(connection)  # once, before any page (see sync_all_matches)
    while True:
        wanted, cursor, page_high = _changed_page(connection, tracker, started, cursor, twinned)
        queued += flow.sync_many(connection, wanted, tracker=tracker, versions=versions)
        if page_high and (high_water is None or page_high > high_water):
            high_water = page_high
        if cursor is None:
            break
    if getattr(tracker, "shares_database", False):
        # Its timestamps come from this node's clock, and a write older than SETTLED has
        # committed by now: the watermark moves up to there even when nothing changed, or
        # every pass would read again, in the overlap, the thousands of issues an import
        # wrote in the same second.
        settled = pass_started - SETTLED
        if high_water is None or high_water < settled:
            high_water = settled
    Connection.objects.filter(pk=connection.pk).update(poll_watermark=high_water)
    return queued + sweep(connection, tracker)


# How long a write to a tracker that shares the node's database can take to commit.
SETTLED = timedelta(seconds=10)


# Twins re-read per polling pass where the tracker does not report every change.
SWEEP_BATCH = 20


def sweep(connection: Connection, tracker: Tracker, batch: int = SWEEP_BATCH) -> int:
    """Re-read the twins looked at longest ago, for changes ``changed_since`` cannot see.

    Redmine, for one, moves no timestamp when a comment is edited or an attachment
    deleted. Re-running the outgoing rules costs one read per twin and sends only when
    the replica differs from the last one sent, so a sweep of unchanged twins sends nothing.
    """
    if getattr(tracker, "reports_every_change", True):
        return 0
    twins = (
        Twin.objects.filter(connection=connection, local_key__isnull=False)
        .exclude(state=Twin.State.STOPPED)
        .order_by(F("last_checked").asc(nulls_first=True), "id")
        .values_list("pk", "local_key")[:batch]
    )
    queued = 0
    for pk, key in twins:
        try:
            if flow.sync_entity(connection, key, tracker=tracker):
                queued += 1
        except TrackerUnavailable:
            raise
        except (TrackerError, flow.SyncRefused) as e:
            log.warning("re-reading %s failed: %s", key, e)
        Twin.objects.filter(pk=pk).update(last_checked=timezone.now())
    return queued


def poll_interval() -> int:
    return Node.local().poll_interval()


def poll_due() -> int:
    """Poll every syncing connection whose interval has passed."""
    due = timezone.now() - timedelta(seconds=poll_interval())
    queued = 0
    connections = Connection.objects.filter(status__in=SYNCING).filter(Q(polled_at=None) | Q(polled_at__lte=due))
    for connection in connections.select_related("active_rules"):
        Connection.objects.filter(pk=connection.pk).update(polled_at=timezone.now())
        try:
            queued += poll(connection)
        except TrackerUnavailable as e:
            # Every connection reads the same tracker: the others would fail the same way.
            health.tracker_failed(e)
            return queued
        except (TrackerError, flow.SyncRefused) as e:
            log.warning("polling %s failed: %s", connection, e)
        else:
            health.tracker_ok()
    return queued
