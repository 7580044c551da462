"""A private node: Red cannot be reached from Blue (it has no public URL), so it pulls its
messages from Blue and uploads the attachment bytes Blue needs. The flow and the promises
are those of two public nodes; only the direction of the HTTP requests changes.

Two live nodes on loopback, driven through their REST APIs.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from tests.livenodes import LiveNode, wait_for


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    # Red has no URL to give: nothing can reach it, as behind a firewall.
    blue, red = LiveNode("Blue", root), LiveNode("Red", root, extra_env={"NODE_URL": ""})
    try:
        blue.start()
        red.start()
        invitation = blue.api("POST", "connections/invitations/", json={"name": "Red", "project": blue.project})
        red_side = red.api(
            "POST", "connections/accept/", json={"code": invitation["code"], "project": red.project, "private": True}
        )
        blue_side = blue.api("GET", f"connections/{invitation['connection']['id']}/")
        blue.api("POST", f"connections/{blue_side['id']}/triggers/", json={"query": f"project:{blue.project}"})
        red.api("POST", f"connections/{red_side['id']}/triggers/", json={"query": f"project:{red.project}"})
        blue.connection, red.connection = blue_side, red_side
        yield blue, red
    finally:
        for node in (blue, red):
            node.destroy()


def copy_of(source: LiveNode, target: LiveNode, key: str) -> dict:
    def arrived():
        twins = source.twins(local_key=key)
        return twins and twins[0]["remote_key"] and target.issue(twins[0]["remote_key"])

    return wait_for(arrived, timeout=40, what=f"{key} to arrive on {target.name}")


def comments(node: LiveNode, key: str) -> list[str]:
    return [c["body"] for c in node.api("GET", f"tracker/issues/{key}/comments/")["results"]]


def attachments(node: LiveNode, key: str) -> list[dict]:
    return node.api("GET", f"tracker/issues/{key}/attachments/")["results"]


def test_the_public_side_knows_the_private_one_pulls(nodes):
    blue, red = nodes
    assert (blue.connection["remote_url"], blue.connection["pulls"]) == ("", False)
    assert (red.connection["remote_url"], red.connection["pulls"]) == (blue.url, True)


def test_issues_edits_comments_and_attachments_flow_both_ways(nodes):
    blue, red = nodes
    made_on_blue = blue.create_issue(summary="From the public side")
    on_red = copy_of(blue, red, made_on_blue["key"])
    made_on_red = red.create_issue(summary="From the private side")
    on_blue = copy_of(red, blue, made_on_red["key"])

    red.api("PATCH", f"tracker/issues/{on_red['key']}/", json={"summary": "Edited behind the firewall"})
    blue.api("PATCH", f"tracker/issues/{on_blue['key']}/", json={"description": "Edited in public"})
    wait_for(lambda: blue.issue(made_on_blue["key"])["summary"] == "Edited behind the firewall", what="Red's edit")
    wait_for(lambda: red.issue(made_on_red["key"])["description"] == "Edited in public", what="Blue's edit")

    blue.api("POST", f"tracker/issues/{made_on_blue['key']}/comments/", json={"body": "Hello from Blue"})
    red.api("POST", f"tracker/issues/{on_red['key']}/comments/", json={"body": "Hello from Red"})
    wait_for(lambda: len(comments(red, on_red["key"])) == 2, what="Blue's comment on Red")
    wait_for(lambda: len(comments(blue, made_on_blue["key"])) == 2, what="Red's comment on Blue")

    from_red, from_blue = os.urandom(40_000), os.urandom(30_000)
    red.api("POST", f"tracker/issues/{on_red['key']}/attachments/", files={"file": ("red.bin", from_red)})
    blue.api("POST", f"tracker/issues/{made_on_blue['key']}/attachments/", files={"file": ("blue.bin", from_blue)})
    expected = sorted(hashlib.sha256(c).hexdigest() for c in (from_red, from_blue))
    for node, key in ((blue, made_on_blue["key"]), (red, on_red["key"])):
        wait_for(
            lambda node=node, key=key: sorted(a["sha256"] for a in attachments(node, key)) == expected,
            timeout=40,
            what=f"both attachments on {node.name}",
        )

    time.sleep(3)  # a few pull rounds: nothing may double or echo
    assert len(comments(blue, made_on_blue["key"])) == 2 and len(comments(red, on_red["key"])) == 2
    assert len(attachments(blue, made_on_blue["key"])) == 2 and len(attachments(red, on_red["key"])) == 2
    for node in (blue, red):
        assert {t["state"] for t in node.twins()} == {"ok"}


def test_the_private_side_catches_up_after_it_was_away(nodes):
    blue, red = nodes
    red.stop()
    made = [blue.create_issue(summary=f"While Red was away {n}") for n in range(3)]
    time.sleep(2)
    red.start()
    for issue in made:
        copy_of(blue, red, issue["key"])

    def drained():
        [counts] = blue.api("GET", "queue/stats/")["connections"]
        outgoing = counts["outgoing"]
        return not any(outgoing.get(status) for status in ("pending", "sending", "sent")) and counts

    counts = wait_for(drained, timeout=30, what="Blue's queue to drain")
    assert not counts["outgoing"].get("failed") and not counts["blocked_twins"]
