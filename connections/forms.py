"""Forms of the connection pages. They only read input: pairing, triggers and tracker settings are written elsewhere."""

from __future__ import annotations

from django import forms
from django.conf import settings
from rest_framework import serializers

from connections import rules, tracker_settings
from connections.api import TriggerSerializer
from connections.models import MAX_POLL_SECONDS, Node
from trackers import registry
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


class PairingForm(forms.Form):
    """What both ends of pairing ask: the local project and the rules to start from.

    A node serving another tracker (Redmine) names its project instead of choosing a built-in one.
    """

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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        node = Node.local()
        if node.tracker_kind != "builtin":
            self.fields["project"] = forms.CharField(
                label="Local project",
                max_length=50,
                initial=node.tracker_config().get("project", ""),
                help_text=f"The {node.tracker_kind} project new issues from the other side are created in.",
            )


def has_projects() -> bool:
    """Whether a first sync has somewhere to create issues (a node serving another tracker always has)."""
    return Node.local().tracker_kind != "builtin" or Project.objects.exists()


class InvitationForm(PairingForm):
    name = forms.CharField(max_length=100, help_text="What this node calls the connection, e.g. the other team.")
    hours_valid = forms.IntegerField(
        label="Code valid for (hours)", min_value=1, max_value=24 * 14, initial=24, help_text="At most two weeks."
    )
    not_reachable = forms.BooleanField(
        label="This node is not reachable from the other node",
        required=False,
        help_text="For example behind a firewall or on a laptop.",
    )


class AcceptForm(PairingForm):
    code = forms.CharField(
        label="Invitation code",
        max_length=4000,
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "autocomplete": "off"}),
        help_text="Starts with EXL1-. Paste it whole; line breaks do not matter.",
    )
    name = forms.CharField(max_length=100, required=False, help_text="Leave empty to use the other node's own name.")
    private = forms.BooleanField(
        label="This node is not reachable from the other node",
        required=False,
        help_text="For example behind a firewall or on a laptop: this node then fetches its messages from the other.",
    )


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


TRACKER_KINDS = {"builtin": "The built-in tracker", "redmine": "Redmine"}


def _tracker_kind_choices() -> list[tuple[str, str]]:
    return [(kind, TRACKER_KINDS.get(kind, kind)) for kind in registry.kinds()]


def _map_field(label: str, example: str) -> forms.CharField:
    return forms.CharField(
        label=label,
        required=False,
        max_length=10_000,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "placeholder": example}),
        help_text="One per line, Name = Redmine id: names the rules may use besides Redmine's own.",
    )


class TrackerSettingsForm(forms.Form):
    """The tracker this node serves. With the built-in tracker chosen, the Redmine fields are ignored."""

    kind = forms.ChoiceField(label="Tracker", choices=_tracker_kind_choices)
    url = forms.CharField(
        label="Redmine URL",
        max_length=300,
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "https://redmine.example.org", "spellcheck": "false"}),
    )
    api_key = forms.CharField(
        label="API key",
        max_length=200,
        required=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="Of the Redmine account the sync writes as. Leave blank to keep the stored key "
        "(a new URL needs its key again).",
    )
    project = forms.CharField(label="Project identifier", max_length=100, required=False)
    status_map = _map_field("Status names", "Done = 5")
    priority_map = _map_field("Priority names", "Urgent = 4")
    tracker_map = _map_field("Issue type names", "Task = 3")
    poll_seconds = forms.IntegerField(
        label="Poll interval (seconds)", min_value=1, max_value=MAX_POLL_SECONDS, required=False
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["poll_seconds"].help_text = (
            f"How often the tracker is asked for changes. Blank: every {settings.SYNC_POLL_SECONDS} seconds "
            "(the SYNC_POLL_SECONDS setting)."
        )

    @classmethod
    def for_node(cls, node: Node) -> TrackerSettingsForm:
        """The form filled in with what ``node`` has now (the API key never)."""
        config = node.tracker_config()
        initial = {
            "kind": node.tracker_kind,
            "url": config.get("url", ""),
            "project": config.get("project", ""),
            "poll_seconds": node.poll_seconds,
        }
        for name in tracker_settings.MAP_NAMES:
            initial[name] = "\n".join(tracker_settings.format_map(config.get(name, {})))
        return cls(initial=initial)

    def clean(self) -> dict:
        data = super().clean()
        # Maps only matter for Redmine; a leftover one must not block choosing the built-in tracker.
        if data.get("kind") == "redmine":
            for name in tracker_settings.MAP_NAMES:
                if name not in data:
                    continue
                try:
                    data[name] = tracker_settings.parse_map(data[name].splitlines(), name)
                except tracker_settings.TrackerSettingsError as e:
                    self.add_error(name, e.message)
        return data

    def save_arguments(self) -> dict:
        """Keyword arguments for ``tracker_settings.save``, from a valid form."""
        data = self.cleaned_data
        chosen = {"kind": data["kind"], "poll_seconds": data["poll_seconds"]}
        if data["kind"] == "redmine":
            for name in ("url", "api_key", "project", *tracker_settings.MAP_NAMES):
                chosen[name] = data[name]
        return chosen
