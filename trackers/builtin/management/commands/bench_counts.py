"""``manage.py bench_counts``: how many issues and comments a project holds, as JSON (for benchmarks)."""

from __future__ import annotations

import json

from django.conf import settings
from django.core.management.base import BaseCommand

from trackers.builtin.management.commands.demo_setup import project_key
from trackers.builtin.models import Comment, Issue


class Command(BaseCommand):
    help = "For benchmarks: print the number of issues and comments in a project as JSON."

    def add_arguments(self, parser):
        parser.add_argument("--project", default="", help="Project key (default: the node's own project).")

    def handle(self, *args, project: str, **options):
        key = project or project_key(settings.NODE_NAME)
        counts = {
            "project": key,
            "issues": Issue.objects.filter(project__key=key).count(),
            "comments": Comment.objects.filter(issue__project__key=key).count(),
        }
        self.stdout.write(json.dumps(counts))
