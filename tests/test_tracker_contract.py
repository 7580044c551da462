"""Every adapter passes the tracker contract (tests/contract.py).

A tracker joins by adding a harness factory to HARNESSES; one that needs an outside
service skips with the reason when the service is not configured.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from unittest import mock

import pytest
from django.db import OperationalError

from tests import contract
from tests.redmine_live import MISSING as REDMINE_MISSING
from tests.redmine_live import SETTINGS as REDMINE_SETTINGS
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Project
from trackers.redmine.adapter import RedmineTracker
from trackers.redmine.client import RedmineClient


@contextmanager
def _database_down():
    with (
        mock.patch(
            "django.db.backends.utils.CursorWrapper.execute",
            side_effect=OperationalError("connection to server failed"),
        ),
        mock.patch(
            "django.db.backends.utils.CursorWrapper.executemany",
            side_effect=OperationalError("connection to server failed"),
        ),
    ):
        yield


def builtin_harness(django_user_model) -> contract.Harness:
    Project.objects.create(key="CON", name="Contract")
    django_user_model.objects.create_user("dana")
    return contract.Harness(
        tracker=BuiltinTracker(account="sync"),
        project="CON",
        statuses=("Open", "In Progress"),
        priorities=("Medium", "High"),
        assignee="dana",
        outage=_database_down,
        query_for_word=lambda word: word,
        invalid_query="nosuchfield:x",
    )


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redmine_assignee(client: RedmineClient, project: str) -> str:
    """A user who can be assigned issues of ``project``, made once per Redmine."""
    login = "contract-dana"
    users = client.get("/users.json", {"name": login})["users"]
    if users:
        user_id = users[0]["id"]
    else:
        user_id = client.post(
            "/users.json",
            {"user": {"login": login, "firstname": "Dana", "lastname": "Contract", "mail": "dana@example.org"}},
        )["user"]["id"]
    members = client.get(f"/projects/{project}/memberships.json", {"limit": 100})["memberships"]
    if not any(m.get("user", {}).get("id") == user_id for m in members):
        roles = {role["name"]: role["id"] for role in client.get("/roles.json")["roles"]}
        client.post(
            f"/projects/{project}/memberships.json",
            {"membership": {"user_id": user_id, "role_ids": [roles["Developer"]]}},
        )
    return str(user_id)


def redmine_harness(django_user_model) -> contract.Harness:
    if not all(os.environ.get(name) for name in REDMINE_SETTINGS):
        pytest.skip(REDMINE_MISSING)
    url, api_key, project = (os.environ[name] for name in REDMINE_SETTINGS)
    tracker = RedmineTracker(url, api_key, project)

    @contextmanager
    def unreachable():
        live_url = tracker.client.url
        tracker.client.url = f"http://127.0.0.1:{_closed_port()}"
        try:
            yield
        finally:
            tracker.client.url = live_url

    return contract.Harness(
        tracker=tracker,
        project=project,
        statuses=("New", "In Progress"),
        priorities=("Normal", "High"),
        assignee=_redmine_assignee(tracker.client, project),
        outage=unreachable,
        query_for_word=lambda word: f"subject=~{word}",
        invalid_query="no_such_filter=1",
        comment_edits_bump_updated=False,
        # Redmine cannot create custom fields over REST, so the contract's "Customer" is not there.
        supports_custom_fields=False,
        supports_labels=False,
    )


HARNESSES = {"builtin": builtin_harness, "redmine": redmine_harness}
# Tests that need an outside service carry its marker, so `-m "not redmine"` leaves them out.
MARKS = {"redmine": [pytest.mark.redmine]}


@pytest.fixture(params=[pytest.param(name, marks=MARKS.get(name, [])) for name in sorted(HARNESSES)])
def harness(request, db, django_user_model):
    return HARNESSES[request.param](django_user_model)


@pytest.mark.parametrize("check", contract.CHECKS, ids=list(contract.check_ids()))
def test_it_keeps_the_tracker_contract(harness, check):
    check(harness)
