"""Forms of the connection setup pages. They only read input; pairing and triggers are written elsewhere."""

from __future__ import annotations

from django import forms
from rest_framework import serializers

from connections import rules
from connections.api import TriggerSerializer
from trackers.builtin.models import Project


class ProjectChoiceField(forms.ModelChoiceField):
    """A built-in project, chosen by name, cleaned to its key (what ``Connection.project`` stores)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", "New issues that come from the other side are created in this project.")
        super().__init__(queryset=Project.objects.order_by("key"), to_field_name="key", **kwargs)

    def label_from_instance(self, project: Project) -> str:
        return f"{project.key} — {project.name}"

    def clean(self, value) -> str:
        project = super().clean(value)
        return project.key if project else ""


class InvitationForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What this node calls the connection, e.g. the other team.")
    project = ProjectChoiceField(label="Local project")
    hours_valid = forms.IntegerField(
        label="Code valid for (hours)", min_value=1, max_value=24 * 14, initial=24, help_text="At most two weeks."
    )
    rules_template = forms.ChoiceField(
        label="Rules to start from",
        choices=rules.template_choices,
        initial="default",
        required=False,
        help_text="Each side keeps its own rules; edit them any time in the rule editor.",
    )
    not_reachable = forms.BooleanField(
        label="This node is not reachable from the other node",
        required=False,
        help_text="For example behind a firewall or on a laptop.",
    )

    def clean_rules_template(self) -> str:
        return _template_or_default(self)


class AcceptForm(forms.Form):
    code = forms.CharField(
        label="Invitation code",
        max_length=4000,
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "autocomplete": "off"}),
        help_text="Starts with EXL1-. Paste it whole; line breaks do not matter.",
    )
    name = forms.CharField(max_length=100, required=False, help_text="Leave empty to use the other node's own name.")
    project = ProjectChoiceField(label="Local project")
    rules_template = forms.ChoiceField(
        label="Rules to start from",
        choices=rules.template_choices,
        initial="default",
        required=False,
        help_text="Each side keeps its own rules; edit them any time in the rule editor.",
    )

    def clean_rules_template(self) -> str:
        return _template_or_default(self)


def _template_or_default(form: forms.Form) -> str:
    return form.cleaned_data.get("rules_template") or "default"


def clean_trigger_query(query: str) -> str:
    """The API's check, so that pages, admin and API refuse the same queries."""
    try:
        return TriggerSerializer().validate_query(query)
    except serializers.ValidationError as e:
        raise forms.ValidationError([str(message) for message in e.detail]) from None


class TriggerForm(forms.Form):
    query = forms.CharField(
        max_length=1000,
        widget=forms.TextInput(attrs={"placeholder": "e.g. project:BLUE label:sync"}),
        help_text="In the local tracker's search syntax; matching issues come under sync.",
    )

    def clean_query(self) -> str:
        return clean_trigger_query(self.cleaned_data["query"])
