"""``manage.py node_tracker``: which tracker this node serves, and its settings.

    manage.py node_tracker                                  # show it (the API key never)
    manage.py node_tracker builtin
    manage.py node_tracker redmine --url URL --api-key KEY --project IDENTIFIER

The settings are kept encrypted in the database. Before anything is saved the tracker is
tried once (its sync account is read), so a wrong key or an unreachable server is a clear
error here, not a stuck queue later.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from connections.models import Node
from trackers import registry
from trackers.base import TrackerError


class Command(BaseCommand):
    help = "Show or set the tracker this node serves (built-in or Redmine) and its settings."

    def add_arguments(self, parser):
        parser.add_argument("kind", nargs="?", help=f"One of: {', '.join(registry.kinds())}. Omit to show.")
        parser.add_argument("--url", help="Redmine: its base URL, e.g. https://redmine.example.org")
        parser.add_argument("--api-key", help="Redmine: the API key of the account the sync writes as.")
        parser.add_argument("--project", help="Redmine: the project identifier to sync.")

    def handle(self, *args, kind=None, url=None, api_key=None, project=None, **options):
        node = Node.local()
        if kind is None:
            shown = {k: v for k, v in node.tracker_config().items() if k != "api_key"}
            self.stdout.write(f"{node.tracker_kind}\t{json.dumps(shown, sort_keys=True)}")
            return
        if kind not in registry.kinds():
            raise CommandError(f"unknown tracker kind {kind!r} (known: {', '.join(registry.kinds())})")
        config = {}
        if kind == "redmine":
            missing = [
                name for name, value in (("--url", url), ("--api-key", api_key), ("--project", project)) if not value
            ]
            if missing:
                raise CommandError(f"a Redmine node needs {', '.join(missing)}")
            config = {"url": url.rstrip("/"), "api_key": api_key, "project": project}
        elif any((url, api_key, project)):
            raise CommandError(f"--url, --api-key and --project are for Redmine, not for {kind}")
        try:
            account = registry.create(kind, **config).sync_account()
        except TrackerError as e:
            raise CommandError(f"the {kind} tracker does not work with these settings: {e}") from None
        node.tracker_kind = kind
        node.tracker_settings = json.dumps(config) if config else ""
        node.save(update_fields=["tracker_kind", "tracker_settings"])
        self.stdout.write(
            f"{node.name} now serves its {kind} tracker; the sync writes as {account.name or account.id}."
        )
