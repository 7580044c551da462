"""``manage.py connection_sync ID KEY``: bring one entity under sync now (the manual trigger)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from connections.management import get_connection
from syncqueue import flow
from syncqueue.models import SyncEvent, Twin
from trackers.base import TrackerError


class Command(BaseCommand):
    help = (
        "Run the outgoing rules on KEY and queue its replica on the connection, also when nothing "
        "changed or the twin was stopped. Prints the queued event's id, tab, its status."
    )

    def add_arguments(self, parser):
        parser.add_argument("connection_id", type=int, metavar="ID", help="The connection's id (see connection_list).")
        parser.add_argument("key", metavar="KEY", help="The local entity's key, e.g. BLUE-12.")

    def handle(self, *args, connection_id, key, **options):
        connection = get_connection(connection_id)
        try:
            event = flow.sync_entity(connection, key, force=True)
        except (flow.SyncRefused, TrackerError) as e:
            raise CommandError(f"{key} not synced: {e}.") from None
        if event is None:
            self.stderr.write(f"{key}: the outgoing rules chose not to sync it (stop_sync).")
            return
        if event.status == SyncEvent.Status.FAILED:
            raise CommandError(f"{key} not synced: {event.error}")
        self.stdout.write(f"{event.pk}\t{event.status}")
        if event.twin.state == Twin.State.BLOCKED:
            self.stderr.write(f"{key} is blocked on this connection: it is sent once its twin is resolved and retried.")
