"""Forms of the built-in tracker's pages. They only read input; the writes are ``actions``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models import F, Q, QuerySet
from django.template.defaultfilters import filesizeformat

from trackers.builtin import actions, query
from trackers.builtin.models import Issue, Label, Priority, Project, Status

User = get_user_model()

# value: (label, ordering)
SORTS = {
    "-updated": ("Recently updated", ("-updated", "-id")),
    "updated": ("Least recently updated", ("updated", "id")),
    "key": ("Key", ("project__key", "number")),
    "-key": ("Key, descending", ("-project__key", "-number")),
    "-priority": ("Highest priority", (F("priority__position").desc(nulls_last=True), "-updated", "-id")),
    "priority": ("Lowest priority", (F("priority__position").asc(nulls_first=True), "-updated", "-id")),
}
DEFAULT_SORT = "-updated"
# A select with more labels than this is no help; the search box still takes any label.
MAX_LABEL_CHOICES = 200


def _lf(text: str) -> str:
    # Browsers send CRLF; storing LF keeps an untouched textarea from counting as an edit.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def too_large_message(size: int, limit: int) -> str:
    return f"The file is too large ({filesizeformat(size)}); the limit is {filesizeformat(limit)}."


def add_action_errors(form: forms.Form, error: ValidationError) -> None:
    """Show an action's ValidationError on ``form``: at the field it names, else above the form."""
    if not hasattr(error, "error_dict"):
        form.add_error(None, error.messages)
        return
    aliases = getattr(form, "action_field_aliases", {})
    for name, messages in error.message_dict.items():
        name = aliases.get(name, name)
        if name in form.fields:
            form.add_error(name, messages)
        else:
            form.add_error(None, [f"{name}: {message}" for message in messages])


@contextmanager
def action_errors_on(form: forms.Form) -> Iterator[None]:
    """Run a write; if it raises ValidationError, the messages land on ``form`` and the block is left."""
    try:
        yield
    except ValidationError as error:
        add_action_errors(form, error)


class IssueFilterForm(forms.Form):
    """The issue list's search box, filter selects and sort order (from the query string)."""

    FILTERS = ("project", "status", "priority", "assignee", "label")

    q = forms.CharField(
        required=False,
        label="Search",
        widget=forms.TextInput(
            attrs={"type": "search", "placeholder": 'e.g. status:"In Progress" label:backend -label:wontfix crash'}
        ),
    )
    project = forms.CharField(required=False, widget=forms.Select)
    status = forms.CharField(required=False, widget=forms.Select)
    priority = forms.CharField(required=False, widget=forms.Select)
    assignee = forms.CharField(required=False, widget=forms.Select)
    label = forms.CharField(required=False, widget=forms.Select)
    sort = forms.ChoiceField(required=False, choices=[(value, label) for value, (label, _) in SORTS.items()])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_choices("project", "Any project", [(p.key, str(p)) for p in Project.objects.all()])
        statuses = Status.objects.values_list("name", flat=True)
        self._set_choices("status", "Any status", [(name, name) for name in statuses])
        self._set_choices(
            "priority",
            "Any priority",
            [("none", "No priority"), *((name, name) for name in Priority.objects.values_list("name", flat=True))],
        )
        users = User.objects.filter(is_active=True).order_by("username")
        self._set_choices("assignee", "Anyone", [("none", "Unassigned"), *((u.username, _name(u)) for u in users)])
        labels = Label.objects.order_by("name").values_list("name", flat=True).distinct()[:MAX_LABEL_CHOICES]
        self._set_choices("label", "Any label", [(name, name) for name in labels])

    def _set_choices(self, name: str, anything: str, choices: list[tuple[str, str]]) -> None:
        current = self.data.get(name) if self.is_bound else None
        if current and current not in {value for value, _ in choices}:
            # A value from a bookmarked URL still filters, so the select must show it.
            choices.append((current, current))
        self.fields[name].widget.choices = [("", anything), *choices]

    @property
    def is_filtered(self) -> bool:
        return self.is_bound and any(self.data.get(name) for name in ("q", *self.FILTERS))

    @property
    def current_sort(self) -> str:
        sort = getattr(self, "cleaned_data", {}).get("sort")
        return sort if sort in SORTS else DEFAULT_SORT

    @property
    def current_sort_label(self) -> str:
        return SORTS[self.current_sort][0]

    def search(self, issues: QuerySet[Issue]) -> QuerySet[Issue] | None:
        """``issues`` filtered and ordered; None when the input cannot be read (the reason is in the errors)."""
        if not self.is_valid():
            return None
        data = self.cleaned_data
        try:
            terms = query.parse(data["q"])
            terms += [query.Term(name, data[name]) for name in self.FILTERS if data[name]]
            issues = query.filter_issues(issues, terms)
        except query.QueryError as error:
            self.add_error("q", str(error))
            return None
        return issues.order_by(*SORTS[self.current_sort][1])


def _name(user) -> str:
    return user.get_full_name() or user.get_username()


class UserChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj) -> str:
        return f"{_name(obj)} ({obj.get_username()})"


class IssueForm(forms.Form):
    """Create an issue, or edit one (``issue=``); the project cannot change once created."""

    project = forms.ModelChoiceField(queryset=Project.objects.all(), to_field_name="key", empty_label=None)
    summary = forms.CharField(max_length=255)
    type = forms.CharField(max_length=40, initial="Task", help_text="Task, Bug, Story, ...")
    status = forms.ModelChoiceField(queryset=Status.objects.all(), to_field_name="name", empty_label=None)
    priority = forms.ModelChoiceField(
        queryset=Priority.objects.all(), to_field_name="name", required=False, empty_label="No priority"
    )
    assignee = UserChoiceField(
        queryset=User.objects.none(), to_field_name="username", required=False, empty_label="Unassigned"
    )
    labels = forms.CharField(required=False, help_text="Separated by spaces or commas, e.g. backend ui.")
    description = forms.CharField(
        required=False, strip=False, max_length=actions.MAX_DESCRIPTION, widget=forms.Textarea(attrs={"rows": 12})
    )

    def __init__(self, *args, issue: Issue | None = None, **kwargs):
        if issue is not None:
            kwargs["initial"] = {
                "project": issue.project,
                "summary": issue.summary,
                "type": issue.type,
                "status": issue.status,
                "priority": issue.priority,
                "assignee": issue.assignee,
                "labels": " ".join(issue.label_names),
                "description": issue.description,
                **kwargs.get("initial", {}),
            }
        super().__init__(*args, **kwargs)
        users = Q(is_active=True)
        if issue is None:
            self.fields["priority"].initial = Priority.objects.filter(is_default=True).first()
        else:
            self.fields["project"].disabled = True
            self.fields["project"].help_text = "An issue stays in its project."
            if issue.assignee_id:
                # Keep a deactivated assignee selectable, or saving would silently unassign.
                users |= Q(pk=issue.assignee_id)
        self.fields["assignee"].queryset = User.objects.filter(users).order_by("username")

    def clean_labels(self) -> list[str]:
        return [label for label in re.split(r"[\s,]+", self.cleaned_data["labels"]) if label]

    def clean_description(self) -> str:
        return _lf(self.cleaned_data["description"])

    def action_fields(self) -> dict[str, Any]:
        """The cleaned values as ``actions.create_issue`` and ``update_issue`` take them."""
        fields = ("summary", "description", "type", "status", "priority", "assignee", "labels")
        return {name: self.cleaned_data[name] for name in fields}


class CommentForm(forms.Form):
    body = forms.CharField(
        label="Comment", strip=False, max_length=actions.MAX_COMMENT, widget=forms.Textarea(attrs={"rows": 5})
    )

    def clean_body(self) -> str:
        return _lf(self.cleaned_data["body"])


class AttachmentForm(forms.Form):
    action_field_aliases = {"filename": "file"}

    file = forms.FileField(allow_empty_file=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
        self.fields["file"].help_text = f"Up to {filesizeformat(limit)}."
        # Lets the page refuse a too-large file before uploading it.
        self.fields["file"].widget.attrs["data-max-bytes"] = limit

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = settings.TRACKER_MAX_ATTACHMENT_BYTES
        if upload.size > limit:
            raise ValidationError(too_large_message(upload.size, limit))
        return upload
