from django.urls import path

from syncqueue import views

app_name = "sync"
urlpatterns = [
    path("queue/", views.queue_monitor, name="monitor"),
    path("events/<int:pk>/", views.event_detail, name="event"),
    path("events/<int:pk>/retry/", views.event_retry, name="event-retry"),
    path("events/<int:pk>/discard/", views.event_discard, name="event-discard"),
    path("events/bulk/", views.events_bulk, name="events-bulk"),
    path("twins/<int:pk>/", views.twin_detail, name="twin"),
    path("issues/<str:key>/sync/", views.sync_now, name="sync-now"),
    path("twins/<int:pk>/stop/", views.twin_stop, name="twin-stop"),
    path("twins/<int:pk>/retry/", views.twin_retry, name="twin-retry"),
]
