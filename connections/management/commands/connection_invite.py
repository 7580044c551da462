"""``manage.py connection_invite NAME``: a pending connection and its invitation code."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from connections import handshake
from connections.api import InvitationInput
from connections.management import validated


class Command(BaseCommand):
    help = (
        "Create a pending connection and print its single-use invitation code on its own line; "
        "the connection id and the expiry go to stderr. Give the code to the other node's admin."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", metavar="NAME", help="A name for the connection, e.g. the other node's name.")
        parser.add_argument("--project", default="", help="Local project key where remote entities are created.")
        parser.add_argument("--hours", type=int, default=24, help="How long the code stays valid (default 24).")

    def handle(self, *args, name, project, hours, **options):
        data = validated(
            InvitationInput(data={"name": name, "project": project, "hours_valid": hours}),
            {"hours_valid": "--hours", "project": "--project"},
        )
        try:
            connection, code, expires = handshake.create_invitation(
                data["name"], project=data["project"], hours=data["hours_valid"]
            )
        except handshake.HandshakeError as e:
            raise CommandError(e.message) from None
        self.stdout.write(code)
        self.stderr.write(f"Connection {connection.pk} is pending; the code expires at {expires.isoformat()}.")
