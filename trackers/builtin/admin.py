"""Admin for the built-in tracker's vocabularies and projects; issues are edited in its pages."""

from django.contrib import admin

from trackers.builtin.models import Issue, Priority, Project, Status


@admin.register(Status)
class StatusAdmin(admin.ModelAdmin):
    list_display = ("name", "category", "position")
    list_editable = ("category", "position")


@admin.register(Priority)
class PriorityAdmin(admin.ModelAdmin):
    list_display = ("name", "position", "is_default")
    list_editable = ("position", "is_default")


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("key", "name", "next_number", "created")
    search_fields = ("key", "name")

    def get_readonly_fields(self, request, obj=None):
        # Issue keys embed the project key, so it cannot change once issues exist.
        return ("key",) if obj is not None else ()


@admin.register(Issue)
class IssueAdmin(admin.ModelAdmin):
    """Read-only here: edits must go through the tracker's actions so the sync hears of them."""

    list_display = ("key", "summary", "status", "priority", "assignee", "updated")
    list_filter = ("project", "status", "priority")
    search_fields = ("key", "summary")
    list_select_related = ("status", "priority", "assignee")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
