"""``manage.py connection_deactivate ID``: pause a connection; it keeps collecting changes."""

from __future__ import annotations

from connections.management.commands import connection_activate


class Command(connection_activate.Command):
    help = "Deactivate a connection (changes are still collected and sent once it is active again)."
    active = False
