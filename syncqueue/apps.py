from django.apps import AppConfig


class SyncqueueConfig(AppConfig):
    name = "syncqueue"
    verbose_name = "Sync queue"
