"""The built-in tracker behind the tracker contract (``trackers.base.Tracker``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime, timedelta
from io import BytesIO
from typing import IO, Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import DatabaseError, IntegrityError
from django.db import connection as db_connection
from django.db.models import Prefetch, Q, QuerySet
from django.utils.dateparse import parse_datetime

from trackers.base import (
    Attachment,
    Comment,
    Entity,
    NotFound,
    Page,
    Person,
    TrackerError,
    VersionPage,
    check_limit,
    decode_cursor,
    encode_cursor,
)
from trackers.builtin import actions, models, query

# A write that commits late can carry an ``updated`` slightly older than a pass that has
# already moved on; re-reading this much before the watermark catches it.
CHANGE_OVERLAP = timedelta(seconds=2)
MAX_PAGE = 500


def _validation_message(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(f"{field}: {' '.join(messages)}" for field, messages in error.message_dict.items())
    return " ".join(error.messages)


def _translated(method):
    """Turn everything below the contract into TrackerError, permanent or not."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except TrackerError:
            raise
        except ValidationError as e:
            raise TrackerError(_validation_message(e), permanent=True) from e
        except query.QueryError as e:
            raise TrackerError(f"invalid query: {e}", permanent=True) from e
        except IntegrityError as e:
            # A concurrent write won a race (e.g. a label added twice); trying again settles it.
            raise TrackerError(f"conflicting concurrent write: {e}", permanent=False) from e
        except DatabaseError as e:
            raise TrackerError(f"database unavailable: {e}", permanent=False) from e

    return wrapper


def issue_queryset() -> QuerySet[models.Issue]:
    """Issues with everything ``to_entity`` reads, in a fixed number of queries."""
    return models.Issue.objects.select_related(
        "project", "status", "priority", "assignee", "reporter", "updated_by"
    ).prefetch_related(
        "labels",
        Prefetch("comments", queryset=models.Comment.objects.select_related("author")),
        Prefetch("attachments", queryset=models.Attachment.objects.select_related("author")),
    )


def to_comment(comment: models.Comment) -> Comment:
    return Comment(
        id=str(comment.pk),
        author=actions.person(comment.author),
        body=comment.body,
        created=comment.created,
        updated=comment.updated,
    )


def to_attachment(attachment: models.Attachment) -> Attachment:
    return Attachment(
        id=str(attachment.pk),
        filename=attachment.filename,
        size=attachment.size,
        content_type=attachment.content_type,
        sha256=attachment.sha256,
        created=attachment.created,
        author=actions.person(attachment.author),
        opener=functools.partial(_open_file, attachment.file.storage, attachment.file.name),
    )


def _open_file(storage, name: str) -> IO[bytes]:
    try:
        return storage.open(name, "rb")
    except FileNotFoundError:
        raise NotFound(f"attachment file {name} is missing from storage") from None
    except OSError as e:
        raise TrackerError(f"cannot read attachment {name}: {e}", permanent=False) from e


def to_entity(issue: models.Issue, *, labels=None, comments=None, attachments=None) -> Entity:
    """The entity of ``issue``; ``labels``, ``comments`` and ``attachments`` given (as the
    contract's objects) are not read."""
    return Entity(
        key=issue.key,
        id=str(issue.pk),
        project=issue.project.key,
        type=issue.type,
        summary=issue.summary,
        description=issue.description,
        status=issue.status.name,
        priority=issue.priority.name if issue.priority else "",
        assignee=actions.person(issue.assignee),
        reporter=actions.person(issue.reporter),
        labels=tuple(issue.label_names if labels is None else labels),
        custom_fields=dict(issue.custom_fields),
        created=issue.created,
        updated=issue.updated,
        updated_by=actions.person(issue.updated_by),
        comments=tuple(to_comment(c) for c in issue.comments.all()) if comments is None else tuple(comments),
        attachments=(
            tuple(to_attachment(a) for a in issue.attachments.all()) if attachments is None else tuple(attachments)
        ),
    )


def _tables() -> dict[str, str]:
    found = {
        "issue": models.Issue,
        "project": models.Project,
        "status": models.Status,
        "priority": models.Priority,
        "label": models.Label,
        "comment": models.Comment,
        "attachment": models.Attachment,
        "user": get_user_model(),
    }
    return {name: db_connection.ops.quote_name(model._meta.db_table) for name, model in found.items()}


# Templates: table names come from the models (``_tables``), values always as parameters;
# ``{where}`` is ``i.key IN (...)`` or ``i.id IN (...)``, ``{ids}`` placeholders of issue ids.
_ISSUE_SQL = (
    "SELECT i.id, i.key, p.key, i.type, i.summary, i.description, s.name, pr.name, i.custom_fields, i.created, "
    "i.updated, a.username, a.first_name, a.last_name, a.email, r.username, r.first_name, r.last_name, r.email, "
    "u.username, u.first_name, u.last_name, u.email "
    "FROM {issue} i JOIN {project} p ON p.id = i.project_id JOIN {status} s ON s.id = i.status_id "
    "LEFT JOIN {priority} pr ON pr.id = i.priority_id LEFT JOIN {user} a ON a.id = i.assignee_id "
    "LEFT JOIN {user} r ON r.id = i.reporter_id LEFT JOIN {user} u ON u.id = i.updated_by_id WHERE {where}"
)
# An issue's comments, attachments and labels in one statement: one row each, tagged by
# kind. Comments come first so that no column's type is left to two NULLs (PostgreSQL
# settles a UNION's types a pair of branches at a time). Per kind, rows come in the
# contract's order: comments and attachments by creation, labels by name.
_DETAILS_SQL = (
    "SELECT 'c', c.issue_id, c.id, c.body, c.created, c.updated, NULL, NULL, NULL, NULL, "
    "u.username, u.first_name, u.last_name, u.email "
    "FROM {comment} c LEFT JOIN {user} u ON u.id = c.author_id WHERE c.issue_id IN ({ids}) "
    "UNION ALL SELECT 'a', t.issue_id, t.id, t.filename, t.created, NULL, t.size, t.content_type, t.sha256, t.file, "
    "u.username, u.first_name, u.last_name, u.email "
    "FROM {attachment} t LEFT JOIN {user} u ON u.id = t.author_id WHERE t.issue_id IN ({ids}) "
    "UNION ALL SELECT 'l', issue_id, NULL, name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL "
    "FROM {label} WHERE issue_id IN ({ids}) "
    "ORDER BY 1, 5, 3, 4"
)
# Issues read at once at most (the IN lists stay well inside every database's parameter limit).
READ_CHUNK = 500


@functools.lru_cache(maxsize=64)  # the counts in use: 1, a batch's, a page's
def _statements(by: str, count: int) -> tuple[str, str]:
    tables = _tables()
    marks = ", ".join(["%s"] * count)
    return _ISSUE_SQL.format(where=f"i.{by} IN ({marks})", **tables), _DETAILS_SQL.format(ids=marks, **tables)


def _person(username, first_name, last_name, email) -> Person | None:
    """``actions.person`` from the columns of a user row."""
    if username is None:
        return None
    return Person(id=username, name=f"{first_name} {last_name}".strip() or username, email=email or "")


def _when(value: datetime | str | None) -> datetime | None:
    # PostgreSQL answers aware datetimes; SQLite answers naive ones (or text), in the
    # database's time zone, which Django's own converter makes aware.
    if value is None or (isinstance(value, datetime) and value.tzinfo is not None):
        return value
    return db_connection.ops.convert_datetimefield_value(value, None, db_connection)


def _read(key: str) -> Entity | None:
    """The entity of issue ``key``, or None."""
    return _read_many("key", [key]).get(key)


def _read_many(by: str, values: list) -> dict[Any, Entity]:
    """The entities of the issues whose ``by`` ("key" or "id") is in ``values``, by that value.

    Two plain queries per READ_CHUNK issues. This is the sync's hottest read (every message
    applied reads its issue, every trigger and poll a page of them): the ORM spent about
    seven times the CPU building the same rows as model instances.
    """
    found: dict[Any, Entity] = {}
    for start in range(0, len(values), READ_CHUNK):
        chunk = list(dict.fromkeys(values[start : start + READ_CHUNK]))
        found.update(_read_chunk(by, chunk))
    return found


def _read_chunk(by: str, values: list) -> dict[Any, Entity]:
    if not values:
        return {}
    with db_connection.cursor() as cursor:
        cursor.execute(_statements(by, len(values))[0], values)
        rows = cursor.fetchall()
        if not rows:
            return {}
        pks = [row[0] for row in rows]
        labels, comments, attachments = ({pk: [] for pk in pks} for _ in range(3))
        cursor.execute(_statements(by, len(pks))[1], pks * 3)
        storage = models.Attachment._meta.get_field("file").storage
        for kind, issue_id, pk, text, created, updated, size, content_type, sha256, file, *author in cursor.fetchall():
            if kind == "l":
                labels[issue_id].append(text)
            elif kind == "c":
                comments[issue_id].append(
                    Comment(
                        id=str(pk), author=_person(*author), body=text, created=_when(created), updated=_when(updated)
                    )
                )
            else:
                attachments[issue_id].append(
                    Attachment(
                        id=str(pk),
                        filename=text,
                        size=size,
                        content_type=content_type,
                        sha256=sha256,
                        created=_when(created),
                        author=_person(*author),
                        opener=functools.partial(_open_file, storage, file),
                    )
                )
    custom_field = models.Issue._meta.get_field("custom_fields")
    found = {}
    for row in rows:
        pk = row[0]
        custom_fields = custom_field.from_db_value(row[8], None, db_connection)
        found[row[1] if by == "key" else pk] = Entity(
            key=row[1],
            id=str(pk),
            project=row[2],
            type=row[3],
            summary=row[4],
            description=row[5],
            status=row[6],
            priority=row[7] or "",
            assignee=_person(*row[11:15]),
            reporter=_person(*row[15:19]),
            labels=tuple(labels[pk]),
            custom_fields=dict(custom_fields or {}),
            created=_when(row[9]),
            updated=_when(row[10]),
            updated_by=_person(*row[19:23]),
            comments=tuple(comments[pk]),
            attachments=tuple(attachments[pk]),
        )
    return found


def _page(found: list[tuple[int, Any]]) -> tuple[Entity, ...]:
    """The entities of ``found`` (issue id first in each), in its order; one deleted since is left out."""
    entities = _read_many("id", [pk for pk, *_ in found])
    return tuple(entities[pk] for pk, *_ in found if pk in entities)


class BuiltinTracker:
    """This node's own tracker. Writes are made as the ``account`` user (created if missing)."""

    kind = "builtin"
    # Its writes join the node's own database transaction, so a failed sync step undoes them.
    shares_database = True

    def __init__(self, account: str = "sync"):
        if not isinstance(account, str) or not account.strip():
            raise TrackerError("the built-in tracker needs an account name", permanent=True)
        self.account = account
        self._user = None

    # --- reading -------------------------------------------------------------------------

    def _issue(self, key: str, *, for_update: bool = False) -> models.Issue:
        if not isinstance(key, str):
            raise NotFound(f"no issue {key!r}")
        queryset = models.Issue.objects.select_for_update() if for_update else models.Issue.objects
        try:
            return queryset.select_related("project").get(key=key.upper())
        except models.Issue.DoesNotExist:
            raise NotFound(f"no issue {key}") from None

    @_translated
    def get(self, key: str) -> Entity:
        entity = _read(str(key).upper())
        if entity is None:
            raise NotFound(f"no issue {key}")
        return entity

    @_translated
    def get_many(self, keys: list[str]) -> dict[str, Entity]:
        """The entities of those of ``keys`` that exist, by key as given (a batch reads its issues at once)."""
        wanted = {str(key).upper(): key for key in keys}
        return {wanted[key]: entity for key, entity in _read_many("key", list(wanted)).items()}

    @_translated
    def changed_since(self, since: datetime | None, *, cursor: str | None = None, limit: int = 100) -> Page:
        found, next_cursor, high_water = self._changes(since, cursor, limit)
        return Page(_page(found), next_cursor, high_water)

    @_translated
    def changed_versions(self, since: datetime | None, *, cursor: str | None = None, limit: int = 100) -> VersionPage:
        """``changed_since`` without reading the entities: a poll reads only those it must run rules on."""
        found, next_cursor, high_water = self._changes(since, cursor, limit)
        return VersionPage(tuple((key, updated) for _, key, updated in found), next_cursor, high_water)

    def _changes(self, since: datetime | None, cursor: str | None, limit: int):
        """``(id, key, updated)`` of a page of changed issues, the next cursor and the page's high water."""
        limit = check_limit(limit, MAX_PAGE)
        issues = models.Issue.objects.order_by("updated", "id")
        if since is not None:
            issues = issues.filter(updated__gte=since - CHANGE_OVERLAP)
        if cursor:
            position = decode_cursor(cursor, "updated", "id")
            after = parse_datetime(str(position["updated"]))
            if after is None or not isinstance(position["id"], int):
                raise TrackerError(f"invalid cursor {cursor[:40]!r}", permanent=True)
            issues = issues.filter(Q(updated__gt=after) | Q(updated=after, id__gt=position["id"]))
        found = list(issues.values_list("id", "key", "updated")[: limit + 1])
        next_cursor = None
        if len(found) > limit:
            last_id, _, last_updated = found[limit - 1]
            next_cursor = encode_cursor(updated=last_updated.isoformat(), id=last_id)
        # The watermark as the query ordered them: an issue changed since is newer, and found again.
        return found[:limit], next_cursor, max((updated for *_, updated in found[:limit]), default=None)

    @_translated
    def search(self, text: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        limit = check_limit(limit, MAX_PAGE)
        issues = query.search(models.Issue.objects.all(), text).order_by("id")
        if cursor:
            after = decode_cursor(cursor, "id")["id"]
            if not isinstance(after, int):
                raise TrackerError(f"invalid cursor {cursor[:40]!r}", permanent=True)
            issues = issues.filter(id__gt=after)
        found = list(issues.values_list("id", flat=True)[: limit + 1])
        entities = _page([(pk, None) for pk in found[:limit]])
        next_cursor = encode_cursor(id=found[limit - 1]) if len(found) > limit else None
        return Page(entities, next_cursor, max((e.updated for e in entities), default=None))

    @_translated
    def matches(self, text: str, key: str) -> bool:
        return query.search(models.Issue.objects.filter(key=str(key).upper()), text).exists()

    # --- writing -------------------------------------------------------------------------

    def _actor(self):
        if self._user is None:
            user_model = get_user_model()
            user, created = user_model.objects.get_or_create(
                username=self.account, defaults={"first_name": "Sync", "last_name": "account"}
            )
            if created:
                user.set_unusable_password()
                user.save(update_fields=["password"])
                if db_connection.in_atomic_block:
                    # Made inside a transaction that may yet roll back (a failed apply): not kept,
                    # or the next write would name a user that is gone.
                    return user
            self._user = user
        return self._user

    def find_user(self, person: Mapping[str, Any]) -> str | None:
        """The active user matching a remote person: by email, then by username; None if nobody does."""
        if not isinstance(person, Mapping):
            return None
        users = get_user_model().objects.filter(is_active=True)
        email, ident = person.get("email"), person.get("id")
        user = (isinstance(email, str) and email and users.filter(email__iexact=email).first()) or (
            isinstance(ident, str) and ident and users.filter(username=ident).first()
        )
        return user.get_username() if user else None

    def all_or_nothing(self):
        """The sync's promise that it rolls back on any error: writes skip their savepoints."""
        return actions.all_or_nothing()

    @_translated
    def sync_account(self) -> Person:
        return actions.person(self._actor())

    def sync_account_id(self) -> str:
        # A person's id here is the username (``actions.person``): no query needed.
        return self.account

    @_translated
    def create(self, project: str, fields: Mapping[str, Any]) -> Entity:
        return self.create_with_comments(project, fields, [])[0]

    @_translated
    def create_with_comments(
        self, project: str, fields: Mapping[str, Any], bodies: list[str]
    ) -> tuple[Entity, list[Comment]]:
        """``create`` and ``add_comments`` in one write (a first sync brings both)."""
        return self.create_many([(project, fields, bodies)])[0]

    @_translated
    def create_many(self, items: list[tuple[str, Mapping[str, Any], list[str]]]) -> list[tuple[Entity, list[Comment]]]:
        """``create_with_comments`` for each ``(project, fields, comment bodies)``, in one write.

        The answers are made from what was written, not read again: a new issue has no
        attachments, and only the comments given. One invalid item refuses them all.
        """
        actor = self._actor()
        with actions.atomic_block():
            created = actions.create_issues(items, actor=actor)
        answers = []
        for (_, fields, _), (issue, added) in zip(items, created, strict=True):
            entity = to_entity(
                issue,
                labels=actions.clean_labels(fields.get("labels") or []),  # as written, sorted as read
                comments=[to_comment(c) for c in added],
                attachments=(),
            )
            answers.append((entity, list(entity.comments)))
        return answers

    @_translated
    def update(self, key: str, fields: Mapping[str, Any]) -> Entity:
        # Locked once here (update_issue does not lock again); the answer is the issue read
        # after the write, as the tracker now holds it (two statements, see _read_many).
        with actions.atomic_block():
            if not isinstance(key, str):
                raise NotFound(f"no issue {key!r}")
            try:
                issue = models.Issue.objects.select_for_update().get(key=key.upper())
            except models.Issue.DoesNotExist:
                raise NotFound(f"no issue {key}") from None
            actions.update_issue(issue, fields, actor=self._actor(), locked=True)
            return self.get(issue.key)

    def _comment(self, key: str, comment_id: str) -> models.Comment:
        issue = self._issue(key)
        try:
            return issue.comments.select_related("issue").get(pk=int(comment_id))
        except (ValueError, TypeError, models.Comment.DoesNotExist):
            raise NotFound(f"no comment {comment_id} on {key}") from None

    @_translated
    def add_comment(self, key: str, body: str) -> Comment:
        return to_comment(actions.add_comment(self._issue(key), body, actor=self._actor()))

    @_translated
    def add_comments(self, key: str, bodies: list[str]) -> list[Comment]:
        """``add_comment`` for several bodies at once, in order."""
        return [to_comment(c) for c in actions.add_comments(self._issue(key), bodies, actor=self._actor())]

    @_translated
    def update_comment(self, key: str, comment_id: str, body: str) -> Comment:
        comment = actions.edit_comment(self._comment(key, comment_id), body, actor=self._actor())
        return to_comment(comment)

    @_translated
    def delete_comment(self, key: str, comment_id: str) -> None:
        actions.delete_comment(self._comment(key, comment_id), actor=self._actor())

    @_translated
    def add_attachment(self, key: str, filename: str, content: IO[bytes] | bytes, content_type: str) -> Attachment:
        if isinstance(content, bytes):
            content = BytesIO(content)
        attachment = actions.add_attachment(self._issue(key), filename, content, content_type, actor=self._actor())
        return to_attachment(attachment)

    @_translated
    def remove_attachment(self, key: str, attachment_id: str) -> None:
        issue = self._issue(key)
        try:
            attachment = issue.attachments.select_related("issue").get(pk=int(attachment_id))
        except (ValueError, TypeError, models.Attachment.DoesNotExist):
            raise NotFound(f"no attachment {attachment_id} on {key}") from None
        actions.remove_attachment(attachment, actor=self._actor())
