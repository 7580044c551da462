"""Setting the tracker a node serves: ``connections.tracker_settings.save`` and the page at /connections/tracker/.

alice (admin) may change, bob (staff) may look, charlie (no rights) and anonymous may not.
Tests that need a real Redmine read REDMINE_URL, REDMINE_API_KEY and REDMINE_PROJECT, and
skip saying so when they are unset (``scripts/redmine up`` starts one).
"""

from __future__ import annotations

import logging
import os
import re
import socket

import pytest
from django.db import connection as db_connection
from django.test import Client
from django.urls import reverse

from connections import tracker_settings
from connections.models import Node
from connections.tracker_settings import TrackerSettingsError

pytestmark = pytest.mark.django_db

PAGE = "/connections/tracker/"
CHANGE = "/connections/tracker/change/"


@pytest.fixture
def redmine() -> tuple[str, str, str]:
    """(url, api_key, project) of the Redmine the tests may use."""
    values = tuple(os.environ.get(name, "") for name in ("REDMINE_URL", "REDMINE_API_KEY", "REDMINE_PROJECT"))
    if not all(values):
        pytest.skip("REDMINE_URL, REDMINE_API_KEY and REDMINE_PROJECT are not set; scripts/redmine up starts one")
    return values


@pytest.fixture
def closed_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def node(db) -> Node:
    return Node.local()


def _stored_column() -> str:
    with db_connection.cursor() as cursor:
        cursor.execute("SELECT tracker_settings FROM connections_node")
        return cursor.fetchone()[0]


def _assert_untouched(node: Node) -> None:
    node.refresh_from_db()
    assert (node.tracker_kind, node.tracker_settings, node.poll_seconds) == ("builtin", "", None)


def _form_data(**values) -> dict:
    data = dict.fromkeys(("url", "api_key", "project", "status_map", "priority_map", "tracker_map", "poll_seconds"), "")
    return {**data, "kind": "redmine", **values}


# --- the function ------------------------------------------------------------------------------


@pytest.mark.redmine
def test_it_saves_redmine_settings_with_the_key_encrypted_at_rest(node, redmine, caplog):
    url, key, project = redmine
    caplog.set_level(logging.DEBUG)
    account = tracker_settings.save(
        node, "redmine", url=url + "/", api_key=key, project=project, status_map={"Done": 5}, poll_seconds=60
    )
    assert account.id
    node = Node.objects.get()
    assert node.tracker_kind == "redmine"
    assert node.tracker_config() == {"url": url, "api_key": key, "project": project, "status_map": {"Done": 5}}
    assert node.poll_interval() == 60
    assert node.tracker().sync_account() == account
    assert key not in _stored_column()
    assert key not in caplog.text, "the key is never logged"


@pytest.mark.redmine
def test_it_keeps_the_stored_key_only_while_the_url_stays_the_same(node, redmine):
    url, key, project = redmine
    tracker_settings.save(node, "redmine", url=url, api_key=key, project=project)
    tracker_settings.save(node, "redmine", url=url, project=project, tracker_map={"Task": 2})
    assert Node.objects.get().tracker_config()["api_key"] == key

    other_url = url.replace("127.0.0.1", "localhost") if "127.0.0.1" in url else url + "/redmine"
    with pytest.raises(TrackerSettingsError, match="the URL changed: give the API key for it again") as refused:
        tracker_settings.save(node, "redmine", url=other_url, project=project)
    assert refused.value.field == "api_key"
    assert Node.objects.get().tracker_config()["tracker_map"] == {"Task": 2}


@pytest.mark.redmine
def test_it_refuses_a_wrong_key_clearly_and_saves_nothing(node, redmine):
    url, _, project = redmine
    with pytest.raises(TrackerSettingsError) as refused:
        tracker_settings.save(node, "redmine", url=url, api_key="not-the-key-0123456789", project=project)
    assert refused.value.message.startswith("Redmine refused the API key (HTTP 401")
    assert refused.value.field == "api_key"
    assert "not-the-key" not in refused.value.message
    _assert_untouched(node)


@pytest.mark.redmine
def test_it_refuses_a_project_redmine_does_not_have(node, redmine):
    url, key, _ = redmine
    with pytest.raises(TrackerSettingsError, match="Redmine has no project 'no-such-project'") as refused:
        tracker_settings.save(node, "redmine", url=url, api_key=key, project="no-such-project")
    assert refused.value.field == "project"
    _assert_untouched(node)


def test_it_says_it_cannot_reach_a_redmine_that_does_not_answer(node, closed_url):
    with pytest.raises(TrackerSettingsError) as refused:
        tracker_settings.save(node, "redmine", url=closed_url, api_key="key", project="synctest")
    assert refused.value.message == f"cannot reach Redmine at {closed_url}: ConnectionError"
    assert refused.value.field == "url"
    _assert_untouched(node)


@pytest.mark.parametrize(
    ("kind", "values", "field", "message"),
    [
        ("jira", {}, "kind", "unknown tracker kind 'jira'"),
        ("builtin", {"url": "http://127.0.0.1:9"}, "url", "the builtin tracker has no url"),
        ("builtin", {"status_map": {"Done": 5}}, "status_map", "has no status map"),
        ("builtin", {"poll_seconds": 0}, "poll_seconds", "from 1 to 86400, not 0"),
        ("redmine", {"url": "ftp://redmine.example"}, "url", "must be an http(s) URL"),
        ("redmine", {"url": "http://127.0.0.1:9"}, "project", "name the Redmine project"),
        ("redmine", {"url": "http://127.0.0.1:9", "project": "p"}, "api_key", "give the API key"),
        ("redmine", {"poll_seconds": 86401}, "poll_seconds", "not 86401"),
        ("redmine", {"poll_seconds": True}, "poll_seconds", "not True"),
        ("redmine", {"status_map": {"Done": 0}}, "status_map", "the id of 'Done' must be a positive whole number"),
        ("redmine", {"priority_map": {"High": "3"}}, "priority_map", "must be a positive whole number"),
        ("redmine", {"tracker_map": {" ": 3}}, "tracker_map", "a name must be one line of text"),
        ("redmine", {"tracker_map": ["Task"]}, "tracker_map", "expected names mapped to ids"),
    ],
)
def test_it_refuses_bad_values_before_asking_the_tracker(node, kind, values, field, message):
    if kind == "redmine" and "url" not in values:
        values = {"url": "http://127.0.0.1:9", "api_key": "key", "project": "p", **values}
    with pytest.raises(TrackerSettingsError, match=re.escape(message)) as refused:
        tracker_settings.save(node, kind, **values)
    assert refused.value.field == field
    _assert_untouched(node)


def test_it_serves_the_built_in_tracker_at_its_own_poll_interval(node, settings):
    settings.SYNC_POLL_SECONDS = 17
    account = tracker_settings.save(node, "builtin", poll_seconds=5)
    assert account.id == "sync"
    assert Node.objects.get().poll_interval() == 5
    tracker_settings.save(node, "builtin")
    assert Node.objects.get().poll_interval() == 17, "no poll interval of its own means SYNC_POLL_SECONDS"


def test_it_reads_maps_as_name_equals_id_lines():
    lines = ["Done = 5", "", "In Progress=2", "  Won't = fix = 7  "]
    mapping = tracker_settings.parse_map(lines, "status_map")
    assert mapping == {"Done": 5, "In Progress": 2, "Won't = fix": 7}
    assert tracker_settings.parse_map(tracker_settings.format_map(mapping), "status_map") == mapping


@pytest.mark.parametrize(
    ("line", "message"),
    [("Done", "expected Name = id"), ("Done = five", "expected Name = id"), ("= 5", "expected Name = id")],
)
def test_it_refuses_map_lines_it_cannot_read(line, message):
    with pytest.raises(TrackerSettingsError, match=message):
        tracker_settings.parse_map([line], "status_map")


def test_it_refuses_a_name_mapped_twice():
    with pytest.raises(TrackerSettingsError, match="'Done' is given twice"):
        tracker_settings.parse_map(["Done = 5", "Done = 6"], "status_map")


# --- the page ----------------------------------------------------------------------------------


def test_it_is_linked_from_the_connections_page(as_bob):
    assert f'href="{PAGE}"' in as_bob.get(reverse("connections:list")).content.decode()


def test_it_shows_the_built_in_tracker_to_staff_without_the_form(node, as_bob):
    response = as_bob.get(PAGE)
    html = response.content.decode()
    assert response.status_code == 200
    assert "The built-in tracker" in html
    assert "Every 30 seconds" in html
    assert "Sync account</dt><dd>Sync account" in html
    assert "Check and save" not in html
    assert "Only an administrator can change the tracker." in html


@pytest.mark.redmine
def test_it_shows_redmine_settings_without_the_key(node, redmine, as_alice, as_bob):
    url, key, project = redmine
    tracker_settings.save(node, "redmine", url=url, api_key=key, project=project, status_map={"Done": 5})
    staff_page = as_bob.get(PAGE).content.decode()
    for shown in (url, project, "<dt>API key</dt><dd>set</dd>", "<code>Done = 5</code>", "Redmine Admin"):
        assert shown in staff_page
    admin_page = as_alice.get(PAGE).content.decode()
    assert "Check and save" in admin_page
    assert 'name="csrfmiddlewaretoken"' in admin_page
    assert "Done = 5</textarea>" in admin_page
    assert key not in staff_page + admin_page


def test_it_refuses_anonymous_and_users_without_rights(node, as_charlie):
    anonymous = Client()
    assert anonymous.get(PAGE).status_code == 302
    assert as_charlie.get(PAGE).status_code == 403
    data = _form_data(kind="builtin", poll_seconds="5")
    assert anonymous.post(CHANGE, data).status_code == 302
    assert as_charlie.post(CHANGE, data).status_code == 403
    _assert_untouched(node)


def test_it_lets_staff_look_but_not_change(node, as_bob):
    assert as_bob.get(PAGE).status_code == 200
    assert as_bob.post(CHANGE, _form_data(kind="builtin", poll_seconds="5")).status_code == 403
    assert as_bob.post(PAGE, _form_data(kind="builtin", poll_seconds="5")).status_code == 405
    _assert_untouched(node)


def test_it_changes_nothing_on_a_get_or_without_the_csrf_token(node, alice):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    assert browser.get(CHANGE).status_code == 405
    assert browser.post(CHANGE, _form_data(kind="builtin", poll_seconds="5")).status_code == 403
    _assert_untouched(node)


@pytest.mark.redmine
def test_it_saves_what_an_admin_sends(node, redmine, as_alice):
    url, key, project = redmine
    data = _form_data(
        url=url, api_key=key, project=project, status_map="Done = 5\r\nIn Progress = 2", poll_seconds="45"
    )
    response = as_alice.post(CHANGE, data, follow=True)
    assert response.redirect_chain == [(PAGE, 302)]
    assert "Tracker settings saved. The sync writes as Redmine Admin and looks for changes every 45 seconds." in (
        response.content.decode()
    )
    node.refresh_from_db()
    assert node.tracker_kind == "redmine"
    assert node.tracker_config()["status_map"] == {"Done": 5, "In Progress": 2}
    assert node.poll_seconds == 45
    assert key not in _stored_column()

    # Sent again without a key: the stored one stays.
    assert as_alice.post(CHANGE, {**data, "api_key": "", "poll_seconds": ""}).status_code == 302
    node.refresh_from_db()
    assert (node.tracker_config()["api_key"], node.poll_seconds) == (key, None)


@pytest.mark.redmine
def test_it_shows_a_wrong_key_in_the_form(node, redmine, as_alice):
    url, _, project = redmine
    response = as_alice.post(CHANGE, _form_data(url=url, api_key="not-the-key-0123456789", project=project))
    html = response.content.decode()
    assert response.status_code == 200
    assert "Redmine refused the API key (HTTP 401" in response.context["form"].errors["api_key"][0]
    assert "not-the-key" not in html
    _assert_untouched(node)


def test_it_shows_an_unreachable_redmine_in_the_form(node, closed_url, as_alice):
    response = as_alice.post(CHANGE, _form_data(url=closed_url, api_key="key", project="synctest"))
    assert response.status_code == 200
    assert response.context["form"].errors["url"] == [f"Cannot reach Redmine at {closed_url}: ConnectionError"]
    _assert_untouched(node)


def test_it_shows_bad_maps_and_poll_intervals_as_form_errors(node, as_alice):
    data = _form_data(
        url="http://127.0.0.1:9",
        api_key="key",
        project="p",
        status_map="Done",
        tracker_map="Task = 0",
        poll_seconds="0",
    )
    response = as_alice.post(CHANGE, data)
    errors = response.context["form"].errors
    assert response.status_code == 200
    assert errors["status_map"] == ["status map: expected Name = id, got 'Done'"]
    assert errors["tracker_map"] == ["tracker map: the id of 'Task' must be a positive whole number"]
    assert "poll_seconds" in errors
    _assert_untouched(node)


def test_it_ignores_the_redmine_fields_when_the_built_in_tracker_is_chosen(node, as_alice):
    data = _form_data(kind="builtin", url="http://127.0.0.1:9", status_map="unreadable", poll_seconds="12")
    assert as_alice.post(CHANGE, data).status_code == 302
    node.refresh_from_db()
    assert (node.tracker_kind, node.tracker_settings, node.poll_interval()) == ("builtin", "", 12)


def test_it_shows_stored_settings_that_stopped_working_instead_of_failing(node, closed_url, as_bob):
    node.tracker_kind = "redmine"
    node.tracker_settings = f'{{"url": "{closed_url}", "api_key": "key", "project": "synctest"}}'
    node.save()
    response = as_bob.get(PAGE)
    assert response.status_code == 200
    assert f"The tracker does not answer with these settings: cannot reach Redmine at {closed_url}" in (
        response.content.decode()
    )
