from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from connections import api as connections_api
from exalate_web import ratelimit, schema, views
from syncqueue import api as sync_api
from syncqueue import node_api, webhooks

api_v1 = [
    path("tracker/", include("trackers.builtin.api_urls")),
    path("connections/", connections_api.ConnectionList.as_view(), name="connection-list"),
    path("connections/<int:pk>/", connections_api.ConnectionDetail.as_view(), name="connection-detail"),
    path("connections/invitations/", connections_api.CreateInvitation.as_view(), name="connection-invite"),
    path("connections/accept/", connections_api.AcceptInvitation.as_view(), name="connection-accept"),
    path("connections/<int:pk>/activate/", connections_api.SetActive.as_view(active=True), name="connection-activate"),
    path(
        "connections/<int:pk>/deactivate/",
        connections_api.SetActive.as_view(active=False),
        name="connection-deactivate",
    ),
    path("connections/<int:pk>/sync/", sync_api.SyncNow.as_view(), name="connection-sync"),
    path("connections/<int:pk>/rules/", connections_api.RulesVersions.as_view(), name="connection-rules"),
    path(
        "connections/<int:pk>/rules/<int:number>/activate/",
        connections_api.ActivateRulesVersion.as_view(),
        name="connection-rules-activate",
    ),
    path("connections/<int:pk>/triggers/", connections_api.TriggerList.as_view(), name="connection-triggers"),
    path("triggers/<int:pk>/run/", sync_api.RunTrigger.as_view(), name="trigger-run"),
    path("twins/", sync_api.TwinList.as_view(), name="twin-list"),
    path("twins/<int:pk>/", sync_api.TwinDetail.as_view(), name="twin-detail"),
    path("twins/<int:pk>/stop/", sync_api.TwinAction.as_view(action="stop"), name="twin-stop"),
    path("twins/<int:pk>/retry/", sync_api.TwinAction.as_view(action="retry"), name="twin-retry"),
    path("queue/stats/", sync_api.QueueStats.as_view(), name="queue-stats"),
    path("webhooks/changed/", webhooks.changed, name="webhook-changed"),
    path("schema/", schema.schema_view, name="schema"),
    path("node/handshake/", node_api.handshake_view, name="node-handshake"),
    path("node/messages/", node_api.messages_view, name="node-messages"),
    path("node/attachments/<str:sha256>/", node_api.attachment_view, name="node-attachment"),
    path("node/pull/", node_api.pull_view, name="node-pull"),
    path("node/blobs/<str:sha256>/", node_api.blob_view, name="node-blob"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Before the admin's own routes, so that its login is rate-limited too.
    path("admin/login/", views.admin_login),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("issues/", include("trackers.builtin.urls")),
    path("connections/", include("connections.urls")),
    path("sync/", include("syncqueue.urls")),
]

# The admin names the node it belongs to: with two nodes open side by side, that matters.
admin.site.site_header = f"{settings.NODE_NAME} administration"
admin.site.site_title = f"{settings.NODE_NAME} admin"
admin.site.site_url = "/"
admin.site.login_form = ratelimit.AdminLoginForm

handler400 = views.bad_request
handler403 = views.permission_denied
handler404 = views.page_not_found
handler500 = views.server_error
