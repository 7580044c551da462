"""The tracker contract: tracker-neutral entities and the protocol every adapter implements.

The sync never talks to a tracker directly; it talks to a ``Tracker``. Each adapter
(the built-in tracker, Redmine, ...) turns its system's records into the dataclasses
below and back. Adapters raise only ``TrackerError`` (and its ``NotFound`` case): a
permanent error will not go away by retrying, a transient one might.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Protocol, runtime_checkable


class TrackerError(Exception):
    """The one error an adapter raises. ``permanent`` says whether a retry can help."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.message = message
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, permanent={self.permanent})"


class TrackerUnavailable(TrackerError):
    """The tracker as a whole cannot be used now: unreachable, down, or refusing the sync's credentials.

    Nothing is wrong with the entity at hand, so the sync holds the queue instead of
    blocking twins, shows the problem, and resumes by itself once the tracker answers.
    ``permanent`` says whether waiting alone can help (a refused key needs someone to act).
    """


class NotFound(TrackerError):
    """The entity, comment or attachment does not exist (always permanent)."""

    def __init__(self, message: str):
        super().__init__(message, permanent=True)


@dataclass(frozen=True)
class Person:
    """A user of the tracker. ``id`` is what the tracker accepts back (a login, a user id)."""

    id: str
    name: str = ""
    email: str = ""


@dataclass(frozen=True)
class Comment:
    id: str
    author: Person | None
    body: str
    created: datetime
    updated: datetime


@dataclass(frozen=True)
class Attachment:
    id: str
    filename: str
    size: int
    content_type: str
    sha256: str
    created: datetime | None = None
    author: Person | None = None
    # Opens the bytes for reading; left out of equality so two reads of one file compare equal.
    opener: Callable[[], IO[bytes]] | None = field(default=None, compare=False, repr=False)

    def open(self) -> IO[bytes]:
        if self.opener is None:
            raise TrackerError(f"attachment {self.id} has no content reader", permanent=True)
        return self.opener()

    def read(self) -> bytes:
        with self.open() as f:
            return f.read()


@dataclass(frozen=True)
class Entity:
    """One issue / work item, with its comments and attachments, in tracker-neutral form."""

    key: str
    id: str
    project: str
    type: str
    summary: str
    description: str = ""
    status: str = ""
    priority: str = ""
    assignee: Person | None = None
    reporter: Person | None = None
    labels: tuple[str, ...] = ()
    custom_fields: Mapping[str, Any] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None
    # Who made the latest change; lets the sync recognise its own writes.
    updated_by: Person | None = None
    comments: tuple[Comment, ...] = ()
    attachments: tuple[Attachment, ...] = ()


# Fields ``create`` and ``update`` accept. ``assignee``/``reporter`` take a Person id or None;
# ``custom_fields`` is merged key by key (a None value removes that key).
WRITABLE_FIELDS = frozenset(
    {"summary", "description", "status", "priority", "type", "assignee", "reporter", "labels", "custom_fields"}
)


@dataclass(frozen=True)
class Page:
    """One page of a listing. Pass ``next_cursor`` back for the next page; None means done.

    ``high_water`` is the newest ``updated`` seen in this page; a poller stores the largest
    one as its next watermark only after the whole pass succeeded.
    """

    entities: tuple[Entity, ...]
    next_cursor: str | None = None
    high_water: datetime | None = None


@dataclass(frozen=True)
class VersionPage:
    """A page of ``changed_versions``: the key and ``updated`` of each entity ``changed_since`` lists."""

    versions: tuple[tuple[str, datetime | None], ...]
    next_cursor: str | None = None
    high_water: datetime | None = None


@runtime_checkable
class Tracker(Protocol):
    """What the sync needs from a tracker. Every method raises only TrackerError."""

    kind: str
    # True when writes join the node's database transaction (only the built-in tracker);
    # the sync then creates and links an entity in one step. Other adapters leave it False.
    shares_database: bool = False
    # False when some changes move no timestamp (Redmine: comment edits, attachment
    # deletes), so ``changed_since`` misses them; the poller then also re-reads twins.
    reports_every_change: bool = True

    def get(self, key: str) -> Entity:
        """The entity with its comments and attachments; NotFound if there is none."""

    def changed_since(self, since: datetime | None, *, cursor: str | None = None, limit: int = 100) -> Page:
        """Entities updated at or after ``since`` (all when None), oldest first, paged.

        A comment or attachment change counts as a change of its entity where the tracker
        allows. An entity may appear again in a later pass (adapters overlap the boundary
        so that late commits are not missed); within one pass it appears at most once.
        """

    def search(self, query: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        """Entities matching a filter in the tracker's own query language."""

    def matches(self, query: str, key: str) -> bool:
        """Whether entity ``key`` matches ``query`` (as ``search`` reads it), without listing all matches.

        Triggers ask this for every changed entity, so it must cost about one lookup.
        """

    def create(self, project: str, fields: Mapping[str, Any]) -> Entity:
        """A new entity in ``project``; ``fields`` as in WRITABLE_FIELDS."""

    def update(self, key: str, fields: Mapping[str, Any]) -> Entity:
        """Change only the given fields and return the entity as it is now."""

    def add_comment(self, key: str, body: str) -> Comment: ...

    def update_comment(self, key: str, comment_id: str, body: str) -> Comment: ...

    def delete_comment(self, key: str, comment_id: str) -> None: ...

    def add_attachment(self, key: str, filename: str, content: IO[bytes] | bytes, content_type: str) -> Attachment: ...

    def remove_attachment(self, key: str, attachment_id: str) -> None: ...

    def sync_account(self) -> Person:
        """The account the sync writes as, so its own writes can be recognised."""

    # Optional: ``sync_account_id() -> str``, ``sync_account().id`` where the tracker knows it
    # without asking (the sync compares it with the author of every change it reads).
    # Optional: ``find_user(person: Mapping) -> str | None``, the local user id matching a
    # remote person (by email, then id), for ``helpers.find_user``; without it nobody matches.


def sha256_of(chunks: Iterator[bytes] | bytes) -> tuple[str, int]:
    """(hex digest, size) of bytes or of a stream of chunks."""
    digest = hashlib.sha256()
    size = 0
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


# --- helpers for adapters ----------------------------------------------------------------------


def encode_cursor(**values: Any) -> str:
    """An opaque page cursor holding ``values`` (JSON data)."""
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode()


def decode_cursor(cursor: str, *names: str) -> dict[str, Any]:
    """The values of a cursor made by ``encode_cursor`` with exactly these names; else a permanent error."""
    try:
        values = json.loads(base64.urlsafe_b64decode(str(cursor).encode()))
        if not isinstance(values, dict) or set(values) != set(names):
            raise ValueError
        return values
    except (ValueError, TypeError, UnicodeError):
        raise TrackerError(f"invalid cursor {str(cursor)[:40]!r}", permanent=True) from None


def check_limit(limit: Any, maximum: int | None = None) -> int:
    """A page size: a positive whole number, capped at ``maximum``."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise TrackerError("limit must be a positive whole number", permanent=True)
    return min(limit, maximum) if maximum else limit
