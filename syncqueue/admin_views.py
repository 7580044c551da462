"""The rule editor's own admin pages: Test Run of draft rules, comparing two versions, rollback.

``connections.admin.RulesVersionAdmin.get_urls`` mounts them under /admin/. Staff may test
and compare; activating a version is for superusers. None of these pages saves rules.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django_ace import AceWidget

from connections import rules
from connections.models import Connection, RulesVersion
from connections.scripting import ScriptError
from syncqueue import testrun
from syncqueue.models import Twin

DIFF_CONTEXT_LINES = 3


def script_widget(*, readonly: bool = False) -> AceWidget:
    if readonly:
        # Sized to the script, so a short one does not leave an empty box.
        return AceWidget(
            mode="python", theme="chrome", readonly=True, width="100%", height=None, minlines=3, maxlines=80
        )
    return AceWidget(mode="python", theme="chrome", width="100%", height="420px", tabsize=4, showprintmargin=False)


def script_field() -> forms.CharField:
    # Scripts are kept byte for byte: leading indentation and trailing lines matter to Python.
    return forms.CharField(required=False, strip=False, widget=script_widget())


def error_message(error: ScriptError, source: str) -> str:
    """``error`` as "incoming rules, line 7: ...", followed by the text of that line."""
    line = testrun.source_line(source, error.line)
    return f"{error} (line {error.line} reads: {line.strip()})" if line.strip() else str(error)


class TestRunFields(forms.Form):
    """What to try the draft rules on; part of both the add form and the Test Run page."""

    __test__ = False

    keys = forms.CharField(
        required=False,
        label="Local issue keys",
        help_text="For the outgoing rules: one or more keys, separated by spaces or commas.",
    )
    twin = forms.CharField(
        required=False,
        label="Twin",
        help_text="For the incoming rules: the local or remote key of a twin of this connection. "
        "Its last received replica is used unless you paste one below; `previous` is that replica.",
    )
    replica = forms.CharField(
        required=False,
        strip=False,
        label="Replica (JSON)",
        help_text="For the incoming rules: a replica to apply; without a twin it is a first sync.",
        widget=forms.Textarea(attrs={"rows": 6, "class": "vLargeTextField", "spellcheck": "false"}),
    )


class TestRunForm(TestRunFields):
    connection = forms.ModelChoiceField(Connection.objects.all())
    outgoing = script_field()
    incoming = script_field()
    # Carried along so that "Save as new version" from this page keeps them.
    comment = forms.CharField(required=False, max_length=300)
    activate = forms.BooleanField(required=False, initial=True, help_text="Make the saved version the active rules.")

    field_order = ("connection", "outgoing", "incoming", "keys", "twin", "replica", "comment", "activate")

    def clean_keys(self) -> list[str]:
        try:
            return testrun.parse_keys(self.cleaned_data["keys"])
        except testrun.TestRunError as e:
            raise forms.ValidationError(str(e)) from None

    def clean_replica(self) -> dict | None:
        text = self.cleaned_data["replica"]
        if not text.strip():
            return None
        try:
            return testrun.parse_replica(text)
        except testrun.TestRunError as e:
            raise forms.ValidationError(str(e)) from None

    def clean(self):
        cleaned = super().clean()
        connection, key = cleaned.get("connection"), cleaned.get("twin", "").strip()
        if connection is not None and key:
            twin = Twin.objects.filter(Q(local_key=key) | Q(remote_key=key), connection=connection).first()
            if twin is None:
                self.add_error("twin", f"{connection} has no twin with the key {key}.")
            cleaned["twin"] = twin
        else:
            cleaned["twin"] = None
        if not self.errors and not (cleaned.get("keys") or cleaned["twin"] or cleaned.get("replica")):
            raise forms.ValidationError(
                "Give local issue keys to try the outgoing rules, or a twin or a replica to try the incoming rules."
            )
        return cleaned


@dataclass
class TestRunResults:
    __test__ = False

    checks: list[str]
    outgoing: list[testrun.OutgoingResult]
    incoming: testrun.IncomingResult | None


def run_test(form: TestRunForm) -> TestRunResults:
    """Runs a valid form's draft; bad input for the incoming side goes back to the form as an error."""
    data = form.cleaned_data
    connection = data["connection"]
    draft = testrun.draft_rules(connection, data["outgoing"], data["incoming"])
    checks = [error_message(e, getattr(draft, e.script)) for e in rules.check(draft.outgoing, draft.incoming)]
    outgoing = testrun.run_outgoing(connection, draft, data["keys"]) if data["keys"] else []
    incoming = None
    if data["twin"] is not None or data["replica"] is not None:
        try:
            incoming = testrun.run_incoming(connection, draft, twin=data["twin"], replica=data["replica"])
        except testrun.TestRunError as e:
            form.add_error("twin" if data["replica"] is None else None, str(e))
    return TestRunResults(checks=checks, outgoing=outgoing, incoming=incoming)


def test_run_view(model_admin, request: HttpRequest) -> HttpResponse:
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    results = None
    if request.method == "POST":
        form = TestRunForm(request.POST)
        if form.is_valid():
            results = run_test(form)
    else:
        form = TestRunForm(initial=_draft_initial(request))
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.model._meta,
        "title": "Test Run of draft rules",
        "form": form,
        "results": results,
        "media": model_admin.media + form.media,
        "can_save": model_admin.has_add_permission(request),
    }
    return TemplateResponse(request, "admin/connections/rulesversion/test_run.html", context)


def _draft_initial(request: HttpRequest) -> dict:
    """A draft to start from: the version named by ?from=, else the active rules of ?connection=."""
    base = None
    if request.GET.get("from", "").isdigit():
        base = RulesVersion.objects.filter(pk=request.GET["from"]).first()
    elif request.GET.get("connection", "").isdigit():
        connection = Connection.objects.filter(pk=request.GET["connection"]).select_related("active_rules").first()
        base = connection.active_rules if connection else None
    if base is None:
        return {}
    return {"connection": base.connection_id, "outgoing": base.outgoing, "incoming": base.incoming}


# --- compare ---------------------------------------------------------------------------------


@dataclass
class DiffLine:
    kind: str  # "same", "removed", "added"
    old_number: int | None
    new_number: int | None
    text: str


def diff_hunks(old: str, new: str) -> list[list[DiffLine]]:
    """The changed parts of a script, each with a few unchanged lines around it."""
    a, b = old.splitlines(), new.splitlines()
    hunks = []
    for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(DIFF_CONTEXT_LINES):
        hunk = []
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                hunk += [
                    DiffLine("same", i + 1, j + 1, a[i]) for i, j in zip(range(i1, i2), range(j1, j2), strict=True)
                ]
                continue
            hunk += [DiffLine("removed", i + 1, None, a[i]) for i in range(i1, i2)]
            hunk += [DiffLine("added", None, j + 1, b[j]) for j in range(j1, j2)]
        hunks.append(hunk)
    return hunks


class CompareForm(forms.Form):
    old = forms.ModelChoiceField(RulesVersion.objects.select_related("connection"), label="Compare")
    new = forms.ModelChoiceField(RulesVersion.objects.select_related("connection"), label="with")


def compare_view(model_admin, request: HttpRequest) -> HttpResponse:
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    form = CompareForm(request.GET if "old" in request.GET else None)
    scripts = None
    if form.is_valid():
        old, new = form.cleaned_data["old"], form.cleaned_data["new"]
        scripts = [
            {"name": name, "hunks": diff_hunks(getattr(old, name), getattr(new, name))}
            for name in ("outgoing", "incoming")
        ]
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.model._meta,
        "title": "Compare rules versions",
        "form": form,
        "scripts": scripts,
    }
    return TemplateResponse(request, "admin/connections/rulesversion/compare.html", context)


def compare_url(old: RulesVersion, new: RulesVersion) -> str:
    return f"{reverse('admin:connections_rulesversion_compare')}?old={old.pk}&new={new.pk}"


# --- rollback --------------------------------------------------------------------------------


def activate_view(model_admin, request: HttpRequest, object_id: str) -> HttpResponse:
    if not model_admin.has_activate_permission(request):
        raise PermissionDenied
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    version = get_object_or_404(RulesVersion.objects.select_related("connection"), pk=object_id)
    rules.activate(version)
    model_admin.message_user(request, f"{version} is now active.", messages.SUCCESS)
    return HttpResponseRedirect(reverse("admin:connections_rulesversion_change", args=[version.pk]))
