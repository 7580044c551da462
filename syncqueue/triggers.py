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
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from connections.models import Connection, Trigger
from syncqueue import flow
from syncqueue.models import Twin
from trackers.base import Entity, Tracker, TrackerError
from trackers.signals import entity_changed

log = logging.getLogger(__name__)
SYNCING = (Connection.Status.ACTIVE, Connection.Status.DEACTIVATED)


def connect() -> None:
    entity_changed.connect(on_entity_changed, dispatch_uid="syncqueue.triggers")


def _matches(trigger: Trigger, key: str, tracker: Tracker) -> bool:
    if tracker.kind == "builtin":
        # The built-in tracker can test one entity against a query without listing all matches.
        from trackers.builtin import query
        from trackers.builtin.models import Issue

        try:
            return query.search(Issue.objects.filter(key=key), trigger.query).exists()
        except query.QueryError:
            return False
    page = tracker.search(trigger.query, limit=500)
    return any(e.key == key for e in page.entities)


def connections_for(key: str, tracker: Tracker) -> list[Connection]:
    """Connections on which ``key`` is (or should come) under sync."""
    twinned = set(
        Twin.objects.filter(local_key=key).exclude(state=Twin.State.STOPPED).values_list("connection_id", flat=True)
    )
    found = []
    for connection in Connection.objects.filter(status__in=SYNCING).select_related("active_rules"):
        if connection.pk in twinned or any(_matches(t, key, tracker) for t in connection.triggers.filter(active=True)):
            found.append(connection)
    return found


def on_entity_changed(sender, key: str, change: str, actor=None, **kwargs) -> None:
    if change == "deleted":
        return
    try:
        tracker = flow.local_tracker()
        for connection in connections_for(key, tracker):
            flow.sync_entity(connection, key, tracker=tracker)
    except (TrackerError, flow.SyncRefused) as e:
        log.warning("could not sync %s after a change: %s", key, e)


def sync_all_matches(trigger: Trigger, tracker: Tracker | None = None) -> int:
    """Bring every entity matching ``trigger`` under sync now; returns how many were queued."""
    tracker = tracker or flow.local_tracker()
    queued, cursor = 0, None
    while True:
        page = tracker.search(trigger.query, cursor=cursor, limit=200)
        for entity in page.entities:
            if flow.sync_entity(trigger.connection, entity.key, tracker=tracker) is not None:
                queued += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    Trigger.objects.filter(pk=trigger.pk).update(last_run=timezone.now())
    return queued


def _should_sync(connection: Connection, entity: Entity, tracker: Tracker, twinned: set[str]) -> bool:
    return entity.key in twinned or any(
        _matches(t, entity.key, tracker) for t in connection.triggers.filter(active=True)
    )


def poll(connection: Connection, tracker: Tracker | None = None) -> int:
    """One polling pass for ``connection``; the watermark moves only if the whole pass worked."""
    tracker = tracker or flow.local_tracker()
    started = connection.poll_watermark
    high_water = started
    twinned = set(
        Twin.objects.filter(connection=connection)
        .exclude(Q(state=Twin.State.STOPPED) | Q(local_key=None))
        .values_list("local_key", flat=True)
    )
    queued, cursor = 0, None
    while True:
        page = tracker.changed_since(started, cursor=cursor, limit=200)
        for entity in page.entities:
            if _should_sync(connection, entity, tracker, twinned) and flow.sync_entity(
                connection, entity.key, tracker=tracker
            ):
                queued += 1
        if page.high_water and (high_water is None or page.high_water > high_water):
            high_water = page.high_water
        cursor = page.next_cursor
        if cursor is None:
            break
    Connection.objects.filter(pk=connection.pk).update(poll_watermark=high_water)
    return queued


def poll_due() -> int:
    """Poll every syncing connection whose interval has passed."""
    due = timezone.now() - timedelta(seconds=settings.SYNC_POLL_SECONDS)
    queued = 0
    connections = Connection.objects.filter(status__in=SYNCING).filter(Q(polled_at=None) | Q(polled_at__lte=due))
    for connection in connections.select_related("active_rules"):
        Connection.objects.filter(pk=connection.pk).update(polled_at=timezone.now())
        try:
            queued += poll(connection)
        except (TrackerError, flow.SyncRefused) as e:
            log.warning("polling %s failed: %s", connection, e)
    return queued
