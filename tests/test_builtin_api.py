"""The built-in tracker's REST API under /api/v1/tracker/."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from tests.helpers import assert_error
from trackers.builtin import actions
from trackers.builtin.models import Attachment, Comment, Issue, Label, Project
from trackers.signals import entity_changed

API = "/api/v1/tracker"


def issue_url(key: str) -> str:
    return f"{API}/issues/{key}/"


def comment_url(key: str, comment_id: int) -> str:
    return f"{API}/issues/{key}/comments/{comment_id}/"


def attachment_url(key: str, attachment_id: int) -> str:
    return f"{API}/issues/{key}/attachments/{attachment_id}/"


def upload(name: str = "notes.txt", content: bytes = b"hello world\n", content_type: str = "text/plain"):
    return SimpleUploadedFile(name, content, content_type=content_type)


@pytest.fixture
def issue(project, bob):
    return actions.create_issue(project, {"summary": "Crash on start", "labels": ["backend"]}, actor=bob)


@pytest.fixture
def changes():
    """Every entity_changed sent during the test, as (key, change, actor id)."""
    sent = []

    def receiver(sender, key, change, actor, **kwargs):
        sent.append((key, change, actor.id if actor else None))

    entity_changed.connect(receiver)
    yield sent
    entity_changed.disconnect(receiver)


# --- authentication ----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_asks_for_credentials():
    response = APIClient().get(f"{API}/issues/")
    assert_error(response, 401, text="credentials were not provided")
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.django_db
def test_it_rejects_a_wrong_token():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert_error(client.get(f"{API}/projects/"), 401, text="invalid token")


def test_it_accepts_a_session(charlie, project):
    client = APIClient()
    client.force_login(charlie)
    response = client.get(f"{API}/projects/")
    assert response.status_code == 200
    assert [p["key"] for p in response.json()["results"]] == ["BLUE"]


def test_it_wants_a_csrf_token_for_a_session_write(charlie, project):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(charlie)
    response = client.post(f"{API}/issues/", GOOD_ISSUE, format="json")
    assert_error(response, 403, text="CSRF")
    assert not Issue.objects.exists()


# --- projects and vocabularies -----------------------------------------------------------


def test_it_lists_projects(charlie_api, project):
    Project.objects.create(key="RED", name="Red project", description="Warm")
    response = charlie_api.get(f"{API}/projects/")
    assert response.status_code == 200
    assert response.json()["results"] == [
        {"key": "BLUE", "name": "Blue project", "description": ""},
        {"key": "RED", "name": "Red project", "description": "Warm"},
    ]


def test_it_creates_a_project_for_staff(bob_api):
    response = bob_api.post(f"{API}/projects/", {"key": "GREEN", "name": "Green"}, format="json")
    assert response.status_code == 201, response.content
    assert response.json() == {"key": "GREEN", "name": "Green", "description": ""}
    assert Project.objects.filter(key="GREEN").exists()


def test_it_refuses_project_creation_to_a_plain_user(charlie_api):
    response = charlie_api.post(f"{API}/projects/", {"key": "GREEN", "name": "Green"}, format="json")
    assert_error(response, 403, text="only staff")
    assert not Project.objects.filter(key="GREEN").exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key": "green", "name": "Green"}, "key"),
        ({"key": "G", "name": "Green"}, "key"),
        ({"key": "BLUE", "name": "Another blue"}, "key"),
        ({"key": 5, "name": "Green"}, "key"),
        ({"key": "GREEN"}, "name"),
        ({"key": "GREEN", "name": "  "}, "name"),
        ({"key": "GREEN", "name": "Green", "next_number": 7}, "next_number"),
    ],
)
def test_it_rejects_a_bad_project(alice_api, project, body, field):
    assert_error(alice_api.post(f"{API}/projects/", body, format="json"), 400, field)
    assert Project.objects.count() == 1


def test_it_lists_statuses_with_the_first_as_default(charlie_api):
    results = charlie_api.get(f"{API}/statuses/").json()["results"]
    assert [s["name"] for s in results] == ["Open", "In Progress", "Resolved", "Closed"]
    assert results[0] == {"name": "Open", "category": "todo", "position": 0, "is_default": True}
    assert [s["is_default"] for s in results[1:]] == [False, False, False]


def test_it_lists_priorities(charlie_api):
    results = charlie_api.get(f"{API}/priorities/").json()["results"]
    assert [p["name"] for p in results] == ["Lowest", "Low", "Medium", "High", "Highest"]
    assert [p["name"] for p in results if p["is_default"]] == ["Medium"]
    assert set(results[0]) == {"name", "position", "is_default"}


# --- issues: writing ---------------------------------------------------------------------


def test_it_creates_an_issue(charlie_api, project, bob, changes, django_capture_on_commit_callbacks):
    body = {
        "project": "blue",
        "summary": "Login fails",
        "description": "Steps:\n1. log in\n",
        "status": "in progress",
        "priority": "High",
        "type": "Bug",
        "assignee": "bob",
        "reporter": "bob",
        "labels": ["ui", "auth", "ui"],
        "custom_fields": {"customer": "ACME", "seats": 3},
    }
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.post(f"{API}/issues/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["key"] == "BLUE-1"
    assert response["Location"] == data["url"] == "http://testserver/api/v1/tracker/issues/BLUE-1/"
    assert {k: data[k] for k in body} == {
        **body,
        "project": "BLUE",
        "status": "In Progress",
        "labels": ["auth", "ui"],
    }
    assert data["updated_by"] == "charlie"
    assert data["comments"] == [] and data["attachments"] == []
    assert data["id"] == Issue.objects.get(key="BLUE-1").pk
    assert changes == [("BLUE-1", "created", "charlie")]


def test_it_fills_in_defaults_and_makes_the_caller_the_reporter(charlie_api, project):
    response = charlie_api.post(f"{API}/issues/", {"project": "BLUE", "summary": "Slow"}, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert (data["status"], data["priority"], data["type"]) == ("Open", "Medium", "Task")
    assert (data["reporter"], data["assignee"]) == ("charlie", None)
    assert (data["labels"], data["custom_fields"], data["description"]) == ([], {}, "")


def test_it_updates_only_the_given_fields(charlie_api, issue, changes, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.patch(
            issue_url(issue.key), {"status": "Resolved", "priority": None, "assignee": "charlie"}, format="json"
        )
    assert response.status_code == 200, response.content
    data = response.json()
    assert (data["status"], data["priority"], data["assignee"]) == ("Resolved", None, "charlie")
    assert (data["summary"], data["labels"], data["reporter"]) == ("Crash on start", ["backend"], "bob")
    assert data["updated_by"] == "charlie"
    assert changes == [(issue.key, "updated", "charlie")]


def test_it_merges_custom_fields_and_replaces_labels(charlie_api, issue):
    charlie_api.patch(issue_url(issue.key), {"custom_fields": {"a": 1, "b": "x"}}, format="json")
    response = charlie_api.patch(
        issue_url(issue.key), {"custom_fields": {"a": None, "c": [1, 2]}, "labels": ["z", "y"]}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["custom_fields"] == {"b": "x", "c": [1, 2]}
    assert response.json()["labels"] == ["y", "z"]


def test_it_sends_nothing_for_a_patch_that_changes_nothing(
    charlie_api, issue, changes, django_capture_on_commit_callbacks
):
    before = Issue.objects.get(pk=issue.pk).updated
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.patch(issue_url(issue.key), {"summary": "Crash on start"}, format="json")
    assert response.status_code == 200
    assert changes == []
    assert Issue.objects.get(pk=issue.pk).updated == before


def test_it_deletes_an_issue_for_staff(bob_api, issue, changes, django_capture_on_commit_callbacks):
    actions.add_comment(issue, "a comment")
    with django_capture_on_commit_callbacks(execute=True):
        response = bob_api.delete(issue_url(issue.key))
    assert response.status_code == 204
    assert not Issue.objects.filter(pk=issue.pk).exists()
    assert not Comment.objects.exists()
    assert changes == [(issue.key, "deleted", "bob")]


def test_it_refuses_to_delete_an_issue_for_a_plain_user(charlie_api, issue):
    assert_error(charlie_api.delete(issue_url(issue.key)), 403, text="only staff")
    assert Issue.objects.filter(pk=issue.pk).exists()


def test_it_refuses_put_with_a_hint(charlie_api, issue):
    response = charlie_api.put(issue_url(issue.key), {"summary": "x"}, format="json")
    assert_error(response, 405, text="PATCH")
    assert "PUT" not in response["Allow"] and "PATCH" in response["Allow"]


# --- issues: reading ---------------------------------------------------------------------


def test_it_shows_an_issue_with_its_comments_and_attachments(charlie_api, issue, bob):
    comment = actions.add_comment(issue, "Seen it too", actor=bob)
    attachment = actions.add_attachment(issue, "log.txt", upload(content=b"trace"), actor=bob)
    response = charlie_api.get(issue_url(issue.key))
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {
        "key",
        "id",
        "project",
        "type",
        "summary",
        "description",
        "status",
        "priority",
        "assignee",
        "reporter",
        "labels",
        "custom_fields",
        "created",
        "updated",
        "updated_by",
        "url",
        "comments",
        "attachments",
    }
    assert data["comments"] == [
        {
            "id": comment.pk,
            "author": "bob",
            "body": "Seen it too",
            "created": comment.created.isoformat().replace("+00:00", "Z"),
            "updated": comment.updated.isoformat().replace("+00:00", "Z"),
        }
    ]
    [shown] = data["attachments"]
    assert shown["id"] == attachment.pk
    assert (shown["filename"], shown["size"], shown["content_type"]) == ("log.txt", 5, "text/plain")
    assert shown["sha256"] == hashlib.sha256(b"trace").hexdigest()
    assert shown["content_url"] == f"http://testserver{attachment_url(issue.key, attachment.pk)}content/"


@pytest.mark.parametrize("typed", ["blue-1", "Blue-1", "BLUE-1"])
def test_it_finds_an_issue_whatever_the_case_of_its_key(charlie_api, issue, typed):
    for url in (issue_url(typed), f"{API}/issues/{typed}/comments/", f"{API}/issues/{typed}/attachments/"):
        assert charlie_api.get(url).status_code == 200, url
    assert charlie_api.get(issue_url(typed)).json()["key"] == "BLUE-1"


@pytest.mark.parametrize(
    "path",
    [
        "/issues/BLUE-99/",
        "/issues/RED-1/",
        "/issues/BLUE-1/comments/123/",
        "/issues/BLUE-1/attachments/123/",
        "/issues/BLUE-1/attachments/123/content/",
        "/issues/BLUE-99/comments/",
        "/issues/not-a-key/",
        "/issues/BLUE-1/comments/999999999999999999/",
        "/issues/BLUE-1/comments/99999999999999999999999/",
        "/issues/BLUE-1/comments/abc/",
        "/nothing-here/",
    ],
)
def test_it_answers_404_in_json(charlie_api, issue, path):
    assert_error(charlie_api.get(API + path), 404)


def test_it_lists_issues_newest_first_a_page_at_a_time(charlie_api, project):
    for n in range(5):
        actions.create_issue(project, {"summary": f"Issue {n}"})
    first = charlie_api.get(f"{API}/issues/", {"page_size": 2}).json()
    assert (first["count"], first["page"], first["pages"], first["previous"]) == (5, 1, 3, None)
    assert [i["key"] for i in first["results"]] == ["BLUE-5", "BLUE-4"]
    assert "comments" not in first["results"][0]
    second = charlie_api.get(first["next"]).json()
    assert [i["key"] for i in second["results"]] == ["BLUE-3", "BLUE-2"]
    last = charlie_api.get(second["next"]).json()
    assert [i["key"] for i in last["results"]] == ["BLUE-1"]
    assert last["next"] is None


@pytest.mark.parametrize("page", ["0", "abc", "4", "-1"])
def test_it_answers_a_bad_page_number_in_json(charlie_api, issue, page):
    assert_error(charlie_api.get(f"{API}/issues/", {"page": page}), 404, text="invalid page")


def test_it_lists_issues_in_a_fixed_number_of_queries(charlie_api, project, bob):
    def count_queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert charlie_api.get(f"{API}/issues/").status_code == 200
        return len(captured)

    def add_issue(n: int) -> None:
        issue = actions.create_issue(
            project, {"summary": f"Issue {n}", "labels": ["a", "b"], "assignee": "bob", "priority": "High"}, actor=bob
        )
        actions.add_comment(issue, "a comment", actor=bob)

    add_issue(0)
    few = count_queries()
    for n in range(1, 8):
        add_issue(n)
    assert count_queries() == few


def test_it_shows_an_issue_in_a_fixed_number_of_queries(charlie_api, issue, bob):
    def count_queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert charlie_api.get(issue_url(issue.key)).status_code == 200
        return len(captured)

    actions.add_comment(issue, "first", actor=bob)
    actions.add_attachment(issue, "a.txt", upload(), actor=bob)
    few = count_queries()
    for n in range(5):
        actions.add_comment(issue, f"more {n}", actor=bob)
        actions.add_attachment(issue, f"{n}.txt", upload(), actor=bob)
    assert count_queries() == few


@pytest.fixture
def several_issues(project, bob, charlie):
    Project.objects.create(key="RED", name="Red")
    actions.create_issue(
        project,
        {"summary": "Crash when saving", "type": "Bug", "labels": ["backend"], "assignee": "bob", "priority": "High"},
        actor=charlie,
    )
    actions.create_issue(project, {"summary": "Dark mode", "labels": ["ui"], "status": "Resolved"}, actor=bob)
    actions.create_issue("RED", {"summary": "Crash on exit", "labels": ["backend", "ui"], "priority": None}, actor=bob)


@pytest.mark.parametrize(
    ("params", "keys"),
    [
        ({"project": "red"}, ["RED-1"]),
        ({"status": "resolved"}, ["BLUE-2"]),
        ({"priority": "High"}, ["BLUE-1"]),
        ({"priority": "none"}, ["RED-1"]),
        ({"type": "bug"}, ["BLUE-1"]),
        ({"assignee": "bob"}, ["BLUE-1"]),
        ({"reporter": "bob"}, ["RED-1", "BLUE-2"]),
        ({"label": "backend"}, ["RED-1", "BLUE-1"]),
        ({"label": ["backend", "ui"]}, ["RED-1"]),
        ({"label": "ui", "project": "BLUE"}, ["BLUE-2"]),
        ({"q": "crash"}, ["RED-1", "BLUE-1"]),
        ({"q": 'crash -label:ui status:"open"'}, ["BLUE-1"]),
        ({"q": "is:done"}, ["BLUE-2"]),
        ({"q": "project:BLUE", "label": "ui"}, ["BLUE-2"]),
        ({"q": ""}, ["RED-1", "BLUE-2", "BLUE-1"]),
    ],
)
def test_it_filters_issues(charlie_api, several_issues, params, keys):
    response = charlie_api.get(f"{API}/issues/", params)
    assert response.status_code == 200, response.content
    assert [i["key"] for i in response.json()["results"]] == keys


def test_it_filters_issues_updated_after_a_moment(charlie_api, project):
    old = actions.create_issue(project, {"summary": "Old"})
    Issue.objects.filter(pk=old.pk).update(updated=timezone.now() - timedelta(days=3))
    actions.create_issue(project, {"summary": "New"})
    since = (timezone.now() - timedelta(days=1)).isoformat()
    response = charlie_api.get(f"{API}/issues/", {"updated_after": since})
    assert [i["summary"] for i in response.json()["results"]] == ["New"]
    naive = (timezone.now() - timedelta(days=4)).replace(tzinfo=None).isoformat()
    response = charlie_api.get(f"{API}/issues/", {"updated_after": naive})
    assert [i["summary"] for i in response.json()["results"]] == ["New", "Old"]


@pytest.mark.parametrize(
    ("params", "field", "text"),
    [
        ({"updated_after": "yesterday"}, "updated_after", "ISO 8601"),
        ({"updated_after": "2026-13-45T00:00:00"}, "updated_after", "ISO 8601"),
        ({"updated_after": "2026-01-31T12:00:00 02:00"}, "updated_after", "%2B"),
        ({"updated_after": "0001-01-01T00:00:00+05:00"}, "updated_after", "ISO 8601"),
        ({"q": 'status:"open'}, "q", "unbalanced"),
        ({"q": "colour:red"}, "q", "unknown field"),
        ({"q": "is:maybe"}, "q", "open or done"),
        ({"q": "updated:>=2026-02-30"}, "q", ""),
        ({"q": "x" * 1001}, "q", "too long"),
        ({"stauts": "Open"}, "stauts", "unknown query parameter"),
        ({"status": ""}, "status", "give a value"),
        ({"summary": "\x00"}, "summary", "unknown query parameter"),
        ({"label": "a\x00b"}, "label", "NUL"),
        ({"q": "crash\x00"}, "q", "NUL"),
    ],
)
def test_it_rejects_a_bad_filter(charlie_api, issue, params, field, text):
    assert_error(charlie_api.get(f"{API}/issues/", params), 400, field, text)


# --- issues: bad input -------------------------------------------------------------------

GOOD_ISSUE = {"project": "BLUE", "summary": "A good summary"}


@pytest.mark.parametrize(
    ("changes_to_body", "field", "text"),
    [
        ({"summary": 5}, "summary", "must be text"),
        ({"summary": None}, "summary", "null"),
        ({"summary": ""}, "summary", "blank"),
        ({"summary": "a\x00b"}, "summary", "null characters"),
        ({"summary": "x" * 256}, "summary", "at most 255"),
        ({"description": ["a"]}, "description", "must be text"),
        ({"type": True}, "type", "must be text"),
        ({"labels": "x"}, "labels", "list"),
        ({"labels": [1]}, "labels", "must be text"),
        ({"labels": ["has space"]}, "labels", "invalid label"),
        ({"labels": ["a\x00"]}, "labels", "null characters"),
        ({"custom_fields": []}, "custom_fields", "dictionary"),
        ({"custom_fields": "x"}, "custom_fields", "dictionary"),
        ({"custom_fields": {"a": {"nested": 1}}}, "custom_fields", "values are text"),
        ({"custom_fields": {"a": "b\x00"}}, "custom_fields", "NUL"),
        ({"custom_fields": {"a\x00": "b"}}, "custom_fields", "NUL"),
        ({"custom_fields": {"a": ["ok", "b\x00"]}}, "custom_fields", "NUL"),
        ({"assignee": 7}, "assignee", "must be text"),
        ({"assignee": "nobody"}, "assignee", "no active user"),
        ({"reporter": "nobody"}, "reporter", "no active user"),
        ({"project": "NOPE"}, "project", "no project"),
        ({"project": 1}, "project", "must be text"),
        ({"project": None}, "project", "null"),
        ({"status": "Sleeping"}, "status", "unknown status"),
        ({"status": None}, "status", "null"),
        ({"priority": "Urgent"}, "priority", "unknown priority"),
        ({"priority": 3}, "priority", "must be text"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"key": "BLUE-7"}, "key", "read-only"),
        ({"id": 7}, "id", "read-only"),
        ({"created": "2020-01-01T00:00:00Z"}, "created", "read-only"),
        ({"updated_by": "alice"}, "updated_by", "read-only"),
        ({"comments": []}, "comments", "read-only"),
        ({"url": "http://x/"}, "url", "read-only"),
    ],
)
def test_it_rejects_a_bad_new_issue(charlie_api, project, changes_to_body, field, text):
    body = {**GOOD_ISSUE, **changes_to_body}
    assert_error(charlie_api.post(f"{API}/issues/", body, format="json"), 400, field, text)
    assert not Issue.objects.exists()


@pytest.mark.parametrize("missing", ["project", "summary"])
def test_it_requires_project_and_summary(charlie_api, project, missing):
    body = {k: v for k, v in GOOD_ISSUE.items() if k != missing}
    assert_error(charlie_api.post(f"{API}/issues/", body, format="json"), 400, missing, "required")


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"project": "RED"}, "project", "read-only"),
        ({"summary": 5}, "summary", "must be text"),
        ({"summary": "  "}, "summary", "blank"),
        ({"status": "Sleeping"}, "status", "unknown status"),
        ({"labels": "x"}, "labels", "list"),
        ({"custom_fields": []}, "custom_fields", "dictionary"),
        ({"assignee": 7}, "assignee", "must be text"),
        ({"number": 3}, "number", "unknown field"),
        ({"updated": "2020-01-01T00:00:00Z"}, "updated", "read-only"),
    ],
)
def test_it_rejects_a_bad_change(charlie_api, issue, body, field, text):
    assert_error(charlie_api.patch(issue_url(issue.key), body, format="json"), 400, field, text)


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "text"),
    [
        ("{", "application/json", 400, "JSON parse error"),
        ('{"summary": NaN}', "application/json", 400, "JSON parse error"),
        ('["summary", "x"]', "application/json", 400, "expected a dictionary"),
        ('"just text"', "application/json", 400, "expected a dictionary"),
        ("null", "application/json", 400, ""),
        ('{"project": "BLUE", "summary": "x", "custom_fields": {"a": 1e400}}', "application/json", 400, "finite"),
        ('{"project": "BLUE", "summary": "x", "custom_fields": {"a": [1, -1e400]}}', "application/json", 400, "finite"),
        ("[" * 100_000 + "]" * 100_000, "application/json", 400, "nested too deeply"),
        ("summary=x&project=BLUE", "application/x-www-form-urlencoded", 415, "unsupported media type"),
        ("<issue/>", "application/xml", 415, "unsupported media type"),
    ],
)
def test_it_rejects_a_body_that_is_not_a_json_object(charlie_api, project, raw, content_type, status, text):
    response = charlie_api.post(f"{API}/issues/", raw, content_type=content_type)
    assert_error(response, status, text=text)
    assert not Issue.objects.exists()


def test_it_refuses_a_body_over_the_size_limit(charlie_api, project, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    body = {**GOOD_ISSUE, "description": "x" * 5000}
    assert_error(charlie_api.post(f"{API}/issues/", body, format="json"), 413, text="too large")
    assert not Issue.objects.exists()


def test_a_failed_change_leaves_the_issue_as_it_was(charlie_api, issue, changes, django_capture_on_commit_callbacks):
    # The labels are rewritten before the bad assignee is found; the whole change must roll back.
    body = {"summary": "Changed", "labels": ["other"], "assignee": "nobody"}
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.patch(issue_url(issue.key), body, format="json")
    assert_error(response, 400, "assignee")
    stored = Issue.objects.get(pk=issue.pk)
    assert (stored.summary, stored.label_names, stored.updated) == ("Crash on start", ["backend"], issue.updated)
    assert changes == []


def test_a_failed_create_uses_up_no_issue_number(charlie_api, issue):
    bad = charlie_api.post(f"{API}/issues/", {**GOOD_ISSUE, "status": "Sleeping"}, format="json")
    assert bad.status_code == 400
    good = charlie_api.post(f"{API}/issues/", GOOD_ISSUE, format="json")
    assert good.json()["key"] == "BLUE-2"
    assert Issue.objects.count() == 2
    assert list(Label.objects.values_list("name", flat=True)) == ["backend"]


# --- comments ----------------------------------------------------------------------------


def test_it_adds_lists_and_shows_comments(charlie_api, issue, changes, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.post(f"{API}/issues/{issue.key}/comments/", {"body": "Me too"}, format="json")
    assert response.status_code == 201, response.content
    created = response.json()
    assert set(created) == {"id", "author", "body", "created", "updated"}
    assert (created["author"], created["body"]) == ("charlie", "Me too")
    assert changes == [(issue.key, "comment_added", "charlie")]

    listed = charlie_api.get(f"{API}/issues/{issue.key}/comments/").json()
    assert listed["count"] == 1 and listed["results"] == [created]
    assert charlie_api.get(comment_url(issue.key, created["id"])).json() == created
    assert Issue.objects.get(pk=issue.pk).updated_by.username == "charlie"


@pytest.fixture
def bobs_comment(issue, bob):
    return actions.add_comment(issue, "Bob was here", actor=bob)


@pytest.fixture
def charlies_comment(issue, charlie):
    return actions.add_comment(issue, "Charlie was here", actor=charlie)


def test_it_lets_the_author_edit_a_comment(charlie_api, charlies_comment, changes, django_capture_on_commit_callbacks):
    url = comment_url("blue-1", charlies_comment.pk)
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.patch(url, {"body": "Charlie was here twice"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["body"] == "Charlie was here twice"
    assert Comment.objects.get(pk=charlies_comment.pk).body == "Charlie was here twice"
    assert changes == [("BLUE-1", "comment_updated", "charlie")]


def test_it_lets_staff_edit_and_delete_anyones_comment(bob_api, charlies_comment):
    url = comment_url("BLUE-1", charlies_comment.pk)
    assert bob_api.patch(url, {"body": "Moderated"}, format="json").status_code == 200
    assert bob_api.delete(url).status_code == 204
    assert not Comment.objects.exists()


def test_it_refuses_changes_to_someone_elses_comment(charlie_api, bobs_comment):
    url = comment_url("BLUE-1", bobs_comment.pk)
    assert_error(charlie_api.patch(url, {"body": "Hijacked"}, format="json"), 403, text="author or staff")
    assert_error(charlie_api.delete(url), 403, text="author or staff")
    assert Comment.objects.get(pk=bobs_comment.pk).body == "Bob was here"
    assert charlie_api.get(url).status_code == 200


def test_it_lets_the_author_delete_a_comment(
    charlie_api, charlies_comment, changes, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.delete(comment_url("BLUE-1", charlies_comment.pk))
    assert response.status_code == 204
    assert not Comment.objects.exists()
    assert changes == [("BLUE-1", "comment_deleted", "charlie")]


def test_it_does_not_find_a_comment_through_another_issue(charlie_api, project, charlies_comment):
    actions.create_issue(project, {"summary": "Other"})
    assert_error(charlie_api.get(comment_url("BLUE-2", charlies_comment.pk)), 404, text="no comment")


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"body": 5}, "body", "must be text"),
        ({"body": ""}, "body", "blank"),
        ({"body": None}, "body", "null"),
        ({}, "body", "required"),
        ({"body": "x", "author": "bob"}, "author", "read-only"),
        ({"body": "x", "issue": "BLUE-2"}, "issue", "unknown field"),
    ],
)
def test_it_rejects_a_bad_comment(charlie_api, issue, body, field, text):
    response = charlie_api.post(f"{API}/issues/{issue.key}/comments/", body, format="json")
    assert_error(response, 400, field, text)
    assert not Comment.objects.exists()


def test_it_refuses_put_on_a_comment(charlie_api, charlies_comment):
    assert_error(charlie_api.put(comment_url("BLUE-1", charlies_comment.pk), {"body": "x"}, format="json"), 405)


# --- attachments -------------------------------------------------------------------------


def test_it_round_trips_an_attachment(charlie_api, issue, changes, django_capture_on_commit_callbacks):
    content = bytes(range(256)) * 1000
    with django_capture_on_commit_callbacks(execute=True):
        response = charlie_api.post(
            f"{API}/issues/{issue.key}/attachments/",
            {"file": upload("Résumé dump.bin", content, "application/octet-stream")},
        )
    assert response.status_code == 201, response.content
    created = response.json()
    assert set(created) == {"id", "filename", "size", "content_type", "sha256", "author", "created", "content_url"}
    assert (created["filename"], created["size"], created["author"]) == ("Résumé dump.bin", len(content), "charlie")
    assert created["sha256"] == hashlib.sha256(content).hexdigest()
    assert created["content_type"] == "application/octet-stream"
    assert changes == [(issue.key, "attachment_added", "charlie")]

    download = charlie_api.get(created["content_url"])
    assert download.status_code == 200
    body = b"".join(download.streaming_content)
    assert hashlib.sha256(body).hexdigest() == created["sha256"]
    assert download["Content-Length"] == str(len(content))
    assert download["Content-Type"] == "application/octet-stream"
    assert download["Content-Disposition"].startswith("attachment;")
    assert "R%C3%A9sum%C3%A9%20dump.bin" in download["Content-Disposition"]
    assert download["X-Content-Type-Options"] == "nosniff"

    assert charlie_api.get(attachment_url(issue.key, created["id"])).json() == created
    assert charlie_api.get(f"{API}/issues/{issue.key}/attachments/").json()["results"] == [created]


def test_it_takes_the_filename_and_type_from_the_form(charlie_api, issue):
    response = charlie_api.post(
        f"{API}/issues/{issue.key}/attachments/",
        {"file": upload("upload.dat", b"<svg/>"), "filename": "../../picture.svg", "content_type": "image/svg+xml"},
    )
    assert response.status_code == 201, response.content
    assert (response.json()["filename"], response.json()["content_type"]) == ("picture.svg", "image/svg+xml")
    download = charlie_api.get(response.json()["content_url"])
    assert download["Content-Type"] == "image/svg+xml"
    assert download["Content-Disposition"] == 'attachment; filename="picture.svg"'
    assert b"".join(download.streaming_content) == b"<svg/>"


def test_it_guesses_the_type_from_the_filename(charlie_api, issue):
    response = charlie_api.post(
        f"{API}/issues/{issue.key}/attachments/", {"file": upload("shot.png", b"\x89PNG", "application/octet-stream")}
    )
    assert response.json()["content_type"] == "image/png"


@pytest.mark.parametrize(
    ("form", "field", "text"),
    [
        ({"file": upload(content=b"")}, "file", "empty"),
        ({}, "file", "no file"),
        ({"file": "not a file"}, "file", "not a file"),
        ({"file": upload(), "filename": "a\r\nSet-Cookie: x=1"}, "filename", "control characters"),
        ({"file": upload(), "filename": ".."}, "filename", "give a file name"),
        ({"file": upload(), "content_type": "text/html\r\nX-Evil: 1"}, "content_type", "media type"),
        ({"file": upload(), "content_type": "nonsense"}, "content_type", "media type"),
        ({"file": upload(), "sha256": "0" * 64}, "sha256", "read-only"),
        ({"file": upload(), "colour": "red"}, "colour", "unknown field"),
        ({"file": [upload("a.txt"), upload("b.txt")]}, "file", "once"),
        ({"file": upload(), "filename": ["a.txt", "b.txt"]}, "filename", "once"),
    ],
)
def test_it_rejects_a_bad_upload(charlie_api, issue, media_root, form, field, text):
    response = charlie_api.post(f"{API}/issues/{issue.key}/attachments/", form)
    assert_error(response, 400, field, text)
    assert not Attachment.objects.exists()


def test_it_rejects_a_json_upload(charlie_api, issue):
    response = charlie_api.post(f"{API}/issues/{issue.key}/attachments/", {"file": "aGVsbG8="}, format="json")
    assert_error(response, 415, text="unsupported media type")


def test_it_rejects_a_file_over_the_limit_and_keeps_nothing(charlie_api, issue, settings, media_root, changes):
    settings.TRACKER_MAX_ATTACHMENT_BYTES = 100
    response = charlie_api.post(f"{API}/issues/{issue.key}/attachments/", {"file": upload(content=b"x" * 101)})
    assert_error(response, 400, "file", "limit is 100")
    assert not Attachment.objects.exists()
    assert not any(path.is_file() for path in media_root.rglob("*"))
    assert changes == []


def test_it_refuses_an_upload_body_far_over_the_limit(charlie_api, issue, settings):
    settings.TRACKER_MAX_ATTACHMENT_BYTES = 100
    response = charlie_api.post(
        f"{API}/issues/{issue.key}/attachments/", {"file": upload(content=b"x" * (1024 * 1024 + 200))}
    )
    assert_error(response, 413, text="too large")
    assert not Attachment.objects.exists()


@pytest.fixture
def bobs_attachment(issue, bob):
    return actions.add_attachment(issue, "bob.txt", upload(content=b"bob's"), actor=bob)


def test_it_lets_the_uploader_delete_an_attachment(
    bob_api, bobs_attachment, media_root, changes, django_capture_on_commit_callbacks
):
    stored = media_root / bobs_attachment.file.name
    assert stored.is_file()
    with django_capture_on_commit_callbacks(execute=True):
        response = bob_api.delete(attachment_url("blue-1", bobs_attachment.pk))
    assert response.status_code == 204
    assert not Attachment.objects.exists()
    assert not stored.exists()
    assert changes == [("BLUE-1", "attachment_removed", "bob")]


def test_it_refuses_to_delete_someone_elses_attachment(charlie_api, alice_api, bobs_attachment):
    url = attachment_url("BLUE-1", bobs_attachment.pk)
    assert_error(charlie_api.delete(url), 403, text="author or staff")
    assert Attachment.objects.filter(pk=bobs_attachment.pk).exists()
    assert alice_api.delete(url).status_code == 204


def test_it_downloads_whatever_the_client_accepts(charlie_api, bobs_attachment):
    response = charlie_api.get(f"{attachment_url('BLUE-1', bobs_attachment.pk)}content/", HTTP_ACCEPT="image/png")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"bob's"


def test_it_answers_404_when_the_stored_file_is_gone(charlie_api, bobs_attachment, media_root):
    (media_root / bobs_attachment.file.name).unlink()
    response = charlie_api.get(f"{attachment_url('BLUE-1', bobs_attachment.pk)}content/")
    assert_error(response, 404, text="missing from storage")


def test_it_serves_a_stored_odd_name_and_type_safely(charlie_api, bobs_attachment):
    # Rows written by the sync bypass the API's checks.
    Attachment.objects.filter(pk=bobs_attachment.pk).update(filename="a\nb.txt", content_type="text/html\nX: y")
    response = charlie_api.get(f"{attachment_url('BLUE-1', bobs_attachment.pk)}content/")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"] == 'attachment; filename="a_b.txt"'
    assert b"".join(response.streaming_content) == b"bob's"


# --- every write tells the sync ----------------------------------------------------------


def test_it_sends_entity_changed_only_after_commit(charlie_api, issue, changes, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = charlie_api.patch(issue_url(issue.key), {"summary": "Renamed"}, format="json")
    assert response.status_code == 200
    assert changes == []
    for callback in callbacks:
        callback()
    assert changes == [(issue.key, "updated", "charlie")]


def test_a_rejected_write_sends_nothing(charlie_api, issue, bobs_comment, changes, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        charlie_api.post(f"{API}/issues/", {"project": "BLUE", "summary": 5}, format="json")
        charlie_api.patch(issue_url(issue.key), {"status": "Sleeping"}, format="json")
        charlie_api.delete(issue_url(issue.key))
        charlie_api.patch(comment_url(issue.key, bobs_comment.pk), {"body": "x"}, format="json")
        charlie_api.post(f"{API}/issues/{issue.key}/attachments/", {"file": upload(content=b"")})
    assert changes == []
