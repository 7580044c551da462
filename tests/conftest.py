"""Shared test fixtures: the named users, a project, and API clients.

alice is the admin, bob a staff user, charlie a user with no special rights.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from trackers.builtin import actions
from trackers.builtin.models import Project


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """The production hasher is slow on purpose; tests create many users."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    """Attachments of each test go to their own folder."""
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


@pytest.fixture
def django_capture_on_commit_callbacks(django_capture_on_commit_callbacks):
    """pytest-django's, with one difference: the block is a transaction of its own for announcements.

    The built-in tracker announces all changes of one transaction together, after it
    commits. In a test everything shares the test's transaction, so changes made before
    the block (fixtures) would hold the announcement back; starting a new batch at the
    block keeps each block's changes announced at its end, as a real commit would.
    """

    @contextmanager
    def capture(**kwargs):
        actions.start_new_announcements()
        with django_capture_on_commit_callbacks(**kwargs) as callbacks:
            yield callbacks

    return capture


def _user(username: str, **flags):
    user = get_user_model().objects.create_user(
        username, f"{username}@example.org", "password-" + username, first_name=username.title(), **flags
    )
    return user


@pytest.fixture
def alice(db):
    return _user("alice", is_staff=True, is_superuser=True)


@pytest.fixture
def bob(db):
    return _user("bob", is_staff=True)


@pytest.fixture
def charlie(db):
    return _user("charlie")


@pytest.fixture
def project(db):
    return Project.objects.create(key="BLUE", name="Blue project")


def _api_client(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def alice_api(alice):
    return _api_client(alice)


@pytest.fixture
def bob_api(bob):
    return _api_client(bob)


@pytest.fixture
def charlie_api(charlie):
    return _api_client(charlie)


def _page_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def as_alice(alice):
    """A browser session logged in as alice; each user gets their own, so one test can hold several."""
    return _page_client(alice)


@pytest.fixture
def as_bob(bob):
    return _page_client(bob)


@pytest.fixture
def as_charlie(charlie):
    return _page_client(charlie)
