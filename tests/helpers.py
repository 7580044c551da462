"""Assertions shared by the test files."""

from __future__ import annotations

import json


def assert_error(response, status: int, field: str | None = None, text: str = "") -> dict:
    """The JSON error shape: a one-line "error", "fields" naming the bad field, the message containing ``text``."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert field in body["fields"], body
    assert text.lower() in json.dumps(body).lower(), body
    return body
