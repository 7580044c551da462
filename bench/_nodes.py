"""Live nodes set up as in production, and what their processes use, for the benchmarks.

``BenchNode`` is the tests' ``LiveNode`` (``runnode``: gunicorn + django-q2 on loopback,
its own PostgreSQL database) with production settings: the Redis broker on a database
number of its own, DEBUG off, LOG_LEVEL WARNING, the default poll interval and workers.
``ProcessWatch`` samples the memory and CPU time of every process of each node's process
group; ``Profiler`` runs py-spy on chosen processes and sums up where their time went.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.livenodes import LiveNode  # noqa: E402 - needs the repository on the path

POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379"
# The tests' speed-ups that production does not have.
TEST_ONLY_SETTINGS = ("SYNC_POLL_SECONDS", "Q_WORKERS")


class BenchNode(LiveNode):
    """A live node with production settings and the django-q2 Redis broker on ``redis_db``."""

    def __init__(self, name: str, root: Path, redis_db: int):
        os.environ["DATABASE_URL"] = POSTGRES  # LiveNode makes its own database from this one
        super().__init__(name, root)
        for name_ in TEST_ONLY_SETTINGS:
            self.env.pop(name_, None)
        self.redis_url = f"{REDIS}/{redis_db}"
        self.env.update(REDIS_URL=self.redis_url, DEBUG="false", LOG_LEVEL="WARNING")

    def prepare(self) -> None:
        redis.Redis.from_url(self.redis_url).flushdb()
        super().prepare()

    def database_url(self) -> str:
        """The node's own PostgreSQL database, for reading it beside the node."""
        return self.env["DATABASE_URL"]

    @property
    def group(self) -> int | None:
        """The process group of the running node (runnode starts its own session)."""
        return self.process.pid if self.process is not None else None

    def destroy(self) -> None:
        super().destroy()
        redis.Redis.from_url(self.redis_url).flushdb()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --- processes -----------------------------------------------------------------------------

POSTGRES_BACKEND = "postgres backend"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    node: str
    pid: int
    ppid: int
    started: int  # clock ticks after boot: orders the children of one parent
    command: str
    peak_rss_kb: int = 0
    hwm_kb: int = 0
    cpu_ticks: int = 0
    role: str = "other"
    alive: bool = True


def _stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, process group, start time, CPU ticks) from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; the fields follow the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), int(fields[19]), int(fields[11]) + int(fields[12])


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; zeros when the process is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessWatch(threading.Thread):
    """Samples VmRSS (keeping each process's peak), VmHWM and CPU time of the nodes' processes."""

    def __init__(self, interval: float = 0.25, q_workers: int = 2):
        super().__init__(name="process-watch", daemon=True)
        self.interval = interval
        self.q_workers = q_workers
        self.groups: dict[int, str] = {}
        # The PostgreSQL backends serving each node's database, found through pg_stat_activity.
        self.databases: dict[str, str] = {}
        self.postgres: psycopg.Connection | None = None
        self.processes: dict[int, Process] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def add(self, node: BenchNode) -> None:
        with self.lock:
            self.groups[node.group] = node.name
            if node.pg_database:
                self.databases[node.pg_database] = node.name
        self.sample()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=5)
        self.sample()
        if self.postgres is not None:
            self.postgres.close()
            self.postgres = None

    def _backends(self) -> dict[int, str]:
        if not self.databases:
            return {}
        if self.postgres is None:
            self.postgres = psycopg.connect(POSTGRES, autocommit=True)
        rows = self.postgres.execute(
            "SELECT pid, datname FROM pg_stat_activity WHERE datname = ANY(%s)", [list(self.databases)]
        ).fetchall()
        return {pid: self.databases[name] for pid, name in rows}

    def sample(self) -> None:
        with self.lock:
            seen = set()
            backends = self._backends()
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                stat = _stat(pid)
                if stat is None or (stat[1] not in self.groups and pid not in backends):
                    continue
                ppid, group, started, cpu = stat
                known = self.processes.get(pid)
                if known is None or known.started != started:
                    node = self.groups.get(group) or backends[pid]
                    known = self.processes[pid] = Process(node, pid, ppid, started, _command(pid))
                    if pid in backends:
                        known.role = POSTGRES_BACKEND
                rss, hwm = _memory_kb(pid)
                known.peak_rss_kb = max(known.peak_rss_kb, rss)
                known.hwm_kb = max(known.hwm_kb, hwm)
                known.cpu_ticks = cpu
                seen.add(pid)
            for pid, process in self.processes.items():
                process.alive = pid in seen
            self._name_roles()

    def _name_roles(self) -> None:
        """Tell the processes apart by their place in the tree, since django-q2's all read 'qcluster'.

        runnode starts gunicorn (master, then its workers) and qcluster, whose sentinel
        forks the workers first, then the monitor and the pusher; a child it forks later
        replaces a recycled or dead worker.
        """
        by_pid = self.processes
        children: dict[int, list[Process]] = {}
        for process in by_pid.values():
            children.setdefault(process.ppid, []).append(process)
        for process in by_pid.values():
            parent = by_pid.get(process.ppid)
            if process.role == POSTGRES_BACKEND:
                continue
            if process.pid in self.groups:
                process.role = "runnode"
            elif "gunicorn" in process.command:
                process.role = "gunicorn master" if parent and parent.role == "runnode" else "gunicorn worker"
            elif "qcluster" in process.command and parent is not None and parent.pid in self.groups:
                process.role = "qcluster"
        for process in by_pid.values():
            if process.role == "qcluster":
                for sentinel in children.get(process.pid, []):
                    sentinel.role = "qcluster sentinel"
                    self._name_cluster(children.get(sentinel.pid, []))

    def _name_cluster(self, forked: list[Process]) -> None:
        forked = sorted(forked, key=lambda p: (p.started, p.pid))
        if not forked:
            return
        first = forked[0].started
        initial = [p for p in forked if p.started - first < 2 * CLOCK_TICKS]
        for position, process in enumerate(forked):
            process.role = "qcluster worker"
            if process in initial and position == len(initial) - 2 and len(initial) == self.q_workers + 2:
                process.role = "qcluster monitor"
            elif process in initial and position == len(initial) - 1 and len(initial) == self.q_workers + 2:
                process.role = "qcluster pusher"

    def pids(self, node: str, role: str, alive: bool = True) -> list[int]:
        with self.lock:
            return [
                p.pid for p in self.processes.values() if p.node == node and p.role == role and (p.alive or not alive)
            ]

    def cpu_seconds(self) -> float:
        """CPU time used so far by all the live processes watched."""
        with self.lock:
            return sum(p.cpu_ticks for p in self.processes.values() if p.alive) / CLOCK_TICKS

    def report(self) -> list[dict]:
        """One row per node process; the node's PostgreSQL backends as one row (pid 0), CPU added up."""
        with self.lock:
            rows = sorted(self.processes.values(), key=lambda p: (p.node, p.role, p.started, p.pid))
            report = [
                {
                    "node": p.node,
                    "role": p.role,
                    "pid": p.pid,
                    "peak_rss_mb": round(p.peak_rss_kb / 1024, 1),
                    "hwm_mb": round(p.hwm_kb / 1024, 1),
                    "cpu_seconds": round(p.cpu_ticks / CLOCK_TICKS, 1),
                    "alive_at_end": p.alive,
                }
                for p in rows
                if p.role != POSTGRES_BACKEND
            ]
            for node in sorted({p.node for p in rows if p.role == POSTGRES_BACKEND}):
                backends = [p for p in rows if p.role == POSTGRES_BACKEND and p.node == node]
                report.append(
                    {
                        "node": node,
                        "role": f"{POSTGRES_BACKEND}s ({len(backends)})",
                        "pid": 0,
                        "peak_rss_mb": round(max(p.peak_rss_kb for p in backends) / 1024, 1),
                        "hwm_mb": round(max(p.hwm_kb for p in backends) / 1024, 1),
                        "cpu_seconds": round(sum(p.cpu_ticks for p in backends) / CLOCK_TICKS, 1),
                        "alive_at_end": any(p.alive for p in backends),
                    }
                )
            return report


def wait_until_quiet(watch: ProcessWatch, *, cpu_share: float = 0.1, quiet_for: float = 3.0, limit: float = 120.0):
    """Wait until the nodes together use under ``cpu_share`` of a core for ``quiet_for`` seconds."""
    deadline = time.monotonic() + limit
    quiet_since = None
    last = watch.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        watch.sample()
        now_cpu = watch.cpu_seconds()
        busy = (now_cpu - last) / 0.5 > cpu_share
        last = now_cpu
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_for:
            return True
    return False


# --- profiling -----------------------------------------------------------------------------

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
PROJECT_FOLDERS = ("syncqueue/", "connections/", "trackers/", "exalate_web/")
# Threads that only wait, whatever the process does: left out so that shares are of real work.
# multiprocessing's queue feeder thread is one in every django-q2 process.
HELPER_THREADS = ("Queue._feed (multiprocessing/queues.py",)


@dataclass
class Recording:
    node: str
    role: str
    pid: int
    path: Path
    process: subprocess.Popen


@dataclass
class Profiler:
    """``py-spy record`` (idle time included, so waits show) on the nodes' worker processes."""

    watch: ProcessWatch
    folder: Path
    roles: tuple[str, ...] = ("qcluster worker", "gunicorn worker")
    rate: int = 50
    recordings: list[Recording] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        if PY_SPY is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install -r requirements.txt")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._attach_new()
        # A worker that django-q2 recycles is replaced by a new process: follow it.
        self.thread = threading.Thread(target=self._follow, name="profiler", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        while not self.stopped.wait(1.0):
            self._attach_new()

    def _attach_new(self) -> None:
        recorded = {r.pid for r in self.recordings}
        for node in sorted(set(self.watch.groups.values())):
            for role in self.roles:
                for pid in self.watch.pids(node, role):
                    if pid in recorded:
                        continue
                    path = self.folder / f"{node.lower()}-{role.replace(' ', '-')}-{pid}.txt"
                    command = [PY_SPY, "record", "--pid", str(pid), "--rate", str(self.rate), "--idle"]
                    command += ["--format", "raw", "--output", str(path)]
                    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    self.recordings.append(Recording(node, role, pid, path, process))

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        for recording in self.recordings:
            if recording.process.poll() is None:
                recording.process.send_signal(signal.SIGINT)
        for recording in self.recordings:
            try:
                recording.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recording.process.kill()
                recording.process.wait()

    def summary(self, top: int = 12) -> dict:
        """Per node and role: samples, where the time went by kind, and the top functions."""
        groups: dict[str, dict[str, Counter]] = {}
        for recording in self.recordings:
            if not recording.path.exists():
                continue
            name = f"{recording.node} {recording.role}"
            group = groups.setdefault(
                name, {"kinds": Counter(), "inclusive": Counter(), "innermost": Counter(), "self": Counter()}
            )
            for stack, count in _read_raw(recording.path):
                if any(helper in frame for frame in stack for helper in HELPER_THREADS):
                    continue
                group["kinds"][_kind(stack)] += count
                group["self"][_short(stack[-1])] += count
                project = [_short(f) for f in stack if _is_project(f)]
                if project:
                    # The project function that made the call this sample is in, whatever library runs it.
                    group["innermost"][project[-1]] += count
                for frame in set(project):
                    group["inclusive"][frame] += count
        result = {}
        for name, group in sorted(groups.items()):
            total = sum(group["kinds"].values()) or 1
            result[name] = {
                "samples": total,
                "kinds": {k: round(100 * n / total, 1) for k, n in group["kinds"].most_common()},
                "project_functions_inclusive": {
                    k: round(100 * n / total, 1) for k, n in group["inclusive"].most_common(top)
                },
                "project_functions_innermost": {
                    k: round(100 * n / total, 1) for k, n in group["innermost"].most_common(top)
                },
                "leaf_functions": {k: round(100 * n / total, 1) for k, n in group["self"].most_common(top)},
            }
        return result


def _read_raw(path: Path):
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def _is_project(frame: str) -> bool:
    return any(f"({folder}" in frame or f"/{folder}" in frame for folder in PROJECT_FOLDERS)


def _short(frame: str) -> str:
    """'function (path/file.py:12)' -> 'function (file.py)': samples of one function add up."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = file.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


# The kind of work a sample shows: the first of these that the innermost matching frame names.
KINDS = (
    ("PostgreSQL round trips (psycopg)", ("psycopg",)),
    ("HTTP to the other node (requests)", ("requests/", "urllib3/", "http/client")),
    ("rules sandbox (RestrictedPython)", ("connections/scripting", "RestrictedPython")),
    ("Django ORM, Python side", ("django/db/",)),
    ("JSON", ("json/",)),
)


def _kind(stack: list[str]) -> str:
    if not any(_is_project(frame) for frame in stack):
        # gunicorn or django-q2 waiting for a request or a task, or their own bookkeeping.
        return "idle or server/queue loop (no project code)"
    for frame in reversed(stack):
        for kind, needles in KINDS:
            if any(needle in frame for needle in needles):
                return kind
    return "other Python in the project's code path"
