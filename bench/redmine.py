"""Benchmark of the sync through a real Redmine, against Redmine's own write rate.

    .venv/bin/python bench/redmine.py [--issues N]

Three live processes on 127.0.0.1, as in tests/test_redmine_e2e.py (tests/redmine_live.py):
the Redmine of ``scripts/redmine``, a node serving a fresh project of it, and a built-in
node, paired, with the same rules and triggers. In one run:

1. raw: N issues, each with a comment (POST /issues.json, then PUT with notes), written
   straight into another fresh project over one keep-alive session. Redmine's write rate
   is the floor: the sync writes each issue the same way, and more.
2. built-in -> Redmine: N issues with a comment made on the built-in node through its REST
   API; its trigger brings them under sync. The clock stops when every one has a Redmine
   twin and both queues are empty (all acknowledgements applied); Redmine is then checked
   for N issues with one comment each.
3. Redmine -> built-in: N issues with a comment made in Redmine over one session; the
   Redmine node finds them by polling. The clock stops when each has a built-in twin and
   both queues are empty; the built-in side is checked for one comment each.

Prints a table and JSON with issues/s for each, how many times slower than the floor the
sync is, and how long making the N issues on the source side took (part of the sync's
time, as the sync starts with the first one); the JSON also goes to
bench/results/redmine-<time>.json and redmine-latest.json. The nodes use the tests'
settings (poll every 2 s, 3 workers) and SQLite, or PostgreSQL when DATABASE_URL names
it. REDMINE_URL, REDMINE_API_KEY and REDMINE_PROJECT come from the environment, else
from ``scripts/redmine env``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.livenodes import LiveNode  # noqa: E402 - needs the repository on the path
from tests.redmine_live import (  # noqa: E402
    EXTERNAL_ID,
    SCRIPT,
    SETTINGS,
    RedmineAdmin,
    RedminePair,
    comments_of,
    custom_field,
    settings,
)

RESULTS = REPO / "bench" / "results"
BUSY = {"pending", "sending", "sent", "processing"}


def redmine_settings() -> tuple[str, str, str]:
    found = settings()
    if found:
        return found
    result = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        sys.exit(f"no Redmine: set {', '.join(SETTINGS)} or start one with scripts/redmine up\n{result.stderr}")
    os.environ.update(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return settings()


def quiet(node: LiveNode) -> bool:
    """Nothing waits in the node's queue; a failed event or a blocked twin stops the benchmark."""
    for connection in node.api("GET", "queue/stats/")["connections"]:
        if connection["blocked_twins"] or any("failed" in connection[d] for d in ("outgoing", "incoming")):
            raise RuntimeError(f"{node.name}: the sync failed: {connection}")
        if any(BUSY & set(connection[d]) for d in ("outgoing", "incoming")):
            return False
    return True


def all_twins(node: LiveNode) -> list[dict]:
    found, page = [], 1
    while True:
        body = node.api("GET", "twins/", params={"page_size": 500, "page": page})
        found.extend(body["results"])
        if not body["next"]:
            return found
        page += 1


def twinned(node: LiveNode, local_keys: set[str]) -> int:
    """How many of ``local_keys`` have a twin on ``node`` that knows its remote key."""
    return sum(1 for twin in all_twins(node) if twin["local_key"] in local_keys and twin["remote_key"])


def events(node: LiveNode) -> dict[str, int]:
    (connection,) = node.api("GET", "queue/stats/")["connections"]
    return {direction: sum(connection[direction].values()) for direction in ("outgoing", "incoming")}


def until_synced(pair: RedminePair, node: LiveNode, local_keys: set[str], timeout: float) -> None:
    pair.wait(
        lambda: twinned(node, local_keys) == len(local_keys) and quiet(pair.builtin) and quiet(pair.redmine),
        f"{len(local_keys)} issues synced from {node.name}",
        timeout=timeout,
    )


def raw_writes(admin: RedmineAdmin, issues: int) -> dict:
    project = admin.create_project("bench-raw")
    try:
        started = time.perf_counter()
        for n in range(issues):
            issue = admin.create_issue(project, f"Raw issue {n}", description="Written straight to Redmine")
            admin.update_issue(issue["id"], notes=f"Raw comment {n}")
        seconds = time.perf_counter() - started
        assert len(admin.issues(project)) == issues
    finally:
        admin.delete_project(project)
    return {"seconds": seconds, "requests": 2 * issues}


def builtin_to_redmine(pair: RedminePair, issues: int, timeout: float) -> dict:
    before = {node.name: events(node) for node in pair.nodes()}
    started = time.perf_counter()
    keys = set()
    for n in range(issues):
        key = pair.builtin.create_issue(summary=f"Built-in issue {n}", description="Made on the built-in node")["key"]
        pair.builtin.api("POST", f"tracker/issues/{key}/comments/", json={"body": f"Built-in comment {n}"})
        keys.add(key)
    made = time.perf_counter() - started
    until_synced(pair, pair.builtin, keys, timeout)
    seconds = time.perf_counter() - started
    mine = [row for row in pair.admin.issues(pair.project) if custom_field(row, EXTERNAL_ID) in keys]
    assert len(mine) == issues, f"{len(mine)} of {issues} issues in Redmine"
    assert all(len(comments_of(pair.admin.issue(row["id"]))) == 1 for row in mine), "one comment each in Redmine"
    return {"seconds": seconds, "making_seconds": made, "events": used_events(pair, before)}


def redmine_to_builtin(pair: RedminePair, issues: int, timeout: float) -> dict:
    before = {node.name: events(node) for node in pair.nodes()}
    started = time.perf_counter()
    ids = set()
    for n in range(issues):
        issue = pair.admin.create_issue(pair.project, f"Redmine issue {n}", description="Made in Redmine")
        pair.admin.update_issue(issue["id"], notes=f"Redmine comment {n}")
        ids.add(str(issue["id"]))
    made = time.perf_counter() - started
    until_synced(pair, pair.redmine, ids, timeout)
    seconds = time.perf_counter() - started
    keys = [t["remote_key"] for t in all_twins(pair.redmine) if t["local_key"] in ids]
    comments = [pair.builtin.api("GET", f"tracker/issues/{key}/comments/")["results"] for key in keys]
    assert len(keys) == issues and all(len(c) == 1 for c in comments), "one comment each on the built-in node"
    return {"seconds": seconds, "making_seconds": made, "events": used_events(pair, before)}


def used_events(pair: RedminePair, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The events each node queued in a phase, by direction."""
    return {node.name: {d: n - before[node.name][d] for d, n in events(node).items()} for node in pair.nodes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--issues", type=int, default=50, help="issues per phase (default 50)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a sync phase may take (default 600)")
    options = parser.parse_args()
    if options.issues < 1:
        parser.error("--issues must be at least 1")
    url, api_key, _ = redmine_settings()
    admin = RedmineAdmin(url, api_key)
    backend = "postgres" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "sqlite"

    print(f"raw: {options.issues} issues with a comment straight into Redmine ...", flush=True)
    raw = raw_writes(admin, options.issues)
    with tempfile.TemporaryDirectory(prefix="bench-redmine-") as root:
        print("starting the Redmine node and the built-in node ...", flush=True)
        pair = RedminePair(Path(root), prefix="bench")
        try:
            print("built-in -> Redmine ...", flush=True)
            outgoing = builtin_to_redmine(pair, options.issues, options.timeout)
            print("Redmine -> built-in ...", flush=True)
            incoming = redmine_to_builtin(pair, options.issues, options.timeout)
        finally:
            pair.close()

    phases = {
        "raw Redmine REST writes": raw,
        "built-in -> Redmine sync": outgoing,
        "Redmine -> built-in sync": incoming,
    }
    for phase in phases.values():
        phase["issues_per_second"] = round(options.issues / phase["seconds"], 2)
        phase["times_slower_than_raw"] = round(phase["seconds"] / raw["seconds"], 2)
        for name in ("seconds", "making_seconds"):
            if name in phase:
                phase[name] = round(phase[name], 2)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "issues": options.issues,
        "node_database": backend,
        "poll_seconds": 2,
        "redmine": url,
        "phases": phases,
    }
    print()
    print(table(result))
    print()
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for name in (f"redmine-{stamp}.json", "redmine-latest.json"):
        (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


def table(result: dict) -> str:
    lines = [
        f"{result['issues']} issues with one comment each; nodes on {result['node_database']}, "
        f"polling every {result['poll_seconds']} s",
        f"{'':<26}{'seconds':>9}{'issues/s':>10}{'x raw':>7}{'made in':>9}",
    ]
    for name, phase in result["phases"].items():
        made = f"{phase['making_seconds']:.1f}" if "making_seconds" in phase else "-"
        lines.append(
            f"{name:<26}{phase['seconds']:>9.1f}{phase['issues_per_second']:>10.2f}"
            f"{phase['times_slower_than_raw']:>7.1f}{made:>9}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
