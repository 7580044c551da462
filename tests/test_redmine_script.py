"""scripts/redmine, which serves the real Redmine the Redmine tests talk to.

Starting one takes a minute and root, so CI does that (.ci/run); here are the cheap
checks, plus a look at the running one when REDMINE_URL names it.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "redmine"


def test_it_has_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)  # noqa: S607
    assert result.returncode == 0, result.stderr


def test_it_can_be_run_directly():
    assert os.access(SCRIPT, os.X_OK)


def test_status_is_1_when_nothing_was_started(tmp_path):
    # An empty state folder: no pid file, no key; nothing may be created or started.
    state = tmp_path / "state"
    env = {**os.environ, "REDMINE_STATE": str(state), "REDMINE_PORT": "1"}
    result = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "not running" in result.stderr
    assert not state.exists()


def test_unknown_command_fails(tmp_path):
    env = {**os.environ, "REDMINE_STATE": str(tmp_path)}
    result = subprocess.run([str(SCRIPT), "frobnicate"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "unknown command" in result.stderr


def _status(url: str, key: str | None) -> int:
    request = urllib.request.Request(url)  # noqa: S310 (http to the Redmine named by REDMINE_URL)
    if key is not None:
        request.add_header("X-Redmine-API-Key", key)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.redmine
def test_the_running_redmine_wants_the_key():
    url = os.environ.get("REDMINE_URL")
    key = os.environ.get("REDMINE_API_KEY")
    if not url or not key:
        pytest.skip('REDMINE_URL and REDMINE_API_KEY are not set: run eval "$(scripts/redmine up)" and export them')
    issues = f"{url.rstrip('/')}/issues.json"
    assert _status(issues, key) == 200
    assert _status(issues, None) == 401
