"""Who this node syncs with, and how: the node itself, connections, rules versions and triggers."""

from __future__ import annotations

import json
import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from connections.crypto import EncryptedTextField

MAX_POLL_SECONDS = 24 * 60 * 60


class Node(models.Model):
    """This deployment's identity (one row). Name and URL follow the settings at start-up."""

    node_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=100)
    url = models.URLField(max_length=300, blank=True)
    tracker_kind = models.CharField(max_length=30, default="builtin")
    # JSON of the tracker's settings (URL, API key, ...), encrypted because it holds credentials.
    tracker_settings = EncryptedTextField(blank=True, default="")
    poll_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_POLL_SECONDS)],
        help_text="How often the tracker is asked for changes; empty means the SYNC_POLL_SECONDS setting.",
    )
    created = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self) -> str:
        return self.name

    def poll_interval(self) -> int:
        """Seconds between two looks at this node's tracker for changes."""
        return settings.SYNC_POLL_SECONDS if self.poll_seconds is None else self.poll_seconds

    def tracker_config(self) -> dict:
        return json.loads(self.tracker_settings) if self.tracker_settings else {}

    def tracker(self):
        """This node's tracker adapter (``trackers.base.Tracker``)."""
        from trackers import registry

        return registry.create(self.tracker_kind, **self.tracker_config())

    @classmethod
    def local(cls) -> Node:
        node = cls.objects.order_by("id").first()
        if node is None:
            # Every process of a new node may get here at once. A lock on an empty table holds
            # nothing back, so the row has a fixed key: the losers of the race read the winner's
            # row (and its node_id) instead of adding their own.
            node, _ = cls.objects.get_or_create(pk=1, defaults={"name": settings.NODE_NAME, "url": settings.NODE_URL})
        if (node.name, node.url) != (settings.NODE_NAME, settings.NODE_URL):
            node.name, node.url = settings.NODE_NAME, settings.NODE_URL
            node.save(update_fields=["name", "url"])
        return node


class Connection(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ACTIVE = "active", "Active"
        DEACTIVATED = "deactivated", "Deactivated"
        ERROR = "error", "Error"

    # Shared by both sides: the initiator makes it, the acceptor learns it from the code.
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=100)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    status_detail = models.TextField(blank=True, help_text="Why the connection is in error, in plain words.")
    is_initiator = models.BooleanField(default=True)
    remote_name = models.CharField(max_length=100, blank=True)
    remote_node_id = models.UUIDField(null=True, blank=True)
    # Blank when the remote is private (not reachable): it pulls from us instead.
    remote_url = models.URLField(max_length=300, blank=True)
    # This side is private (the remote cannot reach it): it pulls its messages from the remote
    # and uploads the attachment bytes the remote will need.
    pulls = models.BooleanField(default=False)
    secret = EncryptedTextField(blank=True, default="")
    # Where first syncs of remote entities create local ones (the built-in tracker's project key).
    project = models.CharField(max_length=50, blank=True)
    # RESTRICT, not PROTECT: a version cannot be deleted alone while active, but deleting the
    # connection deletes its versions with it.
    active_rules = models.ForeignKey("RulesVersion", on_delete=models.RESTRICT, null=True, blank=True, related_name="+")

    class ConflictPolicy(models.TextChoices):
        REMOTE = "remote", "The other side's change wins"
        LOCAL = "local", "This side's change wins"
        NEWEST = "newest", "The newer change wins"

    # How helpers.merge_fields settles a field changed on both sides since the last sync. Both
    # sides' policies count (processors.Settling): policies that contradict each other, both
    # "remote" or both "local", fall back to the newer change.
    conflict_policy = models.CharField(max_length=10, choices=ConflictPolicy.choices, default=ConflictPolicy.NEWEST)
    # Polling: entities changed since this moment are looked at on the next pass.
    poll_watermark = models.DateTimeField(null=True, blank=True)
    polled_at = models.DateTimeField(null=True, blank=True)
    last_contact = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


class Invitation(models.Model):
    """A single-use, expiring code the initiator hands to the other side's admin."""

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="invitations")
    token = EncryptedTextField()
    # The initiator's half of the key exchange; never leaves this node.
    private_key = EncryptedTextField()
    # The acceptor's public key, kept so that a retried acceptance gets the same answer.
    accepted_key = models.CharField(max_length=100, blank=True)
    expires = models.DateTimeField()
    used = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"invitation for {self.connection}"

    @property
    def is_usable(self) -> bool:
        return self.used is None and self.expires > timezone.now()


class RulesVersion(models.Model):
    """An immutable pair of scripts. Saving rules makes a new version; rollback activates an old one."""

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="rules_versions")
    number = models.PositiveIntegerField()
    outgoing = models.TextField(blank=True)
    incoming = models.TextField(blank=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True)
    comment = models.CharField(max_length=300, blank=True)
    created = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["connection", "-number"]
        constraints = [models.UniqueConstraint(fields=["connection", "number"], name="rules_version_unique")]

    def __str__(self) -> str:
        return f"{self.connection} rules v{self.number}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("a rules version is immutable; save new rules as a new version")
        super().save(*args, **kwargs)


class Trigger(models.Model):
    """A filter on the local tracker, in its own query language; matching entities come under sync."""

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="triggers")
    query = models.TextField(help_text="In the local tracker's query language, e.g. project:BLUE label:sync")
    active = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now, editable=False)
    last_run = models.DateTimeField(null=True, blank=True)
    # Where a run that outlasted its request goes on: the tracker's cursor of the next page,
    # which the queue's workers take up between their other work. Empty: no run under way.
    run_cursor = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["connection", "id"]

    def __str__(self) -> str:
        return f"{self.connection}: {self.query}"

    @property
    def running(self) -> bool:
        return bool(self.run_cursor)


class SeenNonce(models.Model):
    """Nonces of signed requests inside the time window, so that a replay is refused."""

    connection = models.ForeignKey(Connection, on_delete=models.CASCADE, related_name="+")
    nonce = models.CharField(max_length=64)
    seen = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["connection", "nonce"], name="seen_nonce_unique")]

    def __str__(self) -> str:
        return self.nonce
