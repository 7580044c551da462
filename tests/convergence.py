"""Convergence under faults: a seeded random driver against two live nodes, Blue and Red.

Both nodes serve the built-in tracker and are paired through the invitation flow; each
reaches the other only through a ``FaultProxy`` (tests/faultproxy.py). The driver, from
one seed, interleaves at random: issues created on both sides, fields edited on both
sides (also the same issue on both sides at once), comments added, edited and deleted,
attachments added (also the same file on both sides). Meanwhile the proxies lose,
refuse, duplicate and reorder requests, one node is stopped for a while and started
again, and one is killed with SIGKILL while it has work in flight and restarted.

Once both queues have drained, ``check`` holds the nodes to DESIGN.md's promises:
converged fields, no duplicate issue, comment or attachment, nothing lost but what was
deleted on purpose, and every twin ``ok`` or blocked with a reason. Every breach is a
finding; ``run`` returns them with the figures (operations, faults by kind, times).

The seed fixes the operations (each step draws from its own stream) and the proxies'
decisions (the n-th batch or download through a proxy meets the same fate), not the
timing of two live nodes, so a seed replays the same story but not always the same
interleaving. That is also why this is a plain seeded driver and not Hypothesis: one
example is a minute of two live nodes, and shrinking cannot replay their timing.

Knobs leave out what meets a known bug, so that the rest can be held to the promises:
``races`` (writes racing on both sides), ``cuts``, ``late_answers``, ``poll_seconds``,
``node_faults``, ``network_faults``.

``python -m tests.convergence --seeds N --operations M`` (scripts/convergence) runs
several seeds and writes the figures to bench/results/convergence.json;
tests/test_convergence.py runs a fixed few in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.faultproxy import DOWNLOAD_FAULTS, MESSAGE_FAULTS, FaultProxy, wait_idle
from tests.livenodes import REPO, LiveNode, pair

SIDES = ("Blue", "Red")
FIELDS = ("summary", "description", "status", "priority", "labels", "assignee")
STATUSES = ("Open", "In Progress", "Resolved", "Closed")
PRIORITIES = ("Lowest", "Low", "Medium", "High", "Highest")
LABELS = ("alpha", "beta", "gamma", "delta", "omega")
WORDS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper", "kestrel")
# Queue statuses that mean work is still under way.
BUSY = ("pending", "sending", "sent", "processing")
OPERATION_WEIGHTS = {
    "create_issue": 12,
    "edit_fields": 20,
    "edit_twice": 5,
    "edit_both_sides": 10,
    "add_comment": 14,
    "edit_comment": 8,
    "delete_comment": 6,
    "add_attachment": 8,
    "same_attachment_both_sides": 3,
    "pause": 8,
}
# Writes on both sides that race each other, by name: "edits" (one issue edited on both sides at
# once) and "attachments" (one file attached on both sides at once). Without "edits", a side edits
# fields only while the other side has no update of that issue in flight. Both meet known bugs
# (tests/test_convergence.py), so CI runs them apart.
RACES = {"edits": ("edit_both_sides",), "attachments": ("same_attachment_both_sides",)}
# A copy of a remote comment: "<author> (<node>) wrote:\n\n<body>\n\n[sync <connection>:<remote id>]".
COPY = re.compile(r"\A.*? \(.*?\) wrote:\n\n(?P<body>.*?)\n*\[sync [0-9a-f]{8}:(?P<remote>[\w.-]+)\]\s*\Z", re.DOTALL)
RESULTS = REPO / "bench" / "results" / "convergence.json"
# Proxy faults after which the sender learns the receiver's answer late or never, though the
# receiver acted on the request. On a batch with an update they meet a known bug
# (tests/test_convergence.py); "acks" gives them only to batches without one, "none" to none.
LATE_ANSWERS = ("answer_lost_504", "answer_lost_reset", "late", "duplicated")
LATE_ANSWER_CHOICES = ("all", "acks", "none")


# --- the two nodes and their proxies -----------------------------------------------------------


class Cluster:
    """Blue and Red, each behind its own fault proxy; the other node talks to it only through that."""

    def __init__(self, root: Path, seed: int, *, cuts: bool = True, late_answers: str = "all", poll_seconds: int = 2):
        if late_answers not in LATE_ANSWER_CHOICES:
            raise ValueError(f"late_answers is one of {', '.join(LATE_ANSWER_CHOICES)}")
        downloads = {k: v for k, v in DOWNLOAD_FAULTS.items() if cuts or k != "cut"}
        messages = {k: v for k, v in MESSAGE_FAULTS.items() if late_answers != "none" or k not in LATE_ANSWERS}
        spared = LATE_ANSWERS if late_answers == "acks" else ()
        self.proxies = {
            name: FaultProxy(name, seed, message_faults=messages, download_faults=downloads, spare_updates=spared)
            for name in SIDES
        }
        for proxy in self.proxies.values():
            proxy.start()
        self.nodes = {
            name: LiveNode(
                name,
                root,
                extra_env={"NODE_URL": self.proxies[name].url, "SYNC_POLL_SECONDS": str(poll_seconds)},
            )
            for name in SIDES
        }
        for name in SIDES:
            self.proxies[name].target_port = self.nodes[name].port
        self.up = dict.fromkeys(SIDES, False)

    def start(self) -> None:
        errors: list[BaseException] = []

        def start(node: LiveNode) -> None:
            try:
                node.start()
            except BaseException as e:
                errors.append(e)

        # Side by side: preparing a node is mostly waiting on its own processes.
        threads = [threading.Thread(target=start, args=(node,)) for node in self.nodes.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        self.up = dict.fromkeys(SIDES, True)
        blue, red = pair(self.nodes["Blue"], self.nodes["Red"])
        self.nodes["Blue"].connection, self.nodes["Red"].connection = blue["id"], red["id"]
        # Both sides' remote URL is the other side's proxy: every message passes a proxy.
        assert blue["remote_url"] == self.proxies["Red"].url, blue["remote_url"]
        assert self.nodes["Red"].api("GET", f"connections/{red['id']}/")["remote_url"] == self.proxies["Blue"].url

    def arm(self) -> None:
        for proxy in self.proxies.values():
            proxy.arm()

    def disarm(self) -> None:
        for proxy in self.proxies.values():
            proxy.disarm()

    def destroy(self) -> None:
        for node in self.nodes.values():
            node.destroy()
        for proxy in self.proxies.values():
            proxy.stop()

    def other(self, side: str) -> str:
        return "Red" if side == "Blue" else "Blue"


def stats(node: LiveNode) -> dict[str, int]:
    """Events by status on the node's connection (both directions summed) and its blocked twins."""
    total: Counter[str] = Counter()
    for connection in node.api("GET", "queue/stats/")["connections"]:
        for direction in ("outgoing", "incoming"):
            total.update(connection[direction])
        total["blocked_twins"] += connection["blocked_twins"]
    return dict(total)


def all_pages(node: LiveNode, path: str, **params) -> list[dict]:
    results, page = [], 1
    while True:
        body = node.api("GET", path, params={**params, "page_size": 500, "page": page})
        results += body["results"]
        if not body.get("next"):
            return results
        page += 1


# --- what the driver did, to hold the nodes to ------------------------------------------------


@dataclass
class TrackedIssue:
    number: int
    origin: str
    keys: dict[str, str]
    # field -> [(side, value)], the creation included: what a final value may be.
    writes: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    comments: list[TrackedComment] = field(default_factory=list)
    attachments: dict[str, set[str]] = field(default_factory=dict)  # sha256 -> sides that added it


@dataclass
class TrackedComment:
    side: str
    id: int
    body: str
    deleted: bool = False


@dataclass
class Figures:
    operations: Counter = field(default_factory=Counter)
    node_faults: Counter = field(default_factory=Counter)
    leased_after_kill: list[int] = field(default_factory=list)


# --- the driver -------------------------------------------------------------------------------


class Driver:
    def __init__(
        self,
        cluster: Cluster,
        seed: int,
        operations: int,
        *,
        races: tuple[str, ...] = tuple(RACES),
        node_faults: bool = True,
        echo=print,
    ):
        if set(races) - set(RACES):
            raise ValueError(f"races are among {', '.join(RACES)}")
        self.cluster = cluster
        self.random = random.Random(seed)
        self.seed = seed
        self.operations = operations
        self.races = races
        self.left_out = {name for race, names in RACES.items() if race not in races for name in names}
        self.node_faults = node_faults
        self.echo = echo
        self.issues: list[TrackedIssue] = []
        self.figures = Figures()
        self.down_until: dict[str, float] = {}
        self.counter = 0
        self.journal: list[str] = []  # every write, in order: the story a failing seed tells
        self.refused: list[str] = []  # writes a node answered with an error

    # --- helpers -------------------------------------------------------------------------------

    def node(self, side: str) -> LiveNode:
        return self.cluster.nodes[side]

    def up_sides(self) -> list[str]:
        return [side for side in SIDES if self.cluster.up[side]]

    def next_number(self) -> int:
        self.counter += 1
        return self.counter

    def words(self, n: int) -> str:
        return " ".join(self.random.choice(WORDS) for _ in range(n))

    def key_on(self, issue: TrackedIssue, side: str) -> str | None:
        """The issue's key on ``side``, once the sync has made it there (learned from the origin's twin)."""
        if side not in issue.keys and self.cluster.up[issue.origin]:
            twins = self.node(issue.origin).twins(local_key=issue.keys[issue.origin])
            if twins and twins[0]["remote_key"]:
                issue.keys[side] = twins[0]["remote_key"]
        return issue.keys.get(side)

    def issue_on(self, sides: list[str], *, both: bool = False) -> tuple[TrackedIssue, list[str]] | None:
        """A random issue and the sides among ``sides`` where it can be reached now.

        For both sides, while no issue is twinned yet (the first steps), it waits a little
        for one, so that a seed's early races happen instead of falling back.
        """
        candidates = self.issues[:]
        self.random.shuffle(candidates)
        deadline = time.monotonic() + 20
        while True:
            for issue in candidates[:6]:
                reachable = [side for side in sides if self.key_on(issue, side)]
                if (both and len(reachable) == 2) or (reachable and not both):
                    return issue, reachable
            if not both or time.monotonic() > deadline or any(len(i.keys) == 2 for i in self.issues):
                return None
            time.sleep(0.5)

    def field_value(self, name: str, number: int, side: str) -> Any:
        if name == "summary":
            return f"s{self.seed}-{number} {side} {self.words(2)}"
        if name == "description":
            return f"{side} wrote {self.words(self.random.randint(1, 8))}"
        if name == "status":
            return self.random.choice(STATUSES)
        if name == "priority":
            return self.random.choice(PRIORITIES)
        if name == "labels":
            return sorted(self.random.sample(LABELS, self.random.randint(0, 3)))
        return self.random.choice([None, "admin"])

    def changing_there(self, issue: TrackedIssue, side: str) -> bool:
        """Whether the other side may still change this issue: an update of it unacknowledged there, or no twin yet."""
        other = self.cluster.other(side)
        key = self.key_on(issue, other)
        if key is None or not self.cluster.up[other]:
            return True
        twin = self.node(other).twins(local_key=key)[0]
        events = self.node(other).api("GET", f"twins/{twin['id']}/")["events"]
        return any(e["direction"] == "outgoing" and e["kind"] == "update" and e["status"] in BUSY for e in events)

    def editable(self, side: str) -> TrackedIssue | None:
        """An issue whose fields ``side`` may edit now; without edit races, none the other side may be changing."""
        candidates = self.issues[:]
        self.random.shuffle(candidates)
        for issue in candidates[:4]:
            if self.key_on(issue, side) and ("edits" in self.races or not self.changing_there(issue, side)):
                return issue
        return None

    def patch(self, issue: TrackedIssue, side: str, fields: dict[str, Any]) -> None:
        self.node(side).api("PATCH", f"tracker/issues/{issue.keys[side]}/", json=fields)
        self.journal.append(f"  #{issue.number} {side} {issue.keys[side]} <- {fields}")
        for name, value in fields.items():
            issue.writes.setdefault(name, []).append((side, value))

    # --- operations ----------------------------------------------------------------------------

    def create_issue(self, side: str) -> None:
        number = self.next_number()
        fields = {name: self.field_value(name, number, side) for name in FIELDS}
        created = self.node(side).create_issue(**fields)
        issue = TrackedIssue(number, side, {side: created["key"]})
        self.journal.append(f"  #{number} created on {side} as {created['key']}")
        issue.writes = {name: [(side, value)] for name, value in fields.items()}
        self.issues.append(issue)

    def edit_fields(self, side: str) -> bool:
        issue = self.editable(side)
        if issue is None:
            return False
        names = self.random.sample(FIELDS, self.random.randint(1, 3))
        self.patch(issue, side, {name: self.field_value(name, self.next_number(), side) for name in names})
        return True

    def edit_twice(self, side: str) -> bool:
        """One field edited twice in a row, as someone correcting a slip would."""
        issue = self.editable(side)
        if issue is None:
            return False
        name = self.random.choice(FIELDS)
        for _ in range(2):
            self.patch(issue, side, {name: self.field_value(name, self.next_number(), side)})
        return True

    def edit_both_sides(self, field_name: str | None = None, issue: TrackedIssue | None = None) -> bool:
        """One issue (or ``issue``) edited on both sides at once: often in the same field (or ``field_name``)."""
        if issue is None:
            found = self.issue_on(list(SIDES), both=True)
            if not found:
                return False
            issue, _ = found
        elif not all(self.key_on(issue, side) for side in SIDES):
            return False
        first = field_name or self.random.choice(FIELDS)
        second = first if field_name or self.random.random() < 0.6 else self.random.choice(FIELDS)
        edits = {
            "Blue": {first: self.field_value(first, self.next_number(), "Blue")},
            "Red": {second: self.field_value(second, self.next_number(), "Red")},
        }
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def edit(side: str) -> None:
            try:
                start.wait(5)
                self.patch(issue, side, edits[side])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=edit, args=(side,)) for side in SIDES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return True

    def add_comment(self, side: str) -> bool:
        found = self.issue_on([side])
        if not found:
            return False
        issue, _ = found
        body = f"c{self.next_number()} from {side}: {self.words(self.random.randint(2, 6))}"
        made = self.node(side).api("POST", f"tracker/issues/{issue.keys[side]}/comments/", json={"body": body})
        issue.comments.append(TrackedComment(side, made["id"], body))
        return True

    def _own_comment(self, side: str) -> tuple[TrackedIssue, TrackedComment] | None:
        mine = [(i, c) for i in self.issues for c in i.comments if c.side == side and not c.deleted]
        return self.random.choice(mine) if mine else None

    def edit_comment(self, side: str) -> bool:
        found = self._own_comment(side)
        if not found:
            return False
        issue, comment = found
        body = f"{comment.body.split(' (edited')[0]} (edited {self.next_number()})"
        self.node(side).api("PATCH", f"tracker/issues/{issue.keys[side]}/comments/{comment.id}/", json={"body": body})
        comment.body = body
        return True

    def delete_comment(self, side: str) -> bool:
        found = self._own_comment(side)
        if not found:
            return False
        issue, comment = found
        self.node(side).api("DELETE", f"tracker/issues/{issue.keys[side]}/comments/{comment.id}/")
        comment.deleted = True
        return True

    def _attach(self, issue: TrackedIssue, side: str, content: bytes, name: str) -> None:
        self.node(side).api("POST", f"tracker/issues/{issue.keys[side]}/attachments/", files={"file": (name, content)})
        issue.attachments.setdefault(hashlib.sha256(content).hexdigest(), set()).add(side)

    def add_attachment(self, side: str) -> bool:
        found = self.issue_on([side])
        if not found:
            return False
        issue, _ = found
        size = self.random.randint(1_000, 40_000)
        self._attach(issue, side, self.random.randbytes(size), f"a{self.next_number()}.bin")
        return True

    def same_attachment_both_sides(self) -> bool:
        """The same file attached on both sides at about the same time (one copy per side is right)."""
        found = self.issue_on(list(SIDES), both=True)
        if not found:
            return False
        issue, _ = found
        content = self.random.randbytes(self.random.randint(1_000, 20_000))
        name = f"same{self.next_number()}.bin"
        errors: list[BaseException] = []

        def attach(side: str) -> None:
            try:
                self._attach(issue, side, content, name)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=attach, args=(side,)) for side in SIDES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return True

    def pause(self) -> None:
        time.sleep(self.random.uniform(0.2, 1.5))

    # --- node faults ---------------------------------------------------------------------------

    def stop_for_a_while(self, side: str) -> None:
        """The node is down (SIGTERM) for a few seconds while the other side goes on."""
        self.node(side).stop()
        self.cluster.up[side] = False
        self.down_until[side] = time.monotonic() + self.random.uniform(3, 8)
        self.figures.node_faults["stopped"] += 1
        self.journal.append(f"  {side} stopped")
        self.echo(f"  [{side} stopped]")

    def start_again(self, *, all_of_them: bool = False) -> None:
        for side, until in list(self.down_until.items()):
            if all_of_them or time.monotonic() >= until:
                self.node(side).start()
                self.cluster.up[side] = True
                del self.down_until[side]
                self.echo(f"  [{side} started again]")

    def kill_mid_event(self, side: str) -> None:
        """SIGKILL the node's process group in the middle of an event, then start it again.

        The proxy in front of the other node stalls the event's request, so the node is
        surely mid-way when it dies: applying an update (fetching its attachment) or sending.
        """
        other = self.cluster.other(side)
        proxy = self.cluster.proxies[other]
        how = self.random.choice(["applying", "sending"])
        found = self.issue_on(list(SIDES), both=True) if how == "applying" else None
        if found:
            proxy.stall_next("download")
            self._attach(found[0], other, self.random.randbytes(5_000), f"k{self.next_number()}.bin")
            self.figures.operations["add_attachment"] += 1
        else:
            how = "sending"
            proxy.stall_next("messages")
            self.create_issue(side)
            self.figures.operations["create_issue"] += 1
        caught = proxy.stalled.wait(40)  # the event may wait out a backoff first
        counts = stats(self.node(side))
        self.node(side).stop(kill=True)
        proxy.release_stall()
        self.figures.node_faults[f"killed_{how}" if caught else "killed"] += 1
        self.journal.append(f"  {side} killed while {how}")
        self.node(side).start()
        # Leases outlive the worker by 90 s: what the dead worker held still shows as under way.
        after = stats(self.node(side))
        stranded = after.get("sending", 0) + after.get("processing", 0)
        in_flight = counts.get("sending", 0) + counts.get("processing", 0)
        self.figures.leased_after_kill.append(stranded)
        self.echo(f"  [{side} killed while {how}: {in_flight} event(s) in flight, {stranded} left leased]")

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        """``operations`` random steps, with one stop and one kill at random points in between."""
        plan: dict[int, tuple[str, str]] = {}
        if self.node_faults and self.operations >= 10:
            # The kill comes early: its events wait out their 90 s lease while the rest runs.
            kill_at = self.random.randint(3, max(3, self.operations // 4))
            stop_at = self.random.randint(self.operations // 3, 2 * self.operations // 3)
            plan[kill_at] = ("kill", self.random.choice(SIDES))
            plan[stop_at] = ("stop", self.random.choice(SIDES))
        for side in SIDES:
            self.create_issue(side)
            self.figures.operations["create_issue"] += 1
        for step in range(self.operations):
            # Each step draws from its own stream: what the live nodes did in one step (an issue
            # not twinned yet, say) cannot shift the choices of the steps after it.
            self.random = random.Random(f"{self.seed}:{step}")
            self.start_again()
            if step in plan:
                kind, side = plan[step]
                if kind == "kill" and not self.down_until:
                    self.kill_mid_event(side)
                elif kind == "stop" and not self.down_until:
                    self.stop_for_a_while(side)
            self.step(step)
        self.start_again(all_of_them=True)

    def step(self, number: int) -> None:
        names = [n for n in OPERATION_WEIGHTS if n not in self.left_out]
        name = self.random.choices(names, weights=[OPERATION_WEIGHTS[n] for n in names])[0]
        sides = self.up_sides()
        side = self.random.choice(sides)
        if name in ("edit_both_sides", "same_attachment_both_sides") and len(sides) < 2:
            name = "add_comment"
        try:
            name = self.operate(name, side)
        except (AssertionError, requests.RequestException) as e:
            # A person's write refused by a live node is a finding, not the end of the run.
            self.refused.append(f"refused: step {number} {name} on {side}: {str(e)[:300]}")
        self.figures.operations[name] += 1
        self.journal.append(f"{number}: {name} on {side}")
        time.sleep(self.random.uniform(0, 0.4))  # a person's pace, so the sync sometimes catches up

    def operate(self, name: str, side: str) -> str:
        """Carry out operation ``name``; returns the name of what was done in the end."""
        if name == "create_issue":
            self.create_issue(side)
            return name
        if name == "pause":
            self.pause()
            return name
        if name in ("edit_both_sides", "same_attachment_both_sides"):
            done = getattr(self, name)()
        else:
            done = getattr(self, name)(side)
        if done:
            return name
        # Nothing to do it on yet (or, without edit races, nothing at rest): a comment, or a new issue.
        if self.add_comment(side):
            return "add_comment"
        self.create_issue(side)
        return "create_issue"


# --- quiescence -------------------------------------------------------------------------------


def unfinished(node: LiveNode, waiting_keys: set[str]) -> tuple[int, dict]:
    """Events still under way on ``node``, not counting those of twins in ``waiting_keys``.

    Those are the twins blocked here or on the other side: their events wait for someone
    to resolve the block, which is the visible outcome the check then reports.
    """
    counts = stats(node)
    busy = sum(counts.get(status, 0) for status in BUSY)
    for key in waiting_keys:
        for twin in node.twins(local_key=key):
            events = node.api("GET", f"twins/{twin['id']}/")["events"]
            busy -= sum(1 for event in events if event["status"] in BUSY)
    return busy, counts


def blocked_keys(cluster: Cluster) -> dict[str, set[str]]:
    """Per side, the local keys of twins blocked on that side or whose counterpart is blocked."""
    keys: dict[str, set[str]] = {side: set() for side in SIDES}
    for side in SIDES:
        for twin in cluster.nodes[side].twins(state="blocked"):
            if twin["local_key"]:
                keys[side].add(twin["local_key"])
            if twin["remote_key"]:
                keys[cluster.other(side)].add(twin["remote_key"])
    return keys


def stuck_events(cluster: Cluster) -> list[str]:
    """The events still under way, one line each, with their twin's other events: why the queue did not drain."""
    lines = []
    for side in SIDES:
        node = cluster.nodes[side]
        for twin in all_pages(node, "twins/"):
            events = node.api("GET", f"twins/{twin['id']}/")["events"]
            history = " ".join(f"{e['direction'][:3]}:{e['kind']}:{e['seq']}:{e['status']}" for e in reversed(events))
            for event in (e for e in events if e["status"] in BUSY):
                lines.append(
                    f"stuck: {side} {twin['local_key']} <-> {twin['remote_key']}: {event['direction']} {event['kind']} "
                    f"#{event['seq']} {event['status']} ({event['message_id'][:8]}, {event['attempts']} attempts, "
                    f"{event['error'][:80]!r}); its events: {history}"
                )
    return lines


def echoes(cluster: Cluster, seconds: float = 4) -> list[str]:
    """Events made after quiescence: with nobody changing anything, a settled twin must stay quiet."""
    before = {side: sum(v for k, v in stats(cluster.nodes[side]).items() if k != "blocked_twins") for side in SIDES}
    time.sleep(seconds)  # longer than the nodes' poll interval (2 s)
    after = {side: sum(v for k, v in stats(cluster.nodes[side]).items() if k != "blocked_twins") for side in SIDES}
    return [
        f"echo: {after[side] - before[side]} event(s) made on {side} in {seconds:.0f} s after the queues drained"
        for side in SIDES
        if after[side] != before[side]
    ]


def wait_for_quiescence(cluster: Cluster, timeout: float, echo=print) -> tuple[bool, dict]:
    """Wait until both queues have nothing under way, three looks in a row a second apart."""
    deadline = time.monotonic() + timeout
    calm, last, previous, reported = 0, {}, None, 0.0
    while time.monotonic() < deadline:
        waiting = blocked_keys(cluster)
        looks = {side: unfinished(cluster.nodes[side], waiting[side]) for side in SIDES}
        last = {side: counts for side, (_, counts) in looks.items()}
        quiet = all(busy == 0 for busy, _ in looks.values()) and wait_idle(list(cluster.proxies.values()), 0.5)
        # Calm means nothing under way and nothing done since the last look (a failed event made
        # meanwhile is left to the echo check: it must not hold the wait up).
        done = {side: counts.get("done", 0) for side, counts in last.items()}
        calm = calm + 1 if quiet and done == previous else (1 if quiet else 0)
        previous = done
        if calm >= 3:
            return True, last
        if time.monotonic() - reported > 15:
            reported = time.monotonic()
            echo(f"  waiting for the queues: {json.dumps(last, sort_keys=True)}")
        time.sleep(1)
    return False, last


# --- the promises -----------------------------------------------------------------------------


@dataclass
class Snapshot:
    issues: dict[str, dict]  # key -> issue with comments and attachments
    twins: list[dict]
    conflicts: int


def snapshot(node: LiveNode) -> Snapshot:
    keys = [issue["key"] for issue in all_pages(node, "tracker/issues/")]
    issues = {key: node.issue(key) for key in keys}
    twins = all_pages(node, "twins/")
    conflicts = sum(len(node.api("GET", f"twins/{twin['id']}/")["conflicts"]) for twin in twins)
    return Snapshot(issues, twins, conflicts)


def comparable(issue: dict) -> dict:
    return {name: (sorted(issue[name]) if name == "labels" else issue[name]) for name in FIELDS}


def split_comments(issue: dict) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """(originals by id, copies of remote comments by the remote id they name)."""
    originals, copies = {}, {}
    for comment in issue["comments"]:
        found = COPY.match(comment["body"])
        if found:
            copies.setdefault(found["remote"], []).append({**comment, "text": found["body"]})
        else:
            originals[str(comment["id"])] = comment
    return originals, copies


def loop_details(node: LiveNode, twin: dict) -> str:
    """For a twin blocked as a sync loop: what its last replicas both ways disagree on, and its conflicts."""
    if not twin["last_error"].startswith("sync loop"):
        return ""
    detail = node.api("GET", f"twins/{twin['id']}/")
    sent, received = detail["last_sent"] or {}, detail["last_received"] or {}
    differ = {
        name: (sent.get(name), received.get(name))
        for name in sorted(set(sent) | set(received))
        if name not in ("key", "comments", "attachments") and sent.get(name) != received.get(name)
    }
    conflicts = [(c["field"], c["local"], c["remote"], c["chosen"], c["policy"]) for c in detail["conflicts"][:6]]
    return f"\n      sent != received: {differ}\n      conflicts (newest first): {conflicts}"


def check(driver: Driver) -> tuple[list[str], dict[str, int], list[str]]:
    """Every breach of the promises, one line each; the counts looked at; the blocked twins and why."""
    findings: list[str] = []
    blocked: list[str] = []
    shots = {side: snapshot(driver.node(side)) for side in SIDES}
    counts = {
        "issues": len(shots["Blue"].issues),
        "comments": sum(len(i["comments"]) for s in shots.values() for i in s.issues.values()),
        "attachments": sum(len(i["attachments"]) for s in shots.values() for i in s.issues.values()),
        "conflicts_recorded": shots["Blue"].conflicts + shots["Red"].conflicts,
        "blocked_twins": 0,
    }

    # No duplicate entity: one twin per issue, paired the same way on both sides.
    pairs: dict[str, dict[str, str]] = {}
    for side in SIDES:
        other = "Red" if side == "Blue" else "Blue"
        shot = shots[side]
        by_key = Counter(t["local_key"] for t in shot.twins)
        for key in shot.issues:
            if by_key[key] != 1:
                findings.append(f"duplicate: {side} {key} has {by_key[key]} twins")
        pairs[side] = {}
        for twin in shot.twins:
            if twin["state"] == "blocked":
                counts["blocked_twins"] += 1
                blocked.append(
                    f"{side} {twin['local_key']} <-> {twin['remote_key']}: {twin['last_error'][:200]}"
                    + loop_details(driver.node(side), twin)
                )
                if not twin["last_error"]:
                    findings.append(f"silent: {side} twin of {twin['local_key']} is blocked without a reason")
            elif twin["state"] != "ok":
                findings.append(f"state: {side} twin of {twin['local_key']} is {twin['state']}")
            if not (twin["local_key"] and twin["remote_key"]):
                findings.append(f"half twin: {side} {twin['local_key']} <-> {twin['remote_key']} ({twin['state']})")
                continue
            pairs[side][twin["local_key"]] = twin["remote_key"]
            if twin["remote_key"] not in shots[other].issues:
                findings.append(f"lost: {side} {twin['local_key']} is paired with {other} {twin['remote_key']}, absent")
    for blue_key, red_key in pairs["Blue"].items():
        if pairs["Red"].get(red_key) != blue_key:
            findings.append(f"twins disagree: Blue {blue_key} -> Red {red_key} -> Blue {pairs['Red'].get(red_key)}")
    for side in SIDES:
        if len(shots[side].issues) != len(driver.issues):
            findings.append(
                f"duplicate or lost: {side} has {len(shots[side].issues)} issues, {len(driver.issues)} made"
            )

    for issue in driver.issues:
        findings += _check_issue(issue, shots, pairs)
    return driver.refused + findings, counts, blocked


def _check_issue(issue: TrackedIssue, shots: dict[str, Snapshot], pairs: dict[str, dict[str, str]]) -> list[str]:
    origin, other = issue.origin, ("Red" if issue.origin == "Blue" else "Blue")
    key = issue.keys[origin]
    name = f"#{issue.number} ({origin} {key})"
    if key not in shots[origin].issues:
        return [f"lost: {name} is gone from {origin}"]
    remote_key = pairs[origin].get(key)
    if remote_key is None or remote_key not in shots[other].issues:
        return [f"lost: {name} never reached {other}"]
    keys = {origin: key, other: remote_key}
    found = {side: shots[side].issues[keys[side]] for side in SIDES}
    findings = []

    # Converged fields, each one a value somebody wrote; a field only one side wrote ends as its last write.
    values = {side: comparable(found[side]) for side in SIDES}
    for field_name in FIELDS:
        blue, red = values["Blue"][field_name], values["Red"][field_name]
        if blue != red:
            findings.append(f"diverged: {name} {field_name}: Blue {blue!r} != Red {red!r}")
            continue
        writes = issue.writes.get(field_name, [])
        written = [sorted(v) if field_name == "labels" else v for _, v in writes]
        if blue not in written:
            findings.append(f"wrong value: {name} {field_name} is {blue!r}, which nobody wrote")
        elif len({side for side, _ in writes}) == 1 and blue != written[-1]:
            findings.append(f"lost edit: {name} {field_name} is {blue!r}, the last write was {written[-1]!r}")

    # Comments: each original once on the other side with the same text, nothing deleted left over.
    expected = {side: {str(c.id): c.body for c in issue.comments if c.side == side and not c.deleted} for side in SIDES}
    split = {side: split_comments(found[side]) for side in SIDES}
    for side in SIDES:
        there = "Red" if side == "Blue" else "Blue"
        originals, _ = split[side]
        _, copies = split[there]
        for comment_id, body in expected[side].items():
            if comment_id not in originals:
                findings.append(f"lost: {name} comment {comment_id} vanished from {side}")
            elif originals[comment_id]["body"] != body:
                findings.append(
                    f"lost edit: {name} comment {comment_id} on {side} reads {originals[comment_id]['body']!r}"
                )
        for comment_id in set(originals) - set(expected[side]):
            findings.append(f"unexpected: {name} {side} has comment {comment_id} nobody wrote there")
        for comment_id, comment in originals.items():
            copied = copies.get(comment_id, [])
            if not copied:
                findings.append(f"lost: {name} comment {comment_id} of {side} is not on {there}")
            elif len(copied) > 1:
                findings.append(f"duplicate: {name} comment {comment_id} of {side} is {len(copied)} times on {there}")
            elif copied[0]["text"] != comment["body"]:
                findings.append(
                    f"diverged: {name} comment {comment_id} of {side} reads {copied[0]['text']!r} on {there}, "
                    f"{comment['body']!r} on {side}"
                )
        for comment_id in set(copies) - set(originals):
            findings.append(f"left over: {name} {there} keeps a copy of {side}'s deleted comment {comment_id}")

    # Attachments: each file once on each side.
    for side in SIDES:
        hashes = Counter(a["sha256"] for a in found[side]["attachments"])
        for sha256 in issue.attachments:
            if hashes[sha256] == 0:
                findings.append(f"lost: {name} attachment {sha256[:12]} is not on {side}")
            elif hashes[sha256] > 1:
                findings.append(f"duplicate: {name} attachment {sha256[:12]} is {hashes[sha256]} times on {side}")
        for sha256 in set(hashes) - set(issue.attachments):
            findings.append(f"unexpected: {name} attachment {sha256[:12]} on {side} nobody added")
    return findings


# --- one seed, and many -----------------------------------------------------------------------


def run(
    seed: int,
    operations: int,
    root: Path,
    *,
    races: tuple[str, ...] = tuple(RACES),
    node_faults: bool = True,
    cuts: bool = True,
    late_answers: str = "all",
    poll_seconds: int = 2,
    network_faults: bool = True,
    steps: Callable[[Driver], None] | None = None,
    drain_timeout: float = 240,
    echo=print,
) -> dict[str, Any]:
    """Drive two fresh nodes with ``seed`` and check the promises; returns the figures and findings.

    ``steps`` replaces the random steps with a scenario of its own (a function of the driver).
    """
    began = time.monotonic()
    cluster = Cluster(root, seed, cuts=cuts, late_answers=late_answers, poll_seconds=poll_seconds)
    try:
        cluster.start()
        started = time.monotonic()
        if network_faults:
            cluster.arm()
        driver = Driver(cluster, seed, operations, races=races, node_faults=node_faults, echo=echo)
        (steps or Driver.run)(driver)
        driven = time.monotonic()
        drained, last_counts = wait_for_quiescence(cluster, drain_timeout, echo=echo)
        cluster.disarm()
        quiet = time.monotonic()
        findings, counts, blocked = check(driver)
        if drained:
            findings += echoes(cluster)
        else:
            findings[:0] = [
                f"not drained within {drain_timeout:.0f} s: {json.dumps(last_counts, sort_keys=True)}",
                *stuck_events(cluster),
            ]
        checked = time.monotonic()
        proxy_figures = {name: proxy.figures() for name, proxy in cluster.proxies.items()}
        faults = Counter(driver.figures.node_faults)
        for figures in proxy_figures.values():
            faults.update(figures["faults"])
        lost = sum(1 for f in findings if f.startswith("lost"))
        return {
            "seed": seed,
            "races": list(races),
            "node_faults": node_faults,
            "cuts": cuts,
            "late_answers": late_answers,
            "poll_seconds": poll_seconds,
            "network_faults": network_faults,
            "operations": sum(driver.figures.operations.values()),
            "operations_by_kind": dict(sorted(driver.figures.operations.items())),
            "faults": sum(faults.values()),
            "faults_by_kind": dict(sorted(faults.items())),
            "leased_after_kill": driver.figures.leased_after_kill,
            "proxies": proxy_figures,
            "counts": counts,
            "lost": lost,
            "findings": findings,
            "blocked": blocked,
            "seconds": {
                "start": round(started - began, 1),
                "drive": round(driven - started, 1),
                "drain": round(quiet - driven, 1),
                "check": round(checked - quiet, 1),
                "total": round(checked - began, 1),
            },
            "journal": driver.journal,
            "logs": {side: cluster.nodes[side].log()[-2000:] for side in SIDES} if findings else {},
        }
    finally:
        cluster.destroy()


class PromiseBroken(AssertionError):
    """The nodes broke a promise of DESIGN.md; the message lists every finding."""


def assert_promises_kept(result: dict[str, Any]) -> None:
    if result["findings"]:
        raise PromiseBroken(f"{len(result['findings'])} finding(s):\n" + summary(result))


def summary(result: dict[str, Any]) -> str:
    races, seconds = ", ".join(result["races"]) or "none", result["seconds"]
    lines = [
        f"seed {result['seed']} (races: {races}; cuts: {result['cuts']}; late answers: {result['late_answers']}; "
        f"polling every {result['poll_seconds']} s): {result['operations']} operations, "
        f"{result['faults']} faults, {seconds['total']} s (start {seconds['start']}, drive {seconds['drive']}, "
        f"drain {seconds['drain']}, check {seconds['check']})",
        f"  operations: {_pairs(result['operations_by_kind'])}",
        f"  faults: {_pairs(result['faults_by_kind'])}; events left leased by each kill: {result['leased_after_kill']}",
        "  duplicates answered: "
        + ", ".join(f"{n} {_pairs(p['duplicate_second_answers'])}" for n, p in result["proxies"].items())
        + f"; held requests overtaken: {sum(p['overtaken'] for p in result['proxies'].values())}",
        f"  end state: {_pairs(result['counts'])}; lost: {result['lost']}; findings: {len(result['findings'])}",
    ]
    lines += [f"    {finding}" for finding in result["findings"]]
    lines += [f"  blocked: {twin}" for twin in result["blocked"]]
    return "\n".join(lines)


def _pairs(mapping: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help="how many seeds to run (default 5, or 1 with --seed)")
    parser.add_argument("--seed", type=int, help="the first seed (default 1); alone, runs only that seed")
    parser.add_argument("--operations", type=int, default=80, help="random operations per seed (default 80)")
    parser.add_argument(
        "--races",
        default=",".join(RACES),
        help=f"writes that race the sync, among {', '.join(RACES)} (default all), or none",
    )
    parser.add_argument("--no-node-faults", action="store_true", help="only the proxies' faults, no stop or kill")
    parser.add_argument("--no-cuts", action="store_true", help="no attachment download cut off mid-way")
    parser.add_argument(
        "--late-answers",
        choices=LATE_ANSWER_CHOICES,
        default="all",
        help=f"which batches get the faults that answer late or never ({', '.join(LATE_ANSWERS)}): "
        "all (default), acks (only those without an update), none",
    )
    parser.add_argument(
        "--poll-seconds", type=int, default=2, help="the nodes' polling interval (default 2, as in the live tests)"
    )
    parser.add_argument("--drain-timeout", type=float, default=300, help="seconds to wait for the queues")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON figures (default {RESULTS})")
    args = parser.parse_args(argv)
    races = tuple(r for r in args.races.split(",") if r and r != "none")
    if set(races) - set(RACES):
        parser.error(f"--races takes {', '.join(RACES)} or none")
    first = args.seed if args.seed is not None else 1
    count = args.seeds if args.seeds is not None else (1 if args.seed is not None else 5)
    results = []
    began = time.monotonic()
    base = Path(os.environ.get("EXALATE_DATA_DIR") or tempfile.mkdtemp(prefix="convergence-"))
    for seed in range(first, first + count):
        root = Path(tempfile.mkdtemp(prefix=f"seed{seed}-", dir=base))
        result = run(
            seed,
            args.operations,
            root,
            races=races,
            node_faults=not args.no_node_faults,
            cuts=not args.no_cuts,
            late_answers=args.late_answers,
            poll_seconds=args.poll_seconds,
            drain_timeout=args.drain_timeout,
        )
        results.append(result)
        print(summary(result), flush=True)
        if result["findings"]:
            for side, log in result["logs"].items():
                print(f"--- {side}'s log (end) ---\n{log}")
        shutil.rmtree(root, ignore_errors=True)
    totals = {
        "seeds": [r["seed"] for r in results],
        "races": list(races),
        "operations": sum(r["operations"] for r in results),
        "faults_by_kind": dict(sum((Counter(r["faults_by_kind"]) for r in results), Counter())),
        "lost": sum(r["lost"] for r in results),
        "findings": sum(len(r["findings"]) for r in results),
        "failed_seeds": [r["seed"] for r in results if r["findings"]],
        "seconds": round(time.monotonic() - began, 1),
        "database": "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "sqlite",
    }
    print(
        f"\n{len(results)} seed(s), {totals['operations']} operations, "
        f"{sum(totals['faults_by_kind'].values())} faults ({_pairs(totals['faults_by_kind'])}), "
        f"lost {totals['lost']}, findings {totals['findings']}, {totals['seconds']} s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        r.pop("logs", None)
    args.output.write_text(json.dumps({"totals": totals, "runs": results}, indent=2) + "\n")
    print(f"figures written to {args.output}")
    return 1 if totals["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
