"""Fuzzing /api/v1/ from its own OpenAPI schema against a live node: no input ever gets a 5xx.

One node (gunicorn and django-q2, as in production) runs on 127.0.0.1 with its admin's
token and one active connection whose secret the test holds. Schemathesis generates
valid and invalid requests for every operation of the schema the node serves at
/api/v1/schema/, a bounded number per operation:

- the REST API as the admin;
- the signed node endpoints unsigned (random signature headers): refused, nothing stored;
- the signed node endpoints signed right: any body gets an answer, a malformed one a 400;
- the pairing handshake and the webhook, which need no user.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable
from urllib.parse import unquote_to_bytes, urlsplit

import pytest
import requests
import schemathesis
from django.urls import get_resolver
from django.utils.encoding import escape_uri_path
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from connections import signing
from connections.models import Connection
from syncqueue.models import SyncEvent
from syncqueue.webhooks import signature as webhook_signature
from tests.helpers import assert_error
from tests.livenodes import LiveNode
from trackers.builtin import actions
from trackers.builtin.models import Issue, Project

EXAMPLES = 60
# The other node: one that we push to, and one that is private and pulls from us.
PEER_UUID = "0b6f1c2e-5f43-4c1e-9a59-3f7c0f7f5a10"
PEER_SECRET = "f" * 64
PRIVATE_UUID = "7d1e2b9a-0c3f-4b8e-8f6a-2a9d4c1b3e57"
PRIVATE_SECRET = "e" * 64
PULLING_OPERATIONS = r"^/api/v1/node/(pull|blobs)/"
WEBHOOK_SECRET = "fuzz-webhook-secret-0123456789abcdef"
SIGNED_OPERATIONS = r"^/api/v1/node/(messages|attachments|pull|blobs)/"
UNSIGNED_NODE_OPERATIONS = r"^/api/v1/(node/handshake|webhooks)/"
# The largest seq the database columns hold; the node refuses a message beyond it (and NUL characters).
MAX_STORABLE_SEQ = 2**31 - 1
# Operations and examples per group, for the record.
FIGURES: dict[str, tuple[dict[str, int], Counter]] = {}

fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
    # No shrinking: a failure is reported as found, and the run stays bounded.
    phases=[Phase.explicit, Phase.generate],
)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    live = LiveNode("Fuzz", tmp_path_factory.mktemp("fuzz"), extra_env={"WEBHOOK_SECRET": WEBHOOK_SECRET})
    try:
        live.prepare()
        # A connection whose secret the test holds; its remote is a closed port on this machine.
        live.manage(
            "shell",
            "-c",
            textwrap.dedent(
                f"""
                from connections.models import Connection
                peer = Connection.objects.create(
                    uuid="{PEER_UUID}", name="Peer", status="active", secret="{PEER_SECRET}",
                    remote_name="Peer", remote_url="http://127.0.0.1:9", project="FUZZ",
                )
                Connection.objects.create(
                    uuid="{PRIVATE_UUID}", name="Private", status="active", secret="{PRIVATE_SECRET}",
                    remote_name="Private", remote_url="", project="FUZZ",
                )
                from connections import rules
                from syncqueue.models import Twin
                peer.active_rules = rules.install_template(peer, "default", None)
                peer.save()
                peer.triggers.create(query="project:FUZZ")
                Twin.objects.create(connection=peer, local_key="FUZZ-1", remote_key="PEER-1")
                """
            ),
        )
        live.start()
        # Something for the fuzzed paths to find: FUZZ-1 with a comment and an attachment.
        live.create_issue(summary="Fuzzed")
        live.api("POST", "tracker/issues/FUZZ-1/comments/", json={"body": "A comment"})
        live.api("POST", "tracker/issues/FUZZ-1/attachments/", files={"file": ("a.txt", b"attached")})
        yield live
    finally:
        live.destroy()


@pytest.fixture(scope="module")
def api_schema(node):
    response = node.session.get(f"{node.url}/api/v1/schema/", params={"format": "json"}, timeout=60)
    assert response.status_code == 200, response.text
    loaded = schemathesis.openapi.from_dict(response.json())
    loaded.config.update(base_url=node.url)
    return loaded


def operations(api_schema, path_pattern: str, *, matching: bool = True) -> list:
    found = [result.ok() for result in api_schema.get_all_operations()]
    return [op for op in found if bool(re.search(path_pattern, op.path)) == matching]


# Path parameters that name something on the node; generated ones almost never do.
EXISTING = {"id": 1, "number": 1, "key": "FUZZ-1"}


def strategies(operation) -> list:
    """Valid and invalid cases, and valid cases about things that exist."""
    found = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    names = re.findall(r"{(\w+)}", operation.path)
    if names and all(name in EXISTING for name in names):
        existing = {name: EXISTING[name] for name in names}
        found.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=existing))
    return found


def fuzz_one(operation, check: Callable, statuses: Counter) -> int:
    """Run ``check(case)`` on valid and invalid cases of ``operation``; the number of cases run.

    ``check`` returns the responses it got; their statuses are counted into ``statuses``.
    """
    count = 0

    @fuzz_settings
    @given(case=st.one_of(strategies(operation)))
    def run(case):
        nonlocal count
        count += 1
        statuses.update(response.status_code for response in check(case))

    run()
    return count


def fuzz(group: str, operations_to_fuzz: list, check: Callable) -> None:
    """Fuzz each operation; fail naming every operation that failed, with what it was sent."""
    examples: dict[str, int] = {}
    statuses: Counter = Counter()
    failures: list[str] = []
    for operation in operations_to_fuzz:
        label = f"{operation.method.upper()} {operation.path}"
        try:
            examples[label] = fuzz_one(operation, check, statuses)
        except AssertionError as e:
            failures.append(f"{label}: {e}")
    assert not failures, "\n\n".join(failures)
    assert all(examples.values()), examples
    FIGURES[group] = (examples, statuses)


class NodeSignature(requests.auth.AuthBase):
    """Signs the request exactly as it goes out: method, path with query, body bytes.

    Pulls and uploads come from the private peer, the rest from the one we push to.
    """

    def __call__(self, request):
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        private = re.search(PULLING_OPERATIONS, request.path_url)
        uuid, secret = (PRIVATE_UUID, PRIVATE_SECRET) if private else (PEER_UUID, PEER_SECRET)
        request.headers.update(signing.sign(secret, uuid, request.method, request.path_url, body))
        return request


class WebhookSignature(requests.auth.AuthBase):
    def __call__(self, request):
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        request.headers["X-Exalate-Webhook-Signature"] = webhook_signature(WEBHOOK_SECRET, body)
        return request


def flatten(patterns, prefix: str = ""):
    for pattern in patterns:
        if hasattr(pattern, "url_patterns"):
            yield from flatten(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern)


def route_of(route: str) -> str:
    """An URL route as OpenAPI writes it: <int:pk> -> {id}, <tracker_key:key> -> {key}."""
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "{id}" if m[1] == "pk" else f"{{{m[1]}}}", route)


def rebuilt_as_sent(response) -> bool:
    """Whether the node rebuilds the path as it was signed (it checks the signature over its own rebuilding).

    A path segment with, say, an encoded "&" comes back unencoded; the real transport signs only hex digests.
    """
    path = urlsplit(response.request.url).path
    try:
        return escape_uri_path(unquote_to_bytes(path).decode()) == path
    except UnicodeDecodeError:
        return False


def expect(condition: bool, case, response) -> None:
    if not condition:
        sent = response.request.body or b""
        raise AssertionError(
            f"{case.method} {response.request.url} -> {response.status_code}: {response.text[:300]}\n"
            f"  sent: {sent[:300]!r}"
        )


def sent_json(response):
    try:
        return json.loads(response.request.body or b"")
    except ValueError:
        return None


def assert_error_shape(case, response) -> None:
    """Every API refusal is JSON with a one-line "error" (a 405 of a plain Django view has no body to shape,
    and a 414 comes from gunicorn, which refuses a request line over 4 KB before the node sees it)."""
    if response.status_code < 400 or response.status_code in (405, 414):
        return
    content_type = response.headers.get("content-type", [""])[0]
    expect(content_type.startswith("application/json"), case, response)
    body = response.json()
    expect(isinstance(body, dict) and isinstance(body.get("error"), str) and bool(body["error"]), case, response)


def test_it_refuses_unsigned_node_requests_whatever_they_carry(api_schema, node):
    def check(case):
        response = case.call()
        expect(response.status_code < 500, case, response)
        # Only a URL that cannot name anything is refused before the signature is read.
        expect(response.status_code in (400, 401, 404), case, response)
        assert_error_shape(case, response)
        return [response]

    fuzz("unsigned node API", operations(api_schema, SIGNED_OPERATIONS), check)
    assert [twin["local_key"] for twin in node.twins()] == ["FUZZ-1"]
    peer = node.api("GET", "queue/stats/")["connections"][0]
    assert peer["incoming"] == {}


def test_it_answers_signed_node_requests_without_a_server_error(api_schema):
    def check(case):
        response = case.call(auth=NodeSignature())
        expect(response.status_code < 500, case, response)
        expect(response.status_code not in (401, 403) or not rebuilt_as_sent(response), case, response)
        if case.method == "POST" and not isinstance(sent_json(response), dict):
            expect(response.status_code == 400, case, response)
        assert_error_shape(case, response)
        return [response]

    fuzz("signed node API", operations(api_schema, SIGNED_OPERATIONS), check)


def test_it_answers_pairing_and_webhooks_without_a_server_error(api_schema):
    def check(case):
        responses = [case.call(auth=auth) for auth in (None, WebhookSignature())]
        for response in responses:
            expect(response.status_code < 500, case, response)
            expect(response.status_code != 200, case, response)
            assert_error_shape(case, response)
        return responses
        return [response]

    fuzz("pairing and webhook", operations(api_schema, UNSIGNED_NODE_OPERATIONS), check)


def test_the_rest_api_never_answers_a_server_error(api_schema, node):
    def check(case):
        response = case.call(headers={"Authorization": f"Token {node.token}"})
        expect(response.status_code < 500, case, response)
        assert_error_shape(case, response)
        return [response]

    rest = [op for op in operations(api_schema, "^/api/v1/node/|^/api/v1/webhooks/", matching=False)]
    fuzz("REST API", rest, check)


def test_the_node_logged_no_server_error(node):
    time.sleep(1)
    log = node.log()
    assert "Internal Server Error" not in log, log
    assert "Traceback" not in log, log


def test_the_fuzzing_reached_every_operation(api_schema):
    fuzzed = {label for examples, _ in FIGURES.values() for label in examples}
    everything = {f"{op.method.upper()} {op.path}" for op in operations(api_schema, "")}
    assert fuzzed == everything
    total = sum(sum(examples.values()) for examples, _ in FIGURES.values())
    print(f"\nfuzzed {len(everything)} operations, {total} examples:")
    for name, (examples, statuses) in FIGURES.items():
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"  {name}: {len(examples)} operations, {sum(examples.values())} examples; answers {answers}")


def post_signed(client, connection, body: bytes):
    path = "/api/v1/node/messages/"
    headers = signing.sign(PEER_SECRET, str(connection.uuid), "POST", path, body)
    return client.post(path, body, content_type="application/json", headers=headers)


@pytest.mark.parametrize(
    "bad",
    [{"seq": MAX_STORABLE_SEQ + 1}, {"key": "P-\x00"}, {"replica": {"summary": "\x00"}}, {"acks": "\x00"}],
    ids=["seq too large", "NUL in the key", "NUL in the replica", "NUL in acks"],
)
def test_it_rejects_a_message_the_database_cannot_store(client, db, bad):
    connection = Connection.objects.create(name="Peer", status=Connection.Status.ACTIVE, secret=PEER_SECRET)
    message = {"id": str(uuid.uuid4()), "kind": "update", "seq": 1, "key": "P-1", "replica": {}, **bad}
    body = json.dumps({"messages": [message]}).encode()
    response = post_signed(client, connection, body)
    assert response.status_code == 200
    assert list(response.json()["rejected"]) == [message["id"]]
    assert not SyncEvent.objects.exists()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_it_finds_a_nul_in_a_replica_however_the_body_is_encoded(client, db, encoding):
    connection = Connection.objects.create(name="Peer", status=Connection.Status.ACTIVE, secret=PEER_SECRET)
    message = {"id": str(uuid.uuid4()), "kind": "update", "seq": 1, "key": "P-1", "replica": {"deep": ["a\x00b"]}}
    response = post_signed(client, connection, json.dumps({"messages": [message]}).encode(encoding))
    assert response.status_code == 200
    assert response.json()["rejected"] == {message["id"]: "the replica must not contain NUL characters"}
    assert not SyncEvent.objects.exists()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_it_refuses_a_body_with_numbers_json_does_not_have(client, db, constant):
    connection = Connection.objects.create(name="Peer", status=Connection.Status.ACTIVE, secret=PEER_SECRET)
    message = {"id": str(uuid.uuid4()), "kind": "update", "seq": 1, "key": "P-1", "replica": {"n": 0}}
    body = json.dumps({"messages": [message]}).replace('"n": 0', f'"n": {constant}').encode()
    response = post_signed(client, connection, body)
    assert response.status_code == 400
    assert not SyncEvent.objects.exists()


# --- the schema itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "status"), [(None, 401), ("charlie_api", 403), ("bob_api", 200), ("alice_api", 200)])
def test_the_schema_is_served_to_staff_only(request, client, db, who, status):
    # ``db`` in the signature: pytest-django then runs this with the database tests, not after the
    # browser tests, whose event loop would make Django refuse the database.
    api = request.getfixturevalue(who) if who else client
    response = api.get("/api/v1/schema/", {"format": "json"})
    assert response.status_code == status
    if status == 200:
        assert response.json()["openapi"].startswith("3.")


def test_the_schema_describes_every_api_route(alice_api):
    """A new endpoint under /api/v1/ is fuzzed only if the schema names it: the schema must keep up."""
    described = set(alice_api.get("/api/v1/schema/", {"format": "json"}).json()["paths"])
    routed = set()
    for pattern in get_resolver().url_patterns:
        if str(pattern.pattern) == "api/v1/":
            routed |= {"/api/v1/" + route_of(p) for p in flatten(pattern.url_patterns)}
    assert routed - {"/api/v1/schema/"} == described


# --- bodies over MAX_REQUEST_BYTES -----------------------------------------------------------------

LIMIT = 4096


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tracker/issues/",
        "/api/v1/tracker/projects/",
        "/api/v1/tracker/issues/BLUE-1/comments/",
        "/api/v1/connections/invitations/",
        "/api/v1/connections/accept/",
        "/api/v1/connections/1/rules/",
        "/api/v1/node/handshake/",
        "/api/v1/node/messages/",
        "/api/v1/webhooks/changed/",
    ],
)
def test_a_body_over_the_limit_is_refused_before_anything_changes(alice_api, alice, project, settings, path):
    issue = actions.create_issue(project, {"summary": "Before"}, actor=alice)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT
    settings.WEBHOOK_SECRET = WEBHOOK_SECRET
    body = json.dumps({"summary": "x" * LIMIT, "messages": [], "key": "BLUE-1"}).encode()
    response = alice_api.post(path, body, content_type="application/json")
    assert response.status_code == 413
    assert "too large" in response.json()["error"]
    assert not SyncEvent.objects.exists()
    assert not Connection.objects.exists()
    assert list(Issue.objects.values_list("key", flat=True)) == [issue.key]
    assert not issue.comments.exists()
    assert Project.objects.count() == 1


def test_the_live_node_refuses_a_signed_batch_over_the_limit(node):
    body = json.dumps({"messages": [], "padding": "x" * (2_621_440 + 1)}).encode()
    path = "/api/v1/node/messages/"
    headers = {"Content-Type": "application/json", **signing.sign(PEER_SECRET, PEER_UUID, "POST", path, body)}
    response = requests.post(node.url + path, data=body, headers=headers, timeout=30)
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


# --- what the fuzzing found ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [({"connection": "423728826532383293440"}, "connection"), ({"local_key": "BLUE-\x00"}, "local_key")],
    ids=["connection id past the column", "NUL in a key"],
)
def test_the_twin_list_refuses_a_filter_the_database_cannot_take(alice_api, query, field):
    assert_error(alice_api.get("/api/v1/twins/", query), 400, field)
