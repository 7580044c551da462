"""Playing the remote node "Red" against this test database, which is the node "Blue".

Red is no process here: its messages are built by hand and handed to ``flow.receive``
as its requests would be, and what Blue sends is caught at ``transport.post_messages``.
The end-to-end tests with two live nodes are in test_sync_live.py.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from connections import rules
from connections.models import Connection, Trigger
from syncqueue import flow, worker
from syncqueue.models import SyncEvent, Twin
from trackers.base import Comment, Entity, NotFound
from trackers.builtin import actions
from trackers.builtin.adapter import BuiltinTracker

WORKER = "test-worker"
RITA = {"id": "rita", "name": "Rita Red", "email": "rita@red.example"}


def connect_red(*, project: str = "BLUE", trigger: bool = True) -> Connection:
    """An active connection to Red with the default rules and, by default, a trigger on ``project``."""
    connection = Connection.objects.create(
        name="Red",
        status=Connection.Status.ACTIVE,
        secret="r" * 64,
        remote_name="Red",
        remote_url="http://red.example",
        project=project,
    )
    rules.install_defaults(connection)
    if trigger:
        Trigger.objects.create(connection=connection, query=f"project:{project}")
    connection.refresh_from_db()
    return connection


def use_rules(
    connection: Connection, *, outgoing: str = rules.DEFAULT_OUTGOING, incoming: str = rules.DEFAULT_INCOMING
):
    """Save and activate new rules; returns the connection as it is now."""
    rules.save_rules(connection, outgoing, incoming, comment="test rules")
    connection.refresh_from_db()
    return connection


def replica(key: str = "RED-1", **fields: Any) -> dict[str, Any]:
    """What Red's default outgoing rules would send for its issue ``key``."""
    return {
        "key": key,
        "summary": "Made on Red",
        "description": "",
        "type": "Task",
        "status": "Open",
        "priority": "Medium",
        "labels": [],
        "assignee": None,
        "reporter": RITA,
        "comments": [],
        "attachments": [],
        **fields,
    }


def comment(remote_id: str, body: str, author: Mapping | None = None) -> dict[str, Any]:
    return {
        "id": remote_id,
        "author": dict(author or RITA),
        "body": body,
        "created": "2025-01-01T00:00:00+00:00",
        "updated": "2025-01-01T00:00:00+00:00",
    }


def attachment(remote_id: str, content: bytes, filename: str = "notes.txt") -> dict[str, Any]:
    return {
        "id": remote_id,
        "filename": filename,
        "size": len(content),
        "content_type": "text/plain",
        "sha256": hashlib.sha256(content).hexdigest(),
    }


def serve(*contents: bytes):
    """A stand-in for ``transport.fetch_attachment`` that has Red's attachments with these bytes."""
    by_hash = {hashlib.sha256(content).hexdigest(): content for content in contents}

    def fetch(connection, key: str, sha256: str, max_bytes: int) -> bytes:
        return by_hash[sha256]

    return fetch


class Red:
    """Red's side of the conversation; numbers its messages per issue, as its queue would."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.seqs: dict[str, int] = defaultdict(int)

    def message(self, kind: str, key: str, *, seq: int | None = None, remote_key=None, acks=None, replica=None):
        if seq is None:
            self.seqs[key] += 1
            seq = self.seqs[key]
        message = {"id": str(uuid.uuid4()), "kind": kind, "seq": seq, "key": key, "remote_key": remote_key}
        message["replica"] = replica  # None for a stop
        # As a real node would: its entity changed as the message was made, and Red's policy is the default.
        message["changed"], message["policy"] = datetime.now(UTC).isoformat(), "newest"
        if acks:
            message["acks"] = str(acks)
        return message

    def update(self, key: str = "RED-1", *, seq: int | None = None, remote_key=None, **fields) -> dict[str, Any]:
        return self.message("update", key, seq=seq, remote_key=remote_key, replica=replica(key, **fields))

    def ack(self, acks, *, key: str, remote_key: str, seq: int | None = None, **fields) -> dict[str, Any]:
        return self.message("ack", key, seq=seq, remote_key=remote_key, acks=acks, replica=replica(key, **fields))

    def stop(self, key: str = "RED-1", *, seq: int | None = None) -> dict[str, Any]:
        return self.message("stop", key, seq=seq)

    def send(self, *messages: dict[str, Any]) -> dict[str, Any]:
        """Deliver ``messages`` in one batch, as Red's push would; returns Blue's answer."""
        return flow.receive(self.connection, list(messages))

    def twin(self, key: str = "RED-1") -> Twin:
        return Twin.objects.get(connection=self.connection, remote_key=key)

    def outgoing(self, **filters) -> list[SyncEvent]:
        """What Blue has queued for Red, oldest first."""
        return list(
            SyncEvent.objects.filter(connection=self.connection, direction="outgoing", **filters).order_by("id")
        )


def work(rounds: int = 20) -> int:
    """Apply ready incoming events until none is left; returns how many were handled."""
    handled = 0
    for _ in range(rounds):
        done = worker.process_incoming(WORKER)
        if not done:
            break
        handled += done
    return handled


def tracker() -> BuiltinTracker:
    return BuiltinTracker()


def blue_issue(actor=None, **fields: Any):
    """An issue made on Blue by a person, through the tracker's own write path."""
    return actions.create_issue("BLUE", {"summary": "Made on Blue", **fields}, actor=actor)


class MemoryTracker:
    """A tracker outside Blue's database, as Redmine or Jira are: its writes survive a rollback."""

    kind = "memory"

    def __init__(self):
        self.entities: dict[str, Entity] = {}
        self.numbers = itertools.count(1)

    def get(self, key: str) -> Entity:
        if key not in self.entities:
            raise NotFound(f"no issue {key}")
        return self.entities[key]

    def create(self, project: str, fields: Mapping[str, Any]) -> Entity:
        number = next(self.numbers)
        entity = Entity(key=f"MEM-{number}", id=str(number), project=project, type="Task", summary="")
        self.entities[entity.key] = replace(entity, **_entity_fields(fields))
        return self.entities[entity.key]

    def update(self, key: str, fields: Mapping[str, Any]) -> Entity:
        self.entities[key] = replace(self.get(key), **_entity_fields(fields))
        return self.entities[key]

    def add_comment(self, key: str, body: str) -> Comment:
        entity = self.get(key)
        now = datetime.now(UTC)
        added = Comment(id=str(next(self.numbers)), author=None, body=body, created=now, updated=now)
        self.entities[key] = replace(entity, comments=(*entity.comments, added))
        return added


def _entity_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in fields.items() if k in ("summary", "description", "status", "type")}
    return {k: v or "" for k, v in kept.items()}
