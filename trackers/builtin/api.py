"""The built-in tracker's REST API: thin views over the serializers and ``actions``.

Routes are in ``api_urls.py``. Every list is a page of ``exalate_web.api.Pagination``;
every error is ``exalate_web.api``'s JSON error shape.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cached_property

from django.core.exceptions import ObjectDoesNotExist
from django.db.models import QuerySet
from django.http import FileResponse, QueryDict
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import generics
from rest_framework.exceptions import MethodNotAllowed, NotFound, ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import SAFE_METHODS, BasePermission, IsAuthenticated

from exalate_web.parsers import JSONBodyParser
from trackers.builtin import actions, query
from trackers.builtin.adapter import issue_queryset
from trackers.builtin.models import Issue, Priority, Project, Status
from trackers.builtin.serializers import (
    CONTENT_TYPE_PATTERN,
    CONTROL_CHARACTERS,
    AttachmentSerializer,
    CommentSerializer,
    IssueSerializer,
    IssueSummarySerializer,
    PrioritySerializer,
    ProjectSerializer,
    StatusSerializer,
)

ISSUE_FILTERS = ("project", "status", "priority", "type", "assignee", "reporter", "label")
ISSUE_LIST_PARAMETERS = (*ISSUE_FILTERS, "updated_after", "q", "page", "page_size")


# --- permissions -------------------------------------------------------------------------


class IsStaffToCreate(BasePermission):
    message = "Only staff may create projects."

    def has_permission(self, request, view) -> bool:
        return request.method in SAFE_METHODS or request.user.is_staff


class IsStaffToDelete(BasePermission):
    message = "Only staff may delete issues."

    def has_permission(self, request, view) -> bool:
        return request.method != "DELETE" or request.user.is_staff


class IsAuthorOrStaffToChange(BasePermission):
    message = "Only its author or staff may change or delete this."

    def has_object_permission(self, request, view, obj) -> bool:
        return request.method in SAFE_METHODS or request.user.is_staff or obj.author_id == request.user.pk


# --- shared view parts -------------------------------------------------------------------


class NoPut:
    """Changes are PATCHes of the given fields; a PUT would suggest replacing the whole thing."""

    http_method_names = ["get", "patch", "delete", "head", "options"]

    def http_method_not_allowed(self, request, *args, **kwargs):
        if request.method == "PUT":
            raise MethodNotAllowed("PUT", detail="PUT is not supported: send PATCH with only the fields to change.")
        return super().http_method_not_allowed(request, *args, **kwargs)


def find_issue(key: str, queryset: QuerySet[Issue] | None = None) -> Issue:
    # Project keys are capitals only, so an upper-cased key finds the issue whatever case was typed.
    key = key.upper()
    try:
        return (queryset if queryset is not None else Issue.objects).get(key=key)
    except Issue.DoesNotExist:
        raise NotFound(f"No issue {key}.") from None


class IssueScoped:
    """Views under issues/<key>/: the issue is looked up once, and its absence is a 404."""

    @cached_property
    def issue(self) -> Issue:
        return find_issue(self.kwargs["key"])

    def get_child(self, queryset: QuerySet, noun: str):
        pk = self.kwargs["pk"]
        try:
            child = queryset.get(pk=pk)
        except ObjectDoesNotExist:
            raise NotFound(f"No {noun} {pk} on {self.issue.key}.") from None
        self.check_object_permissions(self.request, child)
        return child


# --- projects and vocabularies -----------------------------------------------------------


class ProjectList(generics.ListCreateAPIView):
    queryset = Project.objects.all()
    serializer_class = ProjectSerializer
    permission_classes = [IsAuthenticated, IsStaffToCreate]
    parser_classes = [JSONBodyParser]


class StatusList(generics.ListAPIView):
    queryset = Status.objects.all()
    serializer_class = StatusSerializer

    def get_serializer_context(self):
        # New issues get the first status; that one is the default.
        default = Status.objects.values_list("pk", flat=True).first()
        return {**super().get_serializer_context(), "default_status_id": default}


class PriorityList(generics.ListAPIView):
    queryset = Priority.objects.all()
    serializer_class = PrioritySerializer


# --- issues ------------------------------------------------------------------------------


def _updated_after(text: str) -> datetime:
    try:
        moment = parse_datetime(text)
        if moment is not None:
            if timezone.is_naive(moment):
                moment = timezone.make_aware(moment, UTC)
            # Near year 1 or 9999 a moment may have no UTC value, and the database compares in UTC.
            moment.astimezone(UTC)
            return moment
    except (ValueError, OverflowError):
        pass
    raise ValidationError(
        {"updated_after": ["Give an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z (a + must be sent as %2B)."]}
    )


def issue_filter_terms(params: QueryDict) -> list[query.Term]:
    """The listing's query parameters as terms of the query language; all of them must match."""
    for name, values in params.lists():
        if name not in ISSUE_LIST_PARAMETERS:
            raise ValidationError({name: [f"Unknown query parameter (known: {', '.join(ISSUE_LIST_PARAMETERS)})."]})
        if any("\x00" in value for value in values):
            raise ValidationError({name: ["Must not contain NUL characters."]})
    terms = []
    for name in ISSUE_FILTERS:
        for value in params.getlist(name):
            if not value.strip():
                raise ValidationError({name: ["Give a value."]})
            terms.append(query.Term(name, value.strip()))
    for value in params.getlist("updated_after"):
        terms.append(query.Term("updated", f">={_updated_after(value).isoformat()}"))
    for value in params.getlist("q"):
        try:
            terms.extend(query.parse(value))
        except query.QueryError as e:
            raise ValidationError({"q": [str(e)]}) from None
    return terms


class IssueList(generics.ListCreateAPIView):
    parser_classes = [JSONBodyParser]

    def get_queryset(self) -> QuerySet[Issue]:
        # A listing shows no comments or attachments, so only the labels are fetched with it.
        issues = issue_queryset().prefetch_related(None).prefetch_related("labels")
        terms = issue_filter_terms(self.request.query_params)
        try:
            return query.filter_issues(issues, terms)
        except ValueError as e:
            # QueryError, or a date that has the right shape but does not exist (2026-02-30).
            raise ValidationError({"q": [str(e)]}) from None

    def paginate_queryset(self, queryset):
        try:
            return super().paginate_queryset(queryset)
        except OverflowError:
            # A query date such as 0001-01-01T00:00+05:00 is valid but has no UTC value to compare with.
            raise ValidationError({"q": ["A date in the query is out of range."]}) from None

    def get_serializer_class(self):
        return IssueSummarySerializer if self.request.method in SAFE_METHODS else IssueSerializer

    def perform_create(self, serializer) -> None:
        serializer.save(actor=self.request.user)


class IssueDetail(NoPut, generics.RetrieveUpdateDestroyAPIView):
    serializer_class = IssueSerializer
    permission_classes = [IsAuthenticated, IsStaffToDelete]
    parser_classes = [JSONBodyParser]

    def get_object(self) -> Issue:
        # A change reads the issue again, locked, and answers with it read in full afterwards
        # (IssueSerializer.update): read in full before as well, it cost a PATCH a third more.
        issue = find_issue(self.kwargs["key"], issue_queryset() if self.request.method in SAFE_METHODS else None)
        self.check_object_permissions(self.request, issue)
        return issue

    def perform_update(self, serializer) -> None:
        serializer.save(actor=self.request.user)

    def perform_destroy(self, issue: Issue) -> None:
        actions.delete_issue(issue, actor=self.request.user)


# --- comments ----------------------------------------------------------------------------


class CommentList(IssueScoped, generics.ListCreateAPIView):
    serializer_class = CommentSerializer
    parser_classes = [JSONBodyParser]

    def get_queryset(self):
        return self.issue.comments.select_related("author")

    def perform_create(self, serializer) -> None:
        serializer.save(issue=self.issue, actor=self.request.user)


class CommentDetail(IssueScoped, NoPut, generics.RetrieveUpdateDestroyAPIView):
    serializer_class = CommentSerializer
    permission_classes = [IsAuthenticated, IsAuthorOrStaffToChange]
    parser_classes = [JSONBodyParser]

    def get_object(self):
        return self.get_child(self.issue.comments.select_related("author", "issue"), "comment")

    def perform_update(self, serializer) -> None:
        serializer.save(actor=self.request.user)

    def perform_destroy(self, comment) -> None:
        actions.delete_comment(comment, actor=self.request.user)


# --- attachments -------------------------------------------------------------------------


class AttachmentList(IssueScoped, generics.ListCreateAPIView):
    serializer_class = AttachmentSerializer
    parser_classes = [MultiPartParser]

    def get_queryset(self):
        return self.issue.attachments.select_related("author")

    def perform_create(self, serializer) -> None:
        serializer.save(issue=self.issue, actor=self.request.user)


class AttachmentDetail(IssueScoped, generics.RetrieveDestroyAPIView):
    serializer_class = AttachmentSerializer
    permission_classes = [IsAuthenticated, IsAuthorOrStaffToChange]

    def get_object(self):
        return self.get_child(self.issue.attachments.select_related("author", "issue"), "attachment")

    def perform_destroy(self, attachment) -> None:
        actions.remove_attachment(attachment, actor=self.request.user)


class AttachmentContent(IssueScoped, generics.GenericAPIView):
    """The stored bytes, as a download that a browser never renders in the page."""

    def perform_content_negotiation(self, request, force=False):
        # The answer is the file whatever the client accepts; only errors are rendered as JSON.
        return super().perform_content_negotiation(request, force=True)

    def get(self, request, *args, **kwargs):
        attachment = self.get_child(self.issue.attachments.all(), "attachment")
        try:
            content = attachment.file.storage.open(attachment.file.name, "rb")
        except FileNotFoundError:
            raise NotFound(f"The content of attachment {attachment.pk} is missing from storage.") from None
        # Rows written by other paths (the sync) may carry values that cannot go into a header.
        content_type = attachment.content_type
        if not CONTENT_TYPE_PATTERN.match(content_type):
            content_type = "application/octet-stream"
        filename = CONTROL_CHARACTERS.sub("_", attachment.filename)
        response = FileResponse(content, as_attachment=True, filename=filename, content_type=content_type)
        response["X-Content-Type-Options"] = "nosniff"
        response["Content-Security-Policy"] = "sandbox"
        return response
