"""The Redmine adapter's promises beyond the shared contract, against the live Redmine.

``matches`` must cost about one request (triggers ask it for every changed issue) and
read a query exactly as ``search`` does.
"""

from __future__ import annotations

import os

import pytest

from tests.redmine_live import MISSING, RedmineAdmin, settings
from trackers.redmine.adapter import RedmineTracker

pytestmark = [pytest.mark.redmine, pytest.mark.skipif(settings() is None, reason=MISSING)]


@pytest.fixture(scope="module")
def admin():
    url, api_key, _ = settings()
    return RedmineAdmin(url, api_key)


@pytest.fixture(scope="module")
def tracker(admin):
    url, api_key, _ = settings()
    project = admin.create_project("adapter")
    yield RedmineTracker(url, api_key, project)
    admin.delete_project(project)


def test_it_tells_a_match_with_one_request(tracker):
    entity = tracker.create(tracker.project, {"summary": "counted requests"})
    before = tracker.client.requests_made
    assert tracker.matches("subject=~counted&tracker_id=1", entity.key) is True
    assert tracker.matches("subject=~uncounted", entity.key) is False
    assert tracker.client.requests_made - before == 2


def test_it_matches_closed_issues_unless_the_query_says_open(tracker):
    entity = tracker.create(tracker.project, {"summary": "closed match", "status": "Closed"})
    assert entity.key in {e.key for e in tracker.search("subject=~closed match").entities}
    assert tracker.matches("subject=~closed match", entity.key) is True
    assert tracker.matches("status_id=open&subject=~closed match", entity.key) is False


def test_it_matches_a_query_that_names_issues_itself(tracker):
    first, second, third = (tracker.create(tracker.project, {"summary": f"named {n}"}) for n in range(3))
    query = f"issue_id={first.key},{second.key}"
    assert [tracker.matches(query, e.key) for e in (first, second, third)] == [True, True, False]


def test_it_matches_only_issues_of_its_own_project(tracker, admin):
    elsewhere = admin.create_issue(os.environ["REDMINE_PROJECT"], "in another project")
    try:
        assert tracker.matches("status_id=*", str(elsewhere["id"])) is False
    finally:
        admin.client.delete(f"/issues/{elsewhere['id']}.json")


def test_it_matches_nothing_for_a_key_that_is_no_issue(tracker):
    assert tracker.matches("status_id=*", "999999999") is False
    assert tracker.matches("status_id=*", "not-a-number") is False
