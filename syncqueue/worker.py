"""The claim-and-process loop over the SyncEvent table.

``drain`` repeats until the queue has nothing ready or the time budget is spent:

1. Ask, in one query, which of the steps below would find anything (``ready_work``).
2. Claim a batch of ready incoming events: pending, due, of a twin that is not blocked,
   and next in their twin's sequence. On PostgreSQL the candidates are locked with
   ``FOR UPDATE SKIP LOCKED``, so several workers on several machines never claim the
   same row; everywhere the claim is a conditional UPDATE that tolerates losing a race.
3. Apply each, in its own transaction; a failure is recorded on the event (retry with
   backoff or block the twin) before the loop moves on, so one bad event cannot stall
   the others or crash-loop the worker. When the tracker itself is out (unreachable,
   refusing the key) the rest of the batch waits instead, and ``health`` records why.
4. Claim a batch of ready outgoing events of active connections and push them to each
   remote in one signed request per connection; a remote that does not answer keeps its
   events pending with backoff.
5. Make the next page of a trigger run that outlasted its request (``triggers.continue_runs``).

Events whose worker died mid-event (their lease expired) go back to pending at the tick
(``reclaim_expired``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from django.db import DatabaseError, transaction
from django.db import connection as db
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from connections.models import Connection
from connections.scripting import ScriptError
from exalate_web import jsonio
from syncqueue import flow, health, transport, triggers
from syncqueue.every import Every
from syncqueue.models import SyncEvent, Twin
from trackers.base import TrackerError, TrackerUnavailable

log = logging.getLogger(__name__)
Direction, Kind, Status = SyncEvent.Direction, SyncEvent.Kind, SyncEvent.Status
LEASE = timedelta(seconds=90)
# Outgoing events claimed, and sent, at once. Each batch has its costs whatever its size (a
# claim, a request, a commit); at 5,000 issues, twice these sizes took a fifth less CPU.
BATCH = 200
# Incoming events applied in one transaction (see _apply_batch): enough to spread its costs,
# few enough that their acks go out while the next batch is applied.
INCOMING_BATCH = 100
# A remote that does not answer is tried again at least this often, however long it is down.
MAX_SEND_BACKOFF = timedelta(seconds=30)
# While the local tracker is out, held events try again this often.
TRACKER_RETRY = timedelta(seconds=10)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def reclaim_expired() -> int:
    """Events whose worker died mid-way go back to pending."""
    now = timezone.now()
    return SyncEvent.objects.filter(status__in=(Status.PROCESSING, Status.SENDING), lease_expires__lt=now).update(
        status=Status.PENDING, lease_owner="", lease_expires=None
    )


def _ready(direction: str, now=None):
    """Events ready to claim; ``now`` may be an expression (the probe uses the database's clock)."""
    if now is None:
        now = timezone.now()
    events = SyncEvent.objects.filter(direction=direction, status=Status.PENDING, next_attempt__lte=now)
    if direction == Direction.INCOMING:
        # Next in sequence, or already applied (a redelivery, which is marked done without effect).
        return events.filter(twin__state__in=(Twin.State.OK, Twin.State.STOPPED), seq__lte=F("twin__in_seq") + 1)
    # A private remote (no URL) is not pushed to: it pulls these through ``claim_for_pull``.
    return (
        events.filter(connection__status=Connection.Status.ACTIVE)
        .exclude(twin__state=Twin.State.BLOCKED)
        .exclude(connection__remote_url="")
    )


def claim(direction: str, owner: str, limit: int = BATCH) -> list[SyncEvent]:
    """Lease up to ``limit`` ready events to ``owner``, in twin and sequence order.

    The events are read whole under their row locks and leased by one UPDATE: two
    statements, where reading their ids first and the rows after the lease took three.
    """
    busy = Status.PROCESSING if direction == Direction.INCOMING else Status.SENDING
    with transaction.atomic():
        candidates = (
            _ready(direction).select_related("twin").defer(*(f"twin__{name}" for name in CLAIM_DEFERS)).order_by("id")
        )
        if db.vendor == "postgresql":
            candidates = candidates.select_for_update(skip_locked=True, of=("self",))
        events = list(candidates[:limit])
        if not events:
            return []
        expires = timezone.now() + LEASE
        # Row locks (PostgreSQL) or the write lock taken at BEGIN (SQLite) keep every event
        # read pending until this UPDATE, so all of them are ours.
        SyncEvent.objects.filter(id__in=[e.pk for e in events]).update(
            status=busy, lease_owner=owner, lease_expires=expires
        )
    for event in events:
        event.status, event.lease_owner, event.lease_expires = busy, owner, expires
    events.sort(key=lambda e: (e.twin_id, e.seq))
    return flow.share_connections(events)


# What a claimed event's twin is not read with: a sender needs its keys, and an apply locks
# and reads the twin again. (Each is read on first use should anything ask.)
CLAIM_DEFERS = (
    "last_sent",
    "last_received",
    "comment_map",
    "attachment_map",
    "linked_attachments",
    "merge_base",
    "sent_fields",
    "blocked_reason",
)


def process_incoming(owner: str, limit: int = INCOMING_BATCH) -> int:
    events = claim(Direction.INCOMING, owner, limit)
    if not events:
        return 0
    try:
        tracker = flow.local_tracker()
    except TrackerError as e:
        return _hold(events, TrackerUnavailable(f"the tracker's settings do not work: {e}", permanent=True))
    if getattr(tracker, "shares_database", False) and len(events) > 1:
        return _apply_batch(events, tracker)
    return _apply_each(events, tracker)


def _apply_each(events: list[SyncEvent], tracker) -> int:
    """Each event in its own transaction."""
    applied = False
    for position, event in enumerate(events):
        try:
            finished = flow.apply_incoming(event, tracker)
        except TrackerUnavailable as e:
            # The tracker as a whole is out: this and the rest wait, no twin is blocked.
            return _hold(events[position:], e) + position
        except Exception as e:
            _failed(event, e)
        else:
            applied = True
            if not finished:
                _release(event)
    if applied:
        health.tracker_ok()
    return len(events)


def _apply_batch(events: list[SyncEvent], tracker) -> int:
    """All events in one transaction, each in a savepoint, for a tracker in our own database.

    One commit instead of one per event, the twins locked in one query, and the entities of
    first syncs created together (``flow.apply_creates``). An event that fails is rolled
    back to its savepoint and recorded as in ``_apply_each``; one that needs attachment
    bytes ends the batch, and the rest go one by one (the bytes are fetched outside any
    transaction). Should the batch's transaction itself fail, nothing of it was kept, and
    the events go one by one.
    """
    rest: list[SyncEvent] = []
    outage, applied = None, False
    try:
        with transaction.atomic():
            twins = flow.lock_twins(events)
            batch = flow.Batch(twins)
            ahead = flow.read_ahead(tracker, events, twins)
            created = flow.apply_creates(events, tracker, twins, batch)
            applied = bool(created)
            for position, event in enumerate(events):
                if event.pk in created:
                    continue
                try:
                    finished = flow.apply_locked(event, tracker, twins, batch, ahead)
                except TrackerUnavailable as e:
                    outage, rest = e, events[position:]
                    break
                except flow.FetchFirst:
                    rest = events[position:]
                    break
                except Exception as e:
                    _failed(event, e)
                else:
                    applied = True
                    if not finished:
                        _release(event)
            batch.write()
    except DatabaseError:
        log.warning("applying a batch of %s events failed as a whole; applying them one by one", len(events))
        return _apply_each(events, tracker)
    finally:
        flow.forget_answered()
    if outage is not None:
        return _hold(rest, outage) + len(events) - len(rest)
    if applied:
        health.tracker_ok()
    if rest:
        _apply_each(rest, tracker)
    return len(events)


def _failed(event: SyncEvent, error: Exception) -> None:
    if not isinstance(error, (ScriptError, TrackerError, transport.RemoteError)):
        log.exception("unexpected error applying %s", event)
    flow.record_failure(event, error)


def _release(event: SyncEvent) -> None:
    """A gap left it unapplied: release it to wait for the missing message."""
    SyncEvent.objects.filter(pk=event.pk, status=Status.PROCESSING).update(
        status=Status.PENDING, lease_owner="", lease_expires=None
    )


def _hold(events: list[SyncEvent], error: TrackerUnavailable) -> int:
    """Put ``events`` back to wait for the tracker, without counting it against them."""
    SyncEvent.objects.filter(pk__in=[e.pk for e in events]).update(
        status=Status.PENDING,
        lease_owner="",
        lease_expires=None,
        error=str(error),
        next_attempt=timezone.now() + TRACKER_RETRY,
    )
    health.tracker_failed(error)
    return 0


def send_outgoing(owner: str, limit: int = BATCH) -> int:
    events = claim(Direction.OUTGOING, owner, limit)
    by_connection: dict[int, list[SyncEvent]] = defaultdict(list)
    for event in events:
        by_connection[event.connection_id].append(event)
    for batch in by_connection.values():
        for part in split_by_size(batch):
            _send(part[0].connection, part)
    return len(events)


# The receiver refuses bodies over its MAX_REQUEST_BYTES (2.5 MB by default); stay well below.
MAX_BATCH_BYTES = 1_000_000


def split_by_size(events: list[SyncEvent], limit: int = MAX_BATCH_BYTES) -> list[list[SyncEvent]]:
    """Consecutive parts of ``events`` whose messages stay under ``limit`` bytes of JSON each."""
    parts: list[list[SyncEvent]] = [[]]
    size = 0
    for event in events:
        event_size = len(jsonio.dumps(flow.message_of(event)))
        if parts[-1] and size + event_size > limit:
            parts.append([])
            size = 0
        parts[-1].append(event)
        size += event_size
    return [part for part in parts if part]


def _send(connection: Connection, events: list[SyncEvent]) -> None:
    try:
        if connection.pulls:
            # The remote cannot fetch attachment bytes from a private node: they go first.
            upload_blobs(connection, events)
        answer = transport.post_messages(connection, [flow.message_of(e) for e in events])
    except transport.RemoteError as e:
        _sending_failed(connection, events, e)
        return
    delivered(connection, events, answer)


def delivered(connection: Connection, events: list[SyncEvent], answer: dict) -> None:
    """Record the receiver's answer: accepted messages are sent (updates await their ack), refused ones fail."""
    accepted = {str(i) for i in answer.get("accepted", [])}
    rejected = answer.get("rejected") or {}
    now = timezone.now()
    updates = [e.pk for e in events if str(e.message_id) in accepted and e.kind == Kind.UPDATE]
    others = [e.pk for e in events if str(e.message_id) in accepted and e.kind != Kind.UPDATE]
    refused = [e for e in events if str(e.message_id) not in accepted]
    # One statement needs no transaction of its own (two round trips fewer for most answers).
    several = bool(updates) + bool(others) + len(refused) > 1
    with transaction.atomic() if several else contextlib.nullcontext():
        # Only events still being sent: the ack of an update can be applied before this answer
        # is read, and an update it finished stays finished.
        still_sending = SyncEvent.objects.filter(status=Status.SENDING)
        if updates:
            still_sending.filter(pk__in=updates).update(
                status=Status.SENT, lease_owner="", lease_expires=None, error=""
            )
        if others:
            still_sending.filter(pk__in=others).update(
                status=Status.DONE, lease_owner="", lease_expires=None, error="", finished=now
            )
        for event in refused:
            reason = str(rejected.get(str(event.message_id), "not accepted by the remote node"))
            flow.record_failure(event, transport.RemoteError(f"the remote node refused it: {reason}", True))
    flow.note_contact(connection, answered=True)


def _sending_failed(connection: Connection, events: list[SyncEvent], error: transport.RemoteError) -> None:
    # Only events still being sent: the request may have reached the remote before its answer
    # was lost, and an ack applied meanwhile finished the update. Sent again, it would be
    # answered "stored already", never acknowledged twice, and stay "sent" for good.
    still = set(
        SyncEvent.objects.filter(pk__in=[e.pk for e in events], status=Status.SENDING).values_list("pk", flat=True)
    )
    events = [e for e in events if e.pk in still]
    if not events:
        return
    if error.permanent:
        for event in events:
            flow.record_failure(event, error)
        return
    # Down or busy: nothing is lost, the events wait and the connection says why.
    attempts = max(e.attempts for e in events) + 1
    delay = min(flow.backoff(attempts), MAX_SEND_BACKOFF)
    SyncEvent.objects.filter(pk__in=[e.pk for e in events], status=Status.SENDING).update(
        status=Status.PENDING,
        lease_owner="",
        lease_expires=None,
        attempts=F("attempts") + 1,
        error=str(error),
        next_attempt=timezone.now() + delay,
    )
    if error.refused_us:
        # Retrying cannot help until an administrator looks (the other side removed or re-paired
        # the connection); the events wait, and activating the connection again resumes them.
        Connection.objects.filter(pk=connection.pk, status=Connection.Status.ACTIVE).update(
            status=Connection.Status.ERROR, status_detail=str(error)
        )
    else:
        Connection.objects.filter(pk=connection.pk).update(status_detail=str(error))


def drain(budget_seconds: float = 50.0, owner: str | None = None) -> int:
    """Process until nothing is ready or the budget is spent; returns how many events were handled.

    Each pass first asks in one query what it would find (``ready_work``): most passes are
    the last one, which finds nothing, and it costs one round trip instead of eight.
    """
    owner = owner or worker_id()
    deadline = time.monotonic() + budget_seconds
    handled = 0
    while time.monotonic() < deadline:
        ready = ready_work()
        if not ready:
            break
        done = pull_all() if ready.pulls else 0
        applied = process_incoming(owner) if ready.incoming else 0
        # The acks of what was just applied go out in the same pass.
        done += applied + (send_outgoing(owner) if ready.outgoing or applied else 0)
        done += triggers.continue_runs() if ready.runs else 0
        handled += done
        if not done:
            break
        analyze_grown_tables()
    return handled


@dataclass(frozen=True)
class Ready:
    """What a worker pass would find: connections to pull from, events to apply or send, trigger runs."""

    pulls: bool
    incoming: bool
    outgoing: bool
    runs: bool

    def __bool__(self) -> bool:
        return self.pulls or self.incoming or self.outgoing or self.runs


def ready_work() -> Ready:
    """``Ready``, asked in one query (each part stops at its first row)."""
    probe = _probes.get(db.vendor)
    if probe is None:
        # The same query every time (the clock is the database's), so it is compiled once. A
        # second ahead of that clock, which may lag this machine's (or, SQLite's, count only
        # milliseconds): an early answer costs a claim that finds nothing, a late one a wait.
        now = Now() + PROBE_AHEAD
        parts, params = [], []
        for queryset in (
            _pulling_connections(),
            _ready(Direction.INCOMING, now=now),
            _ready(Direction.OUTGOING, now=now),
            triggers.runs_under_way(),
        ):
            part, part_params = queryset.values("pk")[:1].query.sql_with_params()
            parts.append(f"EXISTS ({part})")
            params.extend(part_params)
        probe = _probes[db.vendor] = (f"SELECT {', '.join(parts)}", tuple(params))
    with db.cursor() as cursor:
        cursor.execute(*probe)
        return Ready(*(bool(value) for value in cursor.fetchone()))


_probes: dict[str, tuple[str, tuple]] = {}
PROBE_AHEAD = timedelta(seconds=1)


# PostgreSQL plans the queue's queries from its statistics of the tables, which autovacuum
# refreshes once a tenth of a table has changed, looking once a minute, if it runs at all.
# A bulk sync grows the queue from nothing to tens of thousands of rows within that minute,
# and plans made for empty tables (a bitmap scan of every outgoing event for a claim that
# finds none) cost more with every row. So a busy worker looks every 15 seconds.
QUEUE_TABLES = ["syncqueue_syncevent", "syncqueue_twin"]
_analysis = Every(15.0)
ANALYZE_GROWTH = 0.2  # of the rows a table had at its last analysis


def analyze_grown_tables() -> list[str]:
    """ANALYZE the queue's tables that changed by more than ANALYZE_GROWTH since their last
    analysis (and by a thousand rows); at most every 15 seconds per process."""
    if db.vendor != "postgresql" or not _analysis.due():
        return []
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE relname = ANY(%s) AND n_mod_since_analyze > 1000"
            " AND n_mod_since_analyze > %s * GREATEST(n_live_tup, 1)",
            [QUEUE_TABLES, ANALYZE_GROWTH],
        )
        grown = [name for (name,) in cursor.fetchall()]
        for name in grown:
            cursor.execute(f"ANALYZE {db.ops.quote_name(name)}")
    return grown


def cleanup() -> int:
    """Delete finished events older than the retention period (SYNC_RETENTION_DAYS)."""
    from django.conf import settings

    cutoff = timezone.now() - timedelta(days=settings.SYNC_RETENTION_DAYS)
    deleted, _ = SyncEvent.objects.filter(status=Status.DONE, finished__lt=cutoff).delete()
    from syncqueue.models import Blob

    Blob.objects.filter(created__lt=cutoff).delete()
    return deleted


# --- private nodes ------------------------------------------------------------------------------


def pull_owner(connection: Connection) -> str:
    return f"pull:{connection.pk}"


def claim_for_pull(connection: Connection, confirmed: list[str], limit: int = BATCH) -> list[SyncEvent]:
    """On the public side: settle what the private remote confirmed, then hand it the next messages.

    Messages of an earlier pull that it did not confirm were lost on the way and go again
    (it stores each message once, so a repeat is harmless).
    """
    owner = pull_owner(connection)
    handed = list(
        SyncEvent.objects.filter(connection=connection, status=Status.SENDING, lease_owner=owner).select_related("twin")
    )
    confirmed_ids = set(confirmed)
    delivered(connection, [e for e in handed if str(e.message_id) in confirmed_ids], {"accepted": list(confirmed_ids)})
    SyncEvent.objects.filter(pk__in=[e.pk for e in handed if str(e.message_id) not in confirmed_ids]).update(
        status=Status.PENDING, lease_owner="", lease_expires=None
    )
    now = timezone.now()
    with transaction.atomic():
        candidates = (
            SyncEvent.objects.filter(
                connection=connection, direction=Direction.OUTGOING, status=Status.PENDING, next_attempt__lte=now
            )
            .exclude(twin__state=Twin.State.BLOCKED)
            .order_by("id")
        )
        if db.vendor == "postgresql":
            candidates = candidates.select_for_update(skip_locked=True, of=("self",))
        ids = list(candidates.values_list("id", flat=True)[:limit])
        SyncEvent.objects.filter(id__in=ids, status=Status.PENDING).update(
            status=Status.SENDING, lease_owner=owner, lease_expires=now + LEASE
        )
    events = list(
        SyncEvent.objects.filter(id__in=ids, lease_owner=owner, status=Status.SENDING)
        .select_related("twin")
        .order_by("id")
    )
    return split_by_size(events)[0] if events else []


def pull_all() -> int:
    """On a private node: fetch and store what each remote has for us; returns how many messages came."""
    received = 0
    for connection in _pulling_connections():
        confirmed: list[str] = []
        for _ in range(MAX_PULLS_PER_PASS):
            try:
                messages = transport.pull_messages(connection, confirmed)
            except transport.RemoteError as e:
                Connection.objects.filter(pk=connection.pk).update(status_detail=str(e))
                break
            if not messages:
                flow.note_contact(connection, answered=True)
                break
            answer = flow.receive(connection, messages)
            confirmed = [str(i) for i in answer["accepted"]]
            for message_id, reason in answer["rejected"].items():
                log.warning("refused a pulled message %s from %s: %s", message_id, connection, reason)
            received += len(messages)
    return received


def _pulling_connections():
    return Connection.objects.filter(pulls=True, status=Connection.Status.ACTIVE).exclude(remote_url="")


# One pass fetches at most this many batches per connection, so the loop cannot run away.
MAX_PULLS_PER_PASS = 20


def upload_blobs(connection: Connection, events: list[SyncEvent]) -> None:
    """Upload the bytes of attachments these messages name that the remote does not have from us yet."""
    from syncqueue.models import UploadedBlob

    tracker = None
    for event in events:
        replica = event.payload.get("replica") or {}
        wanted = {a.get("sha256") for a in replica.get("attachments") or [] if isinstance(a, dict)}
        wanted.discard(None)
        if not wanted:
            continue
        done = set(
            UploadedBlob.objects.filter(connection=connection, sha256__in=wanted).values_list("sha256", flat=True)
        )
        missing = wanted - done
        if not missing:
            continue
        tracker = tracker or flow.local_tracker()
        try:
            entity = tracker.get(event.twin.local_key)
        except TrackerError as e:
            raise transport.RemoteError(f"cannot read attachments of {event.twin.local_key}: {e}") from None
        for attachment in entity.attachments:
            if attachment.sha256 in missing:
                transport.upload_blob(connection, attachment.sha256, attachment.read())
                UploadedBlob.objects.get_or_create(connection=connection, sha256=attachment.sha256)
                missing.discard(attachment.sha256)
