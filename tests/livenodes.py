"""Live nodes for end-to-end tests: real processes (gunicorn + django-q2) on loopback.

Each node gets its own data folder and database: an SQLite file by default, or its own
PostgreSQL database when the tests run with a postgres DATABASE_URL. Nodes are driven
only through their HTTP APIs, as a user or another node would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "live-node-password-1"
START_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_url(base: str, database: str) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, ""))


def _recreate_postgres(base: str, database: str) -> None:
    import psycopg

    with psycopg.connect(_postgres_url(base, "postgres"), autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        db.execute(f'CREATE DATABASE "{database}"')


def _drop_postgres(base: str, database: str) -> None:
    import psycopg

    with psycopg.connect(_postgres_url(base, "postgres"), autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


class LiveNode:
    def __init__(self, name: str, root: Path, *, extra_env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / name.lower()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "node.log"
        self.project = name.upper()
        base = os.environ.get("DATABASE_URL", "")
        self.pg_database = None
        if base.startswith(("postgres://", "postgresql://")):
            self.pg_database = f"exalate_live_{name.lower()}_{os.getpid()}"
            _recreate_postgres(base, self.pg_database)
            database_url = _postgres_url(base, self.pg_database)
        else:
            database_url = f"sqlite:///{self.data_dir / 'db.sqlite3'}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "EXALATE_DATA_DIR": str(self.data_dir),
            "NODE_NAME": name,
            "NODE_URL": self.url,
            "ADMIN_PASSWORD": PASSWORD,
            "SYNC_POLL_SECONDS": "2",
            "Q_WORKERS": "3",
            "LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        self.env.pop("REDIS_URL", None)
        self.process: subprocess.Popen | None = None
        self.session = requests.Session()
        # gunicorn closes a keep-alive connection idle for 2 s; a request sent on it just then
        # is reset. Idempotent requests (urllib3's default list, not POST) are tried again.
        retry = Retry(total=2, connect=2, read=2, status=0, backoff_factor=0.1)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.token = ""

    # --- lifecycle -------------------------------------------------------------------------

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def prepare(self) -> None:
        self.manage("migrate", "--noinput", "-v0")
        self.manage("demo_setup", "--quiet")
        self.token = self.manage("drf_create_token", "admin").split()[2]
        self.session.headers["Authorization"] = f"Token {self.token}"

    def start(self) -> LiveNode:
        if not self.token:
            self.prepare()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runnode", "--port", str(self.port), "--web-workers", "2"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} stopped while starting:\n{self.log()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT} s:\n{self.log()}")

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def destroy(self) -> None:
        self.stop(kill=True)
        if self.pg_database:
            _drop_postgres(os.environ["DATABASE_URL"], self.pg_database)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    # --- HTTP ------------------------------------------------------------------------------

    def api(self, method: str, path: str, expect: int | tuple[int, ...] = (200, 201, 202, 204), **kwargs) -> Any:
        response = self.session.request(method, self.url + "/api/v1/" + path.lstrip("/"), timeout=30, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        assert response.status_code in expected, f"{self.name} {method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content and "json" in response.headers.get("Content-Type", "") else None

    def issue(self, key: str) -> dict:
        return self.api("GET", f"tracker/issues/{key}/")

    def create_issue(self, **fields) -> dict:
        fields.setdefault("project", self.project)
        return self.api("POST", "tracker/issues/", json=fields)

    def twins(self, **params) -> list[dict]:
        return self.api("GET", "twins/", params=params)["results"]


def pair(blue: LiveNode, red: LiveNode, *, triggers: bool = True) -> tuple[dict, dict]:
    """Connect the two nodes through the real invitation flow; returns both connections."""
    invitation = blue.api("POST", "connections/invitations/", json={"name": "Red", "project": blue.project})
    red_side = red.api("POST", "connections/accept/", json={"code": invitation["code"], "project": red.project})
    blue_side = blue.api("GET", f"connections/{invitation['connection']['id']}/")
    if triggers:
        blue.api("POST", f"connections/{blue_side['id']}/triggers/", json={"query": f"project:{blue.project}"})
        red.api("POST", f"connections/{red_side['id']}/triggers/", json={"query": f"project:{red.project}"})
    return blue_side, red_side


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "the condition") -> Any:
    """Poll ``condition`` until it returns something truthy; its last error is in the failure."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (AssertionError, requests.RequestException, KeyError, IndexError) as e:
            last_error = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last error: {last_error}")
