"""Replicas: the plain JSON messages the outgoing rules make. Normalise, hash and compare them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from typing import Any

from trackers.base import Attachment, Comment, Entity, Person

# The exact types of JSON's scalars, tested before the slower isinstance (against the
# Mapping ABC, say): most values of a replica are text.
SCALARS = frozenset({str, int, float, bool, type(None)})


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses and mappings to dicts, tuples to lists, times to ISO text."""
    if type(value) in SCALARS or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    raise TypeError(f"a replica holds text, numbers, true/false, lists and objects, not {type(value).__name__}")


def canonical(replica: Mapping[str, Any]) -> bytes:
    try:
        # A replica is JSON data already (what the rules made, or what a message brought), and
        # the encoder takes it as it is: plain() first costs more than the encoding.
        text = json.dumps(replica, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except TypeError:
        text = json.dumps(plain(replica), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode()


def replica_hash(replica: Mapping[str, Any] | None) -> str:
    return "" if replica is None else hashlib.sha256(canonical(replica)).hexdigest()


def person_view(person: Person | None) -> dict | None:
    return None if person is None else {"id": person.id, "name": person.name, "email": person.email}


def comment_view(comment: Comment) -> dict:
    return {
        "id": comment.id,
        "author": person_view(comment.author),
        "body": comment.body,
        "created": plain(comment.created),
        "updated": plain(comment.updated),
    }


def attachment_view(attachment: Attachment) -> dict:
    return {
        "id": attachment.id,
        "filename": attachment.filename,
        "size": attachment.size,
        "content_type": attachment.content_type,
        "sha256": attachment.sha256,
    }


def entity_view(entity: Entity | None) -> dict:
    """The local entity as scripts see it (all fields present; empty on a first sync)."""
    if entity is None:
        return {
            "key": None,
            "project": None,
            "type": None,
            "summary": None,
            "description": None,
            "status": None,
            "priority": None,
            "assignee": None,
            "reporter": None,
            "labels": [],
            "custom_fields": {},
            "created": None,
            "updated": None,
            "comments": [],
            "attachments": [],
        }
    return {
        "key": entity.key,
        "project": entity.project,
        "type": entity.type,
        "summary": entity.summary,
        "description": entity.description,
        "status": entity.status,
        "priority": entity.priority or None,
        "assignee": person_view(entity.assignee),
        "reporter": person_view(entity.reporter),
        "labels": list(entity.labels),
        "custom_fields": plain(entity.custom_fields),
        "created": plain(entity.created),
        "updated": plain(entity.updated),
        "comments": [comment_view(c) for c in entity.comments],
        "attachments": [attachment_view(a) for a in entity.attachments],
    }


def diff(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """Field -> (old, new) for every top-level field that differs."""
    before, after = plain(before or {}), plain(after or {})
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
