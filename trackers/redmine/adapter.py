"""Redmine (5.0 REST API) behind the tracker contract (``trackers.base.Tracker``).

How Redmine's records map to entities, and where they cannot:

- An entity's key is the issue id as a string ("42"): Redmine has no project-prefixed keys.
  A key that is not a number names no issue (NotFound).
- Redmine has no labels: entities carry none, and writing labels other than an empty list
  is a permanent error (map them to a custom field in the rules instead).
- Comments are the journals with notes; private notes are left out so that the sync
  cannot copy them elsewhere. Redmine 5.0 journals have no updated_on, so a comment's
  ``updated`` is its ``created``, and editing a note does not move the issue's updated_on.
- Attachments: the API gives no digest, so the sha256 is computed from the bytes once per
  attachment id (Redmine attachments never change) and kept in memory.
- ``status_map``, ``priority_map`` and ``tracker_map`` add names (e.g. "Open") that the
  adapter accepts on writes, mapped to Redmine ids; reads give Redmine's own names.
- Listing costs one list request per page plus one GET per entity, since only a single
  issue's GET carries its journals and attachments.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import IO, Any
from urllib.parse import parse_qsl

from trackers.base import (
    Attachment,
    Comment,
    Entity,
    NotFound,
    Page,
    Person,
    TrackerError,
    check_limit,
    decode_cursor,
    encode_cursor,
)
from trackers.redmine.client import RedmineClient

# Re-read this much before a watermark so that writes committed late are not missed.
CHANGE_OVERLAP = timedelta(seconds=2)
LIST_LIMIT = 100  # Redmine caps a list at 100
MAX_CACHED_DIGESTS = 10_000
ISSUE_INCLUDES = {"include": "journals,attachments"}

# Filters ``search`` passes to Redmine's /issues.json; anything else is refused rather than ignored.
SEARCH_FILTERS = {
    "subject",
    "description",
    "tracker_id",
    "status_id",
    "priority_id",
    "assigned_to_id",
    "author_id",
    "category_id",
    "fixed_version_id",
    "parent_id",
    "issue_id",
    "created_on",
    "updated_on",
    "closed_on",
    "start_date",
    "due_date",
}
CUSTOM_FIELD_FILTER = re.compile(r"cf_\d+")


def _text(value: str | None) -> str:
    # Redmine stores text with CRLF line ends; the contract speaks LF.
    return (value or "").replace("\r\n", "\n")


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _person(user: Mapping[str, Any] | None) -> Person | None:
    if not user or user.get("id") is None:
        return None
    return Person(id=str(user["id"]), name=user.get("name", ""))


def _filter_time(moment: datetime) -> str:
    # The only form Redmine's filter accepts: whole seconds, UTC, "Z".
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _issue_id(key: str) -> str:
    if not isinstance(key, str) or not key.isdigit():
        raise NotFound(f"no Redmine issue {key!r} (Redmine keys are issue numbers)")
    return key


def _guarded(method):
    """Keep the contract's promise that only TrackerError leaves the adapter."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except TrackerError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrackerError(f"unexpected answer from Redmine: {type(e).__name__}: {e}", permanent=True) from e

    return wrapper


class RedmineTracker:
    """One Redmine project, written to as the owner of ``api_key``."""

    kind = "redmine"
    shares_database = False
    reports_every_change = False  # journals have no updated_on; attachment deletes move nothing

    def __init__(
        self,
        url: str,
        api_key: str,
        project: str,
        *,
        status_map: Mapping[str, int] | None = None,
        priority_map: Mapping[str, int] | None = None,
        tracker_map: Mapping[str, int] | None = None,
        request_budget: int | None = None,
    ):
        if not isinstance(project, str) or not project.strip():
            raise TrackerError("a Redmine tracker needs a project identifier", permanent=True)
        self.client = RedmineClient(url, api_key, request_budget=request_budget)
        self.project = project
        self._extra_ids = {
            "status": dict(status_map or {}),
            "priority": dict(priority_map or {}),
            "type": dict(tracker_map or {}),
        }
        self._ids: dict[str, dict[str, int]] = {}
        self._project_identifiers: dict[int, str] = {}
        self._account: Person | None = None
        self._digests: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RedmineTracker(url={self.client.url!r}, project={self.project!r})"

    # --- reading -------------------------------------------------------------------------

    def _fetch(self, key: str) -> dict[str, Any]:
        issue_id = _issue_id(key)
        try:
            return self.client.get(f"/issues/{issue_id}.json", ISSUE_INCLUDES)["issue"]
        except NotFound:
            raise NotFound(f"no Redmine issue {key}") from None

    def _project_identifier(self, project: Mapping[str, Any]) -> str:
        project_id = project["id"]
        if project_id not in self._project_identifiers:
            found = self.client.get(f"/projects/{project_id}.json")["project"]
            self._project_identifiers[project_id] = found["identifier"]
        return self._project_identifiers[project_id]

    def _sha256(self, attachment: Mapping[str, Any]) -> str:
        attachment_id = str(attachment["id"])
        if attachment_id not in self._digests:
            if len(self._digests) >= MAX_CACHED_DIGESTS:
                self._digests.clear()
            self._digests[attachment_id] = hashlib.sha256(self.client.download(attachment["content_url"])).hexdigest()
        return self._digests[attachment_id]

    def _to_attachment(self, attachment: Mapping[str, Any]) -> Attachment:
        content_url = attachment["content_url"]
        return Attachment(
            id=str(attachment["id"]),
            filename=attachment["filename"],
            size=int(attachment["filesize"]),
            content_type=attachment.get("content_type") or "application/octet-stream",
            sha256=self._sha256(attachment),
            created=_time(attachment.get("created_on")),
            author=_person(attachment.get("author")),
            opener=lambda: BytesIO(self.client.download(content_url)),
        )

    def _to_comment(self, journal: Mapping[str, Any]) -> Comment:
        created = _time(journal["created_on"])
        return Comment(
            id=str(journal["id"]),
            author=_person(journal.get("user")),
            body=_text(journal["notes"]),
            created=created,
            updated=created,
        )

    def _to_entity(self, issue: Mapping[str, Any]) -> Entity:
        journals = issue.get("journals", [])
        last_writer = journals[-1].get("user") if journals else issue.get("author")
        return Entity(
            key=str(issue["id"]),
            id=str(issue["id"]),
            project=self._project_identifier(issue["project"]),
            type=issue["tracker"]["name"],
            summary=issue["subject"],
            description=_text(issue.get("description")),
            status=issue["status"]["name"],
            priority=(issue.get("priority") or {}).get("name", ""),
            assignee=_person(issue.get("assigned_to")),
            reporter=_person(issue.get("author")),
            custom_fields={
                field["name"]: field["value"]
                for field in issue.get("custom_fields", [])
                if field.get("value") not in (None, "", [])
            },
            created=_time(issue.get("created_on")),
            updated=_time(issue.get("updated_on")),
            updated_by=_person(last_writer),
            comments=tuple(self._to_comment(j) for j in journals if _is_comment(j)),
            attachments=tuple(self._to_attachment(a) for a in issue.get("attachments", [])),
        )

    @_guarded
    def get(self, key: str) -> Entity:
        return self._to_entity(self._fetch(key))

    def _list(self, params: Mapping[str, Any], offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        found = self.client.get(
            "/issues.json", {**params, "project_id": self.project, "offset": offset, "limit": min(limit, LIST_LIMIT)}
        )
        return found["issues"], int(found["total_count"])

    @_guarded
    def changed_since(self, since: datetime | None, *, cursor: str | None = None, limit: int = 100) -> Page:
        """Pages by position (the last second seen and the ids seen in it), not by offset.

        An offset would skip an entity whenever an earlier one is updated during the pass
        and moves to the end of the list.
        """
        limit = check_limit(limit)
        seen: set[int] = set()
        after: datetime | None = None
        if cursor:
            position = decode_cursor(cursor, "after", "seen")
            try:
                after = _time(position["after"])
                seen = {int(i) for i in position["seen"]}
            except (TypeError, ValueError, AttributeError):
                raise TrackerError(f"invalid cursor {cursor[:40]!r}", permanent=True) from None
            if after is None:
                raise TrackerError(f"invalid cursor {cursor[:40]!r}", permanent=True)
        elif since is not None:
            after = since.astimezone(UTC).replace(microsecond=0) - CHANGE_OVERLAP

        params: dict[str, Any] = {"status_id": "*", "sort": "updated_on:asc,id:asc"}
        if after is not None:
            params["updated_on"] = f">={_filter_time(after)}"
        rows: list[dict[str, Any]] = []
        offset = 0
        while len(rows) <= limit:
            batch, total = self._list(params, offset, limit + 1 + len(seen))
            for row in batch:
                updated = _time(row["updated_on"])
                # Redmine's ">=" reaches a second further back; drop that and what was already listed.
                if after is not None and (updated < after or (updated == after and row["id"] in seen)):
                    continue
                rows.append(row)
            offset += len(batch)
            if not batch or offset >= total:
                break

        page = rows[:limit]
        entities = tuple(self.get(str(row["id"])) for row in page)
        next_cursor = None
        if len(rows) > limit:
            last = _time(page[-1]["updated_on"])
            ids = {row["id"] for row in page if _time(row["updated_on"]) == last}
            if last == after:
                ids |= seen
            next_cursor = encode_cursor(after=page[-1]["updated_on"], seen=sorted(ids))
        return Page(entities, next_cursor, max((e.updated for e in entities), default=None))

    @_guarded
    def search(self, query: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        """Issues of the project matching ``query``: Redmine's own filters as a URL query string.

        For example ``subject=~needle&tracker_id=1`` (``~`` is "contains"). Closed issues are
        included unless ``status_id`` says otherwise. Only the filters in SEARCH_FILTERS and
        ``cf_<id>`` are accepted.
        """
        limit = check_limit(limit)
        params = _search_params(query)
        offset = 0
        if cursor:
            offset = decode_cursor(cursor, "offset")["offset"]
            if not isinstance(offset, int) or offset < 0:
                raise TrackerError(f"invalid cursor {cursor[:40]!r}", permanent=True)
        params = {"status_id": "*", **params, "sort": "id:asc"}
        rows, total = self._list(params, offset, limit)
        entities = tuple(self.get(str(row["id"])) for row in rows)
        following = offset + len(rows)
        next_cursor = encode_cursor(offset=following) if rows and following < total else None
        return Page(entities, next_cursor, max((e.updated for e in entities), default=None))

    @_guarded
    def matches(self, query: str, key: str) -> bool:
        """One list request: the query's filters plus ``issue_id=key``, as ``search`` would read them.

        A query that filters on ``issue_id`` itself leaves no room for ours, so its matches
        are listed (ids only, a page of 100 per request) until ``key`` turns up.
        """
        params = {"status_id": "*", **_search_params(query)}
        if not isinstance(key, str) or not key.isdigit():
            return False
        if "issue_id" not in params:
            _, total = self._list({**params, "issue_id": key}, 0, 1)
            return total > 0
        offset = 0
        while True:
            rows, total = self._list({**params, "sort": "id:asc"}, offset, LIST_LIMIT)
            if any(str(row["id"]) == key for row in rows):
                return True
            offset += len(rows)
            if not rows or offset >= total:
                return False

    # --- writing -------------------------------------------------------------------------

    def _id_of(self, what: str, name: Any) -> int:
        if what not in self._ids:
            path, root = {
                "status": ("/issue_statuses.json", "issue_statuses"),
                "priority": ("/enumerations/issue_priorities.json", "issue_priorities"),
                "type": ("/trackers.json", "trackers"),
            }[what]
            known = {item["name"]: int(item["id"]) for item in self.client.get(path)[root]}
            self._ids[what] = {**known, **self._extra_ids[what]}
        try:
            return self._ids[what][name]
        except (KeyError, TypeError):
            names = ", ".join(sorted(self._ids[what]))
            raise TrackerError(f"Redmine has no {what} {name!r} (known: {names})", permanent=True) from None

    def _custom_field_ids(self) -> dict[str, int]:
        if "custom_field" not in self._ids:
            try:
                found = self.client.get("/custom_fields.json")["custom_fields"]
            except TrackerError as e:
                if e.permanent:
                    raise TrackerError(
                        f"cannot list Redmine's custom fields (it needs an admin key): {e.message}", permanent=True
                    ) from None
                raise
            self._ids["custom_field"] = {f["name"]: int(f["id"]) for f in found if f.get("customized_type") == "issue"}
        return self._ids["custom_field"]

    def _issue_fields(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The contract's fields as Redmine's issue attributes; refuses what Redmine cannot hold."""
        issue: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "summary":
                if not isinstance(value, str) or not value.strip():
                    raise TrackerError("summary must be a non-empty string", permanent=True)
                issue["subject"] = value
            elif name == "description":
                if value is not None and not isinstance(value, str):
                    raise TrackerError("description must be a string", permanent=True)
                issue["description"] = value or ""
            elif name == "status":
                issue["status_id"] = self._id_of("status", value)
            elif name == "priority":
                issue["priority_id"] = self._id_of("priority", value)
            elif name == "type":
                issue["tracker_id"] = self._id_of("type", value)
            elif name in ("assignee", "reporter"):
                if value is not None and not str(value).isdigit():
                    raise TrackerError(f"{name} must be a Redmine user id, not {value!r}", permanent=True)
                if name == "assignee":
                    # Only an empty string clears it; Redmine ignores null.
                    issue["assigned_to_id"] = int(value) if value else ""
                elif value:
                    # Redmine 5.0 ignores author_id; the API user stays the author.
                    issue["author_id"] = int(value)
            elif name == "labels":
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise TrackerError("labels must be a list of strings", permanent=True)
                if value:
                    raise TrackerError("Redmine has no labels; map them to a custom field", permanent=True)
            elif name == "custom_fields":
                if not isinstance(value, Mapping):
                    raise TrackerError("custom_fields must be a mapping of name to value", permanent=True)
                ids = self._custom_field_ids() if value else {}
                unknown = sorted(set(value) - set(ids))
                if unknown:
                    raise TrackerError(f"Redmine has no custom field {', '.join(map(repr, unknown))}", permanent=True)
                issue["custom_fields"] = [{"id": ids[n], "value": "" if v is None else v} for n, v in value.items()]
            else:
                raise TrackerError(f"Redmine issues have no field {name!r}", permanent=True)
        return issue

    @_guarded
    def create(self, project: str, fields: Mapping[str, Any]) -> Entity:
        if not fields.get("summary"):
            raise TrackerError("a new issue needs a summary", permanent=True)
        issue = {"project_id": project, **self._issue_fields(fields)}
        try:
            created = self.client.post("/issues.json", {"issue": issue})["issue"]
        except NotFound:
            raise TrackerError(f"Redmine has no project {project!r}", permanent=True) from None
        key = str(created["id"])
        # A new issue starts in its tracker's default status whatever was asked; move it after.
        if "status_id" in issue and created["status"]["id"] != issue["status_id"]:
            return self.update(key, {"status": fields["status"]})
        return self.get(key)

    @_guarded
    def update(self, key: str, fields: Mapping[str, Any]) -> Entity:
        issue_id = _issue_id(key)
        issue = self._issue_fields(fields)
        if issue:
            self._put_issue(issue_id, issue)
        entity = self.get(key)
        # Redmine drops a status change its workflow does not allow, without an error.
        if "status" in fields and self._id_of("status", entity.status) != issue["status_id"]:
            raise TrackerError(
                f"Redmine's workflow kept issue {key} in {entity.status!r} instead of {fields['status']!r}",
                permanent=True,
            )
        return entity

    def _put_issue(self, issue_id: str, issue: Mapping[str, Any]) -> None:
        try:
            self.client.put(f"/issues/{issue_id}.json", {"issue": issue})
        except NotFound:
            raise NotFound(f"no Redmine issue {issue_id}") from None

    @_guarded
    def sync_account(self) -> Person:
        if self._account is None:
            user = self.client.get("/users/current.json")["user"]
            name = f"{user.get('firstname', '')} {user.get('lastname', '')}".strip()
            self._account = Person(id=str(user["id"]), name=name, email=user.get("mail", ""))
        return self._account

    def _comment(self, key: str, comment_id: str) -> Comment:
        for journal in self._fetch(key).get("journals", []):
            if str(journal["id"]) == str(comment_id) and _is_comment(journal):
                return self._to_comment(journal)
        raise NotFound(f"no comment {comment_id} on Redmine issue {key}")

    @_guarded
    def add_comment(self, key: str, body: str) -> Comment:
        if not isinstance(body, str) or not body.strip():
            raise TrackerError("a comment needs a body", permanent=True)
        issue_id = _issue_id(key)
        self._put_issue(issue_id, {"notes": body})
        account = self.sync_account()
        # The PUT returns no body, so the new journal is the latest one of ours with this text.
        for journal in reversed(self._fetch(key).get("journals", [])):
            if (
                _is_comment(journal)
                and str(journal["user"]["id"]) == account.id
                and _text(journal["notes"]) == _text(body)
            ):
                return self._to_comment(journal)
        raise TrackerError(f"Redmine took a comment on {key} but does not show it", permanent=False)

    @_guarded
    def update_comment(self, key: str, comment_id: str, body: str) -> Comment:
        if not isinstance(body, str) or not body.strip():
            raise TrackerError("a comment needs a body", permanent=True)
        comment = self._comment(key, comment_id)
        self.client.put(f"/journals/{comment.id}.json", {"journal": {"notes": body}})
        return Comment(comment.id, comment.author, _text(body), comment.created, comment.updated)

    @_guarded
    def delete_comment(self, key: str, comment_id: str) -> None:
        comment = self._comment(key, comment_id)
        # Blank notes remove the comment: Redmine deletes a journal left with no notes and no changes.
        self.client.put(f"/journals/{comment.id}.json", {"journal": {"notes": ""}})

    @_guarded
    def add_attachment(self, key: str, filename: str, content: IO[bytes] | bytes, content_type: str) -> Attachment:
        issue_id = _issue_id(key)
        data = content if isinstance(content, bytes) else content.read()
        upload = self.client.upload(data, filename)
        self._put_issue(
            issue_id, {"uploads": [{"token": upload["token"], "filename": filename, "content_type": content_type}]}
        )
        self._digests[str(upload["id"])] = hashlib.sha256(data).hexdigest()
        for attachment in self._fetch(key).get("attachments", []):
            if str(attachment["id"]) == str(upload["id"]):
                return self._to_attachment(attachment)
        raise TrackerError(f"Redmine took an attachment for {key} but does not show it", permanent=False)

    @_guarded
    def remove_attachment(self, key: str, attachment_id: str) -> None:
        if not any(str(a["id"]) == str(attachment_id) for a in self._fetch(key).get("attachments", [])):
            raise NotFound(f"no attachment {attachment_id} on Redmine issue {key}")
        self.client.delete(f"/attachments/{attachment_id}.json")


def _is_comment(journal: Mapping[str, Any]) -> bool:
    return bool(journal.get("notes")) and not journal.get("private_notes")


def _search_params(query: str) -> dict[str, str]:
    if not isinstance(query, str) or not query.strip():
        raise TrackerError("a Redmine search needs a filter, e.g. subject=~word", permanent=True)
    try:
        pairs = parse_qsl(query.strip(), keep_blank_values=False, strict_parsing=True)
    except ValueError:
        raise TrackerError(f"invalid Redmine query {query[:80]!r}: expected name=value&...", permanent=True) from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in SEARCH_FILTERS and not CUSTOM_FIELD_FILTER.fullmatch(name):
            raise TrackerError(
                f"unknown Redmine filter {name!r} (known: {', '.join(sorted(SEARCH_FILTERS))}, cf_<id>)", permanent=True
            )
        if name in params:
            raise TrackerError(f"Redmine filter {name!r} given twice", permanent=True)
        params[name] = value
    return params
