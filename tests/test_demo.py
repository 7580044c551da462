"""``manage.py demo``: two nodes paired and syncing, resumed with their data after a SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.livenodes import REPO, free_port, wait_for


def start_demo(data_dir: Path, blue_port: int, red_port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["EXALATE_DATA_DIR"] = str(data_dir)
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "demo",
            "--data-dir",
            str(data_dir / "demo"),
            "--blue-port",
            str(blue_port),
            "--red-port",
            str(red_port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def api(node: dict, method: str, path: str, **kwargs):
    response = requests.request(
        method,
        f"{node['url']}/api/v1/{path}",
        headers={"Authorization": f"Token {node['token']}"},
        timeout=10,
        **kwargs,
    )
    response.raise_for_status()
    return response.json()


def summaries(node: dict) -> set[str]:
    return {issue["summary"] for issue in api(node, "GET", "tracker/issues/?page_size=200")["results"]}


def read_summary(path: Path, newer_than: float = 0.0) -> dict | None:
    if path.exists() and path.stat().st_mtime > newer_than:
        return json.loads(path.read_text())
    return None


def stop_everything(data_dir: Path, demo: subprocess.Popen | None) -> None:
    if demo is not None and demo.poll() is None:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
    for pid_file in (data_dir / "demo").glob("*/node.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_it_pairs_two_nodes_and_resumes_them_after_a_sigkill(tmp_path):
    blue_port, red_port = free_port(), free_port()
    summary_path = tmp_path / "demo" / "demo.json"
    demo = start_demo(tmp_path, blue_port, red_port)
    try:
        nodes = wait_for(lambda: read_summary(summary_path), timeout=120, what="demo.json")
        blue, red = nodes["blue"], nodes["red"]
        assert (blue["url"], blue["username"], blue["project"]) == (f"http://127.0.0.1:{blue_port}", "admin", "BLUE")
        assert api(blue, "GET", "connections/")["results"][0]["status"] == "active"
        wait_for(lambda: summaries(blue) == summaries(red) and len(summaries(blue)) == 3, what="the sample issues")

        os.kill(demo.pid, signal.SIGKILL)  # the demo only: its nodes are left running
        demo.wait(timeout=10)
        written = summary_path.stat().st_mtime
        time.sleep(1)
        demo = start_demo(tmp_path, blue_port, red_port)
        resumed = wait_for(lambda: read_summary(summary_path, written), timeout=120, what="the resumed demo")
        assert resumed["blue"]["token"] == blue["token"], "the same node, with the same data"
        assert len(api(blue, "GET", "connections/")["results"]) == 1, "resuming must not pair a second time"
        api(red, "POST", "tracker/issues/", json={"project": "RED", "summary": "After the restart"})
        wait_for(lambda: "After the restart" in summaries(blue), what="a new issue after the restart")
        assert len(summaries(blue)) == 4
    finally:
        stop_everything(tmp_path, demo)
