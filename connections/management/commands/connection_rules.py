"""``manage.py connection_rules ID --outgoing FILE --incoming FILE``: save a new version of the rules."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from connections import rules
from connections.api import RulesInput
from connections.management import get_connection, validated


def read_script(option: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise CommandError(f"{option}: cannot read {path}: {reason}.") from None


class Command(BaseCommand):
    help = (
        "Save the scripts in the two files as the connection's new rules version and activate it; "
        "prints the version number. A script that does not compile is refused with its line."
    )

    def add_arguments(self, parser):
        parser.add_argument("connection_id", type=int, metavar="ID", help="The connection's id (see connection_list).")
        parser.add_argument("--outgoing", required=True, metavar="FILE", help="The outgoing script.")
        parser.add_argument("--incoming", required=True, metavar="FILE", help="The incoming script.")
        parser.add_argument("--comment", default="", help="What changed, for the version history.")

    def handle(self, *args, connection_id, outgoing, incoming, comment, **options):
        connection = get_connection(connection_id)
        data = validated(
            RulesInput(
                data={
                    "outgoing": read_script("--outgoing", outgoing),
                    "incoming": read_script("--incoming", incoming),
                    "comment": comment,
                }
            ),
            {"outgoing": "--outgoing", "incoming": "--incoming", "comment": "--comment"},
        )
        try:
            version = rules.save_rules(connection, **data)
        except rules.RulesError as e:
            raise CommandError(f"Rules not saved: {e}") from None
        self.stdout.write(str(version.number))
