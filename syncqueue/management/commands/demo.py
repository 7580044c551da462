"""``manage.py demo``: two live nodes, Blue and Red, paired and syncing, on the embedded default.

Each node has its own data folder and SQLite database under ``--data-dir``. The first run
prepares both, pairs them through the real invitation flow, adds a trigger per side
(every issue of the node's project comes under sync) and creates a few issues. Later
runs resume the same nodes with their data and queues, also after a SIGKILL. Once both
answer and the connection is active, ``DIR/demo.json`` holds each node's URL, admin
login, REST API token and project.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

START_TIMEOUT = 90
STOP_GRACE = 15
SAMPLE_ISSUES = {
    "Blue": [
        ("Login page shows a blank screen on Safari", "Reproduced on Safari 18; console shows a CSP error."),
        ("Export to CSV drops the last row", ""),
    ],
    "Red": [("Nightly backup job takes three hours", "It used to take twenty minutes.")],
}


@dataclass
class DemoNode:
    name: str
    port: int
    data_dir: Path
    process: subprocess.Popen | None = None
    password: str = ""
    token: str = ""
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def project(self) -> str:
        return self.name.upper()

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "node.pid"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ENCRYPTION_KEY")
        }
        env.update(
            DATABASE_URL=f"sqlite:///{self.data_dir / 'db.sqlite3'}",
            EXALATE_DATA_DIR=str(self.data_dir),
            NODE_NAME=self.name,
            NODE_URL=self.url,
        )
        return env

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, str(settings.BASE_DIR / "manage.py"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise CommandError(f"{self.name}: manage.py {args[0]} failed:\n{result.stderr.strip()[-2000:]}")
        return result.stdout

    def api(self, method: str, path: str, **kwargs):
        response = self.session.request(method, f"{self.url}/api/v1/{path}", timeout=30, **kwargs)
        if response.status_code >= 400:
            raise CommandError(f"{self.name}: {method} {path} answered {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None


class Command(BaseCommand):
    help = "Start two paired nodes, Blue and Red, each with its own built-in tracker; Ctrl-C stops both."

    def add_arguments(self, parser):
        parser.add_argument("--data-dir", default=None, help="Folder for both nodes' data (default: DATA_DIR/demo).")
        parser.add_argument("--blue-port", type=int, default=8000)
        parser.add_argument("--red-port", type=int, default=8001)

    def handle(self, *args, data_dir, blue_port, red_port, **options):
        root = Path(data_dir or settings.DATA_DIR / "demo").expanduser().resolve()
        if blue_port == red_port or not all(0 < p < 65536 for p in (blue_port, red_port)):
            raise CommandError("--blue-port and --red-port must be two different ports between 1 and 65535")
        nodes = [DemoNode("Blue", blue_port, root / "blue"), DemoNode("Red", red_port, root / "red")]
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            for node in nodes:
                self.prepare(node)
            for node in nodes:
                self.start(node)
            for node in nodes:
                self.wait_until_up(node)
            self.pair(*nodes)
            self.write_summary(root, nodes)
            while not stopping:
                for node in nodes:
                    if node.process.poll() is not None:
                        raise CommandError(f"{node.name} stopped unexpectedly; see its log above")
                time.sleep(0.3)
        finally:
            self.stop(nodes)

    # --- steps -----------------------------------------------------------------------------

    def prepare(self, node: DemoNode) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        self.stop_leftover(node)
        node.manage("migrate", "--noinput", "-v0")
        node.manage("collectstatic", "--noinput", "-v0")
        login = node.manage("demo_setup")
        # demo_setup knows the password (kept, or from ADMIN_PASSWORD), or that it was changed since.
        found = re.search(r"^Login: admin / (\S+)$", login, re.MULTILINE)
        node.password = found[1] if found else "(changed after setup; see manage.py demo_setup --reset-password)"
        node.token = node.manage("drf_create_token", "admin").split()[2]
        node.session.headers["Authorization"] = f"Token {node.token}"

    def stop_leftover(self, node: DemoNode) -> None:
        """A previous demo killed with SIGKILL may have left this node running: end it first."""
        try:
            pid = int(node.pid_file.read_text())
            # The pid may have been reused since: only a runnode of this data folder is ours to end.
            if f"EXALATE_DATA_DIR={node.data_dir}".encode() not in Path(f"/proc/{pid}/environ").read_bytes():
                return
            os.killpg(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        # Cutting work short is safe: expired leases put it back in the queue.
        os.killpg(pid, signal.SIGKILL)

    def start(self, node: DemoNode) -> None:
        node.process = subprocess.Popen(
            [sys.executable, str(settings.BASE_DIR / "manage.py"), "runnode", "--port", str(node.port)],
            env=node.env(),
            start_new_session=True,
        )
        node.pid_file.write_text(str(node.process.pid))

    def wait_until_up(self, node: DemoNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise CommandError(f"{node.name} stopped while starting (is port {node.port} free?)")
            try:
                if requests.get(node.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise CommandError(f"{node.name} did not answer on {node.url} within {START_TIMEOUT} s")

    def pair(self, blue: DemoNode, red: DemoNode) -> None:
        if blue.api("GET", "connections/")["results"]:
            return  # paired on an earlier run: resume
        invitation = blue.api("POST", "connections/invitations/", json={"name": "Red", "project": blue.project})
        red_side = red.api("POST", "connections/accept/", json={"code": invitation["code"], "project": red.project})
        blue_id = invitation["connection"]["id"]
        blue.api("POST", f"connections/{blue_id}/triggers/", json={"query": f"project:{blue.project}"})
        red.api("POST", f"connections/{red_side['id']}/triggers/", json={"query": f"project:{red.project}"})
        for node in (blue, red):
            for summary, description in SAMPLE_ISSUES[node.name]:
                node.api(
                    "POST",
                    "tracker/issues/",
                    json={"project": node.project, "summary": summary, "description": description},
                )

    def write_summary(self, root: Path, nodes: list[DemoNode]) -> None:
        summary = {
            node.name.lower(): {
                "url": node.url,
                "token": node.token,
                "username": "admin",
                "password": node.password,
                "project": node.project,
            }
            for node in nodes
        }
        path = root / "demo.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(summary, f, indent=2)
        self.stdout.write("")
        for node in nodes:
            self.stdout.write(f"{node.name}: {node.url}/  login admin / {node.password}  (project {node.project})")
        self.stdout.write(f"Both nodes are paired and syncing. Details: {path}. Ctrl-C stops both.")

    def stop(self, nodes: list[DemoNode]) -> None:
        running = [n for n in nodes if n.process is not None and n.process.poll() is None]
        for node in running:
            os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for node in running:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait()
        for node in nodes:
            node.pid_file.unlink(missing_ok=True)
