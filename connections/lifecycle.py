"""Activating and deactivating a connection. A deactivated one keeps collecting changes."""

from __future__ import annotations

from django.db import transaction

from connections.models import Connection
from connections.signals import connection_activated


class LifecycleError(Exception):
    pass


@transaction.atomic
def set_active(connection: Connection, active: bool) -> None:
    connection = Connection.objects.select_for_update().get(pk=connection.pk)
    if connection.status == Connection.Status.PENDING:
        raise LifecycleError("the connection is still waiting for the other side to accept the invitation")
    target = Connection.Status.ACTIVE if active else Connection.Status.DEACTIVATED
    if connection.status != target:
        connection.status = target
        connection.status_detail = ""
        connection.save(update_fields=["status", "status_detail"])
    if active:
        transaction.on_commit(lambda: connection_activated.send(sender=Connection, connection=connection), robust=True)
