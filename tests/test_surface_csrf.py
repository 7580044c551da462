"""Every page form that posts carries the CSRF token, and a post without it is refused with 403.

The forms are found, not listed: every page route (the admin's included) is opened by
alice, the admin, who sees the most forms, in the same world of objects as the
permissions matrix, and the log-in pages by someone signed out.
"""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from django.test import Client

# world is the permissions matrix's fixture, shared: importing it makes it one here too.
from tests.test_surface_permissions import ROUTES, client_for, url_of, world  # noqa: F401

TOKEN = "csrfmiddlewaretoken"


class Forms(HTMLParser):
    """The forms of a page: method, action and the names and values of their fields."""

    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append(
                {"method": (attrs.get("method") or "get").lower(), "action": attrs.get("action"), "fields": {}}
            )
        elif tag in ("input", "select", "textarea", "button") and self.forms and attrs.get("name"):
            self.forms[-1]["fields"].setdefault(attrs["name"], attrs.get("value") or "")


def page_routes() -> list:
    return [r for r in ROUTES if not r.route.startswith("api/") and r.route != "healthz"]


def posting_forms(client: Client, url: str) -> list[tuple[str, dict]]:
    """(page URL, form) for each form on the page at ``url`` that posts."""
    response = client.get(url)
    if response.status_code != 200 or "html" not in response.get("Content-Type", ""):
        return []
    parser = Forms()
    parser.feed(response.content.decode())
    return [(url, form) for form in parser.forms if form["method"] == "post"]


@pytest.fixture
def forms(world, alice):  # noqa: F811
    found = []
    as_alice = client_for(alice)
    for route in page_routes():
        found += posting_forms(as_alice, url_of(route.route, world))
    for login in ("/accounts/login/", "/admin/login/"):
        found += posting_forms(Client(), login)
    return found


def test_it_finds_the_forms_of_the_pages(forms):
    actions = {urlsplit(urljoin(page, form["action"] or page)).path for page, form in forms}
    assert "/accounts/login/" in actions
    assert "/issues/BLUE-1/comments/" in actions
    assert any(path.startswith("/connections/") for path in actions)
    assert any(path.startswith("/sync/") for path in actions)
    assert any(path.startswith("/admin/") for path in actions)
    assert len(forms) > 30


def test_every_posting_form_carries_the_token(forms):
    missing = [f"{page}: form to {form['action']}" for page, form in forms if TOKEN not in form["fields"]]
    assert not missing, "\n".join(missing)


def test_every_posting_form_is_refused_without_the_token(forms, alice):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    signed_out = Client(enforce_csrf_checks=True)
    accepted = []
    for page, form in forms:
        action = urljoin(page, form["action"] or page)
        fields = {name: value for name, value in form["fields"].items() if name != TOKEN}
        client = signed_out if urlsplit(action).path.endswith("/login/") else strict
        response = client.post(action, fields)
        if response.status_code != 403:
            accepted.append(f"{page}: form to {action} -> {response.status_code}")
    assert not accepted, "\n".join(accepted)


def test_the_same_post_with_the_token_gets_through(world, alice):  # noqa: F811
    """The refusal is the token's doing: with it, the comment form is accepted."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    client.get("/issues/BLUE-1/")
    token = client.cookies["csrftoken"].value
    response = client.post("/issues/BLUE-1/comments/", {"body": "With the token", TOKEN: token})
    assert response.status_code == 302
    assert world["issue"].comments.filter(body__startswith="With the token").exists()
