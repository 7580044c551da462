"""Routes of the built-in tracker's REST API, mounted at /api/v1/tracker/."""

from django.urls import path, register_converter

from trackers.builtin import api


class IssueKeyConverter:
    """BLUE-1 in any case; anything else is a 404 before a view runs."""

    regex = r"[A-Za-z][A-Za-z0-9]{1,9}-[0-9]{1,12}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


class RowIdConverter:
    """A row id that fits a 64-bit column, so no database is asked about 10**30."""

    regex = r"[0-9]{1,18}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(IssueKeyConverter, "tracker_key")
register_converter(RowIdConverter, "tracker_id")

app_name = "tracker-api"
urlpatterns = [
    path("projects/", api.ProjectList.as_view(), name="project-list"),
    path("statuses/", api.StatusList.as_view(), name="status-list"),
    path("priorities/", api.PriorityList.as_view(), name="priority-list"),
    path("issues/", api.IssueList.as_view(), name="issue-list"),
    path("issues/<tracker_key:key>/", api.IssueDetail.as_view(), name="issue-detail"),
    path("issues/<tracker_key:key>/comments/", api.CommentList.as_view(), name="comment-list"),
    path("issues/<tracker_key:key>/comments/<tracker_id:pk>/", api.CommentDetail.as_view(), name="comment-detail"),
    path("issues/<tracker_key:key>/attachments/", api.AttachmentList.as_view(), name="attachment-list"),
    path(
        "issues/<tracker_key:key>/attachments/<tracker_id:pk>/",
        api.AttachmentDetail.as_view(),
        name="attachment-detail",
    ),
    path(
        "issues/<tracker_key:key>/attachments/<tracker_id:pk>/content/",
        api.AttachmentContent.as_view(),
        name="attachment-content",
    ),
]
