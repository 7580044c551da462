"""``manage.py connection_accept CODE``: pair with the node that made the invitation code."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from connections import handshake
from connections.api import AcceptInput
from connections.management import COLUMNS, get_connection, row, validated


class Command(BaseCommand):
    help = (
        "Accept an invitation code made on another node. Prints the new, active connection as "
        f"connection_list does ({', '.join(COLUMNS)}), without the header."
    )

    def add_arguments(self, parser):
        parser.add_argument("code", metavar="CODE", help="The invitation code (EXL1-...).")
        parser.add_argument("--name", default="", help="A name for the connection (default: the other node's).")
        parser.add_argument("--project", default="", help="Local project key where remote entities are created.")
        parser.add_argument(
            "--private",
            action="store_true",
            help="This node cannot be reached from the other node: it pulls its messages from there.",
        )

    def handle(self, *args, code, name, project, private, **options):
        data = validated(
            AcceptInput(data={"code": code, "name": name, "project": project}),
            {"name": "--name", "project": "--project"},
        )
        try:
            connection = handshake.accept_invitation(
                data["code"], name=data["name"], project=data["project"], private=private
            )
        except handshake.HandshakeError as e:
            raise CommandError(e.message) from None
        self.stdout.write(row(get_connection(connection.pk)))
