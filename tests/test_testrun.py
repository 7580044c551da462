"""Test Run: draft rules tried on real issues and replicas, and nothing written, ever."""

from __future__ import annotations

import json

import pytest

from connections import rules
from connections.models import RulesVersion
from syncqueue import processors, testrun
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import RITA, blue_issue, comment, connect_red, replica
from trackers.builtin import actions
from trackers.builtin.models import Comment, Issue

TEST_RUN = "/admin/connections/rulesversion/testrun/"


@pytest.fixture
def red(project):
    return connect_red()


@pytest.fixture
def issues(red, alice):
    return [
        blue_issue(alice, summary="First on Blue", priority="Medium"),
        blue_issue(alice, summary="Second on Blue", priority="High", labels=["ui"]),
    ]


@pytest.fixture
def twin(red, issues):
    """A twin of the first issue that last received Rita's rename and a comment."""
    return Twin.objects.create(
        connection=red,
        local_key=issues[0].key,
        remote_key="RED-1",
        last_received=replica(summary="Renamed on Red", labels=["red"], comments=[comment("c1", "Hello")]),
    )


def draft(connection, outgoing: str = rules.DEFAULT_OUTGOING, incoming: str = rules.DEFAULT_INCOMING):
    return testrun.draft_rules(connection, outgoing, incoming)


def database_state() -> dict:
    """Row counts of everything a sync could write, and every issue's last change."""
    return {
        "issues": list(Issue.objects.order_by("id").values_list("key", "summary", "updated")),
        "comments": Comment.objects.count(),
        "twins": list(Twin.objects.order_by("id").values_list("id", "local_key", "last_received", "comment_map")),
        "events": SyncEvent.objects.count(),
        "versions": RulesVersion.objects.count(),
    }


# --- outgoing --------------------------------------------------------------------------------


def test_it_shows_the_replica_of_each_key(red, issues):
    outgoing = (
        rules.DEFAULT_OUTGOING + 'replica.summary = "[Blue] " + issue.summary\nhelpers.debug("made", issue.key)\n'
    )
    first, second, missing = testrun.run_outgoing(
        red, draft(red, outgoing=outgoing), [issues[0].key, issues[1].key, "BLUE-99"]
    )
    assert first.key == issues[0].key and first.failure is None
    assert first.replica["summary"] == "[Blue] First on Blue" and first.replica["key"] == issues[0].key
    assert second.replica["summary"] == "[Blue] Second on Blue" and second.replica["labels"] == ["ui"]
    assert second.replica["priority"] == "High"
    assert any("made" in line and issues[1].key in line for line in second.debug)
    assert json.loads(second.replica_json) == second.replica
    assert missing.replica is None and "BLUE-99" in missing.failure.message


def test_it_points_at_the_line_of_an_outgoing_error(red, issues):
    outgoing = "replica.summary = issue.summary\nreplica.type = issue.summary.nope()\n"
    (result,) = testrun.run_outgoing(red, draft(red, outgoing=outgoing), [issues[0].key])
    assert result.replica is None
    assert result.failure.line == 2
    assert result.failure.message.startswith("outgoing rules, line 2: AttributeError")
    assert result.failure.source_line == "replica.type = issue.summary.nope()"


def test_it_shows_a_stop_as_not_synced(red, issues):
    (result,) = testrun.run_outgoing(red, draft(red, outgoing='helpers.stop_sync("private")\n'), [issues[0].key])
    assert result.failure.stopped and "private" in result.failure.message


def test_it_reads_keys_in_order_once():
    assert testrun.parse_keys("blue-2, BLUE-1\nblue-2") == ["BLUE-2", "BLUE-1"]
    with pytest.raises(testrun.TestRunError, match="at most"):
        testrun.parse_keys(" ".join(f"BLUE-{n}" for n in range(testrun.MAX_KEYS + 1)))


# --- incoming --------------------------------------------------------------------------------


def test_it_plans_the_twins_last_replica_field_by_field(red, twin, issues):
    result = testrun.run_incoming(red, draft(red), twin=twin)
    assert result.failure is None and not result.create and result.local_key == issues[0].key
    assert "last replica received" in result.source
    assert {c.name: (c.old, c.new) for c in result.changes} == {
        "summary": ("First on Blue", "Renamed on Red"),
        "labels": ([], ["red"]),
    }
    assert [(op.action, op.remote_id, op.local_id) for op in result.comments] == [("add", "c1", None)]
    assert result.comments[0].detail == f"Rita Red (Red) wrote:\n\nHello\n\n[sync {red.uuid.hex[:8]}:c1]"
    assert result.attachments == []


def test_it_plans_a_pasted_replica_for_a_twin_with_its_last_replica_as_previous(red, twin, issues, bob):
    incoming = (
        rules.DEFAULT_INCOMING
        + "if previous.summary != replica.summary:\n    issue.description = 'was ' + previous.summary\n"
    )
    pasted = replica(summary="Again on Red", assignee={"id": "bob", "email": "bob@example.org"}, priority="Medium")
    result = testrun.run_incoming(red, draft(red, incoming=incoming), twin=twin, replica=pasted)
    changes = {c.name: (c.old, c.new) for c in result.changes}
    assert changes == {
        "summary": ("First on Blue", "Again on Red"),
        "description": ("", "was Renamed on Red"),
        "assignee": (None, "bob"),
    }
    assert [c.new_json for c in result.changes if c.name == "assignee"] == ['"bob"']


def test_it_plans_a_pasted_replica_without_a_twin_as_a_first_sync(red):
    pasted = testrun.parse_replica(json.dumps(replica(summary="New on Red", reporter=RITA)))
    result = testrun.run_incoming(red, draft(red), replica=pasted)
    assert result.create and result.project == "BLUE" and result.local_key is None
    changes = {c.name: (c.old, c.new) for c in result.changes}
    assert changes["summary"] == (None, "New on Red") and changes["type"] == (None, "Task")


def test_it_explains_invalid_pasted_json():
    with pytest.raises(testrun.TestRunError, match=r"not valid JSON: Expecting .* \(line 1, column"):
        testrun.parse_replica('{"summary": ')
    with pytest.raises(testrun.TestRunError, match="JSON object"):
        testrun.parse_replica('["summary"]')


def test_it_refuses_a_twin_with_nothing_received_or_of_another_connection(red, issues):
    empty = Twin.objects.create(connection=red, local_key=issues[1].key, remote_key="RED-2")
    with pytest.raises(testrun.TestRunError, match="received nothing yet"):
        testrun.run_incoming(red, draft(red), twin=empty)
    other = connect_red(project="BLUE", trigger=False)
    with pytest.raises(testrun.TestRunError, match="another connection"):
        testrun.run_incoming(other, draft(other), twin=empty)


def test_it_points_at_the_line_of_an_incoming_error(red, twin):
    incoming = "issue.summary = replica.summary\n\nissue.labels = replica.labels + 1\n"
    result = testrun.run_incoming(red, draft(red, incoming=incoming), twin=twin)
    assert result.failure.line == 3 and result.failure.message.startswith("incoming rules, line 3: TypeError")
    assert result.changes == []


# --- nothing written -------------------------------------------------------------------------


def test_it_never_writes_anything(red, twin, issues):
    before = database_state()
    testrun.run_outgoing(red, draft(red), [issue.key for issue in issues])
    testrun.run_incoming(red, draft(red), twin=twin)
    testrun.run_incoming(red, draft(red), replica=replica(summary="New on Red"))
    assert database_state() == before


def test_it_rolls_back_even_a_write_made_during_the_run(red, twin, issues, monkeypatch, alice):
    """Belt and braces: should a processor ever write, the Test Run still leaves no trace."""
    real_plan = processors.plan_incoming

    def writing_plan(*args, **kwargs):
        actions.update_issue(issues[0], {"summary": "Written by mistake"}, actor=alice)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(processors, "plan_incoming", writing_plan)
    before = database_state()
    result = testrun.run_incoming(red, draft(red), twin=twin)
    assert result.failure is None
    assert database_state() == before
    assert Issue.objects.get(pk=issues[0].pk).summary == "First on Blue"


# --- the page --------------------------------------------------------------------------------


def form_data(red, **extra) -> dict:
    """What the add form (or the Test Run page) posts: the editors' draft and what to try it on."""
    return {
        "connection": red.pk,
        "outgoing": rules.DEFAULT_OUTGOING,
        "incoming": rules.DEFAULT_INCOMING,
        "comment": "draft",
        "activate": "on",
        "keys": "",
        "twin": "",
        "replica": "",
        **extra,
    }


def test_it_runs_the_draft_from_the_page_and_writes_nothing(client, bob, red, twin, issues):
    client.force_login(bob)
    before = database_state()
    outgoing = rules.DEFAULT_OUTGOING + 'replica.summary = "<b>" + issue.summary\n'
    data = form_data(red, outgoing=outgoing, keys=f"{issues[0].key} {issues[1].key}", twin="RED-1")
    page = client.post(TEST_RUN, data).content.decode()
    assert f'id="outgoing-{issues[0].key}"' in page and f'id="outgoing-{issues[1].key}"' in page
    assert "&quot;summary&quot;: &quot;&lt;b&gt;Second on Blue&quot;" in page
    assert "<b>Second" not in page
    assert 'class="field-change-summary"' in page and "&quot;Renamed on Red&quot;" in page
    assert "Would <strong>update</strong> " + issues[0].key in page
    assert "Rita Red (Red) wrote:" in page
    assert database_state() == before
    # The draft stays in the editors, to be changed and run again.
    assert "&lt;b&gt;" in page and 'data-mode="python"' in page
    assert 'value="Save as a new version"' not in page  # bob cannot save


def test_it_shows_errors_with_their_line_on_the_page(as_alice, red, issues):
    data = form_data(red, outgoing="x = 1\nif\n", incoming="issue.summary = 1 / 0\n", keys=issues[0].key)
    data["replica"] = json.dumps(replica())
    page = as_alice.post(TEST_RUN, data).content.decode()
    assert "outgoing rules, line 2: " in page and "line 2 reads: if" in page
    assert "incoming rules, line 1: ZeroDivisionError" in page
    assert "<pre>1: issue.summary = 1 / 0</pre>" in page
    assert 'value="Save as a new version"' in page


def test_it_tells_what_is_wrong_with_the_input(as_alice, red):
    page = as_alice.post(TEST_RUN, form_data(red, replica='{"summary": ')).content.decode()
    assert "the pasted replica is not valid JSON" in page
    page = as_alice.post(TEST_RUN, form_data(red, twin="RED-404")).content.decode()
    assert "Red has no twin with the key RED-404." in page
    page = as_alice.post(TEST_RUN, form_data(red)).content.decode()
    assert "Give local issue keys" in page


def test_it_saves_from_the_test_run_page_only_when_asked(as_alice, red, issues):
    """The add form's Test Run button posts here; "Save as a new version" posts the same fields to add."""
    add_page = as_alice.get(f"/admin/connections/rulesversion/add/?connection={red.pk}").content.decode()
    assert f'formaction="{TEST_RUN}"' in add_page and 'name="keys"' in add_page
    data = form_data(red, keys=issues[0].key)
    as_alice.post(TEST_RUN, data)
    assert red.rules_versions.count() == 1
    r = as_alice.post("/admin/connections/rulesversion/add/", data)
    assert r.status_code == 302
    assert red.rules_versions.count() == 2


def test_it_starts_the_page_from_a_version(as_alice, red):
    page = as_alice.get(f"{TEST_RUN}?from={red.active_rules_id}").content.decode()
    assert "helpers.merge_comments()" in page and "Test Run results" not in page


def test_plain_users_cannot_test_run(client, charlie, red):
    client.force_login(charlie)
    assert client.post(TEST_RUN, form_data(red, keys="BLUE-1")).status_code == 302


def test_it_replays_the_failed_message_of_a_twin_that_never_synced(red, issues):
    failing = Twin.objects.create(connection=red, remote_key="RED-9", state="blocked")
    SyncEvent.objects.create(
        connection=red,
        twin=failing,
        direction="incoming",
        seq=1,
        status="failed",
        payload={"replica": replica(key="RED-9", summary="Broke the rules")},
        error="incoming rules, line 1: boom",
    )
    result = testrun.run_incoming(red, draft(red), twin=failing)
    assert "failed message #1" in result.source
    assert result.create and {c.name: c.new for c in result.changes}["summary"] == "Broke the rules"
