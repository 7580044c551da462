from django.urls import path

from trackers.builtin import views

app_name = "builtin"
urlpatterns = [
    path("", views.issue_list, name="issue-list"),
    # Before "<key>/": an issue key always has a dash, so "new" is never one.
    path("new/", views.issue_create, name="issue-create"),
    path("<str:key>/", views.issue_detail, name="issue-detail"),
    path("<str:key>/edit/", views.issue_edit, name="issue-edit"),
    path("<str:key>/delete/", views.issue_delete, name="issue-delete"),
    path("<str:key>/comments/", views.comment_add, name="comment-add"),
    path("<str:key>/comments/<int:comment_id>/edit/", views.comment_edit, name="comment-edit"),
    path("<str:key>/comments/<int:comment_id>/delete/", views.comment_delete, name="comment-delete"),
    path("<str:key>/attachments/", views.attachment_add, name="attachment-add"),
    path(
        "<str:key>/attachments/<int:attachment_id>/download/",
        views.attachment_download,
        name="attachment-download",
    ),
    path("<str:key>/attachments/<int:attachment_id>/delete/", views.attachment_delete, name="attachment-delete"),
]
