from django.apps import AppConfig
from django.db.backends.signals import connection_created
from django.db.models.signals import post_migrate


class SyncqueueConfig(AppConfig):
    name = "syncqueue"
    verbose_name = "Sync queue"

    def ready(self) -> None:
        from connections.signals import connection_activated
        from exalate_web import jsonio
        from syncqueue import bulk, tasks, triggers, views
        from trackers import panels

        post_migrate.connect(tasks.ensure_schedule, sender=self)
        connection_created.connect(bulk.binary_arrays, dispatch_uid="syncqueue.binary_arrays")
        connection_created.connect(jsonio.for_postgresql, dispatch_uid="syncqueue.jsonio")
        triggers.connect()
        panels.register(views.issue_panel)
        panels.register_elsewhere(views.issue_elsewhere)
        # What a deactivated connection collected goes out as soon as it is active again.
        connection_activated.connect(tasks.on_connection_activated, dispatch_uid="syncqueue.activated")
