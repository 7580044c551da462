"""``manage.py node_tracker``: which tracker this node serves, and its settings.

    manage.py node_tracker                                  # show them (the API key never)
    manage.py node_tracker builtin [--poll-seconds N]
    manage.py node_tracker redmine --url URL --api-key-file PATH --project IDENTIFIER \\
        [--status-map NAME=ID ...] [--priority-map NAME=ID ...] [--tracker-map NAME=ID ...] [--poll-seconds N]

``--api-key-file PATH`` or ``--api-key -`` (standard input) keep the key out of the
process list. Left out, the stored key is kept as long as the URL stays the same; every
other setting left out goes back to its default. The tracker is tried once before
anything is saved (``connections.tracker_settings``), so a wrong key or an unreachable
server is a clear error here, not a stuck queue later.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from connections import tracker_settings
from connections.models import MAX_POLL_SECONDS, Node
from trackers import registry


class Command(BaseCommand):
    help = "Show or set the tracker this node serves (built-in or Redmine), its settings and poll interval."
    # call_command(..., stdin=...) stands in for the terminal in tests.
    stealth_options = ("stdin",)

    def add_arguments(self, parser):
        parser.add_argument("kind", nargs="?", help=f"One of: {', '.join(registry.kinds())}. Omit to show.")
        parser.add_argument("--url", default="", help="Redmine: its base URL, e.g. https://redmine.example.org")
        parser.add_argument(
            "--api-key",
            help="Redmine: the API key of the account the sync writes as; '-' reads it from standard input. "
            "A key given here shows in the process list: prefer '-' or --api-key-file.",
        )
        parser.add_argument("--api-key-file", metavar="PATH", help="Redmine: a file holding the API key.")
        parser.add_argument("--project", default="", help="Redmine: the identifier of the project to sync.")
        for name, what in (("status", "a status"), ("priority", "a priority"), ("tracker", "a tracker (issue type)")):
            parser.add_argument(
                f"--{name}-map",
                action="append",
                default=[],
                metavar="NAME=ID",
                help=f"Redmine: a name the rules may use for {what}, and its Redmine id. Repeat for more.",
            )
        parser.add_argument(
            "--poll-seconds",
            type=int,
            metavar="N",
            help=f"Look for changes every N seconds (1 to {MAX_POLL_SECONDS}); left out, SYNC_POLL_SECONDS "
            f"({settings.SYNC_POLL_SECONDS}).",
        )

    def handle(self, *args, kind: str | None = None, **options):
        node = Node.local()
        if kind is None:
            if _changes_asked(options):
                raise CommandError(f"name the tracker kind ({', '.join(registry.kinds())}) to change its settings")
            self._show(node)
            return
        try:
            maps = {name: tracker_settings.parse_map(options[name], name) for name in tracker_settings.MAP_NAMES}
            account = tracker_settings.save(
                node,
                kind,
                url=options["url"],
                api_key=self._api_key(options),
                project=options["project"],
                poll_seconds=options["poll_seconds"],
                **maps,
            )
        except tracker_settings.TrackerSettingsError as e:
            raise CommandError(e.message) from None
        self.stdout.write(
            f"{node.name} now serves its {kind} tracker, looked at every {node.poll_interval()} seconds; "
            f"the sync writes as {account.name or account.id}."
        )

    def _api_key(self, options) -> str:
        given, path = options["api_key"], options["api_key_file"]
        if given is not None and path is not None:
            raise CommandError("give --api-key or --api-key-file, not both")
        if path is not None:
            try:
                key = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CommandError(
                    f"cannot read the API key from {path}: {getattr(e, 'strerror', None) or e}"
                ) from None
        elif given == "-":
            stdin = options.get("stdin") or sys.stdin
            key = getpass.getpass("Redmine API key: ") if stdin.isatty() else stdin.read()
        else:
            return given or ""
        if not key.strip():
            raise CommandError(f"no API key in {path or 'standard input'}")
        return key.strip()

    def _show(self, node: Node) -> None:
        config = node.tracker_config()
        lines = [f"kind: {node.tracker_kind}"]
        if node.tracker_kind == "redmine":
            lines += [
                f"url: {config.get('url', '')}",
                f"api_key: {'set' if config.get('api_key') else 'not set'}",
                f"project: {config.get('project', '')}",
            ]
            for name in tracker_settings.MAP_NAMES:
                lines.append(f"{name}: {', '.join(tracker_settings.format_map(config.get(name, {}))) or 'none'}")
        default = " (the SYNC_POLL_SECONDS setting)" if node.poll_seconds is None else ""
        lines.append(f"poll_seconds: {node.poll_interval()}{default}")
        self.stdout.write("\n".join(lines))


def _changes_asked(options) -> bool:
    names = ("url", "api_key", "api_key_file", "project", "poll_seconds", *tracker_settings.MAP_NAMES)
    return any(options[name] not in (None, "", []) for name in names)
