"""``manage.py connection_trigger ID QUERY``: a filter trigger on the local tracker."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from connections.api import TriggerSerializer
from connections.management import get_connection, validated


class Command(BaseCommand):
    help = (
        "Add an active filter trigger: entities matching QUERY (in the local tracker's query language) "
        "come under sync on the connection. Prints the trigger's id."
    )

    def add_arguments(self, parser):
        parser.add_argument("connection_id", type=int, metavar="ID", help="The connection's id (see connection_list).")
        parser.add_argument("query", metavar="QUERY", help='e.g. "project:BLUE label:sync"')

    def handle(self, *args, connection_id, query, **options):
        connection = get_connection(connection_id)
        serializer = TriggerSerializer(data={"query": query})
        validated(serializer)
        trigger = serializer.save(connection=connection)
        self.stdout.write(str(trigger.pk))
