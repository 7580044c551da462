"""Every adapter passes the tracker contract (tests/contract.py).

A tracker joins by adding a harness factory to HARNESSES; one that needs an outside
service skips with the reason when the service is not configured.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
from django.db import OperationalError

from tests import contract
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Project


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
    )


HARNESSES = {"builtin": builtin_harness}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request, db, django_user_model):
    return HARNESSES[request.param](django_user_model)


@pytest.mark.parametrize("check", contract.CHECKS, ids=list(contract.check_ids()))
def test_it_keeps_the_tracker_contract(harness, check):
    check(harness)
