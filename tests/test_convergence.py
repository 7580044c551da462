"""Convergence under faults: two live nodes, a seeded random driver and fault proxies.

tests/convergence.py drives Blue and Red and holds them to DESIGN.md's promises. The
live tests here run fixed seeds of it; they take a minute or two (a node killed
mid-event leaves a 90-second lease to expire), so they carry the ``convergence`` marker:
``pytest -m "not convergence"`` leaves them out. They use the suite's database:
PostgreSQL when DATABASE_URL names one, else SQLite. ``scripts/convergence`` runs more
seeds, longer.

The driver found bugs in the sync. Those that one side shows on its own keep a
reproduction below in one process (Blue is this test database, Red is played by hand as
in test_invariants.py). The first live test runs every fault and race; the second runs the
same field edited on both sides at once alone, without faults, so that the edits really
cross, four times. The third shows that a slow attachment download no longer holds every
write of a node on SQLite.
"""

from __future__ import annotations

import io
from unittest import mock

import pytest
import requests

from syncqueue import flow, processors, tasks, transport, worker
from tests import convergence, faultproxy
from tests.livenodes import wait_for
from tests.syncpair import Red, attachment, blue_issue, connect_red, serve, tracker, work
from trackers.builtin import actions

live = pytest.mark.convergence


def run_seed(tmp_path, seed: int, operations: int, **options) -> dict:
    result = convergence.run(seed, operations, tmp_path, drain_timeout=180, **options)
    print("\n" + convergence.summary(result))
    return result


# --- two live nodes ---------------------------------------------------------------------------


@live
def test_it_converges_under_faults(tmp_path):
    # Requests refused with 502 or 504, stored but answered 504 or not at all, forwarded twice,
    # held back and overtaken, delivered late after their retry; downloads cut off midway; a
    # node stopped for a while; a node killed mid-event (its leased events taken up again after
    # restart); polling every 2 s all along; and edits racing on both sides, the same field too.
    result = run_seed(tmp_path, 3, 60)
    faults = result["faults_by_kind"]
    assert faults.get("stopped") == 1
    assert faults.get("killed_applying", 0) + faults.get("killed_sending", 0) == 1, "the kill came mid-event"
    assert result["leased_after_kill"][0] > 0, "the killed worker left an event leased"
    for kind in ("refused_502", "refused_504", "answer_lost_504", "answer_lost_reset", "duplicated", "held", "late"):
        assert faults.get(kind, 0) > 0, f"no {kind} fault was injected"
    assert sum(p["overtaken"] for p in result["proxies"].values()) > 0, "no request arrived out of order"
    assert result["operations_by_kind"].get("edit_both_sides", 0) > 0
    assert result["counts"]["comments"] > 0 and result["counts"]["attachments"] > 0
    convergence.assert_promises_kept(result)


def edit_one_field_on_both_sides_at_once(driver: convergence.Driver) -> None:
    """Four issues, each with its summary changed on both sides within a few milliseconds."""
    for _ in range(4):
        driver.create_issue("Blue")
    for issue in driver.issues:
        wait_for(lambda issue=issue: driver.key_on(issue, "Red"), 60, f"#{issue.number} to reach Red")
        driver.edit_both_sides("summary", issue)
    driver.figures.operations.update(create_issue=4, edit_both_sides=4)


@live
def test_it_settles_one_field_edited_on_both_sides_at_once(tmp_path):
    # No fault at all: two people change the summary of an issue within a few milliseconds, four times.
    scenario = edit_one_field_on_both_sides_at_once
    result = run_seed(tmp_path, 1, 0, node_faults=False, network_faults=False, steps=scenario)
    convergence.assert_promises_kept(result)


@live
def test_it_takes_a_persons_write_while_an_attachment_downloads_slowly(tmp_path, monkeypatch):
    monkeypatch.setattr(faultproxy, "STALL_SECONDS", 30)
    # The nodes run on SQLite, the embedded default, whatever the suite's database: PostgreSQL
    # locks rows, not the database, and does not show this.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    cluster = convergence.Cluster(tmp_path, 1, poll_seconds=600)
    blue, red, red_proxy = cluster.nodes["Blue"], cluster.nodes["Red"], cluster.proxies["Red"]
    try:
        cluster.start()
        issue = blue.create_issue(summary="Files")
        remote_key = wait_for(lambda: blue.twins(local_key=issue["key"])[0]["remote_key"], 60, "the first sync")
        red_proxy.stall_next("download")  # Blue's download of Red's file hangs, as from a slow remote
        red.api("POST", f"tracker/issues/{remote_key}/attachments/", files={"file": ("big.bin", b"x" * 5000)})
        assert red_proxy.stalled.wait(60), "Blue never fetched the file"
        comment = blue.session.post(
            f"{blue.url}/api/v1/tracker/issues/{issue['key']}/comments/", json={"body": "meanwhile"}, timeout=60
        )
        assert comment.status_code == 201, f"{comment.status_code} {comment.text}"
    finally:
        red_proxy.release_stall()
        cluster.destroy()


# --- the bugs it found, each in one process -----------------------------------------------------


@pytest.fixture
def red(project, monkeypatch):
    monkeypatch.setattr(tasks, "kick", lambda: None)
    return Red(connect_red())


def changed(red: Red, issue) -> None:
    """What the change signal does once a write commits (a test runs inside one transaction)."""
    flow.sync_entity(red.connection, issue.key)


def twinned(red: Red, alice):
    """A Blue issue whose first sync Red has acknowledged: summary S0 on both sides."""
    issue = blue_issue(alice, summary="S0")
    changed(red, issue)
    [first] = red.outgoing(kind="update")
    red.send(red.ack(first.message_id, key="RED-1", remote_key=issue.key, summary="S0"))
    work()
    return issue


def test_it_keeps_a_file_attached_on_both_sides_at_once(red, alice):
    issue = twinned(red, alice)
    content = b"the same screenshot"
    actions.add_attachment(issue, "same.png", io.BytesIO(content), actor=alice)
    changed(red, issue)
    blue_update = red.outgoing(kind="update")[-1]
    with mock.patch.object(transport, "fetch_attachment", serve(content)):
        # Red's person attached the same file meanwhile: Red's update crosses Blue's.
        red.send(red.update("RED-1", remote_key=issue.key, summary="S0", attachments=[attachment("r1", content)]))
        work()
        # Red linked Blue's file to its own in turn; its own file is still Red's to send.
        red.send(
            red.ack(
                blue_update.message_id,
                key="RED-1",
                remote_key=issue.key,
                summary="S0",
                attachments=[attachment("r1", content)],
            )
        )
        work()
    assert [a.sha256 for a in tracker().get(issue.key).attachments], "the file must stay"
    sent = processors.run_outgoing(red.connection, red.connection.active_rules, tracker().get(issue.key), red.twin())
    assert [a["filename"] for a in sent[0]["attachments"]] == ["same.png"], "Blue's own file is still Blue's to send"


class CutResponse:
    """An attachment download whose connection breaks after the first part of the body."""

    status_code = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_content(self, size):
        yield b"the first half"
        raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")


def test_it_retries_an_attachment_download_cut_off_midway(red):
    with mock.patch.object(transport, "_session") as session:
        session.return_value.request.return_value = CutResponse()
        red.send(red.update(attachments=[attachment("a1", b"the first half and the second half")]))
        work()
    twin = red.twin()
    assert twin.state == "ok", f"the twin is {twin.state}: {twin.blocked_reason}"


class CutErrorResponse:
    """A download answered 502 by a proxy whose error body breaks off as it is read."""

    status_code = 502
    reason = "Bad Gateway"

    def json(self):
        raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead(20 bytes read)")


def test_it_retries_an_attachment_download_whose_error_answer_is_cut_off(red):
    with mock.patch.object(transport, "_session") as session:
        session.return_value.request.return_value = CutErrorResponse()
        red.send(red.update(attachments=[attachment("a1", b"some bytes")]))
        work()
    twin = red.twin()
    assert twin.state == "ok", f"the twin is {twin.state}: {twin.blocked_reason}"
    [event] = twin.events.filter(direction="incoming")
    assert event.status == "pending" and "502" in event.error, "it waits to be tried again"


def test_it_finishes_an_update_whose_ack_came_before_the_send_was_answered(red, alice):
    issue = twinned(red, alice)
    actions.update_issue(issue, {"summary": "S1"}, actor=alice)
    changed(red, issue)
    update = red.outgoing(kind="update")[-1]

    def slow_answer(connection, messages):
        red.send(red.ack(update.message_id, key="RED-1", remote_key=issue.key, summary="S1"))
        work()
        return {"accepted": [m["id"] for m in messages], "rejected": {}}

    with mock.patch.object(transport, "post_messages", slow_answer):
        worker.send_outgoing("test-worker")
    update.refresh_from_db()
    assert update.status == "done"


def test_it_does_not_send_again_an_update_acknowledged_while_its_answer_was_lost(red, alice):
    issue = twinned(red, alice)
    actions.update_issue(issue, {"summary": "S1"}, actor=alice)
    changed(red, issue)
    update = red.outgoing(kind="update")[-1]

    def lost_answer(connection, messages):
        # Red stored and applied it, and its ack arrived; then the answer to this request was lost.
        red.send(red.ack(update.message_id, key="RED-1", remote_key=issue.key, summary="S1"))
        work()
        raise transport.RemoteError("the remote node did not answer in time (504)")

    with mock.patch.object(transport, "post_messages", lost_answer):
        worker.send_outgoing("test-worker")
    update.refresh_from_db()
    # Sent again, Red would answer "stored already" and never ack it twice: it would stay "sent".
    assert update.status == "done"
