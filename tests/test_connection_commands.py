"""The connection_* management commands: parseable output, and one clear line on bad input."""

from __future__ import annotations

from io import StringIO
from unittest import mock

import pytest
from django.core.management import CommandError, call_command

from connections import handshake, rules
from connections.management import COLUMNS
from connections.models import Connection, Trigger
from syncqueue.models import SyncEvent, Twin
from tests.test_handshake import RemoteInitiator
from trackers.builtin import actions


def run(*args) -> tuple[str, str]:
    """The command's stdout and stderr."""
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def fails(*args) -> str:
    """The command's error message; it must be one line."""
    with pytest.raises(CommandError) as caught:
        run(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def connection(db):
    connection = Connection.objects.create(
        name="Red", status=Connection.Status.ACTIVE, secret="a" * 64, remote_name="Red node", project="BLUE"
    )
    rules.install_defaults(connection)
    return connection


@pytest.fixture
def pending(db):
    connection, _, _ = handshake.create_invitation("Green")
    return connection


@pytest.fixture
def issue(project, bob):
    return actions.create_issue(project, {"summary": "Login page is blank"}, actor=bob)


# --- connection_invite -----------------------------------------------------------------------


def test_it_prints_an_invitation_code_on_its_own_line(db):
    out, err = run("connection_invite", "Green", "--project", "BLUE", "--hours", "3")
    assert out.count("\n") == 1
    parsed = handshake.parse_code(out.strip())
    connection = Connection.objects.get()
    assert parsed.connection_uuid == str(connection.uuid)
    assert (connection.name, connection.project, connection.status) == ("Green", "BLUE", "pending")
    assert f"Connection {connection.pk} is pending" in err
    assert parsed.expires.isoformat()[:16] in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Green", "--hours", "0"], "--hours: Ensure this value is greater than or equal to 1."),
        (["Green", "--hours", "9999"], "--hours: Ensure this value is less than or equal to 336."),
        (["Green", "--hours", "soon"], "argument --hours: invalid int value: 'soon'"),
        ([""], "name: This field may not be blank."),
        (["Green", "--project", "X" * 51], "--project: Ensure this field has no more than 50 characters."),
    ],
)
def test_it_refuses_a_bad_invitation(db, args, message):
    assert message in fails("connection_invite", *args)
    assert not Connection.objects.exists()


def test_it_refuses_to_invite_without_a_public_url(db, settings):
    settings.NODE_URL = ""
    assert "no public URL" in fails("connection_invite", "Green")


# --- connection_accept -----------------------------------------------------------------------


def test_it_accepts_a_code_and_prints_the_connection(db):
    initiator = RemoteInitiator()
    with mock.patch.object(handshake, "_post", initiator.answer):
        out, _ = run("connection_accept", initiator.code, "--name", "Blue side", "--project", "BLUE")
    connection = Connection.objects.get()
    fields = out.rstrip("\n").split("\t")
    assert fields == [str(connection.pk), "Blue side", "active", "Blue", initiator.url, "1", fields[-1]]
    assert connection.project == "BLUE"
    assert connection.secret == initiator.secret


@pytest.mark.parametrize(
    ("code", "message"),
    [("hello", "should start with EXL1-"), ("EXL1-abc", "damaged"), ("", "code: This field may not be blank.")],
)
def test_it_refuses_a_bad_code(db, code, message):
    with mock.patch.object(handshake, "_post") as post:
        assert message in fails("connection_accept", code)
    post.assert_not_called()
    assert not Connection.objects.exists()


def test_it_says_when_the_other_node_does_not_answer(db):
    down = handshake.HandshakeError("The other node does not answer at http://blue.example:8000.", status=502)
    with mock.patch.object(handshake, "_post", side_effect=down):
        assert fails("connection_accept", RemoteInitiator().code) == down.message
    assert not Connection.objects.exists()


# --- connection_list -------------------------------------------------------------------------


def test_it_lists_connections_tab_separated_with_a_header(connection, pending):
    Connection.objects.filter(pk=connection.pk).update(remote_url="http://red.example:8000", name="Red\tnode")
    out, _ = run("connection_list")
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header == list(COLUMNS)
    assert rows[0][:6] == [str(connection.pk), "Red node", "active", "Red node", "http://red.example:8000", "1"]
    assert rows[0][6] == "-"
    assert rows[1] == [str(pending.pk), "Green", "pending", "-", "-", "1", "-"]


def test_it_lists_nothing_but_the_header_without_connections(db):
    assert run("connection_list")[0] == "\t".join(COLUMNS) + "\n"


# --- connection_activate / connection_deactivate ---------------------------------------------


def test_it_deactivates_and_activates_a_connection(connection):
    out, _ = run("connection_deactivate", str(connection.pk))
    assert out.split("\t")[:3] == [str(connection.pk), "Red", "deactivated"]
    out, _ = run("connection_activate", str(connection.pk))
    assert out.split("\t")[:3] == [str(connection.pk), "Red", "active"]
    connection.refresh_from_db()
    assert connection.status == Connection.Status.ACTIVE


@pytest.mark.parametrize("command", ["connection_activate", "connection_deactivate"])
def test_it_refuses_to_switch_a_pending_connection(command, pending):
    assert "still waiting for the other side" in fails(command, str(pending.pk))
    pending.refresh_from_db()
    assert pending.status == Connection.Status.PENDING


@pytest.mark.parametrize(
    "command", ["connection_activate", "connection_deactivate", "connection_trigger", "connection_sync"]
)
def test_it_names_a_connection_that_does_not_exist(db, command):
    extra = {"connection_trigger": ["project:BLUE"], "connection_sync": ["BLUE-1"]}.get(command, [])
    assert "There is no connection with id 42" in fails(command, "42", *extra)
    assert "invalid int value: 'Red'" in fails(command, "Red", *extra)


# --- connection_rules ------------------------------------------------------------------------


@pytest.fixture
def scripts(tmp_path):
    def write(outgoing: str, incoming: str = "") -> tuple[str, str]:
        (tmp_path / "out.py").write_text(outgoing)
        (tmp_path / "in.py").write_text(incoming)
        return str(tmp_path / "out.py"), str(tmp_path / "in.py")

    return write


def test_it_saves_rules_from_files_as_a_new_active_version(connection, scripts):
    texts = ("replica.summary = issue.summary\n", "    \n# kept byte for byte\n")
    outgoing, incoming = scripts(*texts)
    args = ("--outgoing", outgoing, "--incoming", incoming, "--comment", "summary only")
    out, _ = run("connection_rules", str(connection.pk), *args)
    assert out == "2\n"
    connection.refresh_from_db()
    version = connection.active_rules
    assert (version.number, version.comment, version.author) == (2, "summary only", None)
    assert (version.outgoing, version.incoming) == texts


def test_it_refuses_rules_that_do_not_compile_with_the_line(connection, scripts):
    outgoing, incoming = scripts("replica.summary = issue.summary\n", "issue.summary = replica.summary\nif\n")
    message = fails("connection_rules", str(connection.pk), "--outgoing", outgoing, "--incoming", incoming)
    assert message.startswith("Rules not saved: incoming rules, line 2:")
    assert connection.rules_versions.count() == 1


def test_it_says_which_rules_file_it_cannot_read(connection, scripts, tmp_path):
    outgoing, _ = scripts("")
    (tmp_path / "binary.py").write_bytes(b"\xff\xfe\x00")
    missing = str(tmp_path / "nope.py")
    message = fails("connection_rules", str(connection.pk), "--outgoing", outgoing, "--incoming", missing)
    assert message == f"--incoming: cannot read {missing}: No such file or directory."
    binary = str(tmp_path / "binary.py")
    message = fails("connection_rules", str(connection.pk), "--outgoing", binary, "--incoming", outgoing)
    assert message == f"--outgoing: cannot read {binary}: not UTF-8 text."
    assert connection.rules_versions.count() == 1


def test_it_wants_both_rules_files(connection, scripts):
    outgoing, _ = scripts("")
    assert "--incoming" in fails("connection_rules", str(connection.pk), "--outgoing", outgoing)


def test_it_refuses_a_comment_too_long(connection, scripts):
    outgoing, incoming = scripts("")
    args = ("connection_rules", str(connection.pk), "--outgoing", outgoing, "--incoming", incoming)
    assert fails(*args, "--comment", "x" * 301).startswith("--comment: Ensure this field has no more than 300")


# --- connection_trigger ----------------------------------------------------------------------


def test_it_adds_a_filter_trigger(connection):
    out, _ = run("connection_trigger", str(connection.pk), "project:BLUE label:sync")
    trigger = Trigger.objects.get()
    assert out == f"{trigger.pk}\n"
    assert (trigger.connection, trigger.query, trigger.active) == (connection, "project:BLUE label:sync", True)


@pytest.mark.parametrize(("query", "message"), [("colour:red", "unknown field 'colour'"), ("", "may not be blank")])
def test_it_refuses_a_trigger_the_tracker_cannot_read(connection, query, message):
    assert message in fails("connection_trigger", str(connection.pk), query)
    assert not Trigger.objects.exists()


# --- connection_sync -------------------------------------------------------------------------


def test_it_syncs_one_entity_now(connection, issue):
    out, _ = run("connection_sync", str(connection.pk), issue.key)
    event = SyncEvent.objects.get()
    assert out == f"{event.pk}\tpending\n"
    assert (event.direction, event.twin.local_key) == ("outgoing", issue.key)
    assert event.payload["replica"]["summary"] == "Login page is blank"


def test_it_syncs_again_by_hand_even_when_nothing_changed(connection, issue):
    run("connection_sync", str(connection.pk), issue.key)
    run("connection_sync", str(connection.pk), issue.key)
    assert SyncEvent.objects.count() == 2


def test_it_refuses_to_sync_what_does_not_exist(connection, project):
    assert fails("connection_sync", str(connection.pk), "BLUE-99") == "BLUE-99 not synced: no issue BLUE-99."
    assert not Twin.objects.exists()


def test_it_refuses_to_sync_on_a_pending_connection(pending, issue):
    assert "not active yet" in fails("connection_sync", str(pending.pk), issue.key)


def test_it_reports_the_failing_line_of_the_outgoing_rules(connection, issue):
    rules.save_rules(connection, "replica.summary = issue.summary\nreplica.x = 1 / 0\n", "")
    message = fails("connection_sync", str(connection.pk), issue.key)
    assert message.startswith(f"{issue.key} not synced: outgoing rules, line 2:")
    assert Twin.objects.get().state == Twin.State.BLOCKED


def test_it_says_when_the_rules_chose_not_to_sync(connection, issue):
    rules.save_rules(connection, "helpers.stop_sync('not this one')\n", "")
    out, err = run("connection_sync", str(connection.pk), issue.key)
    assert out == ""
    assert "chose not to sync" in err
    assert not SyncEvent.objects.exists()


def test_it_warns_that_a_blocked_entity_waits_for_resolve_and_retry(connection, issue):
    rules.save_rules(connection, "replica.x = 1 / 0\n", "")
    fails("connection_sync", str(connection.pk), issue.key)
    rules.save_rules(connection, rules.DEFAULT_OUTGOING, rules.DEFAULT_INCOMING)
    out, err = run("connection_sync", str(connection.pk), issue.key)
    assert out.endswith("\tpending\n")
    assert "blocked" in err and "resolve" in err
