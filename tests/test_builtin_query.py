import pytest

from trackers.builtin import actions, query
from trackers.builtin.models import Issue


@pytest.fixture
def issues(project, alice, bob):
    make = actions.create_issue
    return {
        "crash": make(project, {"summary": "App crash on start", "labels": ["backend"], "assignee": "alice"}, bob),
        "typo": make(project, {"summary": "Typo in footer", "status": "Closed", "priority": "Low"}, alice),
        "slow": make(project, {"summary": "Slow search", "description": "the crash log", "type": "Bug"}, alice),
    }


def keys(text: str) -> set[str]:
    return set(query.search(Issue.objects.all(), text).values_list("key", flat=True))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {"crash", "typo", "slow"}),
        ("crash", {"crash", "slow"}),
        ("crash start", {"crash"}),
        ("label:backend", {"crash"}),
        ("-label:backend", {"typo", "slow"}),
        ("assignee:alice", {"crash"}),
        ("assignee:none", {"typo", "slow"}),
        ("reporter:alice", {"typo", "slow"}),
        ('status:"closed"', {"typo"}),
        ("is:done", {"typo"}),
        ("is:open", {"crash", "slow"}),
        ("priority:low", {"typo"}),
        ("type:bug", {"slow"}),
        ("project:blue", {"crash", "typo", "slow"}),
        ("project:RED", set()),
        ("key:BLUE-2", {"typo"}),
        ("updated>=2000-01-01", {"crash", "typo", "slow"}),
        ("created<2000-01-01", set()),
        ('"on start"', {"crash"}),
    ],
)
def test_it_filters_issues(issues, text, expected):
    assert keys(text) == {issues[name].key for name in expected}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour:red", "unknown field 'colour'"),
        ('summary "open', "unbalanced"),
        ("status:", "needs a value"),
        ("is:maybe", "expected open or done"),
        ("updated:yesterday", "expected >=DATE"),
        ("updated>=31/01/2026", "expected a date"),
        ("x " * 40, "too many terms"),
        ("x" * 1001, "too long"),
    ],
)
def test_it_explains_what_it_cannot_read(db, text, message):
    with pytest.raises(query.QueryError, match=message):
        query.search(Issue.objects.all(), text)


def test_it_quotes_values_with_spaces():
    assert query.quote("In Progress") == '"In Progress"'
    assert query.quote("Open") == "Open"
    assert query.parse(f"status:{query.quote('In Progress')}") == [query.Term("status", "In Progress")]
