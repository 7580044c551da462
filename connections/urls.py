from django.urls import path

from connections import views

app_name = "connections"
urlpatterns = [
    path("", views.connection_list, name="list"),
    path("new/", views.connection_new, name="new"),
    path("accept/", views.connection_accept, name="accept"),
    path("<int:pk>/", views.connection_detail, name="detail"),
    path("<int:pk>/invitation/", views.connection_invitation, name="invitation"),
    path("<int:pk>/status/", views.connection_status, name="status"),
    path("<int:pk>/activate/", views.set_active, {"active": True}, name="activate"),
    path("<int:pk>/deactivate/", views.set_active, {"active": False}, name="deactivate"),
    path("<int:pk>/triggers/", views.trigger_add, name="trigger-add"),
    path("triggers/<int:pk>/run/", views.trigger_run, name="trigger-run"),
    path("tracker/", views.tracker_settings_page, name="tracker"),
    path("tracker/change/", views.tracker_settings_change, name="tracker-change"),
]
