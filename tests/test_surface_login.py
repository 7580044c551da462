"""Guessing passwords is slowed down: after five failed logins in fifteen minutes from one
client for one username, that client is refused for a while with 429 and a clear message,
on the login page and the admin's alike. Other people, and the same person from elsewhere,
still get in. The API has no password login to guess at: it takes tokens only.
"""

from __future__ import annotations

import time
from unittest import mock

import pytest
from django.conf import settings as django_settings
from django.test import Client

from exalate_web import ratelimit
from exalate_web import settings as node_settings

LOGIN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"
WINDOW = 15 * 60


@pytest.fixture(autouse=True)
def own_counters(settings, request):
    """Each test counts in a cache of its own, not the node's shared one."""
    settings.CACHES = {
        **settings.CACHES,
        "ratelimit": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": request.node.nodeid},
    }
    settings.LOGIN_RATE_LIMIT = {"failures": 5, "minutes": 15}


def browser(address: str = "203.0.113.7") -> Client:
    return Client(REMOTE_ADDR=address)


def log_in(client: Client, username: str, password: str, path: str = LOGIN):
    return client.post(path, {"username": username, "password": password})


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def fail(client: Client, username: str = "alice", times: int = 5, path: str = LOGIN) -> None:
    for _ in range(times):
        response = log_in(client, username, "wrong", path)
        assert response.status_code == 200
        assert b"correct username and password" in response.content


def test_it_refuses_even_the_right_password_after_five_failures(alice):
    client = browser()
    fail(client)
    response = log_in(client, "alice", "password-alice")
    assert response.status_code == 429
    assert b"Too many failed logins. Try again in 15 minutes." in response.content
    assert not logged_in(client)


def test_it_lets_a_person_in_who_got_it_wrong_fewer_times(alice):
    client = browser()
    fail(client, times=4)
    assert log_in(client, "alice", "password-alice").status_code == 302
    assert logged_in(client)


def test_a_successful_login_forgets_the_failures_before_it(alice):
    client = browser()
    fail(client, times=4)
    assert log_in(client, "alice", "password-alice").status_code == 302
    client.logout()
    fail(client, times=4)
    assert log_in(client, "alice", "password-alice").status_code == 302


def test_the_same_person_from_another_client_still_gets_in(alice):
    fail(browser("203.0.113.7"))
    elsewhere = browser("198.51.100.2")
    assert log_in(elsewhere, "alice", "password-alice").status_code == 302


def test_another_username_from_the_same_client_is_counted_apart(alice, bob):
    client = browser()
    fail(client, "alice")
    assert log_in(client, "bob", "password-bob").status_code == 302


def test_usernames_differing_in_case_share_one_count(alice):
    client = browser()
    for username in ("alice", "Alice", "ALICE", "aLiCe", "alicE"):
        log_in(client, username, "wrong")
    assert log_in(client, "alice", "password-alice").status_code == 429


def test_a_client_guessing_across_many_usernames_is_refused_too(alice):
    client = browser()
    for n in range(20):
        fail(client, f"user{n}", times=1)
    response = log_in(client, "alice", "password-alice")
    assert response.status_code == 429
    assert not logged_in(client)
    assert log_in(browser("198.51.100.2"), "alice", "password-alice").status_code == 302


def test_it_lets_the_client_try_again_when_the_time_is_up(alice):
    client = browser()
    fail(client)
    later = time.time() + WINDOW + 1
    with mock.patch.object(time, "time", return_value=later):
        assert log_in(client, "alice", "password-alice").status_code == 302


def test_it_tells_how_long_is_left(alice):
    client = browser()
    fail(client)
    with mock.patch.object(time, "time", return_value=time.time() + WINDOW - 90):
        response = log_in(client, "alice", "password-alice")
    assert response.status_code == 429
    assert b"Try again in 2 minutes." in response.content


def test_the_admin_login_is_limited_too(alice):
    client = browser()
    for _ in range(5):
        assert log_in(client, "alice", "wrong", ADMIN_LOGIN).status_code == 200
    response = log_in(client, "alice", "password-alice", ADMIN_LOGIN)
    assert response.status_code == 429
    assert b"Too many failed logins" in response.content
    assert not logged_in(client)


def test_failures_on_either_login_page_add_up(alice):
    client = browser()
    fail(client, times=3)
    for _ in range(2):
        log_in(client, "alice", "wrong", ADMIN_LOGIN)
    assert log_in(client, "alice", "password-alice").status_code == 429


def test_a_get_of_the_login_page_is_never_refused(alice):
    client = browser()
    fail(client)
    assert client.get(LOGIN).status_code == 200


def test_the_api_takes_no_password_to_guess(alice, client):
    response = client.get("/api/v1/connections/", HTTP_AUTHORIZATION="Basic YWxpY2U6cGFzc3dvcmQtYWxpY2U=")
    assert response.status_code == 401
    assert (
        "rest_framework.authentication.BasicAuthentication"
        not in (django_settings.REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"])
    )


def test_the_node_keeps_its_counts_where_every_web_worker_sees_them():
    backend = node_settings.CACHES["ratelimit"]["BACKEND"]
    assert backend in (
        "django.core.cache.backends.filebased.FileBasedCache",
        "django.core.cache.backends.redis.RedisCache",
    )


def test_the_wait_reads_naturally():
    assert ratelimit.wait_message(30) == "Too many failed logins. Try again in 1 minute."
    assert ratelimit.wait_message(61) == "Too many failed logins. Try again in 2 minutes."
