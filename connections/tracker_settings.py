"""Which tracker a node serves and how to reach it: checked against the tracker, then saved.

The pages and ``manage.py node_tracker`` both go through ``save``. The settings are kept
whole (what is not given goes back to its default), except the API key: left out while
the URL stays the same, the stored one is kept. The key is never logged or shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from connections.models import MAX_POLL_SECONDS, Node
from trackers import registry
from trackers.base import NotFound, Person, TrackerError, TrackerUnavailable

if TYPE_CHECKING:
    from trackers.redmine.client import RedmineClient

MAP_NAMES = ("status_map", "priority_map", "tracker_map")
MAX_ID = 2**31 - 1  # Redmine's ids are 32-bit integers


class TrackerSettingsError(Exception):
    """Settings that were refused, with a one-line reason; ``field`` names the setting at fault, if one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


def save(
    node: Node,
    kind: str,
    *,
    url: str = "",
    api_key: str = "",
    project: str = "",
    status_map: Mapping[str, int] | None = None,
    priority_map: Mapping[str, int] | None = None,
    tracker_map: Mapping[str, int] | None = None,
    poll_seconds: int | None = None,
) -> Person:
    """Make ``node`` serve the ``kind`` tracker with these settings; returns the account the sync writes as.

    1. Check every value on its own (kind, URL, maps, poll interval).
    2. Fill in the stored API key when none is given and the URL has not changed.
    3. Try the tracker once: read its sync account and, for Redmine, the project.
    4. Only then save the kind, the settings (encrypted) and the poll interval.

    Raises TrackerSettingsError, and saves nothing, when any step fails.
    """
    if kind not in registry.kinds():
        raise TrackerSettingsError(f"unknown tracker kind {kind!r} (known: {', '.join(registry.kinds())})", "kind")
    poll_seconds = _checked_poll_seconds(poll_seconds)
    maps = {"status_map": status_map, "priority_map": priority_map, "tracker_map": tracker_map}
    if kind == "redmine":
        config = _redmine_config(node, url, api_key, project, maps)
    else:
        redmine_only = {"url": url, "api_key": api_key, "project": project, **maps}
        given = [name for name, value in redmine_only.items() if value]
        if given:
            raise TrackerSettingsError(
                f"the {kind} tracker has no {_label(given[0])}: a URL, API key, project and maps are for Redmine",
                given[0],
            )
        config = {}

    account = _try(kind, config)
    node.tracker_kind = kind
    node.tracker_settings = json.dumps(config) if config else ""
    node.poll_seconds = poll_seconds
    node.save(update_fields=["tracker_kind", "tracker_settings", "poll_seconds"])
    return account


def parse_map(entries: Iterable[str], field: str) -> dict[str, int]:
    """``Name = id`` entries (one per line on the page, one per option in the command) as a map."""
    mapping: dict[str, int] = {}
    for entry in entries:
        if not entry.strip():
            continue
        name, sep, number = entry.rpartition("=")
        name, number = name.strip(), number.strip()
        if not sep or not name or not number.isdigit():
            raise TrackerSettingsError(f"{_label(field)}: expected Name = id, got {entry.strip()[:80]!r}", field)
        if name in mapping:
            raise TrackerSettingsError(f"{_label(field)}: {name!r} is given twice", field)
        mapping[name] = int(number)
    return _checked_map(mapping, field)


def format_map(mapping: Mapping[str, int]) -> list[str]:
    """The entries ``parse_map`` reads back, sorted by name."""
    return [f"{name} = {number}" for name, number in sorted(mapping.items())]


def _checked_poll_seconds(value: int | None) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_POLL_SECONDS:
        raise TrackerSettingsError(
            f"the poll interval must be a whole number of seconds from 1 to {MAX_POLL_SECONDS}, not {value!r}",
            "poll_seconds",
        )
    return value


def _checked_map(mapping: Mapping[str, int] | None, field: str) -> dict[str, int]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TrackerSettingsError(f"{_label(field)}: expected names mapped to ids", field)
    checked: dict[str, int] = {}
    for name, number in mapping.items():
        if not isinstance(name, str) or not name.strip() or "\n" in name:
            raise TrackerSettingsError(f"{_label(field)}: a name must be one line of text, not {name!r}", field)
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_ID:
            raise TrackerSettingsError(
                f"{_label(field)}: the id of {name.strip()!r} must be a positive whole number", field
            )
        checked[name.strip()] = number
    return checked


def _redmine_config(
    node: Node, url: str, api_key: str, project: str, maps: Mapping[str, Mapping[str, int] | None]
) -> dict:
    url = (url or "").strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TrackerSettingsError("the Redmine URL must be an http(s) URL, e.g. https://redmine.example.org", "url")
    project = (project or "").strip()
    if not project:
        raise TrackerSettingsError("name the Redmine project to sync (its identifier)", "project")
    api_key = (api_key or "").strip()
    if not api_key:
        stored = node.tracker_config() if node.tracker_kind == "redmine" else {}
        if not stored.get("api_key"):
            raise TrackerSettingsError("give the API key of the Redmine account the sync writes as", "api_key")
        if stored.get("url") != url:
            raise TrackerSettingsError("the URL changed: give the API key for it again", "api_key")
        api_key = stored["api_key"]
    config = {"url": url, "api_key": api_key, "project": project}
    for name, mapping in maps.items():
        checked = _checked_map(mapping, name)
        if checked:
            config[name] = checked
    return config


def _try(kind: str, config: Mapping) -> Person:
    """The tracker's sync account, read once with these settings; for Redmine, also its project."""
    try:
        tracker = registry.create(kind, **config)
        account = tracker.sync_account()
        if kind == "redmine":
            _check_redmine_project(tracker.client, config["project"])
    except NotFound as e:
        raise _refused(f"{config.get('url', kind)} does not answer like a Redmine: {e.message}", "url") from None
    except TrackerUnavailable as e:
        if e.permanent:
            reason = f"{e.message}: check the key, and that Redmine's REST API is enabled"
            raise _refused(reason, "api_key") from None
        raise _refused(e.message, "url") from None
    except TrackerError as e:
        raise _refused(e.message, "url" if kind == "redmine" else None) from None
    return account


def _check_redmine_project(client: RedmineClient, project: str) -> None:
    try:
        client.get(f"/projects/{quote(project, safe='')}.json")
    except NotFound:
        raise TrackerSettingsError(
            f"Redmine has no project {project!r}, or the sync's account cannot see it", "project"
        ) from None


def _label(field: str) -> str:
    return field.replace("_", " ")


def _refused(message: str, field: str | None) -> TrackerSettingsError:
    # The client's messages name the URL and the request, never the key.
    return TrackerSettingsError(" ".join(message.split()), field)
