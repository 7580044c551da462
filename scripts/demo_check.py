"""Used by .ci/run: checks that a running demo syncs its sample issues both ways.

Usage: python scripts/demo_check.py DATA_DIR/demo/demo.json  (exit status 0 when synced)
"""

import json
import sys
import time
from pathlib import Path

import requests

TIMEOUT = 60


def summaries(node: dict) -> set[str]:
    response = requests.get(
        node["url"] + "/api/v1/tracker/issues/?page_size=500",
        headers={"Authorization": f"Token {node['token']}"},
        timeout=10,
    )
    response.raise_for_status()
    return {issue["summary"] for issue in response.json()["results"]}


def main(path: str) -> int:
    nodes = json.loads(Path(path).read_text())
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        blue, red = summaries(nodes["blue"]), summaries(nodes["red"])
        if blue and blue == red:
            print(f"both nodes hold the same {len(blue)} issues")
            return 0
        time.sleep(1)
    print(f"not in sync after {TIMEOUT} s:\n  blue: {sorted(blue)}\n  red:  {sorted(red)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
