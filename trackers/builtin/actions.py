"""Every write to the built-in tracker goes through these functions.

They validate (raising Django's ValidationError with a per-field message), keep the
issue's ``updated``/``updated_by`` current for any change to the issue, its comments or
its attachments, and send ``trackers.signals.entity_changed`` once the write has
committed. Views, the REST API and the adapter all call them.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import mimetypes
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.files.base import File
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from trackers.base import Person, sha256_of
from trackers.builtin.models import Attachment, Comment, Issue, Label, Priority, Project, Status
from trackers.signals import entity_changed

log = logging.getLogger(__name__)

User = get_user_model()

KIND = "builtin"
ISSUE_FIELDS = (
    "summary",
    "description",
    "status",
    "priority",
    "type",
    "assignee",
    "reporter",
    "labels",
    "custom_fields",
)
LABEL_PATTERN = re.compile(r"^[^\s,\x00-\x1f\x7f]{1,50}$")
CONTENT_TYPE_PATTERN = re.compile(r"^[\w.+-]+/[\w.+-]+$")
MAX_DESCRIPTION = 100_000
MAX_COMMENT = 100_000
MAX_CUSTOM_FIELDS_BYTES = 20_000


def person(user) -> Person | None:
    if user is None:
        return None
    return Person(id=user.get_username(), name=user.get_full_name() or user.get_username(), email=user.email or "")


# Set while the caller's transaction is all or nothing (the sync applying a message rolls
# it back whole on any error): the writes here join it without savepoints of their own,
# which cost two round trips each.
_all_or_nothing = contextvars.ContextVar("builtin_all_or_nothing", default=False)


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Writes in this block need no savepoints: the caller rolls its transaction back on any error."""
    token = _all_or_nothing.set(True)
    try:
        yield
    finally:
        _all_or_nothing.reset(token)


def atomic_block():
    """``transaction.atomic()``, without a savepoint inside ``all_or_nothing``."""
    return transaction.atomic(savepoint=not _all_or_nothing.get())


def atomic(func):
    """``@transaction.atomic``, without a savepoint inside ``all_or_nothing``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with atomic_block():
            return func(*args, **kwargs)

    return wrapper


# Changes to an issue within one transaction are announced once, after it commits: the sync
# writing an issue and seven comments makes one announcement, not eight.
_pending = threading.local()


def _notify(issue_key: str, change: str, actor) -> None:
    pending = getattr(_pending, "changes", None)
    if pending is None or not _registered(pending):
        pending = _pending.changes = _Changes()
        transaction.on_commit(pending.announce, robust=True)
    pending.by_key[issue_key] = (change, actor)


class _Changes:
    def __init__(self):
        self.by_key: dict[str, tuple[str, Any]] = {}

    def announce(self) -> None:
        if getattr(_pending, "changes", None) is self:
            _pending.changes = None
        for key, (change, actor) in self.by_key.items():
            try:
                entity_changed.send(sender=KIND, key=key, change=change, actor=person(actor))
            except Exception:
                # One failing receiver must not keep the other issues' changes unannounced.
                log.exception("announcing the change of %s failed", key)


def start_new_announcements() -> None:
    """Announce later changes separately from those made so far in this transaction (tests use it)."""
    _pending.changes = None


def _registered(pending: _Changes) -> bool:
    """Whether ``pending`` still waits for a commit (a rollback drops its callback, and then it is stale)."""
    connection = transaction.get_connection()
    return connection.in_atomic_block and any(entry[1] == pending.announce for entry in connection.run_on_commit)


def _touch(issue: Issue, actor) -> None:
    issue.updated = timezone.now()
    issue.updated_by = actor
    Issue.objects.filter(pk=issue.pk).update(updated=issue.updated, updated_by=actor)


# --- resolving and checking field values -------------------------------------------------


def resolve_project(project: Project | str) -> Project:
    if isinstance(project, Project):
        return project
    if not isinstance(project, str) or not project:
        raise ValidationError({"project": "Give a project key, e.g. BLUE."})
    try:
        return Project.objects.get(key=project.upper())
    except Project.DoesNotExist:
        raise ValidationError({"project": f"No project with key {project!r}."}) from None


def resolve_status(name: Any) -> Status:
    if isinstance(name, Status):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ValidationError({"status": "Give a status name."})
    status = Status.objects.filter(name__iexact=name.strip()).first()
    if status is None:
        known = ", ".join(Status.objects.values_list("name", flat=True))
        raise ValidationError({"status": f"Unknown status {name!r} (known: {known})."})
    return status


def resolve_priority(name: Any) -> Priority | None:
    if name is None or name == "" or isinstance(name, Priority):
        return name or None
    if not isinstance(name, str):
        raise ValidationError({"priority": "Give a priority name or null."})
    priority = Priority.objects.filter(name__iexact=name.strip()).first()
    if priority is None:
        known = ", ".join(Priority.objects.values_list("name", flat=True))
        raise ValidationError({"priority": f"Unknown priority {name!r} (known: {known})."})
    return priority


def resolve_user(field: str, username: Any):
    if username is None or username == "":
        return None
    if isinstance(username, User):
        return username
    if not isinstance(username, str):
        raise ValidationError({field: "Give a username or null."})
    try:
        return User.objects.get(username=username, is_active=True)
    except User.DoesNotExist:
        raise ValidationError({field: f"No active user {username!r}."}) from None


def clean_labels(labels: Any) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Iterable):
        raise ValidationError({"labels": "Give a list of labels."})
    result = set()
    for label in labels:
        if not isinstance(label, str) or not LABEL_PATTERN.match(label):
            raise ValidationError({"labels": f"Invalid label {label!r}: 1 to 50 characters, no spaces or commas."})
        result.add(label)
    if len(result) > 100:
        raise ValidationError({"labels": "At most 100 labels."})
    return sorted(result)


def _storable(value: Any) -> bool:
    """A scalar every database's JSON column holds: no NUL in text, no infinite numbers."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (int, bool))


def clean_custom_fields(current: Mapping[str, Any], changes: Any) -> dict[str, Any]:
    """``current`` with ``changes`` merged in; a None value removes that field."""
    if not isinstance(changes, Mapping):
        raise ValidationError({"custom_fields": "Give an object of field name to value."})
    merged = dict(current)
    for name, value in changes.items():
        if not isinstance(name, str) or not name.strip() or len(name) > 100 or not _storable(name):
            raise ValidationError({"custom_fields": f"Invalid field name {name!r}."})
        if value is None:
            merged.pop(name, None)
        elif _storable(value) or (isinstance(value, list) and all(_storable(v) for v in value)):
            merged[name] = value
        else:
            raise ValidationError(
                {"custom_fields": f"{name}: values are text, finite numbers, true/false or lists of them."}
            )
    if len(repr(merged)) > MAX_CUSTOM_FIELDS_BYTES:
        raise ValidationError({"custom_fields": f"Too large (over {MAX_CUSTOM_FIELDS_BYTES} characters)."})
    return merged


def _clean_text(field: str, value: Any, *, required: bool, max_length: int) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValidationError({field: "Must be text."})
    if field in ("summary", "type"):
        value = value.strip()
    if required and not value.strip():
        raise ValidationError({field: "This field may not be blank."})
    if len(value) > max_length:
        raise ValidationError({field: f"At most {max_length} characters (got {len(value)})."})
    if "\x00" in value:
        raise ValidationError({field: "Must not contain NUL characters."})
    return value


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - set(ISSUE_FIELDS))
    if unknown:
        raise ValidationError({unknown[0]: f"Unknown field (known: {', '.join(ISSUE_FIELDS)})."})


# --- issues ------------------------------------------------------------------------------


def default_status() -> Status:
    status = Status.objects.first()
    if status is None:
        raise ValidationError({"status": "No statuses are configured; add one in the admin."})
    return status


@atomic
def create_issue(project: Project | str, fields: Mapping[str, Any], actor=None) -> Issue:
    """A new issue in ``project``. ``fields`` as ISSUE_FIELDS; the reporter defaults to ``actor``."""
    return create_issues([(project, fields, ())], actor=actor)[0][0]


@atomic
def create_issues(
    items: Iterable[tuple[Project | str, Mapping[str, Any], Iterable[Any]]], actor=None
) -> list[tuple[Issue, list[Comment]]]:
    """New issues, each with its first comments: ``(project, fields, comment bodies)`` each.

    Written together, in a few queries whatever their number (the sync creating what a
    batch of first-sync messages brings), numbered in the order given. One invalid value
    refuses them all.
    """
    resolved = _Resolved()
    new = []
    for project, fields, bodies in items:
        _check_fields(fields)
        issue = Issue(
            project=resolved.once("project", project, resolve_project),
            summary=_clean_text("summary", fields.get("summary"), required=True, max_length=255),
            description=_clean_text(
                "description", fields.get("description"), required=False, max_length=MAX_DESCRIPTION
            ),
            type=_clean_text("type", fields.get("type", "Task"), required=True, max_length=40),
            status=(
                resolved.once("status", fields["status"], resolve_status)
                if fields.get("status") not in (None, "")
                else resolved.once("status", None, lambda _: default_status())
            ),
            priority=(
                resolved.once("priority", fields["priority"], resolve_priority)
                if "priority" in fields
                else resolved.once("priority", None, lambda _: Priority.objects.filter(is_default=True).first())
            ),
            assignee=resolved.once("user", fields.get("assignee"), lambda name: resolve_user("assignee", name)),
            reporter=(
                resolved.once("user", fields["reporter"], lambda name: resolve_user("reporter", name))
                if "reporter" in fields
                else actor
            ),
            custom_fields=clean_custom_fields({}, fields.get("custom_fields") or {}),
            updated_by=actor,
        )
        labels = clean_labels(fields.get("labels") or [])
        texts = [_clean_text("body", body, required=True, max_length=MAX_COMMENT) for body in bodies]
        new.append((issue, labels, texts))
    if not new:
        return []
    in_project: dict[int, list[Issue]] = {}
    for issue, _, _ in new:
        in_project.setdefault(issue.project.pk, []).append(issue)
    for project_id, issues in in_project.items():
        # The update locks the project's row until commit, so concurrent creates never repeat a number.
        Project.objects.filter(pk=project_id).update(next_number=F("next_number") + len(issues))
        after = Project.objects.values_list("next_number", flat=True).get(pk=project_id)
        for number, issue in enumerate(issues, start=after - len(issues)):
            issue.number = number
            issue.key = f"{issue.project.key}-{number}"
    now = timezone.now()
    for issue, _, _ in new:
        issue.created = issue.updated = now
    Issue.objects.bulk_create([issue for issue, _, _ in new])
    Label.objects.bulk_create([Label(issue=issue, name=name) for issue, labels, _ in new for name in labels])
    comments = Comment.objects.bulk_create(
        [
            Comment(issue=issue, author=actor, body=text, created=now, updated=now)
            for issue, _, texts in new
            for text in texts
        ]
    )
    answer, position = [], 0
    for issue, _, texts in new:
        answer.append((issue, comments[position : position + len(texts)]))
        position += len(texts)
        _notify(issue.key, "created", actor)
    return answer


class _Resolved:
    """Values resolved once per call: the issues of one batch share their project, status, users."""

    def __init__(self):
        self._found: dict[tuple[str, Any], Any] = {}

    def once(self, kind: str, value: Any, resolve):
        if not (value is None or isinstance(value, str)):
            return resolve(value)  # an object, or a wrong type that resolving refuses
        if (kind, value) not in self._found:
            self._found[kind, value] = resolve(value)
        return self._found[kind, value]


@atomic
def update_issue(issue: Issue, fields: Mapping[str, Any], actor=None, *, locked: bool = False) -> set[str]:
    """Apply only the given fields; returns the names that really changed (nothing bumps otherwise).

    ``locked``: the caller read ``issue`` under its row lock in this transaction, so it is
    current and is changed in place (else it is read again, locked).
    """
    _check_fields(fields)
    if not locked:
        issue = Issue.objects.select_for_update().get(pk=issue.pk)
    changed: set[str] = set()

    def assign(name: str, value: Any) -> None:
        if getattr(issue, name) != value:
            setattr(issue, name, value)
            changed.add(name)

    for name, value in fields.items():
        if name == "summary":
            assign(name, _clean_text(name, value, required=True, max_length=255))
        elif name == "description":
            assign(name, _clean_text(name, value, required=False, max_length=MAX_DESCRIPTION))
        elif name == "type":
            assign(name, _clean_text(name, value, required=True, max_length=40))
        elif name == "status":
            assign(name, resolve_status(value))
        elif name == "priority":
            assign(name, resolve_priority(value))
        elif name in ("assignee", "reporter"):
            assign(name, resolve_user(name, value))
        elif name == "custom_fields":
            assign(name, clean_custom_fields(issue.custom_fields, value))
        elif name == "labels":
            labels = clean_labels(value)
            if labels != issue.label_names:
                issue.labels.all().delete()
                Label.objects.bulk_create([Label(issue=issue, name=label) for label in labels])
                getattr(issue, "_prefetched_objects_cache", {}).pop("labels", None)  # read afresh
                changed.add(name)
    if changed:
        issue.updated = timezone.now()
        issue.updated_by = actor
        issue.save()
        _notify(issue.key, "updated", actor)
    return changed


@atomic
def delete_issue(issue: Issue, actor=None) -> None:
    files = [a.file.name for a in issue.attachments.all()]
    key = issue.key
    issue.delete()
    transaction.on_commit(lambda: _delete_files(files))
    _notify(key, "deleted", actor)


# --- comments ----------------------------------------------------------------------------


@atomic
def add_comment(issue: Issue, body: Any, actor=None) -> Comment:
    body = _clean_text("body", body, required=True, max_length=MAX_COMMENT)
    now = timezone.now()
    comment = Comment.objects.create(issue=issue, author=actor, body=body, created=now, updated=now)
    _touch(issue, actor)
    _notify(issue.key, "comment_added", actor)
    return comment


@atomic
def add_comments(issue: Issue, bodies: Iterable[Any], actor=None) -> list[Comment]:
    """Several comments in one write, in order (the sync adding what the other side wrote)."""
    cleaned = [_clean_text("body", body, required=True, max_length=MAX_COMMENT) for body in bodies]
    if not cleaned:
        return []
    now = timezone.now()
    comments = Comment.objects.bulk_create(
        [Comment(issue=issue, author=actor, body=body, created=now, updated=now) for body in cleaned]
    )
    _touch(issue, actor)
    _notify(issue.key, "comment_added", actor)
    return comments


@atomic
def edit_comment(comment: Comment, body: Any, actor=None) -> Comment:
    body = _clean_text("body", body, required=True, max_length=MAX_COMMENT)
    if body != comment.body:
        comment.body = body
        comment.updated = timezone.now()
        comment.save(update_fields=["body", "updated"])
        _touch(comment.issue, actor)
        _notify(comment.issue.key, "comment_updated", actor)
    return comment


@atomic
def delete_comment(comment: Comment, actor=None) -> None:
    issue = comment.issue
    comment.delete()
    _touch(issue, actor)
    _notify(issue.key, "comment_deleted", actor)


# --- attachments -------------------------------------------------------------------------


def _delete_files(names: list[str]) -> None:
    from django.core.files.storage import default_storage

    for name in names:
        default_storage.delete(name)


def clean_filename(filename: Any) -> str:
    if not isinstance(filename, str):
        raise ValidationError({"filename": "Must be text."})
    # Keep only the last path part: a name is a label, never a place on disk; control
    # characters would break the Content-Disposition header of a download.
    name = re.sub(r"[\x00-\x1f\x7f]", "", re.split(r"[\\/]", filename)[-1]).strip()
    if not name or name in (".", ".."):
        raise ValidationError({"filename": "Give a file name."})
    return name[:255]


def _chunks(content: IO[bytes]):
    while chunk := content.read(64 * 1024):
        yield chunk


@atomic
def add_attachment(issue: Issue, filename: Any, content: IO[bytes], content_type: str | None = None, actor=None):
    filename = clean_filename(filename)
    content_type = (content_type or "").strip().lower()
    if not CONTENT_TYPE_PATTERN.match(content_type) or len(content_type) > 100:
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
    content.seek(0)
    digest, size = sha256_of(_chunks(content))
    if size > limit:
        raise ValidationError({"file": f"File too large: {size} bytes, the limit is {limit}."})
    content.seek(0)
    attachment = Attachment(
        issue=issue, filename=filename, size=size, content_type=content_type, sha256=digest, author=actor
    )
    attachment.file.save(filename, File(content), save=False)
    # If the row cannot be saved, the stored file must not be left behind.
    stored = attachment.file.name
    try:
        attachment.save()
    except Exception:
        _delete_files([stored])
        raise
    _touch(issue, actor)
    _notify(issue.key, "attachment_added", actor)
    return attachment


@atomic
def remove_attachment(attachment: Attachment, actor=None) -> None:
    issue = attachment.issue
    name = attachment.file.name
    attachment.delete()
    transaction.on_commit(lambda: _delete_files([name]))
    _touch(issue, actor)
    _notify(issue.key, "attachment_removed", actor)
