"""Admin for connections and their rules: staff may look, only superusers change anything.

Pairing happens through invitation codes (API, commands), status changes go through
``lifecycle.set_active`` and new rules through ``rules.save_rules``: the admin calls
them and adds no write path of its own.
"""

from __future__ import annotations

from functools import partial

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.http import HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html

from connections import lifecycle, rules
from connections.forms import clean_trigger_query
from connections.models import Connection, RulesVersion, Trigger
from syncqueue import admin_views
from syncqueue.admin_views import TestRunFields, error_message, script_field, script_widget


def is_staff(request) -> bool:
    return request.user.is_active and request.user.is_staff


def is_admin(request) -> bool:
    return request.user.is_active and request.user.is_superuser


class StaffViewsAdminChanges:
    """Staff see everything here without model permissions; only superusers change."""

    def has_module_permission(self, request) -> bool:
        return is_staff(request)

    def has_view_permission(self, request, obj=None) -> bool:
        return is_staff(request)

    def has_add_permission(self, request, obj=None) -> bool:
        return is_admin(request)

    def has_change_permission(self, request, obj=None) -> bool:
        return is_admin(request)

    def has_delete_permission(self, request, obj=None) -> bool:
        return is_admin(request)


class TriggerForm(forms.ModelForm):
    class Meta:
        model = Trigger
        fields = ("query", "active")
        widgets = {"query": forms.TextInput(attrs={"size": 60})}

    def clean_query(self) -> str:
        return clean_trigger_query(self.cleaned_data["query"])


class TriggerInline(StaffViewsAdminChanges, admin.TabularInline):
    model = Trigger
    form = TriggerForm
    fields = ("query", "active", "last_run")
    readonly_fields = ("last_run",)
    extra = 0


@admin.register(Connection)
class ConnectionAdmin(StaffViewsAdminChanges, admin.ModelAdmin):
    list_display = ("name", "status", "remote", "rules_version", "last_contact")
    list_filter = ("status",)
    search_fields = ("name", "remote_name", "remote_url")
    list_select_related = ("active_rules",)
    readonly_fields = (
        "status",
        "status_detail",
        "secret_state",
        "rules_version",
        "rules_history",
        "remote_name",
        "remote_node_id",
        "is_initiator",
        "uuid",
        "last_contact",
        "poll_watermark",
        "created",
    )
    fields = ("name", "project", "remote_url", "conflict_policy", *readonly_fields)
    inlines = [TriggerInline]
    actions = ["activate", "deactivate"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # a connection is made by pairing: connection_invite / connection_accept

    @admin.display(description="remote")
    def remote(self, connection: Connection) -> str:
        return connection.remote_name or connection.remote_url or "-"

    @admin.display(description="active rules", ordering="active_rules__number")
    def rules_version(self, connection: Connection) -> str:
        if connection.active_rules is None:
            return "-"
        return format_html(
            '<a href="{}">v{}</a>',
            reverse("admin:connections_rulesversion_change", args=[connection.active_rules_id]),
            connection.active_rules.number,
        )

    @admin.display(description="rules history")
    def rules_history(self, connection: Connection) -> str:
        url = reverse("admin:connections_rulesversion_changelist")
        return format_html('<a href="{}?connection__id__exact={}">All versions of the rules</a>', url, connection.pk)

    @admin.display(description="shared secret")
    def secret_state(self, connection: Connection) -> str:
        return "set" if connection.secret else "not set"

    @admin.action(description="Activate the selected connections", permissions=["change"])
    def activate(self, request, queryset) -> None:
        self._set_active(request, queryset, True)

    @admin.action(description="Deactivate the selected connections", permissions=["change"])
    def deactivate(self, request, queryset) -> None:
        self._set_active(request, queryset, False)

    def _set_active(self, request, queryset, active: bool) -> None:
        done = 0
        for connection in queryset:
            try:
                lifecycle.set_active(connection, active)
                done += 1
            except lifecycle.LifecycleError as e:
                self.message_user(request, f"{connection}: {e}.", messages.ERROR)
        if done:
            verb = "activated" if active else "deactivated"
            self.message_user(request, f"{done} connection(s) {verb}.", messages.SUCCESS)

    def get_deleted_objects(self, objs, request):
        # Deleting a connection takes its rules, twins and events with it; those models are
        # read-only one by one, which must not stop an administrator deleting the whole.
        deleted, counts, _, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, set(), protected


class NewRulesForm(TestRunFields, forms.ModelForm):
    """New rules; the Test Run fields ride along so the "Test Run" button can send the draft."""

    outgoing = script_field()
    incoming = script_field()
    activate = forms.BooleanField(required=False, initial=True, help_text="Make this version the active rules now.")

    class Meta:
        model = RulesVersion
        fields = ("connection", "outgoing", "incoming", "comment")

    def clean(self):
        cleaned = super().clean()
        for error in rules.check(cleaned.get("outgoing", ""), cleaned.get("incoming", "")):
            self.add_error(error.script, error_message(error, cleaned.get(error.script, "")))
        return cleaned


@admin.register(RulesVersion)
class RulesVersionAdmin(StaffViewsAdminChanges, admin.ModelAdmin):
    """A version is immutable: "add" saves new rules as the next version; rollback activates an old one.

    Its own pages (``syncqueue.admin_views``): Test Run of a draft, compare two versions, activate one.
    """

    form = NewRulesForm
    list_display = ("connection", "number", "author", "created", "comment", "is_active")
    list_display_links = ("connection", "number")
    list_filter = ("connection",)
    list_select_related = ("connection", "author")
    actions = ["activate_version", "compare_versions"]
    add_fieldsets = (
        (None, {"fields": ("connection", "outgoing", "incoming", "comment", "activate")}),
        (
            "Test Run",
            {
                "fields": ("keys", "twin", "replica"),
                "description": "Try the rules in the editors on real issues and replicas before saving them, "
                "with the Test Run button below. Nothing is written.",
            },
        ),
    )
    view_fields = (
        "connection",
        "number",
        "is_active",
        "author",
        "created",
        "comment",
        "outgoing_script",
        "incoming_script",
        "new_version",
    )

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_activate_permission(self, request) -> bool:
        return is_admin(request)

    def get_urls(self):
        def view(function):
            return self.admin_site.admin_view(partial(function, self))

        return [
            path("testrun/", view(admin_views.test_run_view), name="connections_rulesversion_testrun"),
            path("compare/", view(admin_views.compare_view), name="connections_rulesversion_compare"),
            path(
                "<path:object_id>/activate/", view(admin_views.activate_view), name="connections_rulesversion_activate"
            ),
            *super().get_urls(),
        ]

    def get_fieldsets(self, request, obj=None):
        return [(None, {"fields": self.view_fields})] if obj is not None else self.add_fieldsets

    def get_readonly_fields(self, request, obj=None):
        return self.view_fields if obj is not None else ()

    def get_changeform_initial_data(self, request) -> dict:
        """A new version starts from the one named by ?from=, else from the connection's active rules."""
        initial = super().get_changeform_initial_data(request)
        base = None
        if str(request.GET.get("from", "")).isdigit():
            base = RulesVersion.objects.filter(pk=request.GET["from"]).first()
        elif str(initial.get("connection", "")).isdigit():
            connection = Connection.objects.filter(pk=initial["connection"]).select_related("active_rules").first()
            base = connection.active_rules if connection else None
        if base is not None:
            initial.update(connection=base.connection_id, outgoing=base.outgoing, incoming=base.incoming)
        return initial

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            # The scripts of a saved version show in read-only editors, which need the editor's files.
            context["media"] += script_widget(readonly=True).media
            active = obj.connection.active_rules
            context.update(
                version_is_active=active is not None and active.pk == obj.pk,
                can_activate=self.has_activate_permission(request),
                compare_with_active_url=admin_views.compare_url(obj, active) if active is not None else "",
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def save_model(self, request, obj, form, change) -> None:
        version = rules.save_rules(
            obj.connection,
            obj.outgoing,
            obj.incoming,
            author=request.user,
            comment=obj.comment,
            activate=form.cleaned_data["activate"],
        )
        # The admin goes on with `obj` (history entry, redirect): make it the version just saved.
        vars(obj).update(vars(version))

    @admin.display(boolean=True, description="active")
    def is_active(self, version: RulesVersion) -> bool:
        return version.connection.active_rules_id == version.pk

    @admin.display(description="outgoing")
    def outgoing_script(self, version: RulesVersion) -> str:
        return script_widget(readonly=True).render("view_outgoing", version.outgoing)

    @admin.display(description="incoming")
    def incoming_script(self, version: RulesVersion) -> str:
        return script_widget(readonly=True).render("view_incoming", version.incoming)

    @admin.display(description="edit")
    def new_version(self, version: RulesVersion) -> str:
        return format_html(
            '<a href="{}?from={}">Start a new version from this one</a> · <a href="{}?from={}">Test Run it</a>',
            reverse("admin:connections_rulesversion_add"),
            version.pk,
            reverse("admin:connections_rulesversion_testrun"),
            version.pk,
        )

    @admin.action(description="Activate this version (rollback)", permissions=["activate"])
    def activate_version(self, request, queryset) -> None:
        versions = list(queryset.select_related("connection")[:2])
        if len(versions) != 1:
            self.message_user(request, "Select exactly one version to activate.", messages.ERROR)
            return
        rules.activate(versions[0])
        self.message_user(request, f"{versions[0]} is now active.", messages.SUCCESS)

    @admin.action(description="Compare the two selected versions", permissions=["view"])
    def compare_versions(self, request, queryset):
        versions = sorted(queryset[:3], key=lambda v: (v.connection_id, v.number))
        if len(versions) != 2:
            self.message_user(request, "Select exactly two versions to compare.", messages.ERROR)
            return None
        return HttpResponseRedirect(admin_views.compare_url(*versions))
