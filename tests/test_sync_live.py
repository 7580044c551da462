"""End to end: two live nodes, Blue and Red, on loopback, each with its own database.

They are paired through the real invitation flow and driven only through their REST
APIs. Runs on SQLite, and also on PostgreSQL when the suite has a postgres DATABASE_URL.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from tests.livenodes import LiveNode, pair, wait_for

BACKENDS = ["sqlite"] + (["postgres"] if os.environ.get("DATABASE_URL", "").startswith("postgres") else [])


@pytest.fixture(scope="module", params=BACKENDS)
def nodes(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"live-{request.param}")
    saved = os.environ.get("DATABASE_URL")
    if request.param == "sqlite":
        os.environ.pop("DATABASE_URL", None)
    try:
        blue, red = LiveNode("Blue", root), LiveNode("Red", root)
    finally:
        if saved is not None:
            os.environ["DATABASE_URL"] = saved
    try:
        blue.start()
        red.start()
        blue_connection, red_connection = pair(blue, red)
        blue.connection, red.connection = blue_connection["id"], red_connection["id"]
        yield blue, red
    finally:
        for node in (blue, red):
            node.destroy()


def twin_of(node: LiveNode, key: str) -> dict:
    twins = node.twins(local_key=key)
    assert twins, f"{key} has no twin on {node.name}"
    return twins[0]


def remote_issue(source: LiveNode, target: LiveNode, key: str, ready=lambda issue: True) -> dict:
    """Wait until ``key`` on ``source`` has an acknowledged twin, then return the issue on ``target``."""

    def arrived():
        twin = twin_of(source, key)
        if not twin["remote_key"]:
            return None
        issue = target.issue(twin["remote_key"])
        return issue if ready(issue) else None

    return wait_for(arrived, timeout=40, what=f"{key} to arrive on {target.name}")


def test_it_creates_the_remote_issue_on_first_sync_and_both_sides_know_the_keys(nodes):
    blue, red = nodes
    created = blue.create_issue(summary="First sync", description="Made on Blue", labels=["demo"], priority="High")
    copy = remote_issue(blue, red, created["key"])
    assert copy["key"].startswith("RED-")
    assert (copy["summary"], copy["description"], copy["labels"], copy["priority"]) == (
        "First sync",
        "Made on Blue",
        ["demo"],
        "High",
    )
    assert twin_of(red, copy["key"])["remote_key"] == created["key"]
    assert twin_of(blue, created["key"])["state"] == "ok"


def test_it_syncs_later_edits_both_ways(nodes):
    blue, red = nodes
    created = blue.create_issue(summary="Edit me")
    copy = remote_issue(blue, red, created["key"])
    red.api("PATCH", f"tracker/issues/{copy['key']}/", json={"summary": "Edited on Red", "status": "In Progress"})
    wait_for(lambda: blue.issue(created["key"])["summary"] == "Edited on Red", what="Red's edit on Blue")
    assert blue.issue(created["key"])["status"] == "In Progress"
    blue.api("PATCH", f"tracker/issues/{created['key']}/", json={"description": "Edited on Blue"})
    wait_for(lambda: red.issue(copy["key"])["description"] == "Edited on Blue", what="Blue's edit on Red")
    assert len(red.twins(remote_key=created["key"])) == 1


def test_it_syncs_comments_once_with_attribution(nodes):
    blue, red = nodes
    created = blue.create_issue(summary="Comments")
    copy = remote_issue(blue, red, created["key"])
    blue.api("POST", f"tracker/issues/{created['key']}/comments/", json={"body": "Hello from Blue"})
    comments = wait_for(
        lambda: red.api("GET", f"tracker/issues/{copy['key']}/comments/")["results"], what="the comment on Red"
    )
    assert "\n\nHello from Blue\n\n[sync " in comments[0]["body"]
    assert "(Blue) wrote:" in comments[0]["body"]
    red.api("POST", f"tracker/issues/{copy['key']}/comments/", json={"body": "Hello from Red"})
    wait_for(
        lambda: len(blue.api("GET", f"tracker/issues/{created['key']}/comments/")["results"]) == 2,
        what="Red's comment on Blue",
    )
    time.sleep(2)  # let any echo happen, if it would
    blue_bodies = [c["body"] for c in blue.api("GET", f"tracker/issues/{created['key']}/comments/")["results"]]
    red_bodies = [c["body"] for c in red.api("GET", f"tracker/issues/{copy['key']}/comments/")["results"]]
    assert len(blue_bodies) == 2 and len(red_bodies) == 2, "no comment may be doubled or echoed back"


def test_it_syncs_attachments_intact(nodes):
    blue, red = nodes
    created = blue.create_issue(summary="Attachments")
    copy = remote_issue(blue, red, created["key"])
    content = os.urandom(50_000)
    blue.api("POST", f"tracker/issues/{created['key']}/attachments/", files={"file": ("data.bin", content)})
    arrived = wait_for(
        lambda: red.api("GET", f"tracker/issues/{copy['key']}/attachments/")["results"], what="the attachment on Red"
    )
    assert arrived[0]["sha256"] == hashlib.sha256(content).hexdigest()
    download = red.session.get(
        red.url + f"/api/v1/tracker/issues/{copy['key']}/attachments/{arrived[0]['id']}/content/"
    )
    assert download.content == content
    time.sleep(2)
    assert len(blue.api("GET", f"tracker/issues/{created['key']}/attachments/")["results"]) == 1, "no echo"


def test_it_does_not_echo_once_settled(nodes):
    blue, red = nodes
    created = blue.create_issue(summary="Quiet after sync")
    remote_issue(blue, red, created["key"])
    time.sleep(2)
    before = blue.api("GET", "queue/stats/"), red.api("GET", "queue/stats/")
    time.sleep(3)
    after = blue.api("GET", "queue/stats/"), red.api("GET", "queue/stats/")
    assert before == after, "a settled twin must not keep sending"


def test_it_blocks_a_twin_whose_rule_raises_and_lets_others_flow(nodes):
    blue, red = nodes
    rules = red.api("GET", f"connections/{red.connection}/rules/")["results"][0]
    broken = rules["incoming"] + 'if "boom" in replica.summary:\n    helpers.debug(1 / 0)\n'
    red.api(
        "POST",
        f"connections/{red.connection}/rules/",
        json={"outgoing": rules["outgoing"], "incoming": broken, "comment": "breaks on boom"},
    )
    try:
        bad = blue.create_issue(summary="boom goes the rule")
        good = blue.create_issue(summary="fine")
        remote_issue(blue, red, good["key"])

        def blocked():
            twins = red.twins(remote_key=bad["key"])
            return twins and twins[0]["state"] == "blocked" and twins[0]

        twin = wait_for(blocked, what="the broken twin to be blocked")
        assert "ZeroDivisionError" in twin["last_error"]
        assert "line" in twin["last_error"]
    finally:
        red.api(
            "POST",
            f"connections/{red.connection}/rules/",
            json={"outgoing": rules["outgoing"], "incoming": rules["incoming"], "comment": "fixed"},
        )
    red.api("POST", f"twins/{twin['id']}/retry/")
    remote_issue(blue, red, bad["key"])


def test_it_delivers_everything_after_the_remote_comes_back(nodes):
    blue, red = nodes
    red.stop()
    try:
        created = blue.create_issue(summary="Made while Red was down")

        def waiting():
            stats = blue.api("GET", "queue/stats/")["connections"][0]
            return stats["outgoing"].get("pending", 0) >= 1

        wait_for(waiting, what="Blue to hold the change while Red is down")
        wait_for(
            lambda: "does not answer" in blue.api("GET", f"connections/{blue.connection}/")["status_detail"],
            what="the connection to say that Red does not answer",
        )
    finally:
        red.start()
    remote_issue(blue, red, created["key"], ready=lambda issue: issue["summary"] == "Made while Red was down")


def test_it_keeps_collecting_while_deactivated_and_sends_on_reactivation(nodes):
    blue, red = nodes
    created = blue.create_issue(summary="Before deactivation")
    copy = remote_issue(blue, red, created["key"])
    blue.api("POST", f"connections/{blue.connection}/deactivate/")
    try:
        blue.api("PATCH", f"tracker/issues/{created['key']}/", json={"summary": "Changed while off"})
        time.sleep(3)
        assert red.issue(copy["key"])["summary"] == "Before deactivation"
    finally:
        blue.api("POST", f"connections/{blue.connection}/activate/")
    wait_for(lambda: red.issue(copy["key"])["summary"] == "Changed while off", what="the collected change")
