"""The admin for connections, rules, twins and events: staff look, superusers act."""

from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.utils import timezone

from connections import handshake, rules
from connections.models import Connection, RulesVersion, Trigger
from syncqueue.models import SyncEvent, Twin


@pytest.fixture
def connection(db):
    connection = Connection.objects.create(
        name="Red", status=Connection.Status.ACTIVE, secret="s3cr3t" * 10, remote_name="Red node", project="BLUE"
    )
    rules.install_defaults(connection)
    connection.refresh_from_db()
    return connection


@pytest.fixture
def blocked_twin(connection):
    twin = Twin.objects.create(
        connection=connection, local_key="BLUE-1", remote_key="RED-1", state=Twin.State.BLOCKED, blocked_reason="boom"
    )
    SyncEvent.objects.create(
        connection=connection,
        twin=twin,
        direction="incoming",
        seq=1,
        status=SyncEvent.Status.FAILED,
        error="boom",
        payload={"replica": {}},
    )
    return twin


def act(client, url, action, *pks):
    return client.post(url, {"action": action, ACTION_CHECKBOX_NAME: [str(p) for p in pks]}, follow=True)


CL = "/admin/connections/connection/"
RV = "/admin/connections/rulesversion/"
TW = "/admin/syncqueue/twin/"
EV = "/admin/syncqueue/syncevent/"


def test_staff_see_everything(as_bob, connection, blocked_twin):
    for url in (
        CL,
        f"{CL}{connection.pk}/change/",
        RV,
        f"{RV}{connection.active_rules_id}/change/",
        TW,
        f"{TW}{blocked_twin.pk}/change/",
        EV,
        f"{EV}{blocked_twin.events.get().pk}/change/",
        "/admin/",
    ):
        r = as_bob.get(url)
        assert r.status_code == 200, url
    page = as_bob.get(CL).content.decode()
    assert "Red node" in page and "v1" in page
    assert 'name="action"' not in page  # no actions for staff
    assert as_bob.get(f"{RV}add/").status_code == 403
    r = as_bob.post(f"{CL}{connection.pk}/change/", {"name": "Hacked", "project": "", "remote_url": ""})
    assert r.status_code == 403


def test_plain_users_see_nothing(client, charlie, connection):
    client.force_login(charlie)
    assert client.get(CL).status_code == 302


def test_secret_never_shown(as_alice, connection):
    page = as_alice.get(f"{CL}{connection.pk}/change/").content.decode()
    assert "s3cr3t" not in page
    assert "set" in page
    assert as_alice.get(f"{CL}add/").status_code == 403


def test_alice_edits_name_and_trigger(as_alice, connection, project):
    data = {
        "name": "Red 2",
        "project": "BLUE",
        "remote_url": "http://red.example",
        "conflict_policy": "newest",
        "triggers-TOTAL_FORMS": "1",
        "triggers-INITIAL_FORMS": "0",
        "triggers-MIN_NUM_FORMS": "0",
        "triggers-MAX_NUM_FORMS": "1000",
        "triggers-0-query": "colour:red",
        "triggers-0-active": "on",
    }
    r = as_alice.post(f"{CL}{connection.pk}/change/", data)
    assert r.status_code == 200 and "unknown field" in r.content.decode()
    data["triggers-0-query"] = "project:BLUE"
    r = as_alice.post(f"{CL}{connection.pk}/change/", data)
    assert r.status_code == 302, r.content.decode()[:3000]
    connection.refresh_from_db()
    assert connection.name == "Red 2" and connection.secret == "s3cr3t" * 10
    assert (connection.status, connection.conflict_policy) == ("active", "newest")
    assert Trigger.objects.get().query == "project:BLUE"


def test_actions_activate_deactivate(as_alice, connection, db):
    pending, _, _ = handshake.create_invitation("Green")
    r = act(as_alice, CL, "deactivate", connection.pk, pending.pk)
    page = r.content.decode()
    assert "1 connection(s) deactivated" in page and "still waiting" in page
    connection.refresh_from_db()
    assert connection.status == "deactivated"
    act(as_alice, CL, "activate", connection.pk)
    connection.refresh_from_db()
    assert connection.status == "active"


def test_delete_connection(as_alice, connection, blocked_twin):
    r = as_alice.post(f"{CL}{connection.pk}/delete/", {"post": "yes"})
    assert r.status_code == 302, (r.status_code, r.content.decode()[-1500:])
    assert not Connection.objects.exists()


def test_rules_add_checks_scripts(as_alice, alice, connection):
    page = as_alice.get(f"{RV}add/?connection={connection.pk}").content.decode()
    assert "helpers.merge_comments()" in page
    r = as_alice.post(
        f"{RV}add/",
        {"connection": connection.pk, "outgoing": "x = 1\nif\n", "incoming": "", "comment": "bad", "activate": "on"},
    )
    assert r.status_code == 200
    assert "outgoing rules, line 2" in r.content.decode()
    assert RulesVersion.objects.count() == 1
    r = as_alice.post(
        f"{RV}add/",
        {
            "connection": connection.pk,
            "outgoing": "  \nreplica.summary = issue.summary\n",
            "incoming": "",
            "comment": "less",
            "activate": "on",
        },
    )
    assert r.status_code == 302, r.content.decode()[:3000]
    version = RulesVersion.objects.get(number=2)
    assert version.author == alice and version.outgoing.startswith("  \n")
    connection.refresh_from_db()
    assert connection.active_rules == version
    # read-only existing
    page = as_alice.get(f"{RV}{version.pk}/change/").content.decode()
    assert 'name="_save"' not in page and "Start a new version" in page
    r = as_alice.post(f"{RV}{version.pk}/change/", {"comment": "x"})
    assert r.status_code == 403
    page = as_alice.get(f"{RV}add/?from={connection.rules_versions.get(number=1).pk}").content.decode()
    assert "helpers.merge_comments()" in page
    # no activate
    r = as_alice.post(f"{RV}add/", {"connection": connection.pk, "outgoing": "", "incoming": "", "comment": ""})
    assert r.status_code == 302
    connection.refresh_from_db()
    assert connection.active_rules.number == 2


def test_rules_rollback(as_alice, connection):
    v2 = rules.save_rules(connection, "", "")
    v1 = connection.rules_versions.get(number=1)
    page = act(as_alice, RV, "activate_version", v1.pk, v2.pk).content.decode()
    assert "exactly one" in page
    page = act(as_alice, RV, "activate_version", v1.pk).content.decode()
    assert "is now active" in page
    connection.refresh_from_db()
    assert connection.active_rules == v1


def test_twin_actions(as_alice, blocked_twin):
    page = act(as_alice, TW, "resolve_and_retry", blocked_twin.pk).content.decode()
    assert "1 twin(s) unblocked, 1 event(s) retried" in page
    blocked_twin.refresh_from_db()
    assert blocked_twin.state == "ok"
    act(as_alice, TW, "stop_syncing", blocked_twin.pk)
    blocked_twin.refresh_from_db()
    assert blocked_twin.state == "stopped"


def test_twin_actions_not_for_bob(as_bob, blocked_twin):
    act(as_bob, TW, "resolve_and_retry", blocked_twin.pk)
    blocked_twin.refresh_from_db()
    assert blocked_twin.state == "blocked"


def test_event_list_filter_search_retry(as_alice, blocked_twin, django_assert_max_num_queries):
    event = blocked_twin.events.get()
    for params in (
        "?status__exact=failed",
        "?direction__exact=incoming",
        "?kind__exact=update",
        f"?connection__id__exact={blocked_twin.connection_id}",
        f"?q={str(event.message_id)[:8]}",
        f"?q={event.message_id}",
        "?q=zzz",
    ):
        r = as_alice.get(EV + params)
        assert r.status_code == 200, params
    assert str(event.pk) in as_alice.get(f"{EV}?q={event.message_id}").content.decode()
    page = act(as_alice, EV, "retry", event.pk).content.decode()
    assert "1 failed event(s) of 1 twin(s) retried" in page
    event.refresh_from_db()
    assert event.status == "pending" and event.next_attempt <= timezone.now()
    assert as_alice.get(f"{EV}add/").status_code == 403
    assert as_alice.post(f"{EV}{event.pk}/delete/", {"post": "yes"}).status_code == 403


def test_lists_do_not_query_per_row(as_alice, connection, django_assert_max_num_queries):
    for n in range(2, 12):
        rules.save_rules(connection, "", "", comment=str(n))
        other = Connection.objects.create(name=f"C{n}", status="active")
        rules.install_defaults(other)
        twin = Twin.objects.create(connection=other, local_key=f"BLUE-{n}", remote_key=f"R-{n}")
        SyncEvent.objects.create(connection=other, twin=twin, direction="outgoing", seq=1)
    for url in (CL, RV, TW, EV):
        with django_assert_max_num_queries(12):
            assert as_alice.get(url).status_code == 200


# --- the rule editor -------------------------------------------------------------------------


def test_it_edits_scripts_in_the_ace_editor(as_alice, connection):
    page = as_alice.get(f"{RV}add/?connection={connection.pk}").content.decode()
    assert page.count('class="django-ace-widget loading"') == 2
    assert 'data-mode="python"' in page and 'data-theme="chrome"' in page and 'data-showgutter="true"' in page
    assert "/static/django_ace/ace/ace.js" in page and "/static/django_ace/widget.js" in page
    for asset in ("django_ace/ace/ace.js", "django_ace/widget.js", "django_ace/ace/mode-python.js"):
        r = as_alice.get(f"/static/{asset}")
        assert r.status_code == 200, asset
        r.close()


def test_it_shows_a_saved_version_in_a_read_only_editor(as_bob, connection):
    page = as_bob.get(f"{RV}{connection.active_rules_id}/change/").content.decode()
    assert page.count('data-readonly="true"') == 2 and "helpers.merge_comments()" in page
    assert "/static/django_ace/ace/ace.js" in page
    assert "Activate this version" not in page  # active already, and bob may not


def test_it_names_the_line_and_its_text_of_a_script_error(as_alice, connection):
    data = {"connection": connection.pk, "outgoing": "", "incoming": "x = 1\n\n  y = 2\n", "comment": ""}
    page = as_alice.post(f"{RV}add/", data).content.decode()
    assert "incoming rules, line 3: " in page and "(line 3 reads: y = 2)" in page


def test_it_lists_the_versions_of_one_connection(as_bob, connection, alice):
    rules.save_rules(connection, "", "", author=alice, comment="Only <summary>", activate=False)
    other = Connection.objects.create(name="Green", status="active")
    rules.save_rules(other, "", "", comment="Green's own")
    page = as_bob.get(f"{RV}?connection__id__exact={connection.pk}").content.decode()
    assert "Only &lt;summary&gt;" in page and "Default rules" in page and "Green&#x27;s own" not in page
    assert "alice" in page and page.count('alt="True"') == 1
    assert f"{RV}testrun/?connection={connection.pk}" in page and f"{RV}compare/" in page
    assert f"{RV}?connection__id__exact={connection.pk}" in as_bob.get(f"{CL}{connection.pk}/change/").content.decode()


def test_it_compares_two_versions_escaped(as_bob, connection):
    v1 = connection.active_rules
    outgoing = v1.outgoing.replace(
        "replica.labels = issue.labels\n", "replica.labels = ['<script>alert(1)</script>']\n"
    )
    v2 = rules.save_rules(connection, outgoing, v1.incoming + "issue.type = 'Bug'\n", activate=False)
    page = act(as_bob, RV, "compare_versions", v2.pk, v1.pk).content.decode()
    assert "<script>alert(1)" not in page
    assert "replica.labels = [&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;]" in page
    outgoing_diff = page[page.index('id="diff-outgoing"') : page.index('id="diff-incoming"')]
    assert outgoing_diff.index('class="removed"') < outgoing_diff.index("replica.labels = issue.labels")
    assert outgoing_diff.index("replica.labels = issue.labels") < outgoing_diff.index('class="added"')
    incoming_diff = page[page.index('id="diff-incoming"') :]
    assert 'class="removed"' not in incoming_diff and "issue.type = &#x27;Bug&#x27;" in incoming_diff
    assert as_bob.get(f"{RV}compare/?old={v1.pk}&new={v1.pk}").content.decode().count("No difference.") == 2
    assert "exactly two" in act(as_bob, RV, "compare_versions", v1.pk).content.decode()
    assert as_bob.get(f"{RV}compare/").status_code == 200


def test_it_rolls_back_with_the_button_on_the_version_page(as_alice, connection):
    v1 = connection.active_rules
    rules.save_rules(connection, "", "")
    page = as_alice.get(f"{RV}{v1.pk}/change/").content.decode()
    assert f'formaction="{RV}{v1.pk}/activate/"' in page and "Compare with the active version" in page
    assert as_alice.get(f"{RV}{v1.pk}/activate/").status_code == 405
    r = as_alice.post(f"{RV}{v1.pk}/activate/", follow=True)
    assert "is now active" in r.content.decode()
    connection.refresh_from_db()
    assert connection.active_rules == v1


def test_staff_compare_and_test_run_but_do_not_activate(as_bob, connection):
    v1 = connection.active_rules
    v2 = rules.save_rules(connection, "", "")
    page = as_bob.get(f"{RV}{v1.pk}/change/").content.decode()
    assert "Activate this version" not in page and "Compare with the active version" in page
    assert as_bob.post(f"{RV}{v1.pk}/activate/").status_code == 403
    act(as_bob, RV, "activate_version", v1.pk)
    connection.refresh_from_db()
    assert connection.active_rules == v2
    assert as_bob.get(f"{RV}compare/?old={v1.pk}&new={v2.pk}").status_code == 200
    assert as_bob.get(f"{RV}testrun/").status_code == 200


def test_plain_users_reach_no_rule_editor_page(client, charlie, connection):
    client.force_login(charlie)
    v1 = connection.active_rules
    for url in (f"{RV}testrun/", f"{RV}compare/", f"{RV}{v1.pk}/change/"):
        assert client.get(url).status_code == 302, url
    assert client.post(f"{RV}{v1.pk}/activate/").status_code == 302
    connection.refresh_from_db()
    assert connection.active_rules == v1
