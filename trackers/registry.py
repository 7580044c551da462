"""Tracker kind -> adapter class, imported only when a node of that kind asks for it."""

from __future__ import annotations

from typing import Any

from django.utils.module_loading import import_string

from trackers.base import Tracker, TrackerError

ADAPTERS = {
    "builtin": "trackers.builtin.adapter.BuiltinTracker",
    "redmine": "trackers.redmine.adapter.RedmineTracker",
}


def kinds() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(kind: str) -> type[Tracker]:
    try:
        path = ADAPTERS[kind]
    except KeyError:
        raise TrackerError(f"unknown tracker kind {kind!r} (known: {', '.join(kinds())})", permanent=True) from None
    return import_string(path)


def create(kind: str, **config: Any) -> Tracker:
    """An adapter of ``kind`` configured with ``config`` (URL, credentials, ...)."""
    cls = adapter_class(kind)
    try:
        return cls(**config)
    except TypeError as e:
        raise TrackerError(f"invalid settings for a {kind} tracker: {e}", permanent=True) from None
