"""A live Redmine next to live nodes, for end-to-end tests and the benchmark.

``RedminePair`` runs the three processes of a Redmine sync: the Redmine that
``scripts/redmine`` serves, a node serving a fresh project of it, and a built-in node,
paired through the invitation flow, with rules that map the two trackers' statuses and
priorities and put the built-in key into Redmine's "External ID" custom field.
``RedmineAdmin`` reads and writes that Redmine directly, as a Redmine user would.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.livenodes import REPO, LiveNode, pair, wait_for
from trackers.redmine.client import RedmineClient

SETTINGS = ("REDMINE_URL", "REDMINE_API_KEY", "REDMINE_PROJECT")
MISSING = "REDMINE_URL, REDMINE_API_KEY and REDMINE_PROJECT are not set; scripts/redmine up starts a local Redmine"
SCRIPT = REPO / "scripts" / "redmine"
EXTERNAL_ID = "External ID"
FIRST_POLL_TIMEOUT = 90

# Rules of the Redmine node. merge_fields applies only what the other side changed since
# the last sync, so an acknowledgement cannot undo a change made in Redmine meanwhile.
REDMINE_INCOMING = """\
STATUSES = {"Open": "New", "In Progress": "In Progress", "Resolved": "Resolved", "Closed": "Closed"}
PRIORITIES = {"Lowest": "Low", "Low": "Low", "Medium": "Normal", "High": "High", "Highest": "Urgent"}
if first_sync:
    issue.project = connection.project
    issue.type = "Bug"
helpers.merge_fields(
    summary=replica.summary,
    description=replica.description,
    status=helpers.map_value(replica.status, STATUSES, default="New"),
    priority=helpers.map_value(replica.priority, PRIORITIES, default="Normal"),
)
issue.custom_fields["External ID"] = replica.key
helpers.merge_comments()
helpers.merge_attachments()
"""

OUTGOING = """\
replica.summary = issue.summary
replica.description = issue.description
replica.status = issue.status
replica.priority = issue.priority
replica.comments = helpers.comments_to_send()
replica.attachments = helpers.attachments_to_send()
"""

BUILTIN_INCOMING = """\
STATUSES = {"New": "Open", "In Progress": "In Progress", "Resolved": "Resolved", "Feedback": "In Progress",
            "Closed": "Closed", "Rejected": "Closed"}
PRIORITIES = {"Low": "Low", "Normal": "Medium", "High": "High", "Urgent": "Highest", "Immediate": "Highest"}
if first_sync:
    issue.project = connection.project
    issue.type = "Task"
helpers.merge_fields(
    summary=replica.summary,
    description=replica.description,
    status=helpers.map_value(replica.status, STATUSES, default="Open"),
    priority=helpers.map_value(replica.priority, PRIORITIES, default="Medium"),
)
helpers.merge_comments()
helpers.merge_attachments()
"""


# For diagnoses: a node's latest twins, each event with the replica's summary and status.
TWIN_EVENTS = """
from syncqueue.models import Twin
for twin in Twin.objects.order_by("-id")[:12]:
    print(f"twin {twin.local_key}<->{twin.remote_key} {twin.state} in/out {twin.in_seq}/{twin.out_seq}",
          twin.blocked_reason)
    for e in twin.events.order_by("id"):
        replica = (e.payload or {}).get("replica") or {}
        acks = ((e.payload or {}).get("acks") or "")[:8]
        print(f"  {e.created:%H:%M:%S.%f} {e.direction} {e.kind} #{e.seq} {e.status} {str(e.message_id)[:8]}",
              f"acks={acks}" if acks else "", repr(replica.get("summary")), replica.get("status"), e.error[:120])
"""


def settings() -> tuple[str, str, str] | None:
    """(url, api key, project) of the Redmine named by the environment, or None."""
    values = tuple(os.environ.get(name, "") for name in SETTINGS)
    return values if all(values) else None  # type: ignore[return-value]


def control_problem() -> str | None:
    """Why ``scripts/redmine`` cannot stop and start the Redmine under test, or None when it can."""
    if os.geteuid() != 0:
        return "scripts/redmine stop/up must run as root"
    result = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, timeout=60)  # reads state only
    if result.returncode != 0:
        return f"scripts/redmine does not control a running Redmine here: {result.stderr.strip()[-300:]}"
    served = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if served.get("REDMINE_URL", "").rstrip("/") != os.environ.get("REDMINE_URL", "").rstrip("/"):
        return f"scripts/redmine serves {served.get('REDMINE_URL')}, not the REDMINE_URL under test"
    return None


def run_script(action: str) -> None:
    """``scripts/redmine stop`` or ``up``; raises with its output when it fails."""
    # Rails reads DATABASE_URL too: the nodes' PostgreSQL URL would replace Redmine's own database.
    env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
    result = subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=300, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/redmine {action} failed:\n{result.stderr[-3000:]}")


class RedmineAdmin:
    """Direct access to the Redmine under test, with the admin key (as ``login`` when given)."""

    def __init__(self, url: str, api_key: str, *, login: str = ""):
        self.url, self.api_key = url, api_key
        self.client = RedmineClient(url, api_key)
        if login:
            # An admin key may act as any member of the project.
            self.client.session.headers["X-Redmine-Switch-User"] = login

    def person(self, project: str, login: str = "e2e-person") -> RedmineAdmin:
        """The same Redmine as a person other than the sync's account, a manager of ``project``."""
        users = self.client.get("/users.json", {"name": login})["users"]
        if users:
            user_id = users[0]["id"]
        else:
            user = {"login": login, "firstname": "Pat", "lastname": "Person", "mail": f"{login}@example.org"}
            user_id = self.client.post("/users.json", {"user": user})["user"]["id"]
        manager = self._id_named("/roles.json", "roles", "Manager")
        membership = {"user_id": user_id, "role_ids": [manager]}
        self.client.post(f"/projects/{project}/memberships.json", {"membership": membership})
        return RedmineAdmin(self.url, self.api_key, login=login)

    def create_project(self, prefix: str) -> str:
        """A fresh project (issue tracking, every tracker, "External ID" enabled); returns its identifier."""
        identifier = f"{prefix}-{uuid.uuid4().hex[:10]}"
        trackers = [t["id"] for t in self.client.get("/trackers.json")["trackers"]]
        fields = [f["id"] for f in self.client.get("/custom_fields.json")["custom_fields"] if f["name"] == EXTERNAL_ID]
        if not fields:
            raise RuntimeError(f'Redmine has no "{EXTERNAL_ID}" custom field: run scripts/redmine up')
        self.client.post(
            "/projects.json",
            {
                "project": {
                    "name": identifier,
                    "identifier": identifier,
                    "is_public": False,
                    "enabled_module_names": ["issue_tracking"],
                    "tracker_ids": trackers,
                    "issue_custom_field_ids": fields,
                }
            },
        )
        project = self.client.get(
            f"/projects/{identifier}.json", {"include": "trackers,enabled_modules,issue_custom_fields"}
        )["project"]
        enabled = {m["name"] for m in project["enabled_modules"]}
        if "issue_tracking" not in enabled or sorted(t["id"] for t in project["trackers"]) != sorted(trackers):
            raise RuntimeError(f"project {identifier} lacks issue tracking or a tracker: {project}")
        if EXTERNAL_ID not in {f["name"] for f in project["issue_custom_fields"]}:
            raise RuntimeError(f'"{EXTERNAL_ID}" is not enabled for project {identifier}')
        return identifier

    def delete_project(self, identifier: str) -> None:
        self.client.delete(f"/projects/{identifier}.json")

    def issues(self, project: str, **filters: Any) -> list[dict]:
        """Every issue of ``project`` (open or closed) matching ``filters``, oldest first."""
        found: list[dict] = []
        while True:
            page = self.client.get(
                "/issues.json",
                {"project_id": project, "status_id": "*", "sort": "id", "offset": len(found), "limit": 100, **filters},
            )
            found.extend(page["issues"])
            if not page["issues"] or len(found) >= page["total_count"]:
                return found

    def issue(self, issue_id: str | int) -> dict:
        return self.client.get(f"/issues/{issue_id}.json", {"include": "journals,attachments"})["issue"]

    def create_issue(self, project: str, subject: str, **fields: Any) -> dict:
        return self.client.post("/issues.json", {"issue": {"project_id": project, "subject": subject, **fields}})[
            "issue"
        ]

    def update_issue(self, issue_id: str | int, **fields: Any) -> None:
        self.client.put(f"/issues/{issue_id}.json", {"issue": fields})

    def status_id(self, name: str) -> int:
        return self._id_named("/issue_statuses.json", "issue_statuses", name)

    def priority_id(self, name: str) -> int:
        return self._id_named("/enumerations/issue_priorities.json", "issue_priorities", name)

    def external_id_filter(self) -> str:
        """The name of the list filter on "External ID" (``cf_<id>``)."""
        return f"cf_{self._id_named('/custom_fields.json', 'custom_fields', EXTERNAL_ID)}"

    def _id_named(self, path: str, root: str, name: str) -> int:
        return next(item["id"] for item in self.client.get(path)[root] if item["name"] == name)

    def attach(self, issue_id: str | int, filename: str, content: bytes) -> None:
        token = self.client.upload(content, filename)["token"]
        self.update_issue(
            issue_id, uploads=[{"token": token, "filename": filename, "content_type": "application/octet-stream"}]
        )

    def download(self, attachment: dict) -> bytes:
        return self.client.download(attachment["content_url"])


def comments_of(issue: dict) -> list[str]:
    """The notes of a Redmine issue read with include=journals, oldest first."""
    return [j["notes"] for j in issue.get("journals", []) if j.get("notes")]


def custom_field(issue: dict, name: str) -> Any:
    return next((f.get("value") for f in issue.get("custom_fields", []) if f["name"] == name), None)


def last_poll(node: LiveNode) -> datetime | None:
    """When ``node`` last began a polling pass (read from its database: no API shows it)."""
    url = node.env["DATABASE_URL"]
    query = "SELECT max(polled_at) FROM connections_connection"
    if url.startswith("sqlite:///"):
        with closing(sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)) as db:
            found = db.execute(query).fetchone()[0]
        return datetime.fromisoformat(found).replace(tzinfo=UTC) if found else None
    import psycopg

    with psycopg.connect(url) as db:
        return db.execute(query).fetchone()[0]


class PollWatch:
    """Watches a node's polling from a thread: the longest time it went without starting a pass."""

    def __init__(self, node: LiveNode, every: float = 0.5):
        self.node = node
        self.every = every
        self.first: datetime | None = None
        self.longest = timedelta(0)
        self.longest_seen: datetime | None = None
        self._last: datetime | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poll watch {node.name}", daemon=True)

    def start(self) -> PollWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            polled = self._read()
            if polled is None:
                continue
            now = datetime.now(UTC)
            gap = max(now - polled, polled - self._last if self._last else timedelta(0))
            if gap > self.longest:
                self.longest, self.longest_seen = gap, now
            self._last, self.first = polled, self.first or polled

    def _read(self) -> datetime | None:
        try:
            return last_poll(self.node)
        except Exception:  # the node's database may be gone while the node is torn down
            return None

    def watched(self) -> timedelta:
        return datetime.now(UTC) - self.first if self.first else timedelta(0)


def redmine_node(name: str, root: Path, url: str, api_key: str, project: str) -> LiveNode:
    """A node (not started yet) that serves ``project`` of the Redmine at ``url``."""
    node = LiveNode(name, root)
    node.prepare()
    node.manage("node_tracker", "redmine", "--url", url, "--api-key", api_key, "--project", project)
    node.project = project
    return node


class RedminePair:
    """A built-in node and a Redmine node over a fresh Redmine project, paired, with triggers and rules.

    ``builtin.connection`` and ``redmine.connection`` are the connection ids on each node;
    ``admin`` reads and writes Redmine as the sync's account does, ``person`` as somebody else.
    With ``wait_for_polling`` it returns once the Redmine node polls. Call ``close()`` to
    stop both nodes and delete the project.
    """

    def __init__(self, root: Path, *, prefix: str = "e2e", wait_for_polling: bool = True):
        found = settings()
        if found is None:
            raise RuntimeError(MISSING)
        url, api_key, _ = found
        self.admin = RedmineAdmin(url, api_key)
        self.project = self.admin.create_project(prefix)
        # Changes made "in Redmine" are a person's, so that the sync tells them from its own.
        self.person = self.admin.person(self.project)
        self.builtin: LiveNode | None = None
        self.redmine: LiveNode | None = None
        try:
            self.builtin = LiveNode("Blue", root)
            self.redmine = redmine_node("Rm", root, url, api_key, self.project)
            self.builtin.start()
            self.redmine.start()
            builtin_side, redmine_side = pair(self.builtin, self.redmine, triggers=False)
            self.builtin.connection, self.redmine.connection = builtin_side["id"], redmine_side["id"]
            self.set_rules(self.builtin, OUTGOING, BUILTIN_INCOMING)
            self.set_rules(self.redmine, OUTGOING, REDMINE_INCOMING)
            self.add_trigger(self.builtin, f"project:{self.builtin.project}")
            self.add_trigger(self.redmine, "status_id=*")
            if wait_for_polling:
                # So that a measurement starts with the node polling, not with its start-up.
                wait_for(lambda: last_poll(self.redmine), timeout=FIRST_POLL_TIMEOUT, what="the first poll")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def set_rules(node: LiveNode, outgoing: str, incoming: str) -> None:
        node.api(
            "POST",
            f"connections/{node.connection}/rules/",
            json={"outgoing": outgoing, "incoming": incoming, "comment": "Redmine end-to-end rules"},
        )

    @staticmethod
    def add_trigger(node: LiveNode, query: str) -> None:
        node.api("POST", f"connections/{node.connection}/triggers/", json={"query": query})

    def nodes(self) -> Iterator[LiveNode]:
        yield from (node for node in (self.builtin, self.redmine) if node is not None)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
        """``wait_for`` that, when it fails, tells what each node's twins and queue hold."""
        try:
            return wait_for(condition, timeout=timeout, what=what)
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {e}\n{self.diagnosis()}") from e

    def diagnosis(self) -> str:
        """Each node's queue, and its latest twins with their events (summary and status of each replica)."""
        lines = []
        for node in self.nodes():
            try:
                lines.append(f"--- {node.name} queue: {node.api('GET', 'queue/stats/')['connections']}")
                lines.append(node.manage("shell", "-c", TWIN_EVENTS).strip())
            except Exception as e:  # a diagnosis must never hide the failure it explains
                lines.append(f"--- {node.name}: cannot read its state: {e}")
            lines.append(f"--- {node.name} log:\n{node.log()[-1500:]}")
        return "\n".join(lines)

    def close(self) -> None:
        for node in self.nodes():
            node.destroy()
        try:
            self.admin.delete_project(self.project)
        except Exception as e:  # Redmine may be down after a failed outage test; the project then stays
            print(f"could not delete Redmine project {self.project}: {e}")
