"""The built-in tracker's pages: what a person sees and can do in the browser."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import SimpleLazyObject

from exalate_web.views import server_error
from trackers.builtin import actions
from trackers.builtin.models import Attachment, Comment, Issue, Project

pytestmark = pytest.mark.django_db

LIST = reverse("builtin:issue-list")


def _url(name: str, *args) -> str:
    return reverse(f"builtin:{name}", args=args)


def _issue(project, actor=None, **fields) -> Issue:
    fields.setdefault("summary", "Something is broken")
    return actions.create_issue(project, fields, actor=actor)


def _messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


@pytest.fixture
def issue(project, alice):
    return _issue(project, alice, description="First line\nsecond line", labels=["backend"])


# --- login ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "name", "args"),
    [
        ("get", "issue-list", ()),
        ("get", "issue-create", ()),
        ("get", "issue-detail", ("BLUE-1",)),
        ("get", "issue-edit", ("BLUE-1",)),
        ("post", "comment-add", ("BLUE-1",)),
        ("post", "attachment-add", ("BLUE-1",)),
        ("get", "attachment-download", ("BLUE-1", 1)),
    ],
)
def test_it_sends_anonymous_users_to_the_login_page(client, issue, method, name, args):
    url = _url(name, *args)
    response = getattr(client, method)(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"
    assert issue.comments.count() == 0


def test_it_logs_in_and_lands_on_the_home_page(client, alice, settings):
    settings.NODE_NAME = "Blue node"
    page = client.get(reverse("login"))
    assert page.status_code == 200
    assert b"Blue node" in page.content
    response = client.post(reverse("login"), {"username": "alice", "password": "password-alice"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("home")
    assert b"Log out" in response.content


def test_it_says_why_a_login_failed(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "wrong"})
    assert response.status_code == 200
    assert b"enter a correct username and password" in response.content


def test_it_shows_the_admin_link_only_to_staff(client, alice, charlie):
    admin = reverse("admin:index").encode()
    client.force_login(charlie)
    assert admin not in client.get(LIST).content
    client.force_login(alice)
    assert admin in client.get(LIST).content


# --- the list ------------------------------------------------------------------------------


def test_it_lists_issues_newest_first(as_alice, project, alice):
    older = _issue(project, summary="Older one", assignee="alice", priority="High")
    newer = _issue(project, summary="Newer one")
    Issue.objects.filter(pk=older.pk).update(updated=timezone.now() - timedelta(days=1))
    response = as_alice.get(LIST)
    assert response.status_code == 200
    assert [i.key for i in response.context["page"].object_list] == [newer.key, older.key]
    content = response.content.decode()
    assert "Newer one" in content and "Older one" in content and "High" in content and "Alice" in content


def test_it_searches_with_the_query_language(as_alice, project):
    _issue(project, summary="Crash on start", labels=["backend"])
    _issue(project, summary="Crash on exit", labels=["wontfix"])
    _issue(project, summary="Slow search")
    response = as_alice.get(LIST, {"q": "crash -label:wontfix"})
    assert [i.summary for i in response.context["page"].object_list] == ["Crash on start"]


def test_it_combines_the_filters_with_the_search(as_alice, project, bob):
    other = Project.objects.create(key="RED", name="Red project")
    wanted = _issue(project, summary="Crash A", status="In Progress", priority="High", assignee="bob", labels=["ui"])
    _issue(project, summary="Crash B", status="In Progress", priority="High", assignee="bob")
    _issue(other, summary="Crash C", status="In Progress", priority="High", assignee="bob", labels=["ui"])
    _issue(project, summary="Other D", status="In Progress", priority="High", assignee="bob", labels=["ui"])
    filters = {"project": "BLUE", "status": "In Progress", "priority": "High", "assignee": "bob", "label": "ui"}
    response = as_alice.get(LIST, {"q": "crash", **filters})
    assert [i.key for i in response.context["page"].object_list] == [wanted.key]
    assert b'<option value="In Progress" selected>' in response.content


def test_it_filters_on_unassigned_and_no_priority(as_alice, project):
    bare = _issue(project, priority=None)
    _issue(project, assignee="alice", priority="Low")
    response = as_alice.get(LIST, {"assignee": "none", "priority": "none"})
    assert [i.key for i in response.context["page"].object_list] == [bare.key]


def test_it_keeps_an_unknown_filter_value_and_finds_nothing(as_alice, project):
    _issue(project)
    response = as_alice.get(LIST, {"status": "Nonsense"})
    assert response.status_code == 200
    assert b'<option value="Nonsense" selected>' in response.content
    assert b"No issues match this search." in response.content


def test_it_sorts_by_key_and_by_priority(as_alice, project):
    issues = [_issue(project, priority=name) for name in ("Low", "Highest", None, "Medium")]
    for number in range(5, 11):
        _issue(project, summary=f"Filler {number}")
    by_key = as_alice.get(LIST, {"sort": "key"})
    keys = [i.key for i in by_key.context["page"].object_list]
    assert keys[:3] == ["BLUE-1", "BLUE-2", "BLUE-3"] and keys[-1] == "BLUE-10"
    by_priority = as_alice.get(LIST, {"sort": "-priority", "q": "-priority:Medium"})
    found = [i.key for i in by_priority.context["page"].object_list]
    assert found[:2] == [issues[1].key, issues[0].key]
    assert found[-1] == issues[2].key


def test_it_pages_fifty_issues_at_a_time(as_alice, project):
    for number in range(51):
        _issue(project, summary=f"Issue {number}")
    first = as_alice.get(LIST)
    assert len(first.context["page"].object_list) == 50
    assert b"page 1 of 2" in first.content
    assert b'rel="next"' in first.content
    second = as_alice.get(LIST, {"page": "2"})
    assert [i.summary for i in second.context["page"].object_list] == ["Issue 0"]


@pytest.mark.parametrize(("page", "expected"), [("abc", 1), ("999", 2), ("-1", 2), ("", 1)])
def test_it_handles_bad_page_numbers(as_alice, project, page, expected):
    for number in range(51):
        _issue(project, summary=f"Issue {number}")
    response = as_alice.get(LIST, {"page": page})
    assert response.status_code == 200
    assert response.context["page"].number == expected


def test_it_says_when_there_are_no_issues_yet(as_alice, project):
    response = as_alice.get(LIST)
    assert b"No issues yet." in response.content


def test_it_says_when_nothing_matches(as_alice, project):
    _issue(project)
    response = as_alice.get(LIST, {"q": "nothing-like-this"})
    assert b"No issues match this search." in response.content


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("colour:red", "unknown field &#x27;colour&#x27;"),
        ('status:"open', "unbalanced double quote"),
        ("is:maybe", "is: expected open or done"),
        ("updated:>=yesterday", "updated: expected a date"),
        ("a\x00b", "Null characters are not allowed."),
    ],
)
def test_it_shows_a_query_error_on_the_page(as_alice, project, query, message):
    _issue(project)
    response = as_alice.get(LIST, {"q": query})
    assert response.status_code == 200
    assert message in response.content.decode()
    assert response.context["page"] is None


def test_it_refuses_an_unknown_sort_order_politely(as_alice, project):
    response = as_alice.get(LIST, {"sort": "password"})
    assert response.status_code == 200
    assert b"Select a valid choice." in response.content


def test_it_lists_issues_in_a_bounded_number_of_queries(
    as_alice, project, alice, bob, charlie, django_assert_max_num_queries
):
    for number in range(60):
        assignee = [alice, bob, charlie][number % 3]
        issue = _issue(project, summary=f"Issue {number}", assignee=assignee, labels=["a", f"l{number}"])
        actions.add_comment(issue, "hello", actor=alice)
    # Session, user, vocabularies for the selects, count, page, labels: never one per issue.
    with django_assert_max_num_queries(10):
        response = as_alice.get(LIST)
    assert len(response.context["page"].object_list) == 50


# --- the issue page ------------------------------------------------------------------------


def test_it_shows_an_issue_with_everything_on_it(as_alice, issue, alice, charlie):
    actions.update_issue(issue, {"custom_fields": {"Severity": "S2", "Browsers": ["Firefox", "Chrome"]}}, actor=alice)
    comment = actions.add_comment(issue, "Seen it too.\nTwice.", actor=charlie)
    actions.edit_comment(comment, "Seen it too.\nThree times.", actor=charlie)
    actions.add_attachment(issue, "log.txt", SimpleUploadedFile("log.txt", b"x" * 2048), "text/plain", actor=alice)
    response = as_alice.get(_url("issue-detail", issue.key))
    assert response.status_code == 200
    content = response.content.decode()
    for text in (
        "BLUE-1",
        "Something is broken",
        "First line\nsecond line",
        "backend",
        "Open",
        "Medium",
        "Severity",
        "Firefox, Chrome",
        "Seen it too.\nThree times.",
        "(edited)",
        "Charlie",
        "log.txt",
        "2.0\xa0KB",
        Attachment.objects.get().sha256[:12],
        _url("attachment-download", issue.key, Attachment.objects.get().pk),
        "Up to 25.0\xa0MB.",
    ):
        assert text in content, text


def test_it_shows_an_issue_in_a_bounded_number_of_queries(
    as_alice, issue, alice, charlie, django_assert_max_num_queries
):
    for number in range(10):
        actions.add_comment(issue, f"Comment {number}", actor=[alice, charlie][number % 2])
        upload = SimpleUploadedFile(f"{number}.txt", b"x")
        actions.add_attachment(issue, upload.name, upload, "text/plain", actor=[alice, charlie][number % 2])
    # Session, user, the issue with its joins, labels, comments, attachments; the sync panel's
    # twins and connections.
    with django_assert_max_num_queries(8):
        response = as_alice.get(_url("issue-detail", issue.key))
    assert len(response.context["comments"]) == 10


def test_it_finds_an_issue_whatever_the_case_of_its_key(as_alice, issue):
    response = as_alice.get(_url("issue-detail", "blue-1"))
    assert response.status_code == 200
    assert response.context["issue"] == issue


@pytest.mark.parametrize(
    "url",
    [
        "/issues/BLUE-99/",
        "/issues/NOPE/",
        "/issues/BLUE%001/",
        "/issues/BLUE-99/edit/",
        "/issues/BLUE-1/comments/999/edit/",
        "/issues/BLUE-1/attachments/999/download/",
        "/issues/BLUE-1/attachments/99999999999999999999/download/",
    ],
)
def test_it_shows_the_404_page_for_unknown_things(as_alice, issue, url):
    response = as_alice.get(url)
    assert response.status_code == 404
    assert b"Not found." in response.content
    assert b"<html" in response.content


def test_it_does_not_find_a_comment_through_another_issue(as_alice, project, issue, alice):
    other = _issue(project)
    comment = actions.add_comment(other, "elsewhere", actor=alice)
    response = as_alice.get(_url("comment-edit", issue.key, comment.pk))
    assert response.status_code == 404


def test_it_escapes_html_everywhere(as_alice, project, alice):
    evil = "<script>alert(1)</script>"
    issue = _issue(project, alice, summary=f"Boom {evil}", description=evil, labels=["<b>"])
    actions.add_comment(issue, f"Look {evil}", actor=alice)
    actions.add_attachment(issue, f"{evil}.txt", SimpleUploadedFile("x", b"x"), "text/plain", actor=alice)
    for url in (LIST, _url("issue-detail", issue.key), _url("issue-edit", issue.key)):
        content = as_alice.get(url).content.decode()
        assert evil not in content, url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content, url


def test_it_renders_the_500_page_without_touching_the_user(rf):
    # A 500 may be the database failing; the page must not need it.
    request = rf.get("/issues/")
    request.user = SimpleLazyObject(lambda: pytest.fail("the 500 page looked up the user"))
    response = server_error(request)
    assert response.status_code == 500
    assert b"Internal error" in response.content


# --- create, edit, delete ------------------------------------------------------------------


def test_it_creates_an_issue(as_alice, project, alice, bob):
    response = as_alice.post(
        _url("issue-create"),
        {
            "project": "BLUE",
            "summary": "  New thing  ",
            "type": "Bug",
            "status": "In Progress",
            "priority": "High",
            "assignee": "bob",
            "labels": "backend, ui  api",
            "description": "Line one\r\nLine two",
        },
        follow=True,
    )
    issue = Issue.objects.get()
    assert response.redirect_chain == [(_url("issue-detail", issue.key), 302)]
    assert _messages(response) == ["Created BLUE-1."]
    assert (issue.summary, issue.type, issue.status.name) == ("New thing", "Bug", "In Progress")
    assert issue.priority.name == "High"
    assert (issue.assignee, issue.reporter, issue.updated_by) == (bob, alice, alice)
    assert issue.label_names == ["api", "backend", "ui"]
    assert issue.description == "Line one\nLine two"


def test_it_offers_sensible_defaults_on_the_create_form(as_alice, project):
    response = as_alice.get(_url("issue-create"), {"project": "blue"})
    assert response.status_code == 200
    content = response.content.decode()
    assert '<option value="BLUE" selected>' in content
    assert '<option value="Medium" selected>' in content
    assert 'value="Task"' in content


def test_it_explains_that_a_project_is_needed_first(as_alice, db):
    response = as_alice.get(_url("issue-create"))
    assert b"There are no projects yet." in response.content
    assert reverse("admin:builtin_project_add").encode() in response.content


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"summary": "   "}, "summary", "This field is required."),
        ({"labels": "x" * 51}, "labels", "Invalid label"),
        ({"status": "Nope"}, "status", "Select a valid choice."),
        ({"project": "RED"}, "project", "Select a valid choice."),
        ({"assignee": "ghost"}, "assignee", "Select a valid choice."),
    ],
)
def test_it_shows_errors_on_the_create_form(as_alice, project, change, field, message):
    data = {"project": "BLUE", "summary": "Fine", "type": "Task", "status": "Open", "priority": "", **change}
    response = as_alice.post(_url("issue-create"), data)
    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert message in response.content.decode()
    assert not Issue.objects.exists()


def test_it_edits_an_issue(as_alice, issue, bob):
    page = as_alice.get(_url("issue-edit", issue.key))
    assert page.status_code == 200
    assert 'value="backend"' in page.content.decode()
    data = {
        "summary": "Edited",
        "type": "Task",
        "status": "Resolved",
        "priority": "",
        "assignee": "bob",
        "labels": "backend frontend",
        "description": "First line\r\nsecond line",
        "project": "IGNORED",
    }
    response = as_alice.post(_url("issue-edit", "blue-1"), data, follow=True)
    assert _messages(response) == ["Saved BLUE-1."]
    issue.refresh_from_db()
    assert (issue.summary, issue.status.name, issue.priority, issue.assignee) == ("Edited", "Resolved", None, bob)
    assert issue.label_names == ["backend", "frontend"]
    assert issue.project.key == "BLUE"


def test_it_says_when_an_edit_changed_nothing(as_alice, issue):
    data = {
        "summary": issue.summary,
        "type": issue.type,
        "status": "Open",
        "priority": "Medium",
        "assignee": "",
        "labels": "backend",
        "description": "First line\r\nsecond line",
    }
    updated = issue.updated
    response = as_alice.post(_url("issue-edit", issue.key), data, follow=True)
    assert _messages(response) == ["Nothing changed."]
    issue.refresh_from_db()
    assert issue.updated == updated


def test_it_shows_errors_on_the_edit_form(as_alice, issue):
    data = {"summary": "", "type": "Task", "status": "Open"}
    response = as_alice.post(_url("issue-edit", issue.key), data)
    assert response.status_code == 200
    assert "This field is required." in response.context["form"].errors["summary"]
    issue.refresh_from_db()
    assert issue.summary == "Something is broken"


def test_it_lets_staff_delete_an_issue_after_confirming(client, bob, issue):
    client.force_login(bob)
    confirm = client.get(_url("issue-delete", issue.key))
    assert confirm.status_code == 200
    assert b"It cannot be undone." in confirm.content
    assert Issue.objects.filter(pk=issue.pk).exists()
    response = client.post(_url("issue-delete", issue.key), follow=True)
    assert response.redirect_chain == [(LIST, 302)]
    assert _messages(response) == ["Deleted BLUE-1."]
    assert not Issue.objects.filter(pk=issue.pk).exists()


def test_it_does_not_let_charlie_delete_an_issue(as_charlie, issue):
    assert as_charlie.get(_url("issue-delete", issue.key)).status_code == 403
    response = as_charlie.post(_url("issue-delete", issue.key))
    assert response.status_code == 403
    assert b"You do not have permission" in response.content
    assert Issue.objects.filter(pk=issue.pk).exists()
    assert _url("issue-delete", issue.key).encode() not in as_charlie.get(_url("issue-detail", issue.key)).content


# --- comments ------------------------------------------------------------------------------


def test_it_adds_a_comment(as_charlie, issue, charlie):
    response = as_charlie.post(_url("comment-add", issue.key), {"body": "Me too\r\nreally"}, follow=True)
    comment = Comment.objects.get()
    assert response.redirect_chain == [(_url("issue-detail", issue.key) + f"#comment-{comment.pk}", 302)]
    assert _messages(response) == ["Comment added."]
    assert (comment.author, comment.body) == (charlie, "Me too\nreally")


@pytest.mark.parametrize("body", ["", "   \n  "])
def test_it_refuses_a_blank_comment(as_charlie, issue, body):
    response = as_charlie.post(_url("comment-add", issue.key), {"body": body})
    assert response.status_code == 200
    assert response.context["comment_form"].errors["body"]
    assert b"Something is broken" in response.content
    assert not Comment.objects.exists()


def test_it_lets_the_author_edit_and_delete_a_comment(as_charlie, issue, charlie):
    comment = actions.add_comment(issue, "Frist", actor=charlie)
    edit = _url("comment-edit", issue.key, comment.pk)
    assert b"Frist" in as_charlie.get(edit).content
    response = as_charlie.post(edit, {"body": "First"}, follow=True)
    assert _messages(response) == ["Comment saved."]
    comment.refresh_from_db()
    assert comment.body == "First"
    assert b"(edited)" in response.content
    response = as_charlie.post(_url("comment-delete", issue.key, comment.pk), follow=True)
    assert _messages(response) == ["Comment deleted."]
    assert not Comment.objects.exists()


def test_it_does_not_let_charlie_edit_or_delete_alices_comment(as_charlie, issue, alice):
    comment = actions.add_comment(issue, "Mine", actor=alice)
    edit = _url("comment-edit", issue.key, comment.pk)
    assert as_charlie.get(edit).status_code == 403
    assert as_charlie.post(edit, {"body": "Hijacked"}).status_code == 403
    assert as_charlie.post(_url("comment-delete", issue.key, comment.pk)).status_code == 403
    comment.refresh_from_db()
    assert comment.body == "Mine"
    assert edit.encode() not in as_charlie.get(_url("issue-detail", issue.key)).content


def test_it_lets_staff_edit_anyones_comment(client, bob, issue, charlie):
    comment = actions.add_comment(issue, "Typo", actor=charlie)
    client.force_login(bob)
    client.post(_url("comment-edit", issue.key, comment.pk), {"body": "Fixed"})
    comment.refresh_from_db()
    assert comment.body == "Fixed"


def test_it_shows_errors_on_the_comment_edit_form(as_charlie, issue, charlie):
    comment = actions.add_comment(issue, "Keep", actor=charlie)
    response = as_charlie.post(_url("comment-edit", issue.key, comment.pk), {"body": " "})
    assert response.status_code == 200
    assert "This field may not be blank." in response.context["form"].errors["body"]
    comment.refresh_from_db()
    assert comment.body == "Keep"


# --- attachments ---------------------------------------------------------------------------


def test_it_uploads_downloads_and_deletes_an_attachment(
    as_charlie, issue, charlie, media_root, django_capture_on_commit_callbacks
):
    content = "héllo\n".encode() * 100
    upload = SimpleUploadedFile("../../résumé notes.txt", content, content_type="text/plain")
    response = as_charlie.post(_url("attachment-add", issue.key), {"file": upload}, follow=True)
    attachment = Attachment.objects.get()
    assert _messages(response) == ["Attached résumé notes.txt."]
    assert (attachment.filename, attachment.size, attachment.author) == ("résumé notes.txt", len(content), charlie)

    download = as_charlie.get(_url("attachment-download", issue.key, attachment.pk))
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == content
    assert download["Content-Disposition"].startswith("attachment;")
    assert "r%C3%A9sum%C3%A9%20notes.txt" in download["Content-Disposition"]
    assert download["X-Content-Type-Options"] == "nosniff"

    stored = media_root / attachment.file.name
    assert stored.exists()
    with django_capture_on_commit_callbacks(execute=True):
        response = as_charlie.post(_url("attachment-delete", issue.key, attachment.pk), follow=True)
    assert _messages(response) == ["Removed résumé notes.txt."]
    assert not Attachment.objects.exists()
    assert not stored.exists()


def test_it_does_not_let_charlie_delete_alices_attachment(as_charlie, issue, alice):
    attachment = actions.add_attachment(issue, "a.txt", SimpleUploadedFile("a.txt", b"a"), "text/plain", actor=alice)
    assert as_charlie.post(_url("attachment-delete", issue.key, attachment.pk)).status_code == 403
    assert Attachment.objects.filter(pk=attachment.pk).exists()


def test_it_rejects_an_upload_over_the_limit_with_a_message(as_charlie, issue, settings):
    settings.TRACKER_MAX_ATTACHMENT_BYTES = 100
    upload = SimpleUploadedFile("big.bin", b"x" * 101)
    response = as_charlie.post(_url("attachment-add", issue.key), {"file": upload})
    assert response.status_code == 200
    assert "The file is too large (101\xa0bytes); the limit is 100\xa0bytes." in response.content.decode()
    assert not Attachment.objects.exists()


def test_it_refuses_a_huge_body_before_reading_it(as_charlie, issue, settings):
    settings.TRACKER_MAX_ATTACHMENT_BYTES = 100
    upload = SimpleUploadedFile("huge.bin", b"x" * 200_000)
    response = as_charlie.post(_url("attachment-add", issue.key), {"file": upload}, follow=True)
    assert response.redirect_chain == [(_url("issue-detail", issue.key) + "#attachments", 302)]
    assert "the limit is 100\xa0bytes" in _messages(response)[0]
    assert not Attachment.objects.exists()


def test_it_asks_for_a_file(as_charlie, issue):
    response = as_charlie.post(_url("attachment-add", issue.key), {})
    assert response.status_code == 200
    assert "This field is required." in response.context["attachment_form"].errors["file"]


def test_it_checks_csrf_on_uploads(charlie, issue):
    client = Client(enforce_csrf_checks=True)
    client.force_login(charlie)
    response = client.post(_url("attachment-add", issue.key), {"file": SimpleUploadedFile("a.txt", b"a")})
    assert response.status_code == 403
    assert not Attachment.objects.exists()


def test_it_answers_404_when_the_stored_file_is_gone(as_charlie, issue, charlie, media_root):
    attachment = actions.add_attachment(issue, "a.txt", SimpleUploadedFile("a.txt", b"a"), "text/plain", actor=charlie)
    (media_root / attachment.file.name).unlink()
    response = as_charlie.get(_url("attachment-download", issue.key, attachment.pk))
    assert response.status_code == 404


# --- methods -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("comment-add", ("BLUE-1",)),
        ("comment-delete", ("BLUE-1", 1)),
        ("attachment-add", ("BLUE-1",)),
        ("attachment-delete", ("BLUE-1", 1)),
    ],
)
def test_it_accepts_only_post_on_write_endpoints(as_alice, issue, name, args):
    assert as_alice.get(_url(name, *args)).status_code == 405


def test_it_refuses_writes_to_read_only_pages(as_alice, issue):
    assert as_alice.post(LIST).status_code == 405
    assert as_alice.post(_url("issue-detail", issue.key)).status_code == 405
    assert as_alice.put(_url("issue-edit", issue.key)).status_code == 405
