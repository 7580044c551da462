"""The set-up commands: scripts/run, scripts/test and CI's .ci/run.

Running a node end to end is .ci/run's smoke test; here are the cheap checks.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/run", "scripts/test", "scripts/_env.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_it_has_valid_bash(script):
    result = subprocess.run(["bash", "-n", script], cwd=REPO_ROOT, capture_output=True, text=True)  # noqa: S607
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ["scripts/run", "scripts/test", ".ci/run"])
def test_it_can_be_run_directly(script):
    assert os.access(REPO_ROOT / script, os.X_OK)


def test_it_fails_when_pytest_collects_no_test(tmp_path):
    # -k that matches nothing: pytest exits 5, which must not count as a pass.
    result = subprocess.run(
        [str(REPO_ROOT / "scripts/test"), "tests/test_healthz.py", "-k", "no_test_is_named_like_this"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "scripts/test: pytest collected no tests" in result.stderr
