from django.urls import path

from syncqueue import views

app_name = "sync"
urlpatterns = [
    path("issues/<str:key>/sync/", views.sync_now, name="sync-now"),
    path("twins/<int:pk>/stop/", views.twin_stop, name="twin-stop"),
    path("twins/<int:pk>/retry/", views.twin_retry, name="twin-retry"),
]
