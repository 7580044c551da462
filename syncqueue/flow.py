"""The sync's write paths: bring an entity under sync, receive messages, apply them, stop, retry.

Views, triggers and the worker call these; each runs in one database transaction, so a
crash leaves either all of a step or none of it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from connections.models import Connection, Node
from connections.scripting import ScriptError, StopSync
from syncqueue import bulk, processors, transport
from syncqueue.every import Every
from syncqueue.models import Conflict, SyncEvent, Twin
from syncqueue.replica import replica_hash
from trackers.base import Entity, Tracker, TrackerError

log = logging.getLogger(__name__)
Direction, Kind, Status = SyncEvent.Direction, SyncEvent.Kind, SyncEvent.Status


# Adapters outside the database keep a session and caches (ids, digests) worth reusing;
# one per settings, so a change of settings takes effect at the next call.
_outside_trackers: dict[tuple[str, str], Tracker] = {}


def local_tracker() -> Tracker:
    node = Node.local()
    cache_key = (node.tracker_kind, node.tracker_settings)
    tracker = _outside_trackers.get(cache_key)
    if tracker is None:
        tracker = node.tracker()
        if not getattr(tracker, "shares_database", False):
            _outside_trackers.clear()
            _outside_trackers[cache_key] = tracker
    return tracker


def kick() -> None:
    """Ask the workers to look at the queue once the current transaction has committed (once per transaction)."""
    from syncqueue import tasks

    pending = transaction.get_connection().run_on_commit
    if not any(entry[1] is tasks.kick for entry in pending):
        transaction.on_commit(tasks.kick, robust=True)


class SyncRefused(Exception):
    """The entity cannot be brought under sync on this connection (the message says why)."""


# --- outgoing --------------------------------------------------------------------------------


def sync_entity(connection: Connection, key: str, *, tracker: Tracker | None = None, force: bool = False):
    """Run the outgoing rules on ``key`` and queue the replica if it differs from the last one sent.

    Returns the queued SyncEvent, or None when there was nothing new to send. ``force``
    also restarts a twin that was stopped (the manual and API triggers use it).
    """
    if connection.status == Connection.Status.PENDING:
        raise SyncRefused("the connection is not active yet")
    if connection.active_rules is None:
        raise SyncRefused("the connection has no active rules")
    tracker = tracker or local_tracker()
    seen = twin_versions(connection, [key]).get(key, 0)
    entity = tracker.get(key)
    with transaction.atomic():
        twin, _ = Twin.objects.select_for_update().get_or_create(connection=connection, local_key=entity.key)
        twin.connection = connection  # the one in hand: the message takes its policy
        if twin.in_seq != seen:
            # An incoming message was applied between our read and the lock: read what it wrote,
            # or the older state would go out as a new change.
            entity = tracker.get(entity.key)
        restart = twin.state == Twin.State.STOPPED
        if restart:
            if not force:
                return None
            twin.state = Twin.State.OK
            twin.blocked_reason = ""
        try:
            entity, replica, digest = _replica_of(connection, connection.active_rules, entity, twin, tracker)
        except StopSync:
            return None
        except ScriptError as e:
            return _record_outgoing_failure(twin, e)
        if digest == twin.last_sent_hash and not force:
            twin.save()
            return None
        if _written_by_sync(entity, tracker) and not (force or restart):
            if twin.state == Twin.State.BLOCKED:
                return None  # its block (a loop, say) holds the replicas already; retrying re-syncs it
            twin.bounces += 1
            if twin.bounces > MAX_BOUNCES:
                return _record_loop(twin, replica)
        else:
            twin.bounces = 0
        return _queue(twin, Kind.UPDATE, replica, digest, restart=restart, entity=entity)


def twin_versions(connection: Connection, keys=None) -> dict[str, int]:
    """Local key -> how many incoming messages its twin has applied; read *before* reading entities.

    ``sync_many`` and ``sync_entity`` compare it under the twin's lock: a twin that applied a
    message since has an entity newer than the one read, which is read again.
    """
    twins = Twin.objects.filter(connection=connection, local_key__isnull=False, in_seq__gt=0)  # 0 if missing
    if keys is not None:
        twins = twins.filter(local_key__in=list(keys))
    return dict(twins.values_list("local_key", "in_seq"))


def sync_many(connection: Connection, entities, *, tracker: Tracker, versions: dict[str, int] | None = None) -> int:
    """``sync_entity`` for entities already read (a trigger's or a poll's page): one transaction,
    twins read and written in bulk, events inserted together. Stopped twins stay stopped.

    ``versions`` is ``twin_versions`` taken before the entities were read (without it, every
    entity whose twin ever applied a message is read again). Returns how many updates were queued.
    """
    versions = versions or {}
    if connection.status == Connection.Status.PENDING:
        raise SyncRefused("the connection is not active yet")
    if connection.active_rules is None:
        raise SyncRefused("the connection has no active rules")
    entities = {entity.key: entity for entity in entities}
    if not entities:
        return 0
    rules = connection.active_rules
    account = _sync_account_id(tracker)
    with transaction.atomic():
        Twin.objects.bulk_create(
            [Twin(connection=connection, local_key=key) for key in entities], ignore_conflicts=True
        )
        twins = Twin.objects.select_for_update().filter(connection=connection, local_key__in=list(entities))
        changed, events = [], []
        for twin in twins.order_by("id"):
            if twin.state == Twin.State.STOPPED:
                continue
            entity = entities[twin.local_key]
            if twin.in_seq != versions.get(twin.local_key, 0):
                entity = tracker.get(twin.local_key)  # an incoming message was applied since the read
            try:
                entity, replica, digest = _replica_of(connection, rules, entity, twin, tracker)
            except StopSync:
                continue
            except ScriptError as e:
                _record_outgoing_failure(twin, e)
                continue
            if digest == twin.last_sent_hash:
                continue
            if account is not None and entity.updated_by is not None and entity.updated_by.id == account:
                if twin.state == Twin.State.BLOCKED:
                    continue
                twin.bounces += 1
                if twin.bounces > MAX_BOUNCES:
                    _record_loop(twin, replica)
                    continue
            else:
                twin.bounces = 0
            twin.out_seq += 1
            twin.last_sent, twin.last_sent_hash = replica, digest
            changed.append(twin)
            events.append(
                SyncEvent(
                    connection=connection,
                    twin=twin,
                    direction=Direction.OUTGOING,
                    kind=Kind.UPDATE,
                    seq=twin.out_seq,
                    payload={"replica": replica, **_envelope(connection, twin, entity)},
                    rules_version=rules,
                )
            )
        bulk.update_rows(changed, ["out_seq", "last_sent", "last_sent_hash", "bounces", "sent_fields", "sent_version"])
        SyncEvent.objects.bulk_create(events, batch_size=500)
        if events:
            kick()
    return len(events)


def _replica_of(connection: Connection, rules, entity: Entity, twin: Twin, tracker: Tracker):
    """``(entity, replica, digest)``: what the outgoing rules make of ``entity``, read under the twin's lock.

    An entity read before the lock that is no newer than the one behind our last message
    may be older than it (a person's change synced in between): sent after it, it would
    undo that change on the other side. It is read again first, so that messages go out in
    the order of their reads.
    """
    replica, _ = processors.run_outgoing(connection, rules, entity, twin)
    digest = replica_hash(replica)
    if (
        digest != twin.last_sent_hash
        and entity.updated is not None
        and twin.sent_version is not None
        and entity.updated <= twin.sent_version
    ):
        entity = tracker.get(entity.key)
        replica, _ = processors.run_outgoing(connection, rules, entity, twin)
        digest = replica_hash(replica)
    return entity, replica, digest


def _sync_account_id(tracker: Tracker) -> str | None:
    known = getattr(tracker, "sync_account_id", None)
    if known is not None:
        return known()
    try:
        return tracker.sync_account().id
    except TrackerError:
        return None


# A twin whose own sync writes keep producing new replicas this many times in a row is looping.
MAX_BOUNCES = 5


def _written_by_sync(entity, tracker: Tracker) -> bool:
    """Whether the sync itself made the entity's latest change (so a new replica is its own echo)."""
    return entity.updated_by is not None and entity.updated_by.id == _sync_account_id(tracker)


def _record_loop(twin: Twin, replica: dict) -> SyncEvent:
    """Block a bouncing twin instead of sending again, keeping the replicas that show the loop."""
    reason = (
        f"sync loop: the rules changed what they received {MAX_BOUNCES} times in a row without settling; "
        "the event holds the last replicas sent and received"
    )
    twin.state = Twin.State.BLOCKED
    twin.blocked_reason = reason
    twin.save()
    return SyncEvent.objects.create(
        connection=twin.connection,
        twin=twin,
        direction=Direction.OUTGOING,
        kind=Kind.UPDATE,
        seq=0,
        payload={
            "key": twin.local_key,
            "replica": replica,
            "last_sent": twin.last_sent,
            "last_received": twin.last_received,
        },
        status=Status.FAILED,
        attempts=1,
        error=reason,
        rules_version=twin.connection.active_rules,
        finished=timezone.now(),
    )


def _envelope(connection: Connection, twin: Twin, entity: Entity) -> dict[str, Any]:
    """What a message of ``entity``'s says beside its replica, and records what it sends of each field.

    ``changed`` and ``policy`` settle conflicts the same way on both sides
    (processors.Settling); ``seen`` tells the other side which of its messages this one
    had applied, so that a value of its own this side held back then is not taken for a
    change of ours. ``fields`` (kept here, not sent) are our fields' values in it.
    """
    twin.sent_fields = processors.sent_fields_of(entity, twin.sent_fields, twin.out_seq)
    twin.sent_version = entity.updated
    return {
        "changed": entity.updated.isoformat() if entity.updated else None,
        "policy": connection.conflict_policy,
        "seen": twin.in_seq,
        "dates": {name: record[1] for name, record in twin.sent_fields.items() if record[1]},
        "fields": {name: record[0] for name, record in twin.sent_fields.items()},
    }


def _queue(
    twin: Twin,
    kind: str,
    replica: dict | None,
    digest: str = "",
    acks: str | None = None,
    restart: bool = False,
    entity: Entity | None = None,
) -> SyncEvent:
    twin.out_seq += 1
    payload: dict[str, Any] = {"replica": replica}
    if replica is not None:
        twin.last_sent = replica
        twin.last_sent_hash = digest or replica_hash(replica)
    if entity is not None:
        payload.update(_envelope(twin.connection, twin, entity))
    _save_twin(twin)
    if acks:
        payload["acks"] = acks
    if restart:
        # Tells the other side that this twin was stopped and someone chose to sync it again.
        payload["restart"] = True
    event = SyncEvent(
        connection=twin.connection,
        twin=twin,
        direction=Direction.OUTGOING,
        kind=kind,
        seq=twin.out_seq,
        payload=payload,
        rules_version=twin.connection.active_rules,
    )
    staged = _staged()
    if staged is not None:
        staged.queued.append(event)
    else:
        event.save()
    kick()
    return event


def _record_outgoing_failure(twin: Twin, error: ScriptError) -> SyncEvent:
    """An outgoing script failed: the twin is blocked with the error; nothing is sent."""
    twin.state = Twin.State.BLOCKED
    twin.blocked_reason = str(error)
    twin.save()
    return SyncEvent.objects.create(
        connection=twin.connection,
        twin=twin,
        direction=Direction.OUTGOING,
        kind=Kind.UPDATE,
        seq=0,
        payload={"key": twin.local_key},
        status=Status.FAILED,
        attempts=1,
        error=str(error),
        error_line=error.line,
        rules_version=twin.connection.active_rules,
        finished=timezone.now(),
    )


@transaction.atomic
def stop_twin(twin: Twin, *, tell_remote: bool = True) -> None:
    """Stop syncing this entity ("unexalate"); the remote side is told so it stops too."""
    twin = Twin.objects.select_for_update().get(pk=twin.pk)
    if twin.state == Twin.State.STOPPED:
        return
    twin.state = Twin.State.STOPPED
    twin.blocked_reason = ""
    if tell_remote:
        _queue(twin, Kind.STOP, None)
    else:
        twin.save()


def message_of(event: SyncEvent) -> dict[str, Any]:
    """The wire form of an outgoing event."""
    message = {
        "id": str(event.message_id),
        "kind": event.kind,
        "seq": event.seq,
        "key": event.twin.local_key,
        "remote_key": event.twin.remote_key,
        "replica": event.payload.get("replica"),
    }
    if event.payload.get("acks"):
        message["acks"] = event.payload["acks"]
    if event.payload.get("restart"):
        message["restart"] = True
    for name in ENVELOPE:
        if event.payload.get(name) is not None:
            message[name] = event.payload[name]
    return message


# --- receiving -------------------------------------------------------------------------------

# Beside the replica (see _envelope): when the sender's entity last changed, its conflict
# policy, and how many of the receiver's messages it had applied.
ENVELOPE = ("changed", "policy", "seen", "dates")
MESSAGE_FIELDS = {"id", "kind", "seq", "key", "remote_key", "replica", "acks", "restart", *ENVELOPE}
MAX_SEQ = 2**31 - 1  # the largest sequence number every database column here holds


def validate_message(message: Any, *, nul_free: bool = False) -> str | None:
    """Why ``message`` is malformed, or None. ``nul_free``: the request it came in holds no
    NUL character anywhere, and its replica need not be searched for one."""
    if not isinstance(message, dict):
        return "a message must be an object"
    unknown = set(message) - MESSAGE_FIELDS
    if unknown:
        return f"unknown field {sorted(unknown)[0]!r}"
    try:
        uuid.UUID(str(message.get("id")))
    except ValueError:
        return "id must be a UUID"
    if message.get("kind") not in Kind.values:
        return f"kind must be one of {', '.join(Kind.values)}"
    if not isinstance(message.get("seq"), int) or isinstance(message.get("seq"), bool) or message["seq"] < 1:
        return "seq must be a positive whole number"
    if message["seq"] > MAX_SEQ:
        return f"seq must be at most {MAX_SEQ}"
    if not isinstance(message.get("key"), str) or not 0 < len(message["key"]) <= 100:
        return "key must be the sender's entity key"
    if message.get("remote_key") is not None and (
        not isinstance(message["remote_key"], str) or not 0 < len(message["remote_key"]) <= 100
    ):
        return "remote_key must be text or null"
    if message["kind"] != Kind.STOP and not isinstance(message.get("replica"), dict):
        return "replica must be an object"
    if message.get("acks") is not None and not isinstance(message["acks"], str):
        return "acks must be a message id"
    if message.get("restart") not in (None, True, False):
        return "restart must be true or false"
    for name in ("changed", "policy"):
        if message.get(name) is not None and (not isinstance(message[name], str) or len(message[name]) > 40):
            return f"{name} must be text of at most 40 characters"
    seen = message.get("seen")
    if seen is not None and (not isinstance(seen, int) or isinstance(seen, bool) or not 0 <= seen <= MAX_SEQ):
        return f"seen must be a whole number from 0 to {MAX_SEQ}"
    dates = message.get("dates")
    if dates is not None and not (
        isinstance(dates, dict)
        and len(dates) <= 20
        and all(isinstance(k, str) and isinstance(v, str) and len(k) <= 40 and len(v) <= 40 for k, v in dates.items())
    ):
        return "dates must map at most 20 field names to dates"
    if dates and any("\x00" in k + v for k, v in dates.items()):
        return "text must not contain NUL characters"
    # PostgreSQL stores no NUL character in text or JSON; refuse it here rather than fail later.
    if any("\x00" in (message.get(name) or "") for name in ("key", "remote_key", "acks", "changed", "policy")):
        return "text must not contain NUL characters"
    if not nul_free and message.get("replica") is not None and "\\u0000" in json.dumps(message["replica"]):
        return "the replica must not contain NUL characters"
    return None


def receive(connection: Connection, messages: list[dict[str, Any]], *, nul_free: bool = False) -> dict[str, Any]:
    """Store each valid message once (dedup on its id); answer which were accepted.
    ``nul_free``: as for ``validate_message``, for all of them.

    A batch is stored in one transaction; should that fail (a message delivered twice at
    once, a pairing the batch itself contradicts), each message is stored on its own, so
    that one cannot cost the others their place.
    """
    accepted, rejected, valid = [], {}, []
    for message in messages:
        problem = validate_message(message, nul_free=nul_free)
        if problem:
            rejected[str(message.get("id") if isinstance(message, dict) else "?")[:64]] = problem
        else:
            valid.append(message)
    try:
        with transaction.atomic():
            stored, refused = _store_many(connection, valid)
    except (DatabaseError, ValueError):
        _store_each(connection, valid, accepted, rejected)
    else:
        if stored:
            kick()
        rejected.update(refused)
        accepted.extend(m["id"] for m in valid if m["id"] not in refused)
    note_contact(connection)
    return {"accepted": accepted, "rejected": rejected}


# Nothing shows a connection's last contact to the second, and writing it at every batch sent
# or received cost a write, and a wait for the connection's row, each time.
_contact = Every(5.0)


def note_contact(connection: Connection, *, answered: bool = False) -> None:
    """Record that the remote was heard from (``last_contact``), at most every few seconds per
    process and connection. ``answered``: it answered our request, which also clears the
    connection's note of a problem, at once when the connection in hand has one."""
    if not _contact.due(connection.pk, force=answered and bool(connection.status_detail)):
        return
    fields = {"last_contact": timezone.now(), **({"status_detail": ""} if answered else {})}
    Connection.objects.filter(pk=connection.pk).update(**fields)


def _store_many(connection: Connection, messages: list[dict[str, Any]]) -> tuple[int, dict[str, str]]:
    """``_store`` for a batch, in a few queries: how many were new, and the ones refused with why."""
    if not messages:
        return 0, {}
    known = {
        str(i)
        for i in SyncEvent.objects.filter(
            connection=connection, direction=Direction.INCOMING, message_id__in=[m["id"] for m in messages]
        )
        .order_by()  # the model's "-id" would have PostgreSQL walk the whole queue backwards
        .values_list("message_id", flat=True)
    }
    ours = {m["remote_key"] for m in messages if m.get("remote_key")}
    theirs = {m["key"] for m in messages}
    twins = list(
        Twin.objects.select_for_update()
        .filter(connection=connection)
        .filter(Q(local_key__in=ours) | Q(remote_key__in=theirs))
        .only("id", "connection_id", "local_key", "remote_key")  # not the replicas and maps it holds
        .order_by("id")
    )
    by_local = {t.local_key: t for t in twins if t.local_key}
    by_remote = {t.remote_key: t for t in twins if t.remote_key}
    events, refused, new, paired = [], {}, [], []
    for message in messages:
        message_id = str(uuid.UUID(str(message["id"])))
        if message_id in known:
            continue
        twin = by_local.get(message["remote_key"]) if message.get("remote_key") else None
        if twin is not None and twin.remote_key not in (None, message["key"]):
            refused[message["id"]] = f"cannot store: {message['remote_key']} is already paired with {twin.remote_key}"
            continue
        if twin is None:
            twin = by_remote.get(message["key"])
            if twin is None:
                twin = by_remote[message["key"]] = Twin(connection=connection, remote_key=message["key"])
                new.append(twin)
        elif twin.remote_key is None:
            twin.remote_key = message["key"]
            paired.append(twin)
            by_remote[twin.remote_key] = twin
        known.add(message_id)
        events.append(_incoming_event(connection, twin, message))
    # The twins first: each event takes its twin's new id as it is inserted.
    Twin.objects.bulk_create(new)
    bulk.update_rows(paired, ["remote_key"])
    SyncEvent.objects.bulk_create(events)
    return len(events), refused


def _incoming_event(connection: Connection, twin: Twin, message: dict[str, Any]) -> SyncEvent:
    return SyncEvent(
        connection=connection,
        twin=twin,
        direction=Direction.INCOMING,
        kind=message["kind"],
        seq=message["seq"],
        message_id=message["id"],
        payload={
            "replica": message.get("replica"),
            "acks": message.get("acks"),
            "restart": bool(message.get("restart")),
            **{name: message[name] for name in ENVELOPE if message.get(name) is not None},
        },
    )


def _store_each(connection: Connection, messages, accepted: list, rejected: dict) -> None:
    for message in messages:
        try:
            with transaction.atomic():
                if _store(connection, message):
                    kick()
            accepted.append(message["id"])
        except IntegrityError as e:
            # The same message delivered twice at once: the other request stored it, and that is success.
            if _stored(connection, message["id"]):
                accepted.append(message["id"])
            else:
                rejected[message["id"]] = f"cannot store: {e}"
        except (DatabaseError, ValueError) as e:
            rejected[message["id"]] = f"cannot store: {e}"


def _stored(connection: Connection, message_id: str) -> bool:
    return SyncEvent.objects.filter(connection=connection, direction=Direction.INCOMING, message_id=message_id).exists()


def _store(connection: Connection, message: dict[str, Any]) -> bool:
    """True when the message is new here."""
    if _stored(connection, message["id"]):
        return False
    twin = None
    if message.get("remote_key"):
        # The sender knows our key: this is the twin it refers to (the ack of a first sync names it).
        twin = Twin.objects.select_for_update().filter(connection=connection, local_key=message["remote_key"]).first()
        if twin is not None and twin.remote_key not in (None, message["key"]):
            raise ValueError(f"{message['remote_key']} is already paired with {twin.remote_key}")
    if twin is None:
        twin, _ = Twin.objects.select_for_update().get_or_create(connection=connection, remote_key=message["key"])
    elif twin.remote_key is None:
        twin.remote_key = message["key"]
        twin.save(update_fields=["remote_key"])
    _incoming_event(connection, twin, message).save()
    return True


# --- applying --------------------------------------------------------------------------------


def find_user_for(tracker: Tracker):
    """How the tracker matches a remote person to a local user id (``helpers.find_user``), if it can."""
    return getattr(tracker, "find_user", None)


class FetchFirst(Exception):
    """The plan adds attachments whose bytes are not here yet: fetch them outside the transaction."""

    def __init__(self, connection: Connection, key: str, metas: list[dict]):
        super().__init__(f"{len(metas)} attachments to fetch")
        self.connection, self.key, self.metas = connection, key, metas


class _Downloads:
    """Attachment bytes fetched ahead of an apply, spooled to disk beyond a little, one in memory at a time."""

    def __init__(self):
        self._files: dict[str, tempfile.SpooledTemporaryFile] = {}

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._files

    def fetch(self, connection: Connection, key: str, metas: list[dict]) -> None:
        limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
        for meta in metas:
            if meta["sha256"] not in self._files:
                spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)  # noqa: SIM115 - closed by close()
                spool.write(transport.fetch_attachment(connection, key, meta["sha256"], limit))
                self._files[meta["sha256"]] = spool

    def read_meta(self, meta: dict) -> bytes:
        spool = self._files[meta["sha256"]]
        spool.seek(0)
        return spool.read()

    def close(self) -> None:
        for spool in self._files.values():
            spool.close()


def apply_incoming(event: SyncEvent, tracker: Tracker) -> bool:
    """Apply one claimed incoming event in order; raises ScriptError/TrackerError/RemoteError on failure.

    False when it waits for an earlier message of its twin (a gap), and is left as it was.

    Attachment bytes are downloaded outside the transaction: a slow download must not hold
    the twin's lock, nor, on SQLite, the database's one write lock, for its whole length.
    """
    if not getattr(tracker, "shares_database", False):
        _create_first(event, tracker)
    downloads = _Downloads()
    try:
        for _ in range(3):
            try:
                return _apply(event, tracker, downloads)
            except FetchFirst as needed:
                downloads.fetch(needed.connection, needed.key, needed.metas)
        raise transport.RemoteError("the attachments to fetch kept changing; will try again")
    finally:
        downloads.close()
        forget_answered()


# (connection id, local key) of updates just applied whose ack is queued, until their
# transaction's commit has announced the write: that announcement is the sync's own echo
# on that connection, and running the outgoing rules again would only find the ack's replica.
_answered = threading.local()


def answered_already(connection_id: int, key: str) -> bool:
    """Whether a change announced for ``key`` is the write of an update whose ack this connection queued."""
    return (connection_id, key) in getattr(_answered, "keys", ())


class Batch:
    """The writes that end each event of a batch, made together at its end (``write``).

    While an event is applied (``staging``), its finish, the acks it applies, the
    messages it queues and its twin's save are kept aside, and join the batch only if the
    event succeeds: a failed event's savepoint rollback must take them too. A twin saved
    so is ``dirty`` (its row is behind it until ``write``): ``apply_locked`` keeps a copy
    before applying another event of it, to fall back on should that one fail.
    """

    def __init__(self, twins: dict[int, Twin] | None = None):
        self.finished: list[tuple[int, int | None]] = []  # (event pk, rules version pk)
        self.acknowledged: list[tuple[int, str]] = []  # (connection pk, message id of our update)
        self.queued: list[SyncEvent] = []
        self.saved: list[Twin] = []
        self.dirty: dict[int, Twin] = {}
        # The hashes of the replicas each twin's row holds: a replica that did not change is not
        # written back (a batch of acks changes none of ours; each is some kilobytes of JSON).
        self.locked = {pk: (t.last_sent_hash, t.last_received_hash) for pk, t in (twins or {}).items()}

    @contextlib.contextmanager
    def staging(self):
        event = Batch()
        _staging.current = event
        try:
            yield
        finally:
            _staging.current = None
        self.finished += event.finished
        self.acknowledged += event.acknowledged
        self.queued += event.queued
        self.dirty.update((twin.pk, twin) for twin in event.saved)

    def undo(self, twin: Twin, copy: dict[str, Any] | None) -> None:
        """An event of ``twin`` failed: back to ``copy`` (its state before), saved now, or to its row."""
        if copy is not None:
            for name, value in copy.items():
                setattr(twin, name, value)
            twin.save()  # the row holds what the events before applied, before the failure is recorded
            if twin.pk in self.locked:
                self.locked[twin.pk] = (twin.last_sent_hash, twin.last_received_hash)
        self.dirty.pop(twin.pk, None)

    def write(self) -> None:
        """Within the batch's transaction, before it commits."""
        dirty = list(self.dirty.values())
        fields = TWIN_FIELDS
        if all(t.pk in self.locked for t in dirty):
            unchanged = {"last_sent", "last_received"}
            for twin in dirty:
                sent, received = self.locked[twin.pk]
                unchanged -= {"last_sent"} if twin.last_sent_hash != sent else set()
                unchanged -= {"last_received"} if twin.last_received_hash != received else set()
            fields = [name for name in TWIN_FIELDS if name not in unchanged]
        bulk.update_rows(dirty, fields)
        SyncEvent.objects.bulk_create(self.queued, batch_size=500)
        for connection_id, message_ids in _grouped(self.acknowledged).items():
            _acknowledge(connection_id, message_ids)
        for rules_id, pks in _grouped((rules_id, pk) for pk, rules_id in self.finished).items():
            _finish_events(pks, rules_id)
        self.finished, self.acknowledged, self.queued, self.dirty = [], [], [], {}


def _grouped(pairs) -> dict:
    """``(key, value)`` pairs as key -> [values]."""
    grouped: dict = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return grouped


_staging = threading.local()
TWIN_FIELDS = [f.name for f in Twin._meta.concrete_fields if not f.primary_key]


def _save_twin(twin: Twin) -> None:
    """``twin.save()``, or, in a batch, kept for one statement with the others (``Batch.write``)."""
    staged = _staged()
    if staged is not None:
        staged.saved.append(twin)
    else:
        twin.save()


def _copy_of(twin: Twin) -> dict[str, Any]:
    return {f.attname: copy.deepcopy(getattr(twin, f.attname)) for f in Twin._meta.concrete_fields}


def _staged() -> Batch | None:
    return getattr(_staging, "current", None)


def lock_twins(events: list[SyncEvent]) -> dict[int, Twin]:
    """The twins of ``events``, locked in id order, as every batch locks them: no two batches
    wait on each other, and none holds the tracker's own locks (a project's numbering) while it
    waits for a twin."""
    twins = Twin.objects.select_for_update().filter(pk__in={e.twin_id for e in events}).order_by("id")
    return {twin.pk: twin for twin in share_connections(list(twins), rules=True)}


def share_connections(rows: list, *, rules: bool = False) -> list:
    """``rows`` (events or twins), each given its connection, each connection read once: joined
    to every row, it was built, and its secret decrypted, once per row. ``rules``: with its
    active rules. A row whose connection was deleted meanwhile (with its rows) is left out."""
    connections = Connection.objects.filter(pk__in={row.connection_id for row in rows})
    if rules:
        connections = connections.select_related("active_rules")
    found = connections.in_bulk() if rows else {}
    kept = [row for row in rows if row.connection_id in found]
    for row in kept:
        row.connection = found[row.connection_id]
    return kept


class Ahead:
    """What a batch reads at once for its events (``read_ahead``); each apply takes its part out."""

    def __init__(self, entities: dict[str, Entity], fields: dict[tuple[int, int], dict]):
        self.entities = entities  # local key -> entity
        self.fields = fields  # (twin pk, seq of our message) -> our fields in it


def read_ahead(tracker: Tracker, events: list[SyncEvent], twins: dict[int, Twin]) -> Ahead:
    """The entities of ``twins`` (a batch's, locked), and our fields in the messages of ours
    that ``events`` say they had seen (``_newly_seen``), each read in one go.

    An entity that two of them share (synced on two connections) is left out: the first
    apply changes what the second must read.
    """
    entities = {}
    if hasattr(tracker, "get_many"):
        keys = [twin.local_key for twin in twins.values() if twin.local_key]
        shared = Counter(keys)
        once = [key for key in keys if shared[key] == 1]
        entities = tracker.get_many(once) if once else {}
    wanted = {
        (event.twin_id, seq)
        for event in events
        if event.twin_id in twins and event.payload.get("seen")
        for seq in (event.payload["seen"], twins[event.twin_id].merge_seen)
        if seq
    }
    fields = {}
    if wanted:
        found = (
            SyncEvent.objects.filter(
                direction=Direction.OUTGOING,
                twin_id__in={twin for twin, _ in wanted},
                seq__in={seq for _, seq in wanted},
            )
            .exclude(kind=Kind.STOP)
            .order_by()
            .values_list("twin_id", "seq", "payload__fields")
        )
        fields = {(twin, seq): value for twin, seq, value in found if (twin, seq) in wanted}
    return Ahead(entities, fields)


def apply_locked(
    event: SyncEvent, tracker: Tracker, twins: dict[int, Twin], batch: Batch, ahead: Ahead | None = None
) -> bool:
    """``apply_incoming`` for one event of a batch applied in one transaction (``lock_twins``).

    Only for a tracker that shares our database: its writes are undone with the event's
    savepoint. On any error the twin is dropped from ``twins``, to be read again as the
    events before left it (``Batch.undo``). An event that needs attachment bytes raises
    FetchFirst and changes nothing. The writes that end it join ``batch``, for the caller
    to ``write`` before the commit.
    ``ahead``: what ``read_ahead`` read; the entity used is taken out, so that a later
    event of the same twin reads what this one wrote.
    """
    twin = twins.get(event.twin_id)
    before = _copy_of(twin) if twin is not None and twin.pk in batch.dirty else None
    try:
        with batch.staging():
            return _apply(event, tracker, _Downloads(), twin, ahead)
    except BaseException as error:
        if twin is not None:
            batch.undo(twin, before)
        if not isinstance(error, FetchFirst):
            twins.pop(event.twin_id, None)
        raise


def forget_answered() -> None:
    """After a batch's commit: its writes have been announced (see ``answered_already``)."""
    _answered.keys = set()
    _answered.memo = {}


def remembered(name: str, read: Callable[[], Any]) -> Any:
    """``read()``, read once while the writes of an apply are announced (until ``forget_answered``).

    A batch's commit announces each issue it wrote; what every announcement asks for (the
    syncing connections) need not be read for each.
    """
    if not getattr(_answered, "keys", None):
        return read()
    memo = _answered.__dict__.setdefault("memo", {})
    if name not in memo:
        memo[name] = read()
    return memo[name]


def _apply(
    event: SyncEvent,
    tracker: Tracker,
    downloads: _Downloads,
    twin: Twin | None = None,
    ahead: Ahead | None = None,
) -> bool:
    """Apply ``event`` in a transaction of its own, or, given its ``twin`` locked by a batch
    (``apply_locked``), in the batch's: there only its writes take a savepoint, for most
    events of a batch (acks that change nothing here) write nothing but what the batch
    writes at its end, and a savepoint is two more round trips to the database."""
    if twin is None:
        with transaction.atomic():
            twin = (
                Twin.objects.select_for_update(of=("self",))
                .select_related("connection__active_rules")
                .get(pk=event.twin_id)
            )
            return _apply_to(event, twin, tracker, downloads, None, contextlib.nullcontext)
    return _apply_to(event, twin, tracker, downloads, ahead, transaction.atomic)


def _apply_to(
    event: SyncEvent,
    twin: Twin,
    tracker: Tracker,
    downloads: _Downloads,
    ahead: Ahead | None,
    writes: Callable[[], contextlib.AbstractContextManager],
) -> bool:
    """``_apply`` with the twin locked; ``writes`` wraps what writes to the database."""
    connection = twin.connection
    if event.seq <= twin.in_seq:
        _finish(event)  # applied before (a redelivery): the effect must happen once
        return True
    if event.seq != twin.in_seq + 1:
        return False  # a gap: wait for the missing message
    if event.kind == Kind.STOP:
        twin.state = Twin.State.STOPPED
        twin.in_seq = event.seq
        _save_twin(twin)
        # Our updates the other side will now never acknowledge are finished too.
        with writes():
            SyncEvent.objects.filter(
                twin=twin, direction=Direction.OUTGOING, kind=Kind.UPDATE, status=Status.SENT
            ).update(status=Status.DONE, finished=timezone.now(), error="the other side stopped syncing this")
        _finish(event)
        return True
    if twin.state == Twin.State.STOPPED:
        if not (event.kind == Kind.UPDATE and event.payload.get("restart")):
            # Stopped here: messages that crossed the stop change nothing. An update gets a
            # stop in answer, so its sender closes it instead of waiting for an ack.
            twin.in_seq = event.seq
            if event.kind == Kind.ACK:
                _mark_acknowledged(connection, event)
                _save_twin(twin)
            else:
                _queue(twin, Kind.STOP, None)
            _finish(event)
            return True
        twin.state = Twin.State.OK  # someone on the other side chose to sync it again
    rules = connection.active_rules
    replica = event.payload.get("replica") or {}
    entity = None
    if twin.local_key:
        entity = (ahead.entities.pop(twin.local_key, None) if ahead else None) or tracker.get(twin.local_key)
    try:
        plan = _plan(event, twin, tracker, entity, ahead)
    except StopSync as e:
        # The rules stopped it: say so to the other side too, so that it stops sending.
        twin.state = Twin.State.STOPPED
        twin.blocked_reason = str(e)
        twin.in_seq = event.seq
        _queue(twin, Kind.STOP, None)
        _finish(event, rules)
        return True
    if event.kind == Kind.ACK and event.payload.get("seen") is None and _answers_an_older_update(twin, event):
        # (A message that says what it had seen of ours is merged field by field instead.)
        # A later update of ours is on its way: this ack shows the other side before it, so
        # its field values are older than ours here and must not undo them. Nor may the base
        # move: a change of theirs it is the first to carry would then look old when their
        # next message brings it again. (Comments and attachments are merged as usual.)
        plan.fields, plan.merge_base, plan.conflicts, plan.taken = {}, None, [], {}
    sender_key = replica.get("key") or twin.remote_key
    added = [op[2] for op in plan.attachments if op[0] == "add"]
    if any(not isinstance(meta.get("sha256"), str) for meta in added):
        raise transport.RemoteError("the replica names an attachment without its sha256", True)
    if connection.remote_url:
        missing = [meta for meta in added if meta["sha256"] not in downloads]
        if missing:
            raise FetchFirst(connection, sender_key, missing)  # before anything is written
        fetch = downloads.read_meta
    else:
        # A private remote uploaded the bytes here already: read from the database, no waiting.
        limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
        fetch = lambda meta: transport.fetch_attachment(connection, sender_key, meta["sha256"], limit)  # noqa: E731
    # Any error below rolls this whole transaction back: a tracker writing inside it may
    # skip the savepoints of its own writes.
    if plan.is_empty and not plan.conflicts:
        writes = contextlib.nullcontext  # an ack that changes nothing here: nothing to undo
    with writes(), getattr(tracker, "all_or_nothing", contextlib.nullcontext)():
        written = processors.apply_plan(tracker, plan, twin.local_key, twin, fetch, current=entity)
        _applied(event, twin, plan, written, tracker)
    return True


def _plan(
    event: SyncEvent, twin: Twin, tracker: Tracker, entity: Entity | None, ahead: Ahead | None = None
) -> processors.IncomingPlan:
    """What the incoming rules make of ``event`` for ``entity`` (None on a first sync)."""
    return processors.plan_incoming(
        twin.connection,
        twin.connection.active_rules,
        event.payload.get("replica") or {},
        twin.last_received,
        entity,
        twin,
        find_user=find_user_for(tracker),
        envelope=event.payload,
        seen_fields=_newly_seen(twin, event, ahead.fields if ahead else None),
    )


def _applied(event: SyncEvent, twin: Twin, plan: processors.IncomingPlan, written: Entity, tracker: Tracker) -> None:
    """What follows a plan carried out: the twin's record, conflicts, the ack of an update, the event done."""
    connection, rules = twin.connection, twin.connection.active_rules
    replica = event.payload.get("replica") or {}
    twin.local_key = written.key
    if plan.taken:
        twin.sent_fields = processors.record_taken(twin.sent_fields, plan.taken, written)
    if plan.merge_base is not None:
        twin.merge_base = plan.merge_base
        if event.payload.get("seen") is not None:
            twin.merge_seen = event.payload["seen"]
    if plan.conflicts:
        Conflict.objects.bulk_create(Conflict(twin=twin, event=event, **found) for found in plan.conflicts)
    twin.last_received = replica
    twin.last_received_hash = replica_hash(replica)
    twin.in_seq = event.seq
    twin.last_synced = timezone.now()
    if event.kind == Kind.ACK:
        _mark_acknowledged(connection, event)
    if event.kind == Kind.UPDATE:
        # The acknowledgement: what this side now holds, made by our own outgoing rules.
        ack, _ = processors.run_outgoing(connection, rules, written, twin)
        _queue(twin, Kind.ACK, ack, acks=str(event.message_id), entity=written)
        if getattr(tracker, "shares_database", False):
            _answered.keys = {*getattr(_answered, "keys", ()), (connection.pk, written.key)}
    else:
        _save_twin(twin)
    _finish(event, rules)


def apply_creates(events: list[SyncEvent], tracker: Tracker, twins: dict[int, Twin], batch: Batch) -> set[int]:
    """The first syncs among ``events`` (a batch; ``twins`` locked), created together; the pks of those done.

    A first sync that brings fields and comments only (no attachment to fetch) is planned
    as ``_apply`` plans it, and all of them are then written by one ``create_many`` of the
    tracker; the rest is as in ``_apply``. Should anything fail (the rules, a value the
    tracker refuses), none of them is kept, and the caller applies them one by one, where
    each failure is recorded on its own event.
    """
    if not hasattr(tracker, "create_many"):
        return set()
    planned, taken = [], set()
    for event in events:
        twin = twins.get(event.twin_id)
        if twin is None or twin.pk in taken or not _plain_first_sync(event, twin):
            continue
        try:
            plan = _plan(event, twin, tracker, None)
        except (StopSync, ScriptError):
            continue
        if plan.create and plan.project and not plan.attachments and all(op[0] == "add" for op in plan.comments):
            planned.append((event, twin, plan))
            taken.add(twin.pk)
    if len(planned) < 2:
        return set()
    items = [
        (plan.project, processors.creation_fields(plan), [op[2] for op in plan.comments]) for _, _, plan in planned
    ]
    try:
        with transaction.atomic(), batch.staging():
            with getattr(tracker, "all_or_nothing", contextlib.nullcontext)():
                created = tracker.create_many(items)
            for (event, twin, plan), (written, comments) in zip(planned, created, strict=True):
                for op, comment in zip(plan.comments, comments, strict=True):
                    twin.comment_map[op[1]] = comment.id
                _applied(event, twin, plan, written, tracker)
    except Exception:
        for _, twin, _ in planned:
            twins.pop(twin.pk, None)  # changed in memory by the part rolled back: read again
        return set()
    return {event.pk for event, _, _ in planned}


def _plain_first_sync(event: SyncEvent, twin: Twin) -> bool:
    """An update that is next in sequence and creates the entity here, on a twin neither stopped nor restarted."""
    return (
        event.kind == Kind.UPDATE
        and event.seq == twin.in_seq + 1
        and not twin.local_key
        and twin.state == Twin.State.OK
        and not event.payload.get("restart")
        and event.payload.get("seen") in (None, 0)
    )


def _fields_as_of(twin: Twin, seq: int) -> dict[str, Any]:
    """Our fields' values in the last of our messages up to ``seq`` (the sender had applied it)."""
    found = (
        twin.events.filter(direction=Direction.OUTGOING, seq__gt=0, seq__lte=seq)
        .exclude(kind=Kind.STOP)
        .order_by("-seq")
        .values_list("payload__fields", flat=True)
        .first()
    )
    return found or {}


def _newly_seen(
    twin: Twin, event: SyncEvent, known: dict[tuple[int, int], dict] | None = None
) -> dict[str, Any] | None:
    """Our fields' values that the sender of ``event`` had newly applied since its previous message.

    Where its value is one of these, it took ours: not a change of its own. A value of ours
    it had seen before is not counted, for it may have set that value again itself.
    """
    seen = event.payload.get("seen")
    if seen is None:
        return None
    if seen == twin.merge_seen or seen == 0:
        return {}  # nothing of ours applied there (since its last message)
    # Usually both are messages of ours that carried fields: one query reads the two.
    wanted = [n for n in (seen, twin.merge_seen) if n]
    if known is not None and all((twin.pk, n) in known for n in wanted):
        found = {n: known[twin.pk, n] for n in wanted}  # read ahead for the batch
    else:
        found = dict(
            twin.events.filter(direction=Direction.OUTGOING, seq__in=wanted)
            .exclude(kind=Kind.STOP)
            .order_by()
            .values_list("seq", "payload__fields")
        )

    def fields_at(seq: int) -> dict[str, Any]:
        return (found[seq] or {}) if seq in found else _fields_as_of(twin, seq)

    now = fields_at(seen)
    before = fields_at(twin.merge_seen) if twin.merge_seen else {}
    return {name: value for name, value in now.items() if name not in before or before[name] != value}


def _answers_an_older_update(twin: Twin, ack: SyncEvent) -> bool:
    # At most one row (the message id is unique per connection and direction); unordered, so
    # that PostgreSQL finds it by that index rather than walking the queue in id order.
    acked = next(
        iter(
            SyncEvent.objects.filter(
                connection_id=twin.connection_id, direction=Direction.OUTGOING, message_id=ack.payload.get("acks")
            )
            .order_by()
            .values_list("seq", flat=True)
        ),
        None,
    )
    return (
        acked is not None and twin.events.filter(direction=Direction.OUTGOING, kind=Kind.UPDATE, seq__gt=acked).exists()
    )


def _mark_acknowledged(connection: Connection, ack: SyncEvent) -> None:
    message_id = ack.payload.get("acks")
    if not message_id:
        return
    staged = _staged()
    if staged is not None:
        staged.acknowledged.append((connection.pk, message_id))
    else:
        _acknowledge(connection.pk, [message_id])


def _acknowledge(connection_id: int, message_ids: list[str]) -> None:
    """Our updates with these message ids are done: the other side applied them."""
    SyncEvent.objects.filter(
        connection_id=connection_id, direction=Direction.OUTGOING, message_id__in=message_ids
    ).exclude(status=Status.DONE).update(status=Status.DONE, finished=timezone.now(), error="")


def _create_first(event: SyncEvent, tracker: Tracker) -> None:
    """For a tracker outside our database: create the entity of a first sync and commit its key at once.

    Were the creation part of the big transaction, a failure after it (an attachment that
    cannot be fetched, a dead worker) would roll back the twin's key but not the entity,
    and the retry would create a second one.
    """
    with transaction.atomic():
        twin = (
            Twin.objects.select_for_update(of=("self",))
            .select_related("connection__active_rules")
            .get(pk=event.twin_id)
        )
        if twin.local_key or event.kind == Kind.STOP or event.seq != twin.in_seq + 1:
            return
        if twin.state == Twin.State.STOPPED and not event.payload.get("restart"):
            return
        connection = twin.connection
        try:
            plan = processors.plan_incoming(
                connection,
                connection.active_rules,
                event.payload.get("replica") or {},
                twin.last_received,
                None,
                twin,
                find_user=find_user_for(tracker),
            )
        except StopSync:
            return  # the main path records the stop
        if plan.create:
            twin.local_key = processors.create_entity(tracker, plan).key
            twin.save(update_fields=["local_key"])


def _finish(event: SyncEvent, rules=None) -> None:
    rules_id = rules.pk if rules else event.rules_version_id
    staged = _staged()
    if staged is not None:
        staged.finished.append((event.pk, rules_id))
    else:
        _finish_events([event.pk], rules_id)


def _finish_events(pks: list[int], rules_id: int | None) -> None:
    SyncEvent.objects.filter(pk__in=pks).update(
        status=Status.DONE,
        finished=timezone.now(),
        error="",
        error_line=None,
        lease_owner="",
        lease_expires=None,
        rules_version_id=rules_id,
    )


# --- failures and recovery -------------------------------------------------------------------

MAX_ATTEMPTS = 8


def backoff(attempts: int) -> timedelta:
    import random

    base = min(2**attempts, 600)
    return timedelta(seconds=base * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not security


def record_failure(event: SyncEvent, error: Exception) -> None:
    """Push the event back before anything else can fail: retry later, or block the twin."""
    permanent = getattr(error, "permanent", True) if not isinstance(error, ScriptError) else True
    attempts = event.attempts + 1
    line = getattr(error, "line", None)
    message = str(error) or type(error).__name__
    # Which rules failed: an incoming event records it here, as it never finished.
    rules_id = (
        event.rules_version_id
        or Connection.objects.filter(pk=event.connection_id).values_list("active_rules_id", flat=True).first()
    )
    with transaction.atomic():
        if permanent or attempts >= MAX_ATTEMPTS:
            SyncEvent.objects.filter(pk=event.pk).update(
                status=Status.FAILED,
                attempts=attempts,
                error=message,
                error_line=line,
                rules_version_id=rules_id,
                lease_owner="",
                lease_expires=None,
                finished=timezone.now(),
            )
            Twin.objects.filter(pk=event.twin_id).update(state=Twin.State.BLOCKED, blocked_reason=message)
        else:
            SyncEvent.objects.filter(pk=event.pk).update(
                status=Status.PENDING,
                attempts=attempts,
                error=message,
                error_line=line,
                lease_owner="",
                lease_expires=None,
                next_attempt=timezone.now() + backoff(attempts),
            )


@transaction.atomic
def resolve_and_retry(twin: Twin) -> int:
    """Unblock the twin and put its failed events back in the queue, in order. Returns how many."""
    twin = Twin.objects.select_for_update().get(pk=twin.pk)
    failed = SyncEvent.objects.filter(twin=twin, status=Status.FAILED)
    retried = failed.filter(~Q(seq=0)).update(
        status=Status.PENDING, next_attempt=timezone.now(), attempts=0, finished=None
    )
    # A failed outgoing script has nothing to resend: running the rules again is the retry.
    rerun = failed.filter(seq=0).exists()
    failed.filter(seq=0).update(status=Status.DONE, finished=timezone.now())
    # Only a blocked twin is unblocked; a stopped one stays stopped until someone syncs it again.
    if twin.state == Twin.State.BLOCKED:
        twin.state = Twin.State.OK
        twin.blocked_reason = ""
    twin.bounces = 0
    twin.save()
    if rerun and twin.local_key:
        transaction.on_commit(lambda: _resync(twin.pk))
    kick()
    return retried + int(rerun)


def _resync(twin_id: int) -> None:
    twin = Twin.objects.select_related("connection__active_rules").get(pk=twin_id)
    try:
        sync_entity(twin.connection, twin.local_key)
    except (TrackerError, SyncRefused) as e:
        log.warning("re-running the outgoing rules of %s failed: %s", twin, e)
