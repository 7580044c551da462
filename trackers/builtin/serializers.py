"""Shapes of the built-in tracker's REST API: strict on input, the tracker contract's names on output.

Serializers check types and which fields may be sent; the values themselves are checked
by ``trackers.builtin.actions``, which also make every write.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from django.db import IntegrityError, models, transaction
from django.http import QueryDict
from rest_framework import serializers
from rest_framework.reverse import reverse

from trackers.builtin import actions
from trackers.builtin.adapter import issue_queryset
from trackers.builtin.models import Attachment, Comment, Issue, Priority, Project, Status

API_NAMESPACE = "tracker-api"
# A media type with optional parameters; anything else could not be sent back as a header.
CONTENT_TYPE_PATTERN = re.compile(
    r"^[\w!#$&^.+-]+/[\w!#$&^.+-]+(\s*;\s*[\w!#$&^.+-]+=(\"[^\"\x00-\x1f\x7f]*\"|[\w!#$&^.+-]+))*$"
)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class TextField(serializers.CharField):
    """Text only: DRF's CharField would quietly turn 5 into "5" and trim what the user wrote."""

    default_error_messages = {"not_text": "Must be text."}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("allow_blank", True)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_text")
        return super().to_internal_value(data)


class RelatedTextField(TextField):
    """Written as text (a name, a username, a key); read back as that attribute of the related row."""

    def __init__(self, attribute: str = "name", **kwargs):
        self.attribute = attribute
        super().__init__(**kwargs)

    def to_representation(self, value):
        return getattr(value, self.attribute)


class UsernameField(RelatedTextField):
    def __init__(self, **kwargs):
        super().__init__(attribute="username", **kwargs)


class LabelsField(serializers.ListField):
    def __init__(self, **kwargs):
        super().__init__(child=TextField(), **kwargs)

    def to_representation(self, labels):
        return sorted(label.name for label in labels.all())


def _storable(value: Any) -> bool:
    """Whether a JSON column holds it on every database: no NUL in text, no infinite numbers."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_storable(item) for item in value)
    return True


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know or may not write, where DRF would silently ignore them."""

    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            writable = [name for name, field in self.fields.items() if not field.read_only]
            errors = {}
            for name in data:
                field = self.fields.get(name)
                if field is None:
                    errors[name] = [f"Unknown field (known: {', '.join(writable)})."]
                elif field.read_only:
                    errors[name] = ["This field is read-only."]
            # A form may repeat a field; keeping only the last value would drop the others quietly.
            for name, values in data.lists() if isinstance(data, QueryDict) else ():
                if len(values) > 1 and name not in errors:
                    errors[name] = ["Give this field once."]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)


# --- projects and vocabularies -----------------------------------------------------------


class ProjectSerializer(StrictSerializer, serializers.ModelSerializer):
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: TextField,
        models.TextField: TextField,
    }

    class Meta:
        model = Project
        fields = ["key", "name", "description"]
        extra_kwargs = {"name": {"trim_whitespace": True, "allow_blank": False}}

    def create(self, validated_data):
        try:
            with transaction.atomic():
                return Project.objects.create(**validated_data)
        except IntegrityError:
            # Another request took the key between the uniqueness check and the insert.
            raise serializers.ValidationError({"key": ["A project with this key already exists."]}) from None


class StatusSerializer(serializers.ModelSerializer):
    is_default = serializers.SerializerMethodField()

    class Meta:
        model = Status
        fields = ["name", "category", "position", "is_default"]

    def get_is_default(self, status: Status) -> bool:
        return status.pk == self.context.get("default_status_id")


class PrioritySerializer(serializers.ModelSerializer):
    class Meta:
        model = Priority
        fields = ["name", "position", "is_default"]


# --- comments and attachments ------------------------------------------------------------


class CommentSerializer(StrictSerializer):
    id = serializers.IntegerField(read_only=True)
    author = UsernameField(read_only=True)
    body = TextField()
    created = serializers.DateTimeField(read_only=True)
    updated = serializers.DateTimeField(read_only=True)

    def create(self, validated_data) -> Comment:
        return actions.add_comment(validated_data["issue"], validated_data["body"], actor=validated_data["actor"])

    def update(self, comment: Comment, validated_data) -> Comment:
        if "body" not in validated_data:
            return comment
        return actions.edit_comment(comment, validated_data["body"], actor=validated_data["actor"])


class AttachmentSerializer(StrictSerializer):
    id = serializers.IntegerField(read_only=True)
    file = serializers.FileField(write_only=True)
    filename = TextField(required=False, max_length=255)
    size = serializers.IntegerField(read_only=True)
    content_type = TextField(required=False, max_length=100)
    sha256 = serializers.CharField(read_only=True)
    author = UsernameField(read_only=True)
    created = serializers.DateTimeField(read_only=True)
    content_url = serializers.SerializerMethodField()

    def get_content_url(self, attachment: Attachment) -> str:
        return reverse(
            f"{API_NAMESPACE}:attachment-content",
            kwargs={"key": attachment.issue.key, "pk": attachment.pk},
            request=self.context.get("request"),
        )

    def validate_content_type(self, value: str) -> str:
        if not CONTENT_TYPE_PATTERN.match(value):
            raise serializers.ValidationError("Give a media type such as image/png.")
        return value

    def validate(self, attrs):
        upload = attrs["file"]
        filename = attrs.get("filename") or upload.name or ""
        # The name goes back out in a Content-Disposition header, where line breaks would break it.
        if CONTROL_CHARACTERS.search(filename):
            raise serializers.ValidationError({"filename": ["Must not contain control characters."]})
        attrs["filename"] = filename
        if "content_type" not in attrs:
            sent = (upload.content_type or "").strip()
            # A browser's generic type says nothing; let the file name decide instead.
            usable = CONTENT_TYPE_PATTERN.match(sent) and sent != "application/octet-stream"
            attrs["content_type"] = sent if usable else None
        return attrs

    def create(self, validated_data) -> Attachment:
        return actions.add_attachment(
            validated_data["issue"],
            validated_data["filename"],
            validated_data["file"],
            validated_data["content_type"],
            actor=validated_data["actor"],
        )


# --- issues ------------------------------------------------------------------------------


class IssueSerializer(StrictSerializer):
    """An issue in the tracker contract's names; ``project`` can be set only when creating."""

    key = serializers.CharField(read_only=True)
    id = serializers.IntegerField(read_only=True)
    project = RelatedTextField(attribute="key")
    type = TextField(required=False)
    summary = TextField()
    description = TextField(required=False, allow_null=True)
    status = RelatedTextField(required=False)
    priority = RelatedTextField(required=False, allow_null=True)
    assignee = UsernameField(required=False, allow_null=True)
    reporter = UsernameField(required=False, allow_null=True)
    labels = LabelsField(required=False)
    custom_fields = serializers.DictField(required=False)
    created = serializers.DateTimeField(read_only=True)
    updated = serializers.DateTimeField(read_only=True)
    updated_by = UsernameField(read_only=True)
    url = serializers.HyperlinkedIdentityField(
        view_name=f"{API_NAMESPACE}:issue-detail", lookup_field="key", lookup_url_kwarg="key"
    )
    comments = CommentSerializer(many=True, read_only=True)
    attachments = AttachmentSerializer(many=True, read_only=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance is not None:
            # Moving an issue would change its key; the tracker does not do that.
            self.fields["project"].read_only = True

    def validate_custom_fields(self, value: dict) -> dict:
        # PostgreSQL refuses both in JSON; say so here rather than fail on save.
        if not all(_storable(name) and _storable(item) for name, item in value.items()):
            raise serializers.ValidationError("Text must not contain NUL characters and numbers must be finite.")
        return value

    def create(self, validated_data) -> Issue:
        actor = validated_data.pop("actor")
        project = validated_data.pop("project")
        issue = actions.create_issue(project, validated_data, actor=actor)
        return issue_queryset().get(pk=issue.pk)

    def update(self, issue: Issue, validated_data) -> Issue:
        actor = validated_data.pop("actor")
        actions.update_issue(issue, validated_data, actor=actor)
        return issue_queryset().get(pk=issue.pk)


class IssueSummarySerializer(IssueSerializer):
    """An issue in a listing: comments and attachments are left to the detail view."""

    comments = None
    attachments = None
