"""The built-in tracker's pages: issue list, detail, forms, comments and attachments.

Every write goes through ``trackers.builtin.actions``; a ValidationError it raises is
shown on the form that was sent.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Model
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from trackers import panels
from trackers.builtin import actions
from trackers.builtin.adapter import issue_queryset
from trackers.builtin.forms import (
    AttachmentForm,
    CommentForm,
    IssueFilterForm,
    IssueForm,
    action_errors_on,
    too_large_message,
)
from trackers.builtin.models import Attachment, Comment, Issue

ISSUES_PER_PAGE = 50
# Room for the multipart boundaries, headers and CSRF token around the file itself.
MULTIPART_OVERHEAD = 64 * 1024

require_form_methods = require_http_methods(["GET", "HEAD", "POST"])


def can_change(user, item: Comment | Attachment) -> bool:
    """Comments and attachments are changed by whoever added them, or by staff."""
    return user.is_staff or (item.author_id is not None and item.author_id == user.pk)


def _key(key: str) -> str:
    """An issue key from a URL, in the stored (upper) case."""
    if "\x00" in key:
        # PostgreSQL refuses NUL in a string rather than finding nothing.
        raise Http404
    return key.upper()


def _issue(key: str, *, full: bool = False) -> Issue:
    queryset = issue_queryset() if full else Issue.objects.select_related("project")
    return get_object_or_404(queryset, key=_key(key))


def _child(model: type[Model], request: HttpRequest, key: str, pk: int) -> Any:
    """A comment or attachment of issue ``key`` that the user may change."""
    item = get_object_or_404(model.objects.select_related("issue"), pk=pk, issue__key=_key(key))
    if not can_change(request.user, item):
        raise PermissionDenied
    return item


def _to_issue(issue: Issue, anchor: str = "") -> HttpResponse:
    return redirect(reverse("builtin:issue-detail", args=[issue.key]) + anchor)


def _display(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_display(item) for item in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _render_detail(request: HttpRequest, issue: Issue, **forms_in_error) -> HttpResponse:
    comments = list(issue.comments.all())
    attachments = list(issue.attachments.all())
    for item in (*comments, *attachments):
        item.can_change = can_change(request.user, item)
    context = {
        "issue": issue,
        "comments": comments,
        "attachments": attachments,
        "custom_fields": [(name, _display(value)) for name, value in sorted(issue.custom_fields.items())],
        "comment_form": CommentForm(),
        "attachment_form": AttachmentForm(),
        "panels": panels.render_all(request, issue.key),
        **forms_in_error,
    }
    return render(request, "trackers/issue_detail.html", context)


# --- issues ------------------------------------------------------------------------------


@login_required
@require_safe
def issue_list(request: HttpRequest) -> HttpResponse:
    form = IssueFilterForm(request.GET)
    issues = form.search(
        Issue.objects.select_related("project", "status", "priority", "assignee").prefetch_related("labels")
    )
    page = None if issues is None else Paginator(issues, ISSUES_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "trackers/issue_list.html", {"form": form, "page": page})


@login_required
@require_safe
def issue_detail(request: HttpRequest, key: str) -> HttpResponse:
    try:
        issue = _issue(key, full=True)
    except Http404:
        elsewhere = panels.page_elsewhere(key)
        if elsewhere:
            return redirect(elsewhere)
        raise
    return _render_detail(request, issue)


@login_required
@require_form_methods
def issue_create(request: HttpRequest) -> HttpResponse:
    initial = {"project": request.GET.get("project", "").upper()}
    form = IssueForm(request.POST if request.method == "POST" else None, initial=initial)
    if form.is_bound and form.is_valid():
        with action_errors_on(form):
            issue = actions.create_issue(form.cleaned_data["project"], form.action_fields(), actor=request.user)
            messages.success(request, f"Created {issue.key}.")
            return _to_issue(issue)
    return render(request, "trackers/issue_form.html", {"form": form, "issue": None})


@login_required
@require_form_methods
def issue_edit(request: HttpRequest, key: str) -> HttpResponse:
    issue = _issue(key, full=True)
    form = IssueForm(request.POST if request.method == "POST" else None, issue=issue)
    if form.is_bound and form.is_valid():
        with action_errors_on(form):
            changed = actions.update_issue(issue, form.action_fields(), actor=request.user)
            messages.success(request, f"Saved {issue.key}." if changed else "Nothing changed.")
            return _to_issue(issue)
    return render(request, "trackers/issue_form.html", {"form": form, "issue": issue})


@login_required
@require_form_methods
def issue_delete(request: HttpRequest, key: str) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied
    issue = _issue(key)
    if request.method == "POST":
        actions.delete_issue(issue, actor=request.user)
        messages.success(request, f"Deleted {issue.key}.")
        return redirect("builtin:issue-list")
    context = {"issue": issue, "comments": issue.comments.count(), "attachments": issue.attachments.count()}
    return render(request, "trackers/issue_confirm_delete.html", context)


# --- comments ----------------------------------------------------------------------------


@login_required
@require_POST
def comment_add(request: HttpRequest, key: str) -> HttpResponse:
    issue = _issue(key, full=True)
    form = CommentForm(request.POST)
    if form.is_valid():
        with action_errors_on(form):
            comment = actions.add_comment(issue, form.cleaned_data["body"], actor=request.user)
            messages.success(request, "Comment added.")
            return _to_issue(issue, f"#comment-{comment.pk}")
    return _render_detail(request, issue, comment_form=form)


@login_required
@require_form_methods
def comment_edit(request: HttpRequest, key: str, comment_id: int) -> HttpResponse:
    comment = _child(Comment, request, key, comment_id)
    form = CommentForm(request.POST if request.method == "POST" else None, initial={"body": comment.body})
    if form.is_bound and form.is_valid():
        with action_errors_on(form):
            actions.edit_comment(comment, form.cleaned_data["body"], actor=request.user)
            messages.success(request, "Comment saved.")
            return _to_issue(comment.issue, f"#comment-{comment.pk}")
    return render(request, "trackers/comment_form.html", {"issue": comment.issue, "comment": comment, "form": form})


@login_required
@require_POST
def comment_delete(request: HttpRequest, key: str, comment_id: int) -> HttpResponse:
    comment = _child(Comment, request, key, comment_id)
    actions.delete_comment(comment, actor=request.user)
    messages.success(request, "Comment deleted.")
    return _to_issue(comment.issue, "#comments")


# --- attachments -------------------------------------------------------------------------


def _declared_length(request: HttpRequest) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


@csrf_exempt
@login_required
@require_POST
def attachment_add(request: HttpRequest, key: str) -> HttpResponse:
    """Refuse a body over the limit before reading it; the CSRF check follows in ``_attachment_add``."""
    # CsrfViewMiddleware reads request.POST, which would receive (and spool) the whole upload first.
    issue = _issue(key)
    limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
    length = _declared_length(request)
    if length > limit + MULTIPART_OVERHEAD:
        messages.error(request, too_large_message(length, limit))
        return _to_issue(issue, "#attachments")
    return _attachment_add(request, issue)


@csrf_protect
def _attachment_add(request: HttpRequest, issue: Issue) -> HttpResponse:
    form = AttachmentForm(request.POST, request.FILES)
    if form.is_valid():
        upload = form.cleaned_data["file"]
        with action_errors_on(form):
            actions.add_attachment(issue, upload.name, upload, upload.content_type, actor=request.user)
            messages.success(request, f"Attached {upload.name}.")
            return _to_issue(issue, "#attachments")
    return _render_detail(request, _issue(issue.key, full=True), attachment_form=form)


@login_required
@require_safe
def attachment_download(request: HttpRequest, key: str, attachment_id: int) -> FileResponse:
    attachment = get_object_or_404(Attachment, pk=attachment_id, issue__key=_key(key))
    try:
        content = attachment.file.open("rb")
    except FileNotFoundError:
        raise Http404("The attachment's file is missing from storage.") from None
    response = FileResponse(
        content, as_attachment=True, filename=attachment.filename, content_type=attachment.content_type
    )
    response["X-Content-Type-Options"] = "nosniff"
    return response


@login_required
@require_POST
def attachment_delete(request: HttpRequest, key: str, attachment_id: int) -> HttpResponse:
    attachment = _child(Attachment, request, key, attachment_id)
    actions.remove_attachment(attachment, actor=request.user)
    messages.success(request, f"Removed {attachment.filename}.")
    return _to_issue(attachment.issue, "#attachments")
