"""The built-in tracker's data: projects, issues, comments, attachments and their vocabularies.

Write through ``trackers.builtin.actions``, not by saving these models directly: the
actions validate, keep ``Issue.updated`` right and send the ``entity_changed`` signal.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from exalate_web import jsonio

PROJECT_KEY_PATTERN = r"^[A-Z][A-Z0-9]{1,9}$"


class Status(models.Model):
    class Category(models.TextChoices):
        TODO = "todo", "To do"
        IN_PROGRESS = "in_progress", "In progress"
        DONE = "done", "Done"

    name = models.CharField(max_length=50, unique=True)
    category = models.CharField(max_length=20, choices=Category.choices, default=Category.TODO)
    position = models.PositiveIntegerField(
        default=0, help_text="Order in lists; the first is the default for new issues."
    )

    class Meta:
        ordering = ["position", "id"]
        verbose_name_plural = "statuses"

    def __str__(self) -> str:
        return self.name


class Priority(models.Model):
    name = models.CharField(max_length=50, unique=True)
    position = models.PositiveIntegerField(default=0, help_text="Order in lists, lowest first.")
    is_default = models.BooleanField(default=False, help_text="Given to new issues that name no priority.")

    class Meta:
        ordering = ["position", "id"]
        verbose_name_plural = "priorities"

    def __str__(self) -> str:
        return self.name


class Project(models.Model):
    key = models.CharField(
        max_length=10,
        unique=True,
        validators=[RegexValidator(PROJECT_KEY_PATTERN, "2 to 10 capital letters or digits, starting with a letter.")],
        help_text="Prefix of the issue keys, e.g. BLUE for BLUE-1.",
    )
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    # The number the next issue gets; taken under a row lock so keys never repeat.
    next_number = models.PositiveIntegerField(default=1, editable=False)
    created = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return f"{self.key} - {self.name}"


class Issue(models.Model):
    project = models.ForeignKey(Project, on_delete=models.PROTECT, related_name="issues")
    number = models.PositiveIntegerField()
    key = models.CharField(max_length=24, unique=True)
    type = models.CharField(max_length=40, default="Task")
    summary = models.CharField(max_length=255)
    description = models.TextField(blank=True)
    status = models.ForeignKey(Status, on_delete=models.PROTECT, related_name="+")
    priority = models.ForeignKey(Priority, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="assigned_issues"
    )
    reporter = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="reported_issues"
    )
    custom_fields = jsonio.JSONField(default=dict, blank=True)
    created = models.DateTimeField(default=timezone.now)
    # Bumped by every change to the issue, its comments or its attachments.
    updated = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-updated", "-id"]
        constraints = [models.UniqueConstraint(fields=["project", "number"], name="builtin_issue_number_unique")]
        indexes = [models.Index(fields=["updated", "id"], name="builtin_issue_updated_idx")]

    def __str__(self) -> str:
        return f"{self.key} {self.summary}"

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels.all()]


class Label(models.Model):
    """A label on an issue; a table rather than a JSON list so that filters use an index."""

    issue = models.ForeignKey(Issue, on_delete=models.CASCADE, related_name="labels")
    name = models.CharField(max_length=50, db_index=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["issue", "name"], name="builtin_label_unique")]

    def __str__(self) -> str:
        return self.name


class Comment(models.Model):
    issue = models.ForeignKey(Issue, on_delete=models.CASCADE, related_name="comments")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    body = models.TextField()
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created", "id"]

    def __str__(self) -> str:
        return f"comment {self.pk} on {self.issue_id}"


def attachment_path(instance: Attachment, filename: str) -> str:
    # The user's filename lives in the row; on disk a random name avoids clashes and odd characters.
    return f"attachments/{timezone.now():%Y/%m}/{uuid.uuid4().hex}"


class Attachment(models.Model):
    issue = models.ForeignKey(Issue, on_delete=models.CASCADE, related_name="attachments")
    file = models.FileField(upload_to=attachment_path, max_length=200)
    filename = models.CharField(max_length=255)
    size = models.BigIntegerField()
    content_type = models.CharField(max_length=100, default="application/octet-stream")
    sha256 = models.CharField(max_length=64, db_index=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created", "id"]

    def __str__(self) -> str:
        return self.filename
