"""Who gets what, for every URL the node routes: read from the URL resolver, so a new endpoint
is walked as soon as it exists (and this test fails until its policy is written down here).

Each route is asked with GET and with every writing method it takes, by anonymous,
charlie (no rights), bob (staff) and alice (admin), in that order, against a small world
of real objects. What each may do follows the route's policy:

- public: anyone (the login pages, the health check);
- signed: node-to-node and webhook endpoints, which check a signature instead of a user;
- user: any signed-in person;
- staff: staff, for reading and for operating the sync;
- staff reads: staff read, only admins change;
- admin: admins only, even to look.

Refused means: anonymous is sent to log in (pages) or gets 401 (API), a signed-in person
gets 403 (the admin site sends people without staff rights to its login instead). Nobody
ever gets a 5xx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.views import APIView

from connections import rules
from connections.models import Connection, Node, RulesVersion
from syncqueue.models import SyncEvent, Twin
from trackers.builtin import actions
from trackers.builtin.models import Issue, Project

PUBLIC, SIGNED, USER, STAFF, STAFF_READS, ADMIN = "public", "signed", "user", "staff", "staff reads", "admin"
ADMIN_SITE = "admin site"
WRITES = ("post", "put", "patch", "delete")

# First match wins; every route must match one.
POLICIES: list[tuple[str, str]] = [
    (r"^(accounts|admin)/log(in|out)/$", PUBLIC),
    (r"^healthz$", PUBLIC),
    (r"^api/v1/(node|webhooks)/", SIGNED),
    (r"^(|issues/.*|api/v1/tracker/.*)$", USER),
    # Operating the sync: staff, as on the pages.
    (r"^api/v1/(connections/<int:pk>/sync|twins/<int:pk>/(stop|retry)|triggers/<int:pk>/run)/$", STAFF),
    (r"^sync/", STAFF),
    (r"^api/v1/schema/$", STAFF),
    (r"^api/v1/(connections|twins|queue)/", STAFF_READS),
    (r"^connections/(|<int:pk>/|<int:pk>/status/|tracker/)$", STAFF_READS),
    (r"^connections/", ADMIN),
    # The admin site keeps out whoever is not staff; what staff may do there is the ModelAdmins' own
    # business (StaffViewsAdminChanges), checked in test_admin.py.
    (r"^admin/", ADMIN_SITE),
]

# Within the "user" policy, what a signed-in person without rights may still not do.
USER_EXCEPTIONS: dict[tuple[str, str], str] = {
    # Deleting an issue is for staff.
    ("api/v1/tracker/issues/<tracker_key:key>/", "delete"): STAFF,
    ("issues/<str:key>/delete/", "get"): STAFF,
    ("issues/<str:key>/delete/", "post"): STAFF,
    # A comment or an attachment is changed by whoever added it (alice here), or staff.
    ("api/v1/tracker/issues/<tracker_key:key>/comments/<tracker_id:pk>/", "patch"): STAFF,
    ("api/v1/tracker/issues/<tracker_key:key>/comments/<tracker_id:pk>/", "delete"): STAFF,
    ("api/v1/tracker/issues/<tracker_key:key>/attachments/<tracker_id:pk>/", "delete"): STAFF,
    ("issues/<str:key>/comments/<int:comment_id>/edit/", "get"): STAFF,
    ("issues/<str:key>/comments/<int:comment_id>/edit/", "post"): STAFF,
    ("issues/<str:key>/comments/<int:comment_id>/delete/", "post"): STAFF,
    ("issues/<str:key>/attachments/<int:attachment_id>/delete/", "post"): STAFF,
    # Creating a project is for staff.
    ("api/v1/tracker/projects/", "post"): STAFF,
}


@dataclass(frozen=True)
class Route:
    route: str  # the pattern as written, prefixes included: "api/v1/twins/<int:pk>/"
    view: object

    @property
    def is_api(self) -> bool:
        return self.route.startswith("api/")

    @property
    def is_admin_site(self) -> bool:
        return self.route.startswith("admin/") and self.route != "admin/login/"

    def methods(self) -> list[str]:
        """GET, and the writing methods the view takes (a plain view is asked with POST)."""
        view_class = getattr(self.view, "cls", None) or getattr(self.view, "view_class", None)
        if view_class is not None and issubclass(view_class, APIView):
            return ["get", *(m for m in WRITES if hasattr(view_class, m) and m in view_class.http_method_names)]
        return ["get", "post"]


def walk(patterns, prefix: str = ""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from walk(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield Route(prefix + str(pattern.pattern), pattern.callback)


ROUTES = list(walk(get_resolver().url_patterns))


def policy_of(route: Route, method: str) -> str:
    for pattern, policy in POLICIES:
        if re.search(pattern, route.route):
            if policy == USER:
                return USER_EXCEPTIONS.get((route.route, method), USER)
            return policy
    raise AssertionError(f"No policy for {route.route!r}: add it to POLICIES in {__name__}.")


# --- the world the routes are asked about -------------------------------------------------------


@pytest.fixture
def world(alice, bob, charlie, settings):
    settings.NODE_URL = "http://127.0.0.1:9"
    node = Node.local()
    project = Project.objects.create(key="BLUE", name="Blue")
    issue = actions.create_issue(project, {"summary": "Printer on fire"}, actor=alice)
    comment = actions.add_comment(issue, "Hot", actor=alice)
    upload = SimpleUploadedFile("notes.txt", b"notes", content_type="text/plain")
    attachment = actions.add_attachment(issue, "notes.txt", upload, actor=alice)
    connection = Connection.objects.create(
        name="Red", status=Connection.Status.ACTIVE, secret="a" * 64, remote_name="Red",
        remote_url="http://127.0.0.1:9", project="BLUE",
    )  # fmt: skip
    connection.active_rules = rules.install_template(connection, "default", alice)
    connection.save()
    trigger = connection.triggers.create(query="project:BLUE", active=False)
    twin = Twin.objects.create(connection=connection, local_key=issue.key, remote_key="RED-1", state=Twin.State.BLOCKED)
    event = SyncEvent.objects.create(
        connection=connection, twin=twin, direction="outgoing", kind="update", seq=1,
        status=SyncEvent.Status.FAILED, payload={"replica": {"summary": "Printer on fire"}}, error="boom",
    )  # fmt: skip
    by_segment = {
        "connections": connection.pk,
        "triggers": trigger.pk,
        "twins": twin.pk,
        "events": event.pk,
        "comments": comment.pk,
        "attachments": attachment.pk,
        "rules": connection.active_rules.number,
    }
    admin_objects = {
        "builtin_issue": issue.pk,
        "builtin_project": project.pk,
        "builtin_status": issue.status_id,
        "builtin_priority": issue.priority_id or 1,
        "connections_connection": connection.pk,
        "connections_rulesversion": connection.active_rules.pk,
        "syncqueue_twin": twin.pk,
        "syncqueue_syncevent": event.pk,
        "auth_user": alice.pk,
        "auth_group": 1,
        "authtoken_tokenproxy": alice.pk,
    }
    return {
        "node": node,
        "issue": issue,
        "attachment": attachment,
        "by_segment": by_segment,
        "admin_objects": admin_objects,
        "content_type": ContentType.objects.get_for_model(Issue).pk,
    }


def url_of(route: str, world: dict) -> str:
    """The route with its parameters filled in with things that exist."""

    def value(match: re.Match) -> str:
        name, before = match["name"], route[: match.start()].rstrip("/").rsplit("/", 1)[-1]
        if name in ("key",):
            return world["issue"].key
        if name == "sha256":
            return world["attachment"].sha256
        if name in ("pk", "number") and before in world["by_segment"]:
            return str(world["by_segment"][before])
        if name in ("comment_id", "attachment_id"):
            return str(world["by_segment"][name.split("_")[0] + "s"])
        if name in ("object_id", "id"):
            model = "_".join(route.split("/")[1:3])
            return str(world["admin_objects"].get(model, 1))
        if name == "content_type_id":
            return str(world["content_type"])
        if name == "app_label":
            return "connections"
        if name == "url":
            return "no-such-page/"
        raise AssertionError(f"Cannot fill <{name}> of {route!r}: teach url_of in {__name__} what it names.")

    filled = re.sub(r"<(?:\w+:)?(?P<name>\w+)>", value, route)
    filled = re.sub(r"\(\?P<(?P<name>\w+)>[^)]*\)", value, filled)
    return "/" + filled.replace("^", "").replace("$", "")


# --- asking ---------------------------------------------------------------------------------------


def client_for(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def ask(client: Client, method: str, url: str):
    if method == "get":
        return client.get(url)
    if url.startswith("/api/"):
        return getattr(client, method)(url, "{}", content_type="application/json")
    return getattr(client, method)(url, {})


def is_login_redirect(response, admin_site: bool) -> bool:
    login = "/admin/login/" if admin_site else "/accounts/login/"
    return response.status_code == 302 and response["Location"].startswith(login)


def refused(route: Route, response, anonymous: bool) -> bool:
    if route.is_admin_site:
        return is_login_redirect(response, admin_site=True) or (not anonymous and response.status_code == 403)
    if anonymous:
        return response.status_code == 401 if route.is_api else is_login_redirect(response, admin_site=False)
    # 405: a read-only page asked to change something has nothing to refuse.
    return response.status_code in (403, 405)


def allowed(route: Route, response) -> bool:
    return response.status_code not in (401, 403) and not (
        is_login_redirect(response, admin_site=False) or is_login_redirect(response, admin_site=True)
    )


def may(role: str, policy: str, method: str) -> bool | None:
    """Whether ``role`` may use the route with ``method``; None when this test leaves it to others."""
    if policy in (PUBLIC, SIGNED):
        return True
    if role == "anonymous":
        return False
    if policy == USER:
        return True
    if policy == STAFF:
        return role in ("bob", "alice")
    if policy == ADMIN_SITE:
        return None if role in ("bob", "alice") else False
    if policy == STAFF_READS:
        return role == "alice" or (role == "bob" and method == "get")
    return role == "alice"


@pytest.mark.parametrize("route", ROUTES, ids=[r.route or "home" for r in ROUTES])
def test_each_gets_what_they_should(route, world, request):
    users = {"anonymous": None, **{name: request.getfixturevalue(name) for name in ("charlie", "bob", "alice")}}
    url = url_of(route.route, world)
    problems = []
    for role, user in users.items():
        client = client_for(user)
        for method in route.methods():
            policy = policy_of(route, method)
            response = ask(client, method, url)
            what = f"{role} {method.upper()} {url} ({policy}) -> {response.status_code}"
            if response.status_code >= 500:
                problems.append(f"{what}: server error")
            elif policy == SIGNED and response.status_code < 400:
                problems.append(f"{what}: answered without a signature")
            elif policy not in (PUBLIC, SIGNED):
                if may(role, policy, method) and not allowed(route, response):
                    problems.append(f"{what}: should be allowed")
                if may(role, policy, method) is False and not refused(route, response, anonymous=user is None):
                    problems.append(f"{what}: should be refused")
    assert not problems, "\n".join(problems)


def test_every_route_has_a_policy():
    for route in ROUTES:
        for method in route.methods():
            policy_of(route, method)


def test_the_walk_finds_the_api_the_pages_and_the_admin():
    routes = {r.route for r in ROUTES}
    assert "api/v1/connections/<int:pk>/" in routes
    assert "connections/<int:pk>/" in routes
    assert "issues/<str:key>/edit/" in routes
    assert "admin/connections/connection/" in routes
    assert len(routes) > 150


def test_a_refused_change_changes_nothing(world, bob, charlie):
    """Spot check that refusal comes before any effect: bob and charlie try to take the connection down."""
    connection = Connection.objects.get()
    for user in (charlie, bob):
        client = client_for(user)
        client.post(f"/connections/{connection.pk}/deactivate/")
        client.post(f"/api/v1/connections/{connection.pk}/deactivate/")
        client.post(f"/api/v1/connections/{connection.pk}/rules/", {"outgoing": "", "incoming": ""})
        client.post(f"/admin/connections/connection/{connection.pk}/delete/", {"post": "yes"})
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE
    assert RulesVersion.objects.filter(connection=connection).count() == 1
