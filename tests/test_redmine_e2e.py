"""End to end through a real Redmine: three live processes on loopback.

The Redmine that ``scripts/redmine`` serves, a node serving a fresh project of it, and a
built-in node, paired through the invitation flow (tests/redmine_live.py). The built-in
side is driven through its REST API, the Redmine side through Redmine's own REST API, as
the people using each tracker would. Runs on SQLite, or on PostgreSQL when DATABASE_URL
names one.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta

import pytest

from tests.livenodes import LiveNode
from tests.redmine_live import (
    EXTERNAL_ID,
    MISSING,
    PollWatch,
    RedminePair,
    comments_of,
    control_problem,
    custom_field,
    run_script,
    settings,
)

pytestmark = [pytest.mark.redmine, pytest.mark.skipif(settings() is None, reason=MISSING)]

POLL = 2  # SYNC_POLL_SECONDS of live nodes


@pytest.fixture(scope="module")
def sync(tmp_path_factory):
    pair = RedminePair(tmp_path_factory.mktemp("redmine-e2e"), wait_for_polling=False)
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module", autouse=True)
def polling(sync):
    """Watches the Redmine node's polling for the whole module."""
    watch = PollWatch(sync.redmine).start()
    yield watch
    watch.stop()


# --- helpers -----------------------------------------------------------------------------------


def redmine_id_of(sync: RedminePair, key: str) -> str:
    """The Redmine issue the built-in ``key`` is synced to, once the first sync is acknowledged."""

    def acknowledged():
        twins = sync.builtin.twins(local_key=key)
        return twins and twins[0]["remote_key"]

    return sync.wait(acknowledged, f"{key} to reach Redmine")


def builtin_key_of(sync: RedminePair, issue_id: int | str) -> str:
    """The built-in issue Redmine's ``issue_id`` is synced to, once the first sync is acknowledged."""

    def acknowledged():
        twins = sync.redmine.twins(local_key=str(issue_id))
        return twins and twins[0]["remote_key"]

    return sync.wait(acknowledged, f"Redmine issue {issue_id} to reach the built-in node")


class SyncBroke(Exception):
    """A failed event or a blocked twin: waiting longer cannot help, so the wait stops at once."""


def drained(node: LiveNode) -> bool:
    """Nothing waits in the node's queue; a failed event or a blocked twin raises SyncBroke."""
    for connection in node.api("GET", "queue/stats/")["connections"]:
        if connection["blocked_twins"] or any("failed" in connection[d] for d in ("outgoing", "incoming")):
            raise SyncBroke(f"{node.name}: {connection}; blocked: {node.twins(state='blocked')}")
        if any(set(connection[d]) - {"done"} for d in ("outgoing", "incoming")):
            return False
    return True


def twin_settled(node: LiveNode, **which: str) -> bool:
    """The twin (by local_key or remote_key) has nothing waiting; failed or blocked raises SyncBroke."""
    twins = node.twins(**which)
    if not twins:
        return False
    detail = node.api("GET", f"twins/{twins[0]['id']}/")
    if detail["state"] == "blocked" or any(e["status"] == "failed" for e in detail["events"]):
        raise SyncBroke(f"{node.name}: twin {which} is {detail['state']}: {detail['last_error']}")
    return all(e["status"] == "done" for e in detail["events"])


def settle(sync: RedminePair, *keys: str) -> None:
    """Wait until both queues are empty, or, given built-in keys, until those twins are, on both sides."""
    if not keys:
        sync.wait(lambda: drained(sync.builtin) and drained(sync.redmine), "both queues to drain")
        return
    sync.wait(
        lambda: all(
            twin_settled(sync.builtin, local_key=key) and twin_settled(sync.redmine, remote_key=key) for key in keys
        ),
        f"the twins of {', '.join(keys)} to settle",
    )


def builtin_fields(node: LiveNode, key: str, *names: str) -> tuple:
    issue = node.issue(key)
    return tuple(issue[name] for name in names)


def builtin_comments(node: LiveNode, key: str) -> list[str]:
    return [c["body"] for c in node.api("GET", f"tracker/issues/{key}/comments/")["results"]]


def builtin_attachments(node: LiveNode, key: str) -> dict[str, str]:
    return {a["filename"]: a["sha256"] for a in node.api("GET", f"tracker/issues/{key}/attachments/")["results"]}


def redmine_attachments(sync: RedminePair, issue_id: str) -> dict[str, str]:
    return {
        a["filename"]: hashlib.sha256(sync.admin.download(a)).hexdigest()
        for a in sync.admin.issue(issue_id)["attachments"]
    }


def history(issue: dict, attribute: str) -> list[str]:
    """The values an attribute of a Redmine issue took, change by change, from its journals."""
    return [
        d["new_value"]
        for j in issue["journals"]
        for d in j["details"]
        if d["property"] == "attr" and d["name"] == attribute
    ]


def snapshot(sync: RedminePair) -> dict:
    """What both sides hold: issues with their last change, comment and attachment counts, twins."""
    redmine = {}
    for row in sync.admin.issues(sync.project):
        issue = sync.admin.issue(row["id"])
        redmine[str(issue["id"])] = (issue["updated_on"], len(comments_of(issue)), len(issue["attachments"]))
    builtin = {}
    for issue in sync.builtin.api("GET", "tracker/issues/", params={"project": sync.builtin.project})["results"]:
        key = issue["key"]
        builtin[key] = (
            issue["updated"],
            len(builtin_comments(sync.builtin, key)),
            len(builtin_attachments(sync.builtin, key)),
        )
    return {
        "redmine": redmine,
        "builtin": builtin,
        "redmine twins": sorted((t["local_key"], t["remote_key"]) for t in sync.redmine.twins()),
        "builtin twins": sorted((t["local_key"], t["remote_key"]) for t in sync.builtin.twins()),
    }


# --- first syncs, and Redmine going away for a while -------------------------------------------


def test_it_creates_the_redmine_issue_on_first_sync_with_the_built_in_key(sync):
    created = sync.builtin.create_issue(summary="Printer on fire", description="Tray 2\nsmokes", priority="High")
    issue_id = redmine_id_of(sync, created["key"])
    issue = sync.admin.issue(issue_id)
    assert issue["project"]["name"] == sync.project
    assert (issue["subject"], issue["description"].replace("\r\n", "\n")) == ("Printer on fire", "Tray 2\nsmokes")
    assert (issue["tracker"]["name"], issue["status"]["name"], issue["priority"]["name"]) == ("Bug", "New", "High")
    assert custom_field(issue, EXTERNAL_ID) == created["key"]
    assert sync.redmine.twins(local_key=issue_id)[0]["remote_key"] == created["key"]
    assert [t["state"] for t in sync.builtin.twins(local_key=created["key"])] == ["ok"]


def test_it_holds_changes_while_redmine_is_down_and_delivers_them_after(sync):
    problem = control_problem()
    if problem:
        pytest.skip(problem)
    before = sync.builtin.create_issue(summary="Before the outage")
    issue_id = redmine_id_of(sync, before["key"])
    settle(sync)
    twin_id = sync.redmine.twins(local_key=issue_id)[0]["id"]

    run_script("stop")
    try:
        during = sync.builtin.create_issue(summary="Made while Redmine was down")
        sync.builtin.api("POST", f"tracker/issues/{before['key']}/comments/", json={"body": "Said while down"})
        sync.builtin.api("POST", f"tracker/issues/{before['key']}/comments/", json={"body": "And more"})

        def held() -> str | None:
            """When the comment, held for the outage, is tried next."""
            assert not drained(sync.redmine)
            events = sync.redmine.api("GET", f"twins/{twin_id}/")["events"]
            waiting = [e for e in events if e["direction"] == "incoming" and e["status"] == "pending" and e["error"]]
            return waiting[0]["next_attempt"] if waiting else None

        first_hold = sync.wait(held, "the Redmine node to hold the comment")
        # Held events are tried again later; after a retry they still wait and no twin is blocked.
        sync.wait(lambda: held() not in (None, first_hold), "the held comment to be tried again")
        problem = sync.redmine.api("GET", f"connections/{sync.redmine.connection}/")["tracker_problem"]
        assert "Redmine" in (problem or ""), "the connection says why the queue waits"
        stats = sync.redmine.api("GET", "queue/stats/")["connections"][0]
        assert stats["incoming"].get("pending", 0) >= 2, stats
        assert stats["blocked_twins"] == 0 and "failed" not in stats["incoming"], stats
        assert [t["state"] for t in sync.redmine.twins()] == ["ok"] * len(sync.redmine.twins())
    finally:
        run_script("up")

    new_id = redmine_id_of(sync, during["key"])
    settle(sync)
    assert sync.admin.issue(new_id)["subject"] == "Made while Redmine was down"
    notes = comments_of(sync.admin.issue(issue_id))
    assert [sum(text in note for note in notes) for text in ("Said while down", "And more")] == [1, 1]
    for key in (before["key"], during["key"]):
        assert len(sync.admin.issues(sync.project, **{sync.admin.external_id_filter(): key})) == 1, "created once"
    assert {t["state"] for t in sync.redmine.twins() + sync.builtin.twins()} == {"ok"}


# --- changes made in Redmine, found by polling -----------------------------------------------


def test_it_brings_a_new_redmine_issue_to_the_built_in_tracker(sync):
    high = sync.admin.priority_id("High")
    made = sync.person.create_issue(sync.project, "Made in Redmine", description="Redmine's words", priority_id=high)
    key = builtin_key_of(sync, made["id"])
    copy = sync.builtin.issue(key)
    assert key.startswith(f"{sync.builtin.project}-")
    assert (copy["summary"], copy["description"]) == ("Made in Redmine", "Redmine's words")
    assert (copy["type"], copy["status"], copy["priority"]) == ("Task", "Open", "High"), "New maps to Open"
    assert sync.builtin.twins(local_key=key)[0]["remote_key"] == str(made["id"])
    # The acknowledgement runs the Redmine node's incoming rules, which record the built-in key.
    sync.wait(
        lambda: custom_field(sync.admin.issue(made["id"]), EXTERNAL_ID) == key,
        "the built-in key in Redmine's External ID",
    )


def test_it_brings_redmine_edits_and_mapped_statuses_to_the_built_in_tracker(sync):
    created = sync.builtin.create_issue(summary="Edit me in Redmine", description="Blue's words")
    key = created["key"]
    issue_id = redmine_id_of(sync, key)
    settle(sync)

    sync.person.update_issue(issue_id, subject="Edited in Redmine", status_id=sync.admin.status_id("Resolved"))
    sync.wait(
        lambda: builtin_fields(sync.builtin, key, "summary", "status") == ("Edited in Redmine", "Resolved"),
        "Redmine's edit on Blue",
    )
    assert sync.builtin.issue(key)["description"] == "Blue's words", "a field not changed in Redmine stays"
    settle(sync)
    sync.person.update_issue(issue_id, description="Redmine's words", status_id=sync.admin.status_id("In Progress"))
    sync.wait(
        lambda: builtin_fields(sync.builtin, key, "description", "status") == ("Redmine's words", "In Progress"),
        "Redmine's description and In Progress on Blue",
    )
    settle(sync)
    sync.person.update_issue(issue_id, status_id=sync.admin.status_id("New"))
    sync.wait(lambda: sync.builtin.issue(key)["status"] == "Open", "New to arrive as Open")
    settle(sync)
    assert [i["id"] for i in sync.admin.issues(sync.project, **{sync.admin.external_id_filter(): key})] == [
        int(issue_id)
    ], "later syncs update the one Redmine issue"
    assert custom_field(sync.admin.issue(issue_id), EXTERNAL_ID) == key
    assert sync.admin.issue(issue_id)["subject"] == "Edited in Redmine"


def test_it_syncs_comments_and_attachments_both_ways_once(sync):
    created = sync.builtin.create_issue(summary="Talk and files")
    key = created["key"]
    issue_id = redmine_id_of(sync, key)
    settle(sync)
    from_blue, from_redmine = os.urandom(20_000), os.urandom(30_000)

    sync.builtin.api("POST", f"tracker/issues/{key}/comments/", json={"body": "From Blue"})
    sync.builtin.api("POST", f"tracker/issues/{key}/attachments/", files={"file": ("blue.bin", from_blue)})
    sync.wait(
        lambda: len(comments_of(sync.admin.issue(issue_id))) == 1 and redmine_attachments(sync, issue_id),
        "Blue's comment and attachment in Redmine",
    )
    (note,) = comments_of(sync.admin.issue(issue_id))
    assert "(Blue) wrote:" in note and "From Blue" in note
    assert redmine_attachments(sync, issue_id) == {"blue.bin": hashlib.sha256(from_blue).hexdigest()}

    sync.person.update_issue(issue_id, notes="From Redmine")
    sync.person.attach(issue_id, "redmine.bin", from_redmine)
    sync.wait(
        lambda: len(builtin_comments(sync.builtin, key)) == 2 and len(builtin_attachments(sync.builtin, key)) == 2,
        "Redmine's comment and attachment on Blue",
    )
    assert "Pat Person (Rm) wrote:" in builtin_comments(sync.builtin, key)[1]
    assert "From Redmine" in builtin_comments(sync.builtin, key)[1]
    assert builtin_attachments(sync.builtin, key)["redmine.bin"] == hashlib.sha256(from_redmine).hexdigest()

    # A second round: later comments are added, the earlier ones are not added again.
    sync.builtin.api("POST", f"tracker/issues/{key}/comments/", json={"body": "Blue again"})
    sync.person.update_issue(issue_id, notes="Redmine again")
    sync.wait(
        lambda: len(builtin_comments(sync.builtin, key)) == 4 and len(comments_of(sync.admin.issue(issue_id))) == 4,
        "the second round of comments on both sides",
    )
    settle(sync)
    time.sleep(3 * POLL)  # an echo, if there were one, would add comments or attachments now
    redmine_notes = comments_of(sync.admin.issue(issue_id))
    blue_bodies = builtin_comments(sync.builtin, key)
    assert [sum(word in note for note in redmine_notes) for word in ("From Blue", "Blue again")] == [1, 1]
    assert [sum(word in body for body in blue_bodies) for word in ("From Redmine", "Redmine again")] == [1, 1]
    assert len(redmine_notes) == len(blue_bodies) == 4, "no comment doubled or echoed back"
    assert redmine_attachments(sync, issue_id) == builtin_attachments(sync.builtin, key), "the same files, once each"
    assert len(builtin_attachments(sync.builtin, key)) == 2


def test_it_settles_with_no_echo_and_no_doubles(sync):
    settle(sync)
    first = snapshot(sync)
    time.sleep(3 * POLL)  # several polling passes and sweeps of every twin
    settle(sync)
    assert snapshot(sync) == first, "a settled sync must not write anything more on either side"
    assert len(first["redmine"]) == len(first["builtin"]) == len(first["redmine twins"]) == len(first["builtin twins"])
    external_ids = {issue_id: custom_field(sync.admin.issue(issue_id), EXTERNAL_ID) for issue_id in first["redmine"]}
    assert sorted(external_ids.items()) == first["redmine twins"], "each Redmine issue names its built-in twin"


# --- edits racing the sync's own writes. Should they fail, they leave twins bouncing or blocked, so they
# come after the checks of the whole sync and check only their own twins.


def test_it_sends_built_in_edits_and_statuses_to_redmine_once(sync):
    keys = [sync.builtin.create_issue(summary=f"Edit me {n}")["key"] for n in range(4)]
    issue_ids = {key: redmine_id_of(sync, key) for key in keys}
    settle(sync, *keys)  # an edit racing the first acknowledgement is the next test's business

    def arrived(issue_id: str, summary: str) -> bool:
        values = history(sync.admin.issue(issue_id), "subject")
        if summary in values and values[-1] != summary:
            raise SyncBroke(f"Redmine issue {issue_id}'s summary went {values}")
        return values[-1:] == [summary]

    # Each round edits the issues right after the last round reached Redmine, as busy people do.
    rounds = (("First edit", "In Progress"), ("Second edit", "Closed"))
    for edit, status in rounds:
        for key in keys:
            fields = {"summary": f"{edit} of {key}", "description": f"{edit}, described", "status": status}
            sync.builtin.api("PATCH", f"tracker/issues/{key}/", json=fields)
        sync.wait(lambda edit=edit: all(arrived(issue_ids[k], f"{edit} of {k}") for k in keys), f"the {edit}s")
        settle(sync, *keys)
    time.sleep(2 * POLL)
    settle(sync, *keys)
    statuses = [str(sync.admin.status_id(status)) for _, status in rounds]
    for key in keys:
        issue = sync.admin.issue(issue_ids[key])
        assert history(issue, "subject") == [f"{edit} of {key}" for edit, _ in rounds], "each edit once, no undo"
        assert history(issue, "status_id") == statuses
        assert issue["description"] == "Second edit, described"
        assert sync.builtin.issue(key)["summary"] == f"Second edit of {key}"


def test_it_keeps_an_edit_made_before_the_first_sync_is_acknowledged(sync):
    connection = f"connections/{sync.builtin.connection}/"
    # A deactivated connection collects changes and sends them together when activated again.
    sync.builtin.api("POST", connection + "deactivate/")
    try:
        key = sync.builtin.create_issue(summary="First words")["key"]
        sync.builtin.api("PATCH", f"tracker/issues/{key}/", json={"summary": "Second words"})
    finally:
        sync.builtin.api("POST", connection + "activate/")
    issue_id = redmine_id_of(sync, key)
    settle(sync, key)
    issue = sync.admin.issue(issue_id)
    assert (sync.builtin.issue(key)["summary"], issue["subject"]) == ("Second words", "Second words")
    assert history(issue, "subject") == ["Second words"], "the summary went back and forth in Redmine"


# Last, so that it has watched for a minute whatever ran before.
def test_it_polls_redmine_every_few_poll_intervals_all_along(polling):
    # A minute covers the tick's whole cycle (it hands over to the next about once a minute).
    time.sleep(max(0.0, 65 - polling.watched().total_seconds()))
    # A pass waits while the worker drains a burst of events, hence some slack over one interval.
    assert polling.longest <= timedelta(seconds=5 * POLL), (
        f"no polling pass for {polling.longest}, until {polling.longest_seen:%H:%M:%S}"
    )
