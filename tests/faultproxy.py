"""A fault-injecting HTTP proxy on 127.0.0.1 that sits in front of one live node.

The other node reaches this node only through the proxy (the node's NODE_URL is the
proxy's URL, so the pairing stores it as the connection's remote URL). While the proxy is
armed, it decides per request, from seeded random streams (one for message batches, one
for attachment downloads), to:

- ``pass``: forward the request and hand back the answer;
- ``refused_502`` / ``refused_504``: answer 502 or 504 without forwarding;
- ``answer_lost_504``: forward (the receiver stores it), then answer 504 instead;
- ``answer_lost_reset``: forward, then close the connection without an answer, as a
  read timeout would leave it;
- ``duplicated``: forward the same request twice and hand back the first answer (the
  second copy reuses the signature's nonce, so the receiver must refuse it);
- ``held``: keep the request back until the next request has been forwarded, then
  forward it (the sender waits), so it arrives after a later one;
- ``late``: answer 504 at once and forward the request after the next one, a stale copy
  arriving after the sender has already sent it again;
- ``cut`` (downloads only): hand back the headers and half the body, then close.

Faults named in ``spare_updates`` are given only to batches without an update.

``stall_next(kind)`` makes the next request of a kind (``messages`` or ``download``) hang
until ``release_stall()``: the sender is then surely in the middle of an event, which is
when a test kills it.

Requests to the pairing handshake always pass. Whatever the decision, nothing else in
the request or the answer is changed.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MESSAGE_FAULTS = {
    "pass": 60,
    "refused_502": 4,
    "refused_504": 4,
    "answer_lost_504": 7,
    "answer_lost_reset": 7,
    "duplicated": 6,
    "held": 6,
    "late": 6,
}
DOWNLOAD_FAULTS = {"pass": 70, "refused_502": 6, "answer_lost_reset": 8, "cut": 16}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
# How long a held request waits for a later one to overtake it before it goes anyway.
HOLD_SECONDS = 3.0
FORWARD_TIMEOUT = 60
STALL_SECONDS = 20


@dataclass
class Forwarded:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class _Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    number: int = 0  # order of arrival at the proxy
    overtaken: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """One proxy in front of one node; ``arm()`` starts injecting faults, ``disarm()`` stops."""

    def __init__(self, name: str, seed: int, *, message_faults=None, download_faults=None, spare_updates=()):
        self.name = name
        # Faults given only to batches that carry no update (acknowledgements, stops).
        self.spare_updates = frozenset(spare_updates)
        self.target_port: int | None = None
        self.armed = False
        self.message_faults = dict(message_faults or MESSAGE_FAULTS)
        self.download_faults = dict(download_faults or DOWNLOAD_FAULTS)
        # One stream per kind of request: the n-th download meets the same fate whatever the messages did.
        self.random = {kind: random.Random(f"{seed}:{name}:{kind}") for kind in ("messages", "download")}
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        # What the receiver answered to the second copy of a duplicated request.
        self.duplicate_answers: Counter[int] = Counter()
        self.overtaken = 0
        self.target_down = 0
        self._waiting: _Request | None = None
        self._in_flight = 0
        self._arrivals = 0
        self._stall_kind: str | None = None
        self.stalled = threading.Event()  # a request is hanging in the stall
        self._stall_over = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 64
        self.server.proxy = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"proxy-{name}", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release_stall()
        self.disarm()
        self.server.shutdown()
        self.server.server_close()

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        """Stop injecting faults; a request still held back is let go."""
        self.armed = False
        self._release_waiting()

    @property
    def idle(self) -> bool:
        with self.lock:
            return self._in_flight == 0 and self._waiting is None

    # --- decisions -------------------------------------------------------------------------

    def stall_next(self, kind: str) -> None:
        with self.lock:
            self._stall_kind = kind
            self.stalled.clear()
            self._stall_over.clear()

    def stall(self) -> None:
        """Hang here until ``release_stall()`` (or STALL_SECONDS); the test sees ``stalled`` set."""
        self.stalled.set()
        self._stall_over.wait(STALL_SECONDS)

    def release_stall(self) -> None:
        with self.lock:
            self._stall_kind = None
        self._stall_over.set()

    def decide(self, request: _Request) -> str:
        kind = "messages" if request.path.startswith("/api/v1/node/messages/") else "other"
        if request.path.startswith("/api/v1/node/attachments/"):
            kind = "download"
        with self.lock:
            self._arrivals += 1
            request.number = self._arrivals
            self.requests[kind] += 1
            if kind == self._stall_kind:
                self._stall_kind = None
                return "stalled"
            if not self.armed or kind == "other":
                return "pass"
            table = self.message_faults if kind == "messages" else self.download_faults
            choice = self.random[kind].choices(list(table), weights=list(table.values()))[0]
            if choice in ("held", "late") and self._waiting is not None:
                choice = "pass"  # one request is held back at a time
            if choice in self.spare_updates and _carries_an_update(request.body):
                choice = "pass"
            if choice != "pass":
                self.faults[choice] += 1
            return choice

    # --- forwarding ------------------------------------------------------------------------

    def forward(self, request: _Request) -> Forwarded:
        """Send ``request`` to the node; then a request held back waiting for this one may go."""
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=FORWARD_TIMEOUT)
            try:
                connection.request(
                    request.method, request.path, body=request.body or None, headers=dict(request.headers)
                )
                response = connection.getresponse()
                answer = Forwarded(response.status, response.reason, response.getheaders(), response.read())
            finally:
                connection.close()
        except OSError as e:
            with self.lock:
                self.target_down += 1
            answer = Forwarded(502, "Bad Gateway", [("Content-Type", "text/plain")], f"node down: {e}".encode())
        self._release_waiting(arrived_before=request.number)
        return answer

    def hold(self, request: _Request) -> bool:
        """Park ``request`` until a later one has been forwarded; False when another one is parked."""
        with self.lock:
            if self._waiting is not None:
                return False
            self._waiting = request
            return True

    def undo(self, fault: str) -> str:
        """Take back a fault that could not be carried out; the request passes."""
        with self.lock:
            self.faults[fault] -= 1
        return "pass"

    def wait_and_forward(self, request: _Request) -> Forwarded:
        request.overtaken.wait(HOLD_SECONDS)
        with self.lock:
            if self._waiting is request:
                self._waiting = None
        return self.forward(request)

    def deliver_late(self, request: _Request) -> None:
        self.track(+1)

        def deliver():
            try:
                self.wait_and_forward(request)
            finally:
                self.track(-1)

        threading.Thread(target=deliver, name=f"proxy-{self.name}-late", daemon=True).start()

    def _release_waiting(self, arrived_before: int | None = None) -> None:
        """Let the parked request go: all of them, or one that arrived before request ``arrived_before``."""
        with self.lock:
            waiting = self._waiting
            if waiting is None or (arrived_before is not None and waiting.number >= arrived_before):
                return
            self._waiting = None
            if arrived_before is not None:
                self.overtaken += 1
        waiting.overtaken.set()

    def track(self, delta: int) -> None:
        with self.lock:
            self._in_flight += delta

    def figures(self) -> dict:
        with self.lock:
            return {
                "requests": dict(self.requests),
                "faults": dict(self.faults),
                "overtaken": self.overtaken,
                "duplicate_second_answers": {str(k): v for k, v in self.duplicate_answers.items()},
                "answered_node_down": self.target_down,
            }


class _Handler(BaseHTTPRequestHandler):
    server_version = "faultproxy"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format, *args) -> None:
        pass  # the proxy's figures say what happened; a line per request would drown the test output

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        proxy.track(+1)
        try:
            self._dispatch(proxy)
        finally:
            proxy.track(-1)

    def _dispatch(self, proxy: FaultProxy) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
        request = _Request(self.command, self.path, headers, body)
        fault = proxy.decide(request)
        if fault in ("held", "late") and not proxy.hold(request):
            fault = proxy.undo(fault)  # another request was parked first
        if fault in ("refused_502", "refused_504"):
            self._answer(Forwarded(int(fault[-3:]), "Injected", [("Content-Type", "text/plain")], b"injected"))
        elif fault == "answer_lost_504":
            proxy.forward(request)
            self._answer(Forwarded(504, "Gateway Timeout", [("Content-Type", "text/plain")], b"injected"))
        elif fault == "answer_lost_reset":
            proxy.forward(request)
            self.close_connection = True  # no answer at all: the sender's read fails
        elif fault == "duplicated":
            first = proxy.forward(request)
            second = proxy.forward(request)
            with proxy.lock:
                proxy.duplicate_answers[second.status] += 1
            self._answer(first)
        elif fault == "held":
            self._answer(proxy.wait_and_forward(request))
        elif fault == "late":
            self._answer(Forwarded(504, "Gateway Timeout", [("Content-Type", "text/plain")], b"injected"))
            proxy.deliver_late(request)
        elif fault == "cut":
            self._answer(proxy.forward(request), cut=True)
        elif fault == "stalled":
            proxy.stall()
            self._answer(proxy.forward(request))
        else:
            self._answer(proxy.forward(request))

    def _answer(self, answer: Forwarded, *, cut: bool = False) -> None:
        try:
            self.send_response(answer.status, answer.reason)
            for name, value in answer.headers:
                if name.lower() not in HOP_BY_HOP | {"content-length", "date", "server"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer.body[: len(answer.body) // 2] if cut else answer.body)
            self.wfile.flush()
        except OSError:
            pass  # the sender gave up waiting; what it would have got does not matter
        self.close_connection = True


def _carries_an_update(body: bytes) -> bool:
    try:
        messages = json.loads(body)["messages"]
        return any(isinstance(m, dict) and m.get("kind") == "update" for m in messages)
    except (ValueError, KeyError, TypeError):
        return False


def wait_idle(proxies: list[FaultProxy], timeout: float = 10) -> bool:
    """True once no request is in flight or held back in any of ``proxies``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.idle for p in proxies):
            return True
        time.sleep(0.1)
    return False
