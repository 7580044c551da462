"""``manage.py connection_list``: the connections of this node, one a line."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from connections.management import COLUMNS, row
from connections.models import Connection


class Command(BaseCommand):
    help = f"List the connections, tab-separated with a header line: {', '.join(COLUMNS)}."

    def handle(self, *args, **options):
        self.stdout.write("\t".join(COLUMNS))
        for connection in Connection.objects.select_related("active_rules").order_by("id"):
            self.stdout.write(row(connection))
