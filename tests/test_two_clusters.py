"""Beyond one machine: two django-q2 clusters share one PostgreSQL database and one Redis broker.

One web process (gunicorn) and two ``manage.py qcluster`` processes run with the same
settings, as they would on two machines. A fake remote node, Red (this test), delivers
about two thousand signed updates over 120 twins, some late and some twice, while the
clusters work. The incoming rules append each update's number to the description, which
is not idempotent and records order: a message applied twice or out of order shows in the
text. Blue's acknowledgements go to a small HTTP sink that plays Red's receiving side.

A trigger in the test's own database logs every status change of a sync event with its
lease owner, so the test can tell that each event was finished once, and by which
cluster: a lease owner names the worker process, and its parents name the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from connections import signing

pytestmark = pytest.mark.clusters

REPO = Path(__file__).resolve().parent.parent
MESSAGES_PATH = "/api/v1/node/messages/"
TWINS = 120
BATCH = 40
SENDERS = 4
START_TIMEOUT = 60
# Draining takes about two minutes on two busy cores; the margin is for a busier machine.
DRAIN_TIMEOUT = 300
QUEUE_KEYS = "django_q:exalate:*"  # the Q_CLUSTER name in settings

OUTGOING = """\
replica.summary = issue.summary
replica.description = issue.description
"""
INCOMING = """\
if first_sync:
    issue.project = connection.project
    issue.type = "Task"
    issue.summary = replica.summary
# Not idempotent on purpose: applied twice, or out of order, it shows in the description.
issue.description = (issue.description or "") + "[" + str(replica.n) + "]"
"""

SETUP = """\
import json
from connections.models import Connection
from connections.rules import save_rules
from syncqueue import tasks
from trackers.builtin.models import Project

given = json.loads({given!r})
Project.objects.create(key="BLUE", name="Blue project")
connection = Connection.objects.create(
    name="Red", remote_name="Red", status="active", secret=given["secret"],
    remote_url=given["remote_url"], project="BLUE",
)
save_rules(connection, given["outgoing"], given["incoming"], comment="order-revealing rules")
tasks.start()  # as runnode does: the first tick starts now, not at the scheduler's first pass
print(json.dumps({{"uuid": str(connection.uuid)}}))
"""

# Every status change of a sync event, with its lease owner before and after.
EVENT_LOG = """\
CREATE TABLE watch_event_log (
    id bigserial PRIMARY KEY, event_id bigint, direction text, kind text,
    old_status text, new_status text, old_owner text, new_owner text
);
CREATE FUNCTION watch_event() RETURNS trigger AS $$
BEGIN
    INSERT INTO watch_event_log (event_id, direction, kind, old_status, new_status, old_owner, new_owner)
    VALUES (NEW.id, NEW.direction, NEW.kind, OLD.status, NEW.status, OLD.lease_owner, NEW.lease_owner);
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER watch_event AFTER UPDATE ON syncqueue_syncevent FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION watch_event();
"""


def _skip_reason() -> str | None:
    if urlsplit(os.environ.get("DATABASE_URL", "")).scheme not in ("postgres", "postgresql", "pgsql"):
        return "two clusters need a shared PostgreSQL database: set DATABASE_URL=postgres://..."
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        return "two clusters need a shared Redis broker: set REDIS_URL=redis://..."
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_timeout=3).ping()
    except redis.RedisError as e:
        return f"the Redis at REDIS_URL does not answer ({type(e).__name__})"
    return None


def _database_url(base: str, name: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(("postgresql", parts.netloc, "/" + name, parts.query, ""))


def _admin_sql(base: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(_database_url(base, "postgres"), autocommit=True) as db:
        for statement in statements:
            db.execute(statement)


def _forget_queued_tasks(redis_url: str) -> None:
    """Tasks another run left in the broker would run against this test's database."""
    import redis

    broker = redis.Redis.from_url(redis_url)
    keys = list(broker.scan_iter(QUEUE_KEYS))
    if keys:
        broker.delete(*keys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def expected_description(n: int) -> str:
    return "".join(f"[{i}]" for i in range(1, n + 1))


# --- Blue: one web process and two clusters --------------------------------------------------


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; the parent's pid follows it.
    return int(stat.rsplit(")", 1)[1].split()[1])


class ClusterMap:
    """Which cluster each process belongs to, from its parents; refreshed often, as workers get replaced."""

    def __init__(self, clusters: dict[int, str]):
        self.clusters = clusters
        self.cluster_of: dict[int, str] = {}

    def refresh(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in self.cluster_of:
                continue
            pid = ancestor = int(entry.name)
            # qcluster -> sentinel -> worker: a few generations at most.
            for _ in range(5):
                if ancestor in self.clusters:
                    self.cluster_of[pid] = self.clusters[ancestor]
                    break
                ancestor = _parent_of(ancestor)
                if ancestor is None or ancestor <= 1:
                    break

    def of_owner(self, owner: str) -> str:
        # A lease owner is hostname:pid:random (syncqueue.worker.worker_id).
        return self.cluster_of.get(int(owner.split(":")[1]), "unknown")


class Node:
    """Blue's parts as separate processes with one environment, as on separate machines."""

    def __init__(self, root: Path, database_url: str, redis_url: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "EXALATE_DATA_DIR": str(root / "data"),
            "NODE_NAME": "Blue",
            "NODE_URL": self.url,
            "Q_WORKERS": "2",
            "LOG_LEVEL": "WARNING",
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.db = None  # the test's own connection to the node's database

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"manage.py {args[0]} failed:\n{result.stderr[-3000:]}"
        return result.stdout

    def start(self, name: str, *command: str) -> int:
        with (self.root / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, *command],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.processes[name].pid

    def start_web(self) -> None:
        self.start("web", "-m", "gunicorn", "exalate_web.wsgi", "--bind", f"127.0.0.1:{self.port}", "--workers", "2")

        def answers() -> bool:
            self.assert_running()
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        _wait_for(answers, START_TIMEOUT, "the web process to answer")

    def start_all(self) -> ClusterMap:
        """The web process and two clusters; returns which process belongs to which cluster."""
        clusters = ClusterMap({self.start(name, "manage.py", "qcluster"): name for name in ("cluster-a", "cluster-b")})
        self.start_web()
        import redis

        broker = redis.Redis.from_url(self.env["REDIS_URL"])

        def running() -> bool:
            self.assert_running()
            # Each running cluster keeps a status key in the broker.
            return len(list(broker.scan_iter("django_q:exalate:cluster:*"))) >= 2

        _wait_for(running, START_TIMEOUT, "both clusters to start")
        clusters.refresh()
        return clusters

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def assert_running(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} stopped (exit {process.returncode}):\n{self.log(name)}"

    def stop(self) -> None:
        """Each part with its whole process group, children left by a part that died included."""
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # A tick may run for most of a minute; work cut short goes back when its lease ends.
                process.kill()
                process.wait(timeout=10)
            _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


# --- Red: the remote node, sending and receiving ---------------------------------------------


class AckSink:
    """Red's receiving side: checks each batch's signature, keeps the messages, accepts them all."""

    def __init__(self, secret: str):
        self.secret = secret
        self.connection_uuid = ""
        self.messages: list[dict] = []
        self.problems: list[str] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                problem = sink.check(self.path, self.headers, body)
                if problem:
                    with sink.lock:
                        sink.problems.append(problem)
                    self.answer(401, {"error": problem})
                    return
                messages = json.loads(body)["messages"]
                with sink.lock:
                    sink.messages.extend(messages)
                self.answer(200, {"accepted": [m["id"] for m in messages], "rejected": {}})

            def answer(self, status: int, answer: dict) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check(self, path: str, headers, body: bytes) -> str | None:
        if path != MESSAGES_PATH:
            return f"unexpected path {path}"
        try:
            signed = signing.read_headers(headers)
            if signed.connection_uuid != self.connection_uuid:
                return f"unknown connection {signed.connection_uuid}"
            signing.verify(self.secret, signed, "POST", path, body)
        except signing.SignatureError as e:
            return str(e)
        return None

    def received(self) -> list[dict]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def red_updates(rng: random.Random) -> dict[str, list[dict]]:
    """Red's updates per twin, seq 1..k with k from 5 to 30 (the busiest twins go on alone); update n carries n."""
    updates = {}
    for t in range(1, TWINS + 1):
        key = f"RED-{t}"
        updates[key] = [
            {
                "id": str(uuid.uuid4()),
                "kind": "update",
                "seq": n,
                "key": key,
                "remote_key": None,
                "replica": {"key": key, "summary": f"Red issue {t}", "n": n},
            }
            for n in range(1, 5 + rng.randrange(26) + 1)
        ]
    return updates


def deliveries(updates: dict[str, list[dict]], rng: random.Random) -> list[list[dict]]:
    """Batches in send order. Round n carries every twin's update n, but about one message in ten
    comes two rounds late (the ones after it arrive first), and one in ten comes again three rounds later."""
    rounds: list[list[dict]] = [[] for _ in range(max(map(len, updates.values())) + 4)]
    for messages in updates.values():
        for n, message in enumerate(messages):
            rounds[n + (2 if rng.random() < 0.1 else 0)].append(message)
            if rng.random() < 0.1:
                rounds[n + 3].append(message)
    batches = []
    for messages in rounds:
        rng.shuffle(messages)
        batches += [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
    return batches


class Red:
    """Delivers batches to Blue as a remote node would: signed, several requests at a time."""

    def __init__(self, url: str, connection_uuid: str, secret: str):
        self.url, self.connection_uuid, self.secret = url, connection_uuid, secret
        self.local = threading.local()
        self.answers: list[tuple[list[dict], int, dict]] = []

    def post(self, batch: list[dict]) -> None:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        body = json.dumps({"messages": batch}).encode()
        headers = signing.sign(self.secret, self.connection_uuid, "POST", MESSAGES_PATH, body)
        response = session.post(
            self.url + MESSAGES_PATH, data=body, headers={**headers, "Content-Type": "application/json"}, timeout=60
        )
        self.answers.append((batch, response.status_code, response.json()))

    def deliver(self, batches: list[list[dict]]) -> None:
        """Several batches at a time, in order. A message sent again goes only once its first delivery
        was answered, as after a lost answer (test_it_accepts_a_message_delivered_twice_at_once races them)."""
        answered: dict[str, threading.Event] = {}
        waits = []
        for batch in batches:
            waits.append([answered[m["id"]] for m in batch if m["id"] in answered])
            for message in batch:
                answered.setdefault(message["id"], threading.Event())

        def send(batch: list[dict], first_deliveries: list[threading.Event]) -> None:
            for event in first_deliveries:
                event.wait()  # its batch started earlier: the pool starts batches in order
            try:
                self.post(batch)
            finally:
                for message in batch:
                    answered[message["id"]].set()

        with ThreadPoolExecutor(SENDERS) as pool:
            list(pool.map(send, batches, waits))

    def deliver_twice_at_once(self, batch: list[dict]) -> None:
        start = threading.Barrier(2)

        def send() -> None:
            start.wait()
            self.post(batch)

        senders = [threading.Thread(target=send) for _ in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()


# --- the test --------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base, redis_url = os.environ["DATABASE_URL"], os.environ["REDIS_URL"]
    name = f"exalate_clusters_{os.getpid()}"
    _admin_sql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    _forget_queued_tasks(redis_url)
    node = Node(tmp_path, _database_url(base, name), redis_url)
    try:
        yield node
    finally:
        node.stop()
        if node.db is not None:
            node.db.close()
        _admin_sql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _forget_queued_tasks(redis_url)


@pytest.fixture
def sink():
    sink = AckSink(random.Random(7).randbytes(32).hex())
    yield sink
    sink.close()


def prepare(node: Node, sink: AckSink):
    """Blue's database with the connection to Red and its rules; returns a connection to it, event log on."""
    import psycopg

    node.manage("migrate", "--noinput", "-v0")
    given = json.dumps({"secret": sink.secret, "remote_url": sink.url, "outgoing": OUTGOING, "incoming": INCOMING})
    sink.connection_uuid = json.loads(node.manage("shell", "-c", SETUP.format(given=given)).splitlines()[-1])["uuid"]
    node.db = psycopg.connect(node.env["DATABASE_URL"], autocommit=True)
    node.db.execute(EVENT_LOG)
    return node.db


def _queue_state(db) -> dict:
    """How the queue stands, for a failure message."""
    events = db.execute("SELECT direction, kind, status, count(*) FROM syncqueue_syncevent GROUP BY 1, 2, 3")
    twins = db.execute("SELECT state, count(*) FROM syncqueue_twin GROUP BY 1")
    return {"events": {f"{d} {k} {s}": n for d, k, s, n in events}, "twins": dict(twins.fetchall())}


def test_it_applies_every_message_once_and_in_order_with_two_clusters(node, sink):
    db = prepare(node, sink)
    clusters = node.start_all()
    rng = random.Random(7)

    updates = red_updates(rng)
    batches = deliveries(updates, rng)
    total = sum(map(len, updates.values()))
    red = Red(node.url, sink.connection_uuid, sink.secret)
    started = time.monotonic()
    red.deliver(batches)
    delivered = time.monotonic() - started

    def drained() -> bool:
        node.assert_running()
        clusters.refresh()
        incoming, acks, unsent, failed = db.execute(
            "SELECT count(*) FILTER (WHERE direction = 'incoming' AND status = 'done'),"
            " count(*) FILTER (WHERE kind = 'ack' AND status = 'done'),"
            " count(*) FILTER (WHERE direction = 'outgoing' AND status IN ('pending', 'sending')),"
            " count(*) FILTER (WHERE status = 'failed') FROM syncqueue_syncevent"
        ).fetchone()
        assert not failed, db.execute(
            "SELECT kind, seq, error FROM syncqueue_syncevent WHERE status = 'failed'"
        ).fetchall()
        return incoming == total and acks == total and not unsent

    try:
        _wait_for(drained, DRAIN_TIMEOUT, f"both clusters to apply and acknowledge {total} messages")
    except AssertionError as e:
        raise AssertionError(f"{e}; queue: {_queue_state(db)}, messages at the sink: {len(sink.received())}") from None
    drained_in = time.monotonic() - started
    time.sleep(1)  # a message sent twice would arrive now
    clusters.refresh()

    # Red: every batch was taken whole, early arrivals and second deliveries included.
    assert {status for _, status, _ in red.answers} == {200}
    assert all(answer == {"accepted": [m["id"] for m in batch], "rejected": {}} for batch, _, answer in red.answers)

    # Blue: each twin's description is [1][2]...[k], so every message was applied once, in order.
    twins = {
        remote_key: (state, in_seq, description)
        for remote_key, state, in_seq, description in db.execute(
            "SELECT t.remote_key, t.state, t.in_seq, i.description FROM syncqueue_twin t"
            " LEFT JOIN builtin_issue i ON i.key = t.local_key"
        )
    }
    assert set(twins) == set(updates)
    wrong = {
        key: twins[key]
        for key, messages in updates.items()
        if twins[key] != ("ok", len(messages), expected_description(len(messages)))
    }
    assert not wrong, f"{len(wrong)} twins applied a message twice or out of order, e.g. {list(wrong.items())[:3]}"

    # The queue: every incoming event and every acknowledgement was finished exactly once.
    finished = Counter(
        db.execute(
            "SELECT event_id FROM watch_event_log"
            " WHERE new_status = 'done' AND (direction = 'incoming' OR kind = 'ack')"
        ).fetchall()
    )
    assert len(finished) == 2 * total
    assert set(finished.values()) == {1}

    # The sink: each message once, signed; each twin's acknowledgements answer Red's updates in order.
    received = sink.received()
    assert not sink.problems
    assert len({m["id"] for m in received}) == len(received)
    by_twin = defaultdict(list)
    for message in received:
        by_twin[message["remote_key"]].append(message)
    for key, messages in updates.items():
        sent = sorted(by_twin[key], key=lambda m: m["seq"])
        assert [m["seq"] for m in sent] == list(range(1, len(sent) + 1)), key
        acks = [m for m in sent if m["kind"] == "ack"]
        assert [a["acks"] for a in acks] == [m["id"] for m in messages], key
        assert [a["replica"]["description"] for a in acks] == [
            expected_description(n) for n in range(1, len(messages) + 1)
        ], key

    # Both clusters did the work: who held each event's lease when it was finished.
    applied, sent_by = Counter(), Counter()
    for direction, owner in db.execute("SELECT direction, old_owner FROM watch_event_log WHERE new_status = 'done'"):
        (applied if direction == "incoming" else sent_by)[clusters.of_owner(owner)] += 1
    print(
        f"\n{total} messages over {TWINS} twins, {sum(map(len, batches))} delivered in {len(batches)} batches "
        f"in {delivered:.1f} s; all applied and acknowledged after {drained_in:.1f} s; "
        f"applied per cluster {dict(applied)}, acknowledgements sent per cluster {dict(sent_by)}"
    )
    assert "unknown" not in applied, applied
    assert min(applied["cluster-a"], applied["cluster-b"]) >= total // 10, applied

    # No echo: Blue sent nothing but acknowledgements, as nothing changed on Blue but the sync's own writes.
    # (An entity read before its twin's lock, while another worker applied the next message, once sent
    # the older state back as an update.)
    echoes = []
    for message in received:
        if message["kind"] != "ack":
            earlier = [a for a in by_twin[message["remote_key"]] if a["kind"] == "ack" and a["seq"] < message["seq"]]
            newest = max(earlier, key=lambda a: a["seq"])["replica"]["description"] if earlier else None
            echoes.append(
                f"{message['remote_key']}: update {message['seq']} carries {message['replica']['description']!r}"
                f" after the ack of {newest!r}"
            )
    assert not echoes, f"Blue sent {len(echoes)} updates of its own, e.g. {echoes[:3]}"


def test_it_accepts_a_message_delivered_twice_at_once(node, sink):
    """A sender that tries again while its first request is still being stored delivers a message twice
    at once. Both requests must accept it: a refusal makes the sender fail the event and block its twin."""
    db = prepare(node, sink)
    node.start_web()
    red = Red(node.url, sink.connection_uuid, sink.secret)
    updates = red_updates(random.Random(8))
    for key in list(updates)[:30]:
        red.deliver_twice_at_once(updates[key][:3])
    assert len(red.answers) == 60
    refused = [answer["rejected"] for _, _, answer in red.answers if answer["rejected"]]
    assert not refused, f"{len(refused)} of {len(red.answers)} deliveries refused, e.g. {refused[0]}"
    assert all(answer["accepted"] == [m["id"] for m in batch] for batch, _, answer in red.answers)
    assert db.execute("SELECT count(*) FROM syncqueue_syncevent").fetchone()[0] == 90
