"""``manage.py connection_activate ID``: start syncing on a connection again."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from connections import lifecycle
from connections.management import get_connection, row


class Command(BaseCommand):
    help = "Activate a connection; prints it as connection_list does."
    active = True

    def add_arguments(self, parser):
        parser.add_argument("connection_id", type=int, metavar="ID", help="The connection's id (see connection_list).")

    def handle(self, *args, connection_id, **options):
        connection = get_connection(connection_id)
        try:
            lifecycle.set_active(connection, self.active)
        except lifecycle.LifecycleError as e:
            raise CommandError(f"Connection {connection_id}: {e}.") from None
        self.stdout.write(row(get_connection(connection_id)))
