"""``manage.py bench_seed``: fill a project with many issues and comments at once, for benchmarks.

This is for benchmarks (``bench/sync.py``) only. It writes rows with ``bulk_create``,
bypassing ``trackers.builtin.actions``: no validation and no ``entity_changed`` signal,
so the sync does not notice the new issues until a trigger runs or a poll finds them.
The text is pseudo-random but the same for the same ``--seed``. Comments are spread
evenly, so every issue gets the average rounded up or down and the total is exact.

It prints JSON: the project, how many issues and comments it wrote, and ``seconds``,
the time spent inserting (building the rows and ``bulk_create`` in one transaction,
without generating the text), which is the benchmark's floor.
"""

from __future__ import annotations

import json
import random
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from trackers.builtin.management.commands.demo_setup import ADMIN_USERNAME, project_key
from trackers.builtin.models import Comment, Issue, Priority, Project, Status

VOCABULARY = (
    "sync node queue replica twin comment status priority label assignee tracker remote local "
    "update create delete retry lease batch worker event message signal trigger filter rule "
    "script merge conflict field value summary description project issue attachment hash "
    "the a of to and in is it on for with when after before while not every each one"
)
WORDS = VOCABULARY.split()
ISSUE_BATCH = 2000
COMMENT_BATCH = 5000


def text(rng: random.Random, low: int, high: int) -> str:
    """Words up to a length between ``low`` and ``high`` characters."""
    target = rng.randint(low, high)
    words: list[str] = []
    length = 0
    while length < target:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words).capitalize() + "."


def spread(total: int, buckets: int) -> list[int]:
    """``total`` split into ``buckets`` counts that differ by at most one and add up exactly."""
    return [(i + 1) * total // buckets - i * total // buckets for i in range(buckets)]


class Command(BaseCommand):
    help = "For benchmarks: bulk-create issues with comments in a project, without sending change signals."

    def add_arguments(self, parser):
        parser.add_argument("--issues", type=int, required=True, help="How many issues to create.")
        parser.add_argument("--comments", type=int, required=True, help="How many comments in all.")
        parser.add_argument("--project", default="", help="Project key (default: the node's own project).")
        parser.add_argument("--seed", type=int, default=1, help="Seed of the pseudo-random text (default 1).")

    def handle(self, *args, issues: int, comments: int, project: str, seed: int, **options):
        if issues < 1 or comments < 0:
            raise CommandError("--issues must be at least 1 and --comments at least 0")
        key = project or project_key(settings.NODE_NAME)
        found = Project.objects.filter(key=key).first()
        if found is None:
            raise CommandError(f"No project {key}; run demo_setup first.")
        author = get_user_model().objects.filter(username=ADMIN_USERNAME).first()
        statuses = list(Status.objects.all())
        priorities = list(Priority.objects.all())
        if not statuses:
            raise CommandError("No statuses; run migrate first.")

        rng = random.Random(seed)  # noqa: S311 - benchmark text, not a secret
        issue_texts = [(text(rng, 20, 80), text(rng, 200, 800)) for _ in range(issues)]
        comment_texts = [text(rng, 40, 400) for _ in range(comments)]
        per_issue = spread(comments, issues)

        started = time.perf_counter()
        with transaction.atomic():
            # Take the numbers as actions.create_issue does, so later issues continue after these.
            Project.objects.filter(pk=found.pk).update(next_number=F("next_number") + issues)
            first = Project.objects.select_for_update().values_list("next_number", flat=True).get(pk=found.pk) - issues
            now = timezone.now()
            rows = [
                Issue(
                    project=found,
                    number=first + i,
                    key=f"{key}-{first + i}",
                    summary=summary,
                    description=description,
                    status=statuses[i % len(statuses)],
                    priority=priorities[i % len(priorities)] if priorities else None,
                    reporter=author,
                    updated_by=author,
                    created=now,
                    updated=now,
                )
                for i, (summary, description) in enumerate(issue_texts)
            ]
            created = Issue.objects.bulk_create(rows, batch_size=ISSUE_BATCH)
            bodies = iter(comment_texts)
            comment_rows = [
                Comment(issue=issue, author=author, body=next(bodies), created=now, updated=now)
                for issue, count in zip(created, per_issue, strict=True)
                for _ in range(count)
            ]
            Comment.objects.bulk_create(comment_rows, batch_size=COMMENT_BATCH)
        seconds = time.perf_counter() - started
        self.stdout.write(
            json.dumps({"project": key, "issues": issues, "comments": comments, "seconds": round(seconds, 3)})
        )
