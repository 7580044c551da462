"""Benchmark of the sync between two live nodes: bulk sync, its floor, latency, memory.

    .venv/bin/python bench/sync.py [--small] [--issues N] [--comments-per-issue 6.9585]
                                   [--latency-seconds 60] [--rate 20] [--profile]

Two nodes (built-in tracker, PostgreSQL, the Redis broker, production settings, gunicorn
and django-q2 through ``runnode``) on 127.0.0.1, driven through their REST APIs:

1. floor: a fresh database, migrated, gets the issues and comments by ``bulk_create``
   (``manage.py bench_seed``); its insert time is the floor (the median of three runs,
   each into a fresh database).
2. bulk: Blue gets the same rows the same way before the sync; a trigger made through
   the API and run (``POST /api/v1/triggers/<id>/run/``) brings them under sync; the
   clock stops when Red holds every issue and every event on both nodes is done (the
   acks applied on Blue), as ``/api/v1/queue/stats/`` and Red's issue list tell; then
   ``manage.py bench_counts`` confirms the issues and comments on Red.
3. latency: at a steady rate, PATCH the summary of synced issues on Blue (the response
   marks the commit) while one list request to Red, repeated, tells when each new value
   first shows there.

Every process of both nodes is sampled for its memory (VmRSS, peak kept; VmHWM) and CPU
time. ``--profile`` records the workers with py-spy during the bulk sync and the latency
phase, and sums up where their time went. The figures go to bench/results/latest.json (the one before to
previous.json) and are printed beside the previous run's and the targets. Nothing is
asserted. Nodes, databases and Redis databases are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nodes import REPO, BenchNode, ProcessWatch, Profiler, wait_until_quiet

from tests.livenodes import LiveNode, pair

RESULTS = REPO / "bench" / "results"
FULL_ISSUES = 10_000
FULL_COMMENTS = 69_585
SMALL_ISSUES = 1_000
# Events still on their way. An update stays "sent" until its ack is applied; the clock
# waits for the acks themselves (Blue's incoming events), since an update can be left
# "sent" after its ack was applied (see bench/README.md).
ACTIVE = ("pending", "sending", "processing")
# Red's issues updated this long before a poll began are asked for again: a write's
# timestamp is taken a little before its transaction commits.
POLL_OVERLAP = timedelta(seconds=1)
DATABASE_OVERLAP = timedelta(seconds=60)
# After the last change is sent, wait for the rest to show on Red while some keep coming.
LATENCY_QUIET_SECONDS = 30
LATENCY_DRAIN_LIMIT = 600
TARGETS = {
    "bulk_seconds": (120, "s at 10,000 issues"),
    "ratio": (10, "x the floor"),
    "latency_p50_ms": (250, "ms"),
    "latency_p99_ms": (1000, "ms"),
    "peak_rss_mb": (200, "MB, every process"),
}


class BenchError(Exception):
    """The benchmark could not finish; the message says where it stopped."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- floor ---------------------------------------------------------------------------------


def seed(node: LiveNode, issues: int, comments: int) -> dict:
    return json.loads(node.manage("bench_seed", "--issues", str(issues), "--comments", str(comments)))


def counts(node: LiveNode) -> dict:
    return json.loads(node.manage("bench_counts"))


# The floor is timed this many times, each into a fresh database, and the median taken: one
# timing of a few seconds varied by a third between runs on the same machine.
FLOOR_RUNS = 3


def measure_floor(root: Path, issues: int, comments: int) -> list[float]:
    """Bulk inserts of the same rows into a fresh, migrated database: the seconds of each run."""
    timings = []
    for _ in range(FLOOR_RUNS):
        floor = LiveNode("Floor", root)
        try:
            floor.manage("migrate", "--noinput", "-v0")
            floor.manage("demo_setup", "--quiet")
            timings.append(seed(floor, issues, comments)["seconds"])
        finally:
            floor.destroy()
    return timings


# --- bulk ----------------------------------------------------------------------------------


def queue_totals(node: LiveNode) -> dict:
    totals = {"outgoing": Counter(), "incoming": Counter(), "blocked_twins": 0}
    for connection in node.api("GET", "queue/stats/")["connections"]:
        totals["outgoing"].update(connection["outgoing"])
        totals["incoming"].update(connection["incoming"])
        totals["blocked_twins"] += connection["blocked_twins"]
    return totals


def active(totals: dict) -> int:
    return sum(totals[direction][status] for direction in ("outgoing", "incoming") for status in ACTIVE)


def issue_count(node: LiveNode) -> int:
    return node.api("GET", "tracker/issues/", params={"project": node.project, "page_size": 1})["count"]


QUEUE_READS_EVERY = 2.0


def run_bulk(blue: BenchNode, red: BenchNode, connection: int, issues: int, comments: int, stall: float) -> dict:
    """Trigger the sync of everything on Blue and wait until Red has it and both queues are done."""
    run: dict = {}

    def run_trigger(trigger: int) -> None:
        began = time.perf_counter()
        try:
            response = blue.session.post(f"{blue.url}/api/v1/triggers/{trigger}/run/", timeout=3600)
            run["status"] = response.status_code
            run["answer"] = response.text[:300]
        except requests.RequestException as e:
            run["status"] = f"failed: {e}"
        run["seconds"] = round(time.perf_counter() - began, 2)

    began = time.perf_counter()
    trigger = blue.api("POST", f"connections/{connection}/triggers/", json={"query": f"project:{blue.project}"})
    runner = threading.Thread(target=run_trigger, args=(trigger["id"],), daemon=True)
    runner.start()
    progress, progressed, reported, all_on_red = None, time.perf_counter(), 0.0, None
    blue_q = red_q = None
    read_queues = 0.0
    on_red = 0
    while True:
        # Once Red has every issue only the last acks are awaited: look more often, so that
        # the clock stops within a tenth of a second of the end (a small run lasts seconds).
        time.sleep(0.1 if on_red >= issues else 0.5)
        on_red = issue_count(red)
        now = time.perf_counter()
        # The queue counts scan each node's whole queue: read every QUEUE_READS_EVERY seconds
        # while Red still lacks issues, so that watching does not slow what it watches; every
        # time once Red has them all, so that the end is seen within a tenth of a second.
        if blue_q is None or on_red >= issues or now - read_queues >= QUEUE_READS_EVERY:
            blue_q, red_q, read_queues = queue_totals(blue), queue_totals(red), now
        if all_on_red is None and on_red >= issues:
            all_on_red = now - began
        finished = (
            not runner.is_alive()
            and on_red >= issues
            and blue_q["incoming"]["done"] >= issues
            and active(blue_q) == 0
            and active(red_q) == 0
        )
        if finished:
            break
        state = (on_red, blue_q["outgoing"]["done"], blue_q["incoming"]["done"], red_q["incoming"]["done"])
        if state != progress:
            progress, progressed = state, now
        elif now - progressed > stall:
            raise BenchError(f"no progress for {stall:.0f} s: Red has {on_red} issues; Blue {blue_q}; Red {red_q}")
        if now - reported >= 10:
            reported = now
            say(
                f"bulk {now - began:5.0f} s: Red has {on_red}/{issues} issues; Blue outgoing done "
                f"{blue_q['outgoing']['done']}, acks applied {blue_q['incoming']['done']}; "
                f"active events Blue {active(blue_q)}, Red {active(red_q)}"
            )
    seconds = time.perf_counter() - began
    red_counts = counts(red)
    deadline = time.monotonic() + 60
    while red_counts["comments"] < comments and time.monotonic() < deadline:
        time.sleep(2)
        red_counts = counts(red)
    return {
        "bulk_seconds": round(seconds, 2),
        "bulk_entities_per_second": round((issues + comments) / seconds, 1),
        "bulk_issues_per_second": round(issues / seconds, 1),
        "bulk_all_issues_on_red_seconds": round(all_on_red, 2),
        "trigger_run": run,
        "red_counts": red_counts,
        "complete": red_counts["issues"] == issues and red_counts["comments"] == comments,
        "blue_updates_left_sent": blue_q["outgoing"]["sent"],
        "failed_events": {
            "blue": blue_q["outgoing"]["failed"] + blue_q["incoming"]["failed"],
            "red": red_q["outgoing"]["failed"] + red_q["incoming"]["failed"],
        },
    }


# --- latency -------------------------------------------------------------------------------


def measure_latency(
    blue: BenchNode,
    red: BenchNode,
    issues: int,
    seconds: float,
    rate: float,
    poll_interval: float,
    observe: str = "database",
) -> dict:
    """PATCH summaries on Blue at ``rate`` per second; note when each first shows on Red.

    ``observe``: "database" reads Red's committed issues straight from its database, at
    next to no cost to Red; "api" asks Red's REST API, whose list request, ten times a
    second, costs Red's web process a share of a core and so slows what it measures.
    """
    total = int(seconds * rate)
    if total < 1:
        return {}
    keys = [f"{blue.project}-{n}" for n in range(1, issues + 1)]
    expected: dict[str, int] = {}
    started: dict[int, float] = {}
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}
    errors: list[str] = []
    poll_seconds: list[float] = []
    local = threading.local()
    stop = threading.Event()

    def session(node: LiveNode) -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers.update(node.session.headers)
        return local.session

    def change(i: int) -> None:
        summary = f"latency probe {i}"
        expected[summary] = i
        started[i] = time.perf_counter()
        url = f"{blue.url}/api/v1/tracker/issues/{keys[i % len(keys)]}/"
        try:
            response = session(blue).patch(url, json={"summary": summary}, timeout=30)
        except requests.RequestException as e:
            errors.append(f"change {i}: {e}")
            return
        if response.status_code != 200:
            errors.append(f"change {i}: {response.status_code} {response.text[:200]}")
            return
        committed[i] = time.perf_counter()

    def note(summaries, arrived: float) -> None:
        for summary in summaries:
            i = expected.get(summary)
            if i is not None and i not in seen:
                seen[i] = arrived

    def read_api(since: datetime) -> None:
        url = f"{red.url}/api/v1/tracker/issues/"
        params = {"project": red.project, "updated_after": since.isoformat(), "page_size": 500}
        while url:
            response = session(red).get(url, params=params, timeout=30)
            arrived = time.perf_counter()
            body = response.json()
            note((issue["summary"] for issue in body["results"]), arrived)
            url, params = body.get("next"), None

    database = psycopg.connect(red.database_url(), autocommit=True) if observe == "database" else None

    def read_database(since: datetime) -> None:
        # A write commits after the moment it stamped: under load a batch's transaction can
        # take seconds. Reading the last minute costs the database little, and misses none.
        since -= DATABASE_OVERLAP
        rows = database.execute("SELECT summary FROM builtin_issue WHERE updated >= %s", [since]).fetchall()
        note((summary for (summary,) in rows), time.perf_counter())

    read = read_database if database is not None else read_api

    def poll() -> None:
        while not stop.is_set():
            began, since = time.perf_counter(), datetime.now(UTC) - POLL_OVERLAP
            try:
                read(since)
            except (requests.RequestException, psycopg.Error, ValueError, KeyError) as e:
                errors.append(f"poll: {e}")
            poll_seconds.append(time.perf_counter() - began)
            stop.wait(max(0.0, poll_interval - (time.perf_counter() - began)))

    poller = threading.Thread(target=poll, name="red-poller", daemon=True)
    poller.start()
    began = time.perf_counter()
    # Open loop: enough senders that a slow answer does not hold back the next change.
    with ThreadPoolExecutor(max_workers=max(8, math.ceil(rate * 3))) as pool:
        for i in range(total):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(change, i)
    sent = time.perf_counter()
    last_count, last_change = len(seen), sent
    while any(i not in seen for i in committed) and time.perf_counter() - sent < LATENCY_DRAIN_LIMIT:
        time.sleep(0.2)
        if len(seen) != last_count:
            last_count, last_change = len(seen), time.perf_counter()
        elif time.perf_counter() - last_change > LATENCY_QUIET_SECONDS:
            break
    stop.set()
    poller.join(timeout=35)
    if database is not None:
        database.close()

    latencies = [1000 * (seen[i] - committed[i]) for i in committed if i in seen]
    patches = [1000 * (committed[i] - started[i]) for i in committed]
    first, last = min(started.values()), max(started.values())
    return {
        "latency_p50_ms": _round(percentile(latencies, 50)),
        "latency_p95_ms": _round(percentile(latencies, 95)),
        "latency_p99_ms": _round(percentile(latencies, 99)),
        "latency_max_ms": _round(max(latencies, default=None)),
        "latency_changes": total,
        "latency_committed": len(committed),
        "latency_seen": len(latencies),
        # Changes start at most 3 x rate at a time: when Blue answers slowly, fewer go per second.
        "latency_rate_sent": round((total - 1) / (last - first), 2) if last > first else None,
        "latency_drain_seconds": round(time.perf_counter() - sent, 1),
        "latency_patch_p50_ms": _round(percentile(patches, 50)),
        "latency_patch_p99_ms": _round(percentile(patches, 99)),
        "latency_poll_p50_ms": _round(percentile([1000 * s for s in poll_seconds], 50)),
        "latency_observed_through": observe,
        "latency_errors": errors[:20],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --- results -------------------------------------------------------------------------------


def git_version() -> str:
    executable = shutil.which("git")
    if executable is None:
        return "unknown"

    def git(*args: str) -> str:
        return subprocess.run([executable, *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (with local changes)" if git("status", "--porcelain") else "")


def previous_results() -> dict | None:
    """The last run's figures, kept as previous.json before this run can replace them."""
    latest = RESULTS / "latest.json"
    if not latest.exists():
        return None
    shutil.copyfile(latest, RESULTS / "previous.json")
    try:
        return json.loads(latest.read_text())
    except ValueError:
        return None


def show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def print_table(results: dict, previous: dict | None) -> None:
    rows = [
        ("issues", "issues"),
        ("comments", "comments"),
        ("bulk sync, wall time (s)", "bulk_seconds"),
        ("bulk sync, entities/s", "bulk_entities_per_second"),
        ("floor: bulk inserts (s)", "floor_seconds"),
        ("bulk sync / floor", "ratio"),
        ("latency p50 (ms)", "latency_p50_ms"),
        ("latency p95 (ms)", "latency_p95_ms"),
        ("latency p99 (ms)", "latency_p99_ms"),
        ("latency changes seen/sent", None),
        ("peak RSS, largest process (MB)", "peak_rss_mb"),
    ]
    old = previous or {}
    header = f"{'figure':32} {'this run':>12} {'previous':>12}   target"
    print(header)
    print("-" * len(header))
    for label, key in rows:
        if key is None:
            new = f"{results.get('latency_seen', '-')}/{results.get('latency_changes', '-')}"
            before = f"{old.get('latency_seen', '-')}/{old.get('latency_changes', '-')}" if old else "-"
            print(f"{label:32} {new:>12} {before:>12}")
            continue
        target = ""
        if key in TARGETS:
            limit, unit = TARGETS[key]
            value = results.get(key)
            verdict = "" if value is None else ("  meets" if value <= limit else "  misses")
            target = f"<= {limit:,} {unit}{verdict}"
        print(f"{label:32} {show(results.get(key)):>12} {show(old.get(key)) if old else '-':>12}   {target}")
    print()
    for phase in ("bulk", "latency"):
        spent = results.get(f"{phase}_cpu_seconds") or {}
        cpu = ", ".join(f"{where} {seconds} s" for where, seconds in spent.items())
        print(f"CPU time used during the {phase} phase: {cpu or '-'}")
    if results.get("latency_cpu_ms_per_change") is not None:
        print(
            f"latency phase: {results['latency_rate_sent']} changes/s sent (of {results['args']['rate']}), "
            f"PATCH p50 {results['latency_patch_p50_ms']} ms, {results['latency_cpu_ms_per_change']} ms CPU per change"
        )
    print(f"load average before and after: {results['load_before']} {results.get('load_after')}")
    if not results.get("complete", True):
        print(f"INCOMPLETE: Red holds {results.get('red_counts')}")
    if results.get("blue_updates_left_sent"):
        print(f"{results['blue_updates_left_sent']} of Blue's updates stayed 'sent' although their acks were applied")
    print()
    print(f"{'node':6} {'process':22} {'pid':>8} {'peak RSS MB':>12} {'VmHWM MB':>9} {'CPU s':>7} {'bulk CPU s':>10}")
    for p in results["processes"]:
        print(
            f"{p['node']:6} {p['role']:22} {p['pid']:>8} {p['peak_rss_mb']:>12} {p['hwm_mb']:>9} "
            f"{p['cpu_seconds']:>7} {show(p.get('bulk_cpu_seconds')):>10}"
        )
    for field, phase in (("profile", "the bulk sync"), ("latency_profile", "the latency phase")):
        for name, group in (results.get(field) or {}).items():
            print(f"\nprofile of {name} during {phase} ({group['samples']:,} samples, idle included):")
            for kind, share in group["kinds"].items():
                print(f"  {share:5.1f}%  {kind}")
            print("  innermost project function (the code that made the call the sample is in):")
            for function, share in list(group["project_functions_innermost"].items())[:10]:
                print(f"    {share:5.1f}%  {function}")


# --- the run -------------------------------------------------------------------------------


def cpu_snapshot(watch: ProcessWatch) -> dict[tuple[str, int], float]:
    return {(p["node"], p["pid"]): p["cpu_seconds"] for p in watch.report()}


def cpu_spent(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds used between two snapshots, by node, and by the nodes' PostgreSQL backends."""
    spent: Counter = Counter()
    for (node, pid), seconds in after.items():
        spent["PostgreSQL" if pid == 0 else node] += seconds - before.get((node, pid), 0)
    return {where: round(seconds, 1) for where, seconds in sorted(spent.items())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help=f"{SMALL_ISSUES:,} issues instead of {FULL_ISSUES:,}.")
    parser.add_argument("--issues", type=int, help=f"How many issues (default {FULL_ISSUES:,}).")
    parser.add_argument(
        "--comments-per-issue",
        type=float,
        default=FULL_COMMENTS / FULL_ISSUES,
        help=f"Average comments per issue (default {FULL_COMMENTS / FULL_ISSUES}: {FULL_COMMENTS:,} at full size).",
    )
    parser.add_argument("--latency-seconds", type=float, default=60, help="How long to measure latency (0: skip).")
    parser.add_argument("--rate", type=float, default=20, help="Changes per second while measuring latency.")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="Seconds between reads of Red (latency).")
    parser.add_argument(
        "--observe",
        choices=("database", "api"),
        default="database",
        help="How the latency phase reads Red: its database (default) or its REST API (which loads Red).",
    )
    parser.add_argument(
        "--profile", action="store_true", help="Record the workers with py-spy during the bulk and the latency phase."
    )
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database of Blue; Red uses the next one.")
    parser.add_argument("--stall-seconds", type=float, default=300, help="Give up after this long without progress.")
    args = parser.parse_args(argv)
    if args.issues is None:
        args.issues = SMALL_ISSUES if args.small else FULL_ISSUES
    if args.issues < 1 or args.comments_per_issue < 0 or args.rate <= 0:
        parser.error("--issues must be at least 1, --comments-per-issue at least 0 and --rate above 0")
    return args


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    issues = args.issues
    comments = round(issues * args.comments_per_issue)
    # Also when started with SIGINT ignored (as a background job of a script is).
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = previous_results()
    results: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": git_version(),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "args": vars(args),
        "issues": issues,
        "comments": comments,
    }
    root = Path(tempfile.mkdtemp(prefix="exalate-bench-"))
    nodes: list[BenchNode] = []
    watch = ProcessWatch()
    profiler: Profiler | None = None
    try:
        say(f"floor: {issues:,} issues and {comments:,} comments into a fresh database")
        floors = measure_floor(root, issues, comments)
        results["floor_seconds"] = statistics.median(floors)
        results["floor_runs_seconds"] = floors

        say("starting Blue and Red")
        blue = BenchNode("Blue", root, args.redis_db)
        nodes.append(blue)
        red = BenchNode("Red", root, args.redis_db + 1)
        nodes.append(red)
        blue.prepare()
        red.prepare()
        results["seed_seconds"] = seed(blue, issues, comments)["seconds"]
        watch.start()
        for node in nodes:
            node.start()
            watch.add(node)
        blue_side, _ = pair(blue, red, triggers=False)
        # Let the first polling pass over the new connection end before the clock starts.
        wait_until_quiet(watch)

        if args.profile:
            profiler = Profiler(watch, RESULTS / "profile")
            profiler.start()
        say("bulk: trigger, run, wait until Red has everything and the acks are applied")
        cpu_before = cpu_snapshot(watch)
        results.update(run_bulk(blue, red, blue_side["id"], issues, comments, args.stall_seconds))
        cpu_after = cpu_snapshot(watch)
        results["bulk_cpu_seconds"] = cpu_spent(cpu_before, cpu_after)
        if profiler is not None:
            profiler.stop()
            results["profile"] = profiler.summary()
            profiler = None
        results["ratio"] = round(results["bulk_seconds"] / results["floor_seconds"], 1)
        say(f"bulk: {results['bulk_seconds']} s; latency: {args.rate}/s for {args.latency_seconds} s")

        wait_until_quiet(watch)
        if args.latency_seconds > 0:
            latency_before = cpu_snapshot(watch)
            if args.profile:
                profiler = Profiler(watch, RESULTS / "profile-latency")
                profiler.start()
            results.update(
                measure_latency(blue, red, issues, args.latency_seconds, args.rate, args.poll_interval, args.observe)
            )
            if profiler is not None:
                profiler.stop()
                results["latency_profile"] = profiler.summary()
                profiler = None
            results["latency_cpu_seconds"] = cpu_spent(latency_before, cpu_snapshot(watch))
            per_change = sum(results["latency_cpu_seconds"].values()) / max(1, results["latency_committed"])
            results["latency_cpu_ms_per_change"] = round(1000 * per_change, 1)
        watch.stop()
        results["processes"] = watch.report()
        for process in results["processes"]:
            key = (process["node"], process["pid"])
            if key in cpu_after:
                process["bulk_cpu_seconds"] = round(cpu_after[key] - cpu_before.get(key, 0), 1)
        results["peak_rss_mb"] = max(max(p["peak_rss_mb"], p["hwm_mb"]) for p in results["processes"] if p["pid"] != 0)
        results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except (BenchError, RuntimeError, AssertionError, requests.RequestException) as e:
        say(f"the benchmark stopped: {e}")
        for node in nodes:
            say(f"{node.name}'s log ends with:\n{node.log()[-2000:]}")
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if profiler is not None:
            profiler.stop()
        watch.stop()
        for node in nodes:
            # The node's log (gunicorn, django-q2 at WARNING) outlives it, for a look afterwards.
            if node.log_path.exists():
                shutil.copyfile(node.log_path, RESULTS / f"{node.name.lower()}.log")
            node.destroy()
        shutil.rmtree(root, ignore_errors=True)

    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, previous)
    print()
    shown = {k: v for k, v in results.items() if k not in ("processes", "profile", "latency_profile")}
    print(json.dumps(shown, indent=2))
    print(f"\nAll figures, with every process and the profile: {RESULTS / 'latest.json'}; node logs beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
