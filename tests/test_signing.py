import time

import pytest

from connections import signing

SECRET = "s" * 64


class Headers(dict):
    def get(self, name, default=None):
        return super().get(name, default)


def signed(secret=SECRET, method="POST", path="/api/v1/node/messages/", body=b"{}"):
    return signing.read_headers(Headers(signing.sign(secret, "conn-1", method, path, body)))


def test_it_accepts_what_it_signed():
    signing.verify(SECRET, signed(), "POST", "/api/v1/node/messages/", b"{}")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"secret": "t" * 64}, "bad signature"),
        ({"method": "GET"}, "bad signature"),
        ({"path": "/api/v1/node/other/"}, "bad signature"),
        ({"body": b'{"x": 1}'}, "bad signature"),
    ],
)
def test_it_refuses_anything_changed(change, message):
    request = signed(**{k: v for k, v in change.items() if k == "secret"})
    method = change.get("method", "POST")
    path = change.get("path", "/api/v1/node/messages/")
    body = change.get("body", b"{}")
    with pytest.raises(signing.SignatureError, match=message):
        signing.verify(SECRET, request, method, path, body)


def test_it_refuses_a_stale_or_future_request():
    request = signed()
    for offset in (-signing.WINDOW_SECONDS - 5, signing.WINDOW_SECONDS + 5):
        with pytest.raises(signing.SignatureError, match="outside the allowed window"):
            signing.verify(SECRET, request, "POST", "/api/v1/node/messages/", b"{}", now=time.time() + offset)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing header"),
        ({"X-Exalate-Timestamp": "soon"}, "malformed timestamp"),
        ({"X-Exalate-Nonce": "../../"}, "malformed nonce"),
    ],
)
def test_it_refuses_malformed_headers(headers, message):
    base = signing.sign(SECRET, "conn-1", "POST", "/", b"") if headers else {}
    with pytest.raises(signing.SignatureError, match=message):
        signing.read_headers(Headers({**base, **headers}))
