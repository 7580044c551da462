"""The durable sync queue: twins (a local entity paired with a remote one) and sync events.

The SyncEvent table *is* the queue: django-q2 only runs the work; the rows hold the truth.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone

from connections.models import Connection, RulesVersion
from exalate_web import jsonio


class Twin(models.Model):
    class State(models.TextChoices):
        OK = "ok", "OK"
        BLOCKED = "blocked", "Blocked"
        STOPPED = "stopped", "Stopped"

    # No index of its own: twin_sweep_idx begins with it. (Every index costs each write of a row.)
    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="twins", db_index=False)
    # Empty until known: the local key until a first incoming sync creates the entity,
    # the remote key until the first acknowledgement names it.
    # NULL, not "", so that the unique constraints ignore twins whose key is not known yet.
    local_key = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001
    remote_key = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001
    state = models.CharField(max_length=10, choices=State.choices, default=State.OK, db_index=True)
    blocked_reason = models.TextField(blank=True)
    last_sent = jsonio.JSONField(null=True, blank=True)
    last_sent_hash = models.CharField(max_length=64, blank=True)
    # The last replica received: the base (`previous`) of the next incoming sync.
    last_received = jsonio.JSONField(null=True, blank=True)
    last_received_hash = models.CharField(max_length=64, blank=True)
    # Sequence numbers per direction: the last we gave a message, the last we applied.
    out_seq = models.PositiveIntegerField(default=0)
    in_seq = models.PositiveIntegerField(default=0)
    # Remote comment/attachment id -> local id, for the ones the sync created here.
    comment_map = jsonio.JSONField(default=dict, blank=True)
    attachment_map = jsonio.JSONField(default=dict, blank=True)
    # Local attachments in attachment_map that were here already (the same bytes attached on
    # both sides), not copies the sync made: they are still this side's to send.
    linked_attachments = jsonio.JSONField(default=list, blank=True)
    created = models.DateTimeField(default=timezone.now, editable=False)
    last_synced = models.DateTimeField(null=True, blank=True)
    # When polling last looked at the local entity on purpose (see triggers.sweep).
    last_checked = models.DateTimeField(null=True, blank=True)
    # Updates sent in a row right after the sync's own write changed the entity: a loop if it grows.
    bounces = models.PositiveSmallIntegerField(default=0)
    # helpers.merge_fields: the other side's values (in local terms) at the last merge.
    merge_base = jsonio.JSONField(default=dict, blank=True)
    # Each local field's value as last sent, with the ``changed`` of the message that first
    # carried it: {field: [value, iso time]}. merge_fields dates our side of a conflict by it,
    # and does not take back a value that is only ours returning.
    sent_fields = jsonio.JSONField(default=dict, blank=True)
    # How many of our messages the other side had applied when it made the last one merged.
    merge_seen = models.PositiveIntegerField(null=True, blank=True)
    # The ``updated`` of the entity our last message was made from. A read of the entity no
    # newer than this may be older than what went out, and is read again before it is sent.
    sent_version = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["connection", "local_key"], condition=Q(local_key__isnull=False), name="twin_local_unique"
            ),
            models.UniqueConstraint(
                fields=["connection", "remote_key"], condition=Q(remote_key__isnull=False), name="twin_remote_unique"
            ),
        ]
        indexes = [models.Index(fields=["connection", "last_checked"], name="twin_sweep_idx")]

    def __str__(self) -> str:
        return f"{self.local_key or '?'} <-> {self.remote_key or '?'}"


class SyncEvent(models.Model):
    class Direction(models.TextChoices):
        OUTGOING = "outgoing", "Outgoing"
        INCOMING = "incoming", "Incoming"

    class Kind(models.TextChoices):
        UPDATE = "update", "Update"
        ACK = "ack", "Acknowledgement"
        STOP = "stop", "Stop"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent, awaiting acknowledgement"
        PROCESSING = "processing", "Processing"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    # Neither has an index of its own: event_message_unique and event_twin_seq_idx begin with
    # them. An event's row is written about four times, and each write goes to every index.
    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="events", db_index=False)
    twin = models.ForeignKey(Twin, on_delete=models.CASCADE, related_name="events", db_index=False)
    direction = models.CharField(max_length=10, choices=Direction.choices)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.UPDATE)
    # Per twin and direction: the order the sender made them in.
    seq = models.PositiveIntegerField()
    # The idempotency key: the same message delivered twice is stored and applied once.
    message_id = models.UUIDField(default=uuid.uuid4)
    payload = jsonio.JSONField(default=dict)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt = models.DateTimeField(default=timezone.now)
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_expires = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_line = models.PositiveIntegerField(null=True, blank=True)
    # No index: a rules version is deleted only with its connection, and every write of an
    # event would go to one more index.
    rules_version = models.ForeignKey(RulesVersion, on_delete=models.SET_NULL, null=True, blank=True, db_index=False)
    created = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["connection", "direction", "message_id"], name="event_message_unique"),
        ]
        indexes = [
            # A claim takes the oldest ready events: walked in id order over the pending ones
            # only, it stops at its batch, however many thousands wait behind it.
            models.Index(fields=["direction", "id"], condition=Q(status="pending"), name="event_pending_idx"),
            models.Index(fields=["twin", "direction", "seq"], name="event_twin_seq_idx"),
            # Retention and the monitor's throughput look at finished events only; an event gets
            # its entry once, when it finishes, not at each change of status on the way.
            models.Index(fields=["finished"], condition=Q(status__in=["done", "failed"]), name="event_finished_idx"),
            # Every worker pass looks for expired leases; only the few events in flight have one.
            models.Index(
                fields=["lease_expires"],
                condition=Q(status__in=["processing", "sending"]),
                name="event_lease_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.direction} {self.kind} #{self.seq} of {self.twin}"


class TrackerState(models.Model):
    """The local tracker as the sync last found it (one row). While it has a problem the queue waits."""

    problem = models.TextField(blank=True)
    # True when waiting alone cannot help (the tracker refuses the sync's key): someone must act.
    needs_action = models.BooleanField(default=False)
    since = models.DateTimeField(null=True, blank=True)
    checked = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.problem or "working"


class Conflict(models.Model):
    """A field both sides changed since the last sync, and how the connection's policy settled it."""

    twin = models.ForeignKey(Twin, on_delete=models.CASCADE, related_name="conflicts")
    event = models.ForeignKey("SyncEvent", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    field = models.CharField(max_length=40)
    base = jsonio.JSONField(null=True, blank=True)
    local = jsonio.JSONField(null=True, blank=True)
    remote = jsonio.JSONField(null=True, blank=True)
    chosen = models.CharField(max_length=10, choices=[("local", "Local value kept"), ("remote", "Remote value taken")])
    # The rule that settled it (see processors.Settling).
    policy = models.CharField(max_length=10)
    created = models.DateTimeField(default=timezone.now)

    RULES = {
        "remote": "this side's policy: the other side's change wins",
        "local": "this side's policy: this side's change wins",
        "theirs": "the other side's policy",
        "newest": "the newer change wins",
        "initiator": "changes at the same time: the initiating side's wins",
    }

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.field} of {self.twin}: {self.chosen}"

    @property
    def rule(self) -> str:
        return self.RULES.get(self.policy, self.policy)


class Blob(models.Model):
    """Attachment bytes a private remote uploaded ahead of the messages that name them (it cannot be fetched from)."""

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="+")
    sha256 = models.CharField(max_length=64)
    content = models.BinaryField()
    created = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["connection", "sha256"], name="blob_unique")]

    def __str__(self) -> str:
        return f"{self.sha256[:12]} from {self.connection_id}"


class UploadedBlob(models.Model):
    """On a private node: attachment bytes already uploaded to the remote, so they go once."""

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="+")
    sha256 = models.CharField(max_length=64)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["connection", "sha256"], name="uploaded_blob_unique")]

    def __str__(self) -> str:
        return f"{self.sha256[:12]} to {self.connection_id}"


class Lease(models.Model):
    """A named job one process runs at a time across the cluster (the tick), until ``expires``."""

    name = models.CharField(max_length=50, unique=True)
    owner = models.CharField(max_length=100, blank=True)
    expires = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner or 'nobody'} until {self.expires:%H:%M:%S}"
