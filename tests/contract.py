"""The tracker contract, as checks any adapter must pass.

Each ``check_*`` function takes a ``Harness`` (an adapter plus what the checks need to
drive it) and raises AssertionError when the adapter breaks a rule of
``trackers.base.Tracker``. ``tests/test_tracker_contract.py`` runs every check against
every adapter; ``tests/test_contract_can_fail.py`` proves the checks catch broken ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta

from trackers.base import Attachment, Comment, Entity, NotFound, Page, Person, Tracker, TrackerError, VersionPage

MAX_PAGES = 50


@dataclass
class Harness:
    tracker: Tracker
    project: str
    # Two valid statuses and priorities, the second different from what a new entity gets.
    statuses: tuple[str, str]
    priorities: tuple[str, str]
    # A Person id the tracker accepts as assignee.
    assignee: str
    # Makes the tracker's backend unavailable for the duration of the block.
    outage: Callable[[], AbstractContextManager]
    # A query in the tracker's own language matching entities whose summary holds ``word``.
    query_for_word: Callable[[str], str]
    # A query the tracker refuses (an unknown field or filter).
    invalid_query: str
    # Whether editing a comment moves the entity's ``updated`` (Redmine's does not).
    comment_edits_bump_updated: bool = True
    supports_custom_fields: bool = True
    # Whether the tracker has labels at all (Redmine has none).
    supports_labels: bool = True
    created: list[str] = field(default_factory=list)

    def new(self, **fields) -> Entity:
        fields.setdefault("summary", f"contract {uuid.uuid4().hex[:8]}")
        entity = self.tracker.create(self.project, fields)
        self.created.append(entity.key)
        return entity


def expect_error(call: Callable[[], object], what: str, *, permanent: bool) -> TrackerError:
    """The TrackerError ``call`` raises; anything else breaks the contract."""
    try:
        call()
    except TrackerError as e:
        kind = "permanent" if permanent else "transient"
        assert e.permanent is permanent, f"{what}: expected a {kind} error, got {e!r}"
        assert str(e), f"{what}: the error must say what is wrong"
        return e
    except Exception as e:  # the point is to catch what an adapter must not leak
        raise AssertionError(f"{what}: adapters raise only TrackerError, this one raised {e!r}") from e
    raise AssertionError(f"{what}: expected an error, nothing was raised")


def expect_not_found(call: Callable[[], object], what: str) -> None:
    error = expect_error(call, what, permanent=True)
    assert isinstance(error, NotFound), f"{what}: expected NotFound, got {error!r}"


def full_pass(harness: Harness, since, limit: int = 100) -> tuple[list[Entity], int, Page]:
    """Every page of changed_since from ``since``; returns (entities, page count, last page)."""
    entities: list[Entity] = []
    cursor = None
    for pages in range(1, MAX_PAGES + 1):
        page = harness.tracker.changed_since(since, cursor=cursor, limit=limit)
        assert isinstance(page, Page)
        assert len(page.entities) <= limit, "a page must not hold more than the limit"
        entities.extend(page.entities)
        if page.next_cursor is None:
            return entities, pages, page
        assert page.next_cursor != cursor, "the cursor must move on"
        cursor = page.next_cursor
    raise AssertionError(f"changed_since did not finish within {MAX_PAGES} pages")


# --- entities ------------------------------------------------------------------------------


def check_it_creates_and_reads_back_an_entity(h: Harness) -> None:
    fields = {
        "summary": "Printer on fire",
        "description": "Smoke from tray 2.\nSecond line.",
        "status": h.statuses[1],
        "priority": h.priorities[1],
        "assignee": h.assignee,
    }
    if h.supports_custom_fields:
        fields["custom_fields"] = {"Customer": "ACME"}
    if h.supports_labels:
        fields["labels"] = ["hardware", "urgent"]
    created = h.new(**fields)
    assert created.key and created.id and created.project == h.project
    assert created.summary == "Printer on fire"
    assert created.description == "Smoke from tray 2.\nSecond line."
    assert created.status == h.statuses[1]
    assert created.priority == h.priorities[1]
    if h.supports_labels:
        assert sorted(created.labels) == ["hardware", "urgent"]
    assert created.assignee is not None and created.assignee.id == h.assignee
    if h.supports_custom_fields:
        assert created.custom_fields.get("Customer") == "ACME"
    assert created.created is not None and created.updated is not None
    assert h.tracker.get(created.key) == created, "get must return what create returned"


def check_it_creates_with_comments_what_get_reads(h: Harness) -> None:
    """``create_with_comments`` is optional (a first sync's one write); where it is, its answer is true."""
    if not hasattr(h.tracker, "create_with_comments"):
        return
    for labels in ([], ["hardware"]):
        fields = {"summary": f"contract {uuid.uuid4().hex[:8]}", "status": h.statuses[1]}
        if h.supports_labels:
            fields["labels"] = labels
        entity, added = h.tracker.create_with_comments(h.project, fields, ["First note", "Second note"])
        h.created.append(entity.key)
        assert [c.body for c in added] == ["First note", "Second note"]
        assert list(entity.comments) == added
        assert h.tracker.get(entity.key) == entity, "get must return what create_with_comments returned"


def check_it_updates_only_the_given_fields(h: Harness) -> None:
    entity = h.new(summary="Before", description="Keep me", **({"labels": ["one"]} if h.supports_labels else {}))
    updated = h.tracker.update(entity.key, {"summary": "After", "status": h.statuses[1]})
    assert updated.summary == "After"
    assert updated.status == h.statuses[1]
    assert updated.description == "Keep me", "fields not named in the update must stay"
    if h.supports_labels:
        assert list(updated.labels) == ["one"]
    assert updated.updated >= entity.updated
    assert h.tracker.get(entity.key) == updated


def check_it_replaces_labels_and_clears_the_assignee(h: Harness) -> None:
    labels = h.supports_labels
    entity = h.new(assignee=h.assignee, **({"labels": ["a", "b"]} if labels else {}))
    updated = h.tracker.update(entity.key, {"assignee": None, **({"labels": ["c"]} if labels else {})})
    if labels:
        assert list(updated.labels) == ["c"]
    assert updated.assignee is None


def check_it_raises_not_found_for_an_unknown_entity(h: Harness) -> None:
    missing = f"{h.project}-999999"
    expect_not_found(lambda: h.tracker.get(missing), "get")
    expect_not_found(lambda: h.tracker.update(missing, {"summary": "x"}), "update")
    expect_not_found(lambda: h.tracker.add_comment(missing, "x"), "add_comment")
    expect_not_found(lambda: h.tracker.add_attachment(missing, "a.txt", b"x", "text/plain"), "add_attachment")


def check_it_rejects_invalid_values_as_permanent_errors(h: Harness) -> None:
    entity = h.new()
    for fields in ({"status": "No Such Status 7f3a"}, {"summary": ""}, {"no_such_field": 1}, {"labels": "not a list"}):
        error = expect_error(lambda f=fields: h.tracker.update(entity.key, f), f"update {fields}", permanent=True)
        assert not isinstance(error, NotFound), f"update {fields}: the entity exists, the value is wrong"
    expect_error(lambda: h.tracker.create(h.project, {"description": "x"}), "create without summary", permanent=True)
    assert h.tracker.get(entity.key) == entity, "a rejected update must change nothing"


def check_it_reports_an_outage_as_a_transient_error(h: Harness) -> None:
    entity = h.new()
    # An unreachable backend may come back, so its errors are transient.
    with h.outage():
        expect_error(lambda: h.tracker.get(entity.key), "get during an outage", permanent=False)
        expect_error(lambda: h.tracker.changed_since(None, limit=5), "changed_since during an outage", permanent=False)
    assert h.tracker.get(entity.key).key == entity.key, "the tracker works again after the outage"


# --- comments ------------------------------------------------------------------------------


def check_it_adds_edits_and_deletes_comments(h: Harness) -> None:
    entity = h.new()
    account = h.tracker.sync_account()
    first = h.tracker.add_comment(entity.key, "First")
    second = h.tracker.add_comment(entity.key, "Second\nwith two lines")
    assert isinstance(first, Comment) and first.id and first.id != second.id
    assert first.author is not None and first.author.id == account.id, "comments are written as the sync account"
    read = h.tracker.get(entity.key)
    assert [(c.id, c.body) for c in read.comments] == [(first.id, "First"), (second.id, "Second\nwith two lines")]

    edited = h.tracker.update_comment(entity.key, first.id, "First, edited")
    assert edited.id == first.id and edited.body == "First, edited"
    assert edited.updated >= first.updated
    h.tracker.delete_comment(entity.key, second.id)
    assert [(c.id, c.body) for c in h.tracker.get(entity.key).comments] == [(first.id, "First, edited")]

    expect_not_found(lambda: h.tracker.update_comment(entity.key, second.id, "gone"), "update a deleted comment")
    expect_not_found(lambda: h.tracker.delete_comment(entity.key, second.id), "delete a deleted comment")


# --- attachments ---------------------------------------------------------------------------


def check_it_adds_reads_and_removes_attachments(h: Harness) -> None:
    import hashlib

    entity = h.new()
    content = b"\x00binary\xffcontent\n" * 1000
    added = h.tracker.add_attachment(entity.key, "report.bin", content, "application/octet-stream")
    assert isinstance(added, Attachment) and added.id
    assert added.filename == "report.bin"
    assert added.size == len(content)
    assert added.sha256 == hashlib.sha256(content).hexdigest()
    assert added.read() == content

    text = h.tracker.add_attachment(entity.key, "notes.txt", b"hello", "text/plain")
    read = h.tracker.get(entity.key)
    assert {a.id: a.sha256 for a in read.attachments} == {added.id: added.sha256, text.id: text.sha256}
    assert next(a for a in read.attachments if a.id == added.id).read() == content

    h.tracker.remove_attachment(entity.key, added.id)
    assert [a.id for a in h.tracker.get(entity.key).attachments] == [text.id]
    expect_not_found(lambda: h.tracker.remove_attachment(entity.key, added.id), "remove a removed attachment")


# --- change detection and search -----------------------------------------------------------


def _start(h: Harness):
    """A watermark just before now, so the checks ignore older entities of a shared tracker."""
    probe = h.new()
    return probe.updated - timedelta(seconds=1)


def check_it_pages_through_changes_without_repeats(h: Harness) -> None:
    since = _start(h)
    keys = {h.new().key for _ in range(5)}
    entities, pages, last = full_pass(h, since, limit=2)
    seen = [e.key for e in entities]
    assert keys <= set(seen), "every entity changed since the watermark must be listed"
    assert len(seen) == len(set(seen)), "within one pass an unchanged entity is listed once"
    assert pages >= 3, "with limit=2, six entities need at least three pages"
    stamps = [e.updated for e in entities]
    assert stamps == sorted(stamps), "changes come oldest first"
    assert last.high_water is not None


def check_it_lists_an_entity_again_after_it_changes(h: Harness) -> None:
    since = _start(h)
    entity = h.new()
    entities, _, _ = full_pass(h, since)
    watermark = max(e.updated for e in entities)
    h.tracker.update(entity.key, {"summary": "changed after the pass"})
    later, _, _ = full_pass(h, watermark)
    assert entity.key in {e.key for e in later}
    assert next(e for e in later if e.key == entity.key).summary == "changed after the pass"


def check_it_lists_an_entity_after_a_new_comment(h: Harness) -> None:
    entity = h.new()
    h.tracker.add_comment(entity.key, "a comment")
    after_comment = h.tracker.get(entity.key)
    assert after_comment.updated >= entity.updated
    later, _, _ = full_pass(h, after_comment.updated)
    assert entity.key in {e.key for e in later}
    if h.comment_edits_bump_updated:
        comment = after_comment.comments[0]
        h.tracker.update_comment(entity.key, comment.id, "edited")
        assert h.tracker.get(entity.key).updated >= after_comment.updated


def check_it_lists_versions_as_it_lists_changes(h: Harness) -> None:
    """A tracker that lists changes without reading them (``changed_versions``, optional) lists
    the same entities, at the same versions, page for page, as ``changed_since``."""
    if not hasattr(h.tracker, "changed_versions"):
        return
    since = _start(h)
    for _ in range(3):
        h.new()
    cursor, versions_cursor = None, None
    for _ in range(MAX_PAGES):
        page = h.tracker.changed_since(since, cursor=cursor, limit=2)
        listed = h.tracker.changed_versions(since, cursor=versions_cursor, limit=2)
        assert isinstance(listed, VersionPage)
        assert list(listed.versions) == [(e.key, e.updated) for e in page.entities]
        assert listed.high_water == page.high_water
        if page.next_cursor is None:
            assert listed.next_cursor is None
            return
        cursor, versions_cursor = page.next_cursor, listed.next_cursor
    raise AssertionError(f"changed_since did not finish within {MAX_PAGES} pages")


def check_it_rejects_an_invalid_cursor(h: Harness) -> None:
    expect_error(lambda: h.tracker.changed_since(None, cursor="not-a-cursor!", limit=5), "bad cursor", permanent=True)


def check_it_searches_in_its_own_query_language(h: Harness) -> None:
    word = f"needle{uuid.uuid4().hex[:6]}"
    wanted = {h.new(summary=f"A {word} here").key, h.new(summary=f"Another {word}").key}
    h.new(summary="A haystack")
    found: list[str] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = h.tracker.search(h.query_for_word(word), cursor=cursor, limit=1)
        found.extend(e.key for e in page.entities)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(found) == sorted(wanted)


def check_it_tells_whether_one_entity_matches_a_query(h: Harness) -> None:
    word = f"match{uuid.uuid4().hex[:6]}"
    query = h.query_for_word(word)
    hit = h.new(summary=f"A {word} here")
    miss = h.new(summary="A haystack")
    assert h.tracker.matches(query, hit.key) is True
    assert h.tracker.matches(query, miss.key) is False
    h.tracker.update(miss.key, {"summary": f"Now a {word} too", "status": h.statuses[1]})
    assert h.tracker.matches(query, miss.key) is True, "matches reads the entity as it is now"
    assert sorted(e.key for e in h.tracker.search(query).entities) == sorted([hit.key, miss.key]), "as search reads it"
    assert h.tracker.matches(query, f"{h.project}-999999") is False, "an unknown entity matches nothing"
    expect_error(lambda: h.tracker.matches(h.invalid_query, hit.key), "matches with an invalid query", permanent=True)


def check_it_names_the_sync_account_on_its_writes(h: Harness) -> None:
    account = h.tracker.sync_account()
    assert isinstance(account, Person) and account.id
    entity = h.new()
    if entity.updated_by is not None:
        assert entity.updated_by.id == account.id, "a write by the sync must be recognisable as ours"
    assert h.tracker.sync_account() == account, "the sync account is stable"
    if hasattr(h.tracker, "sync_account_id"):
        assert h.tracker.sync_account_id() == account.id, "sync_account_id is sync_account().id, without asking"


CHECKS: list[Callable[[Harness], None]] = [
    value for name, value in sorted(globals().items()) if name.startswith("check_it_") and callable(value)
]


def check_ids() -> Iterator[str]:
    return (check.__name__.removeprefix("check_") for check in CHECKS)
