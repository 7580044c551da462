"""The Redmine client's HTTP handling, against a tiny local server that plays Redmine.

This tests our mapping of statuses, waits and budgets; the live contract suite tests Redmine.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trackers.base import NotFound, TrackerError
from trackers.redmine.client import RedmineClient, retry_after_seconds

API_KEY = "s3cr3t-redmine-key-0123456789"


class FakeRedmine:
    """Answers each request with the next scripted (status, headers, body) for its path."""

    def __init__(self):
        self.script: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.delay = 0.0

    def answer(self, path: str, *responses: tuple[int, dict[str, str], object]) -> None:
        self.script[path] = [
            (status, headers, body if isinstance(body, bytes) else json.dumps(body).encode())
            for status, headers, body in responses
        ]

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _respond(self):
                length = int(self.headers.get("Content-Length") or 0)
                fake.seen.append((self.command, self.path, dict(self.headers), self.rfile.read(length)))
                time.sleep(fake.delay)
                path = self.path.split("?")[0]
                queue = fake.script.get(path) or [(404, {}, b"")]
                status, headers, body = queue.pop(0) if len(queue) > 1 else queue[0]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _respond

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def redmine() -> Iterator[tuple[FakeRedmine, str]]:
    fake = FakeRedmine()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(RedmineClient, "sleep", staticmethod(slept.append))
    return slept


def client(url: str, **options) -> RedmineClient:
    return RedmineClient(url, API_KEY, **options)


def test_it_sends_the_key_in_a_header_and_reads_json(redmine):
    fake, url = redmine
    fake.answer("/issues/1.json", (200, {"Content-Type": "application/json"}, {"issue": {"id": 1}}))
    assert client(url).get("/issues/1.json", {"include": "journals"}) == {"issue": {"id": 1}}
    method, path, headers, _ = fake.seen[0]
    assert (method, path) == ("GET", "/issues/1.json?include=journals")
    assert headers["X-Redmine-API-Key"] == API_KEY
    assert API_KEY not in path


def test_it_accepts_a_put_answered_with_no_body(redmine):
    fake, url = redmine
    fake.answer("/issues/1.json", (204, {}, b""))
    assert client(url).put("/issues/1.json", {"issue": {"subject": "x"}}) is None
    assert json.loads(fake.seen[0][3]) == {"issue": {"subject": "x"}}


@pytest.mark.parametrize("status", [401, 403])
def test_it_reports_a_refused_key_as_permanent(redmine, status):
    fake, url = redmine
    fake.answer("/issues.json", (status, {}, b""))
    with pytest.raises(TrackerError, match="Redmine refused the API key") as error:
        client(url).get("/issues.json")
    assert error.value.permanent


def test_it_reports_a_missing_record_as_not_found(redmine):
    fake, url = redmine
    fake.answer("/issues/9.json", (404, {}, b""))
    with pytest.raises(NotFound):
        client(url).get("/issues/9.json")


def test_it_joins_redmine_s_validation_errors_into_a_permanent_error(redmine):
    fake, url = redmine
    fake.answer("/issues.json", (422, {}, {"errors": ["Subject cannot be blank", "Tracker is not included"]}))
    with pytest.raises(TrackerError, match="Subject cannot be blank; Tracker is not included") as error:
        client(url).post("/issues.json", {"issue": {}})
    assert error.value.permanent


@pytest.mark.parametrize("status", [500, 502, 429])
def test_it_reports_server_trouble_as_transient(redmine, waits, status):
    fake, url = redmine
    fake.answer("/issues.json", (status, {}, b"oops"))
    with pytest.raises(TrackerError) as error:
        client(url).get("/issues.json")
    assert not error.value.permanent
    assert waits == [], "without Retry-After there is nothing to wait for"


def test_it_waits_once_as_retry_after_asks_then_succeeds(redmine, waits):
    fake, url = redmine
    fake.answer("/issues.json", (429, {"Retry-After": "3"}, b""), (200, {}, {"issues": []}))
    assert client(url).get("/issues.json") == {"issues": []}
    assert waits == [3.0]
    assert len(fake.seen) == 2


def test_it_gives_up_after_one_wait_with_a_transient_error(redmine, waits):
    fake, url = redmine
    fake.answer("/issues.json", (503, {"Retry-After": "2"}, b""))
    with pytest.raises(TrackerError, match="HTTP 503") as error:
        client(url).get("/issues.json")
    assert not error.value.permanent
    assert waits == [2.0] and len(fake.seen) == 2


def test_it_does_not_wait_longer_than_max_retry_after(redmine, waits):
    fake, url = redmine
    fake.answer("/issues.json", (429, {"Retry-After": "120"}, b""))
    with pytest.raises(TrackerError) as error:
        client(url, max_retry_after=30).get("/issues.json")
    assert not error.value.permanent
    assert waits == [] and len(fake.seen) == 1


def test_it_reads_retry_after_as_seconds_or_a_date():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_it_reports_an_unreachable_server_as_transient():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TrackerError, match="cannot reach Redmine") as error:
        client(f"http://127.0.0.1:{port}").get("/issues.json")
    assert not error.value.permanent


def test_it_reports_a_slow_answer_as_transient(redmine):
    fake, url = redmine
    fake.answer("/issues.json", (200, {}, {"issues": []}))
    fake.delay = 0.5
    with pytest.raises(TrackerError, match="did not answer") as error:
        client(url, timeout=(1, 0.1)).get("/issues.json")
    assert not error.value.permanent


def test_it_stops_when_the_request_budget_is_spent_until_reset(redmine):
    fake, url = redmine
    fake.answer("/issues.json", (200, {}, {"issues": []}))
    budgeted = client(url, request_budget=2)
    budgeted.get("/issues.json")
    budgeted.get("/issues.json")
    with pytest.raises(TrackerError, match="request budget spent") as error:
        budgeted.get("/issues.json")
    assert not error.value.permanent
    assert len(fake.seen) == 2, "a spent budget sends nothing"
    budgeted.reset_budget()
    assert budgeted.get("/issues.json") == {"issues": []}


def test_it_uploads_bytes_as_octet_stream_and_returns_the_token(redmine):
    fake, url = redmine
    fake.answer("/uploads.json", (201, {}, {"upload": {"id": 7, "token": "7.abc"}}))
    assert client(url).upload(b"\x00bytes", "a b.bin") == {"id": 7, "token": "7.abc"}
    method, path, headers, body = fake.seen[0]
    assert (method, path, body) == ("POST", "/uploads.json?filename=a+b.bin", b"\x00bytes")
    assert headers["Content-Type"] == "application/octet-stream"


def test_it_downloads_within_the_size_limit_only(redmine):
    fake, url = redmine
    fake.answer("/attachments/download/1/a.bin", (200, {}, b"x" * 1000))
    redmine_client = client(url)
    assert redmine_client.download(f"{url}/attachments/download/1/a.bin") == b"x" * 1000
    with pytest.raises(TrackerError, match="larger than 999 bytes") as error:
        redmine_client.download(f"{url}/attachments/download/1/a.bin", max_bytes=999)
    assert error.value.permanent


def test_it_never_sends_the_key_to_another_host(redmine):
    fake, url = redmine
    with pytest.raises(TrackerError, match="is not on") as error:
        client(url).download("http://elsewhere.example/attachments/download/1/a.bin")
    assert error.value.permanent
    assert fake.seen == []


def test_it_keeps_the_key_out_of_repr_errors_and_logs(redmine, caplog):
    fake, url = redmine
    fake.answer("/issues.json", (401, {}, b""))
    redmine_client = client(url)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TrackerError) as error:
        redmine_client.get("/issues.json")
    assert API_KEY not in repr(redmine_client)
    assert API_KEY not in str(error.value) and API_KEY not in repr(error.value)
    assert caplog.records, "the request was logged"
    assert API_KEY not in caplog.text


def test_it_refuses_a_url_that_is_not_http():
    with pytest.raises(TrackerError, match="http") as error:
        RedmineClient("redmine.example", API_KEY)
    assert error.value.permanent
