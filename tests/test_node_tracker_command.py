"""``manage.py node_tracker``: showing and setting the tracker a node serves, from the shell."""

import io
import os
import re

import pytest
from django.core.management import CommandError, call_command
from django.db import connection as db_connection

from connections.models import Node

REDMINE = [os.environ.get(name) for name in ("REDMINE_URL", "REDMINE_API_KEY", "REDMINE_PROJECT")]
needs_redmine = pytest.mark.skipif(
    not all(REDMINE),
    reason="REDMINE_URL, REDMINE_API_KEY and REDMINE_PROJECT are not set; scripts/redmine up starts one",
)


def run(*args, stdin: str | None = None) -> str:
    out = io.StringIO()
    options = {"stdin": io.StringIO(stdin)} if stdin is not None else {}
    call_command("node_tracker", *args, stdout=out, **options)
    return out.getvalue()


def test_it_shows_the_built_in_tracker_by_default(db, settings):
    settings.SYNC_POLL_SECONDS = 30
    assert run() == "kind: builtin\npoll_seconds: 30 (the SYNC_POLL_SECONDS setting)\n"


def test_it_gives_the_built_in_tracker_a_poll_interval_of_its_own(db):
    assert "looked at every 7 seconds" in run("builtin", "--poll-seconds", "7")
    assert run().endswith("poll_seconds: 7\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jira"], "unknown tracker kind 'jira'"),
        (["--poll-seconds", "5"], "name the tracker kind"),
        (["redmine", "--url", "http://127.0.0.1:9"], "name the Redmine project"),
        (["redmine", "--url", "http://127.0.0.1:9", "--project", "p"], "give the API key"),
        (["builtin", "--url", "http://x"], "the builtin tracker has no url"),
        (["builtin", "--poll-seconds", "0"], "from 1 to 86400, not 0"),
        (["redmine", "--url", "http://127.0.0.1:9", "--api-key", "k", "--project", "p"], "cannot reach Redmine"),
        (["redmine", "--status-map", "Done"], "status map: expected Name = id, got 'Done'"),
        (["redmine", "--api-key", "k", "--api-key-file", "/dev/null"], "not both"),
        (["redmine", "--api-key-file", "/nonexistent/key"], "cannot read the API key from /nonexistent/key"),
        (["redmine", "--api-key-file", "/dev/null"], "no API key in /dev/null"),
    ],
)
def test_it_refuses_bad_settings_and_keeps_the_old_ones(db, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
    node = Node.local()
    assert (node.tracker_kind, node.tracker_settings, node.poll_seconds) == ("builtin", "", None)


def test_it_reads_the_key_from_standard_input(db):
    # Nothing listens at port 9: reaching the network at all shows the key was read.
    with pytest.raises(CommandError, match=re.escape("cannot reach Redmine at http://127.0.0.1:9")):
        run("redmine", "--url", "http://127.0.0.1:9", "--project", "p", "--api-key", "-", stdin="a-key\n")
    with pytest.raises(CommandError, match="no API key in standard input"):
        run("redmine", "--url", "http://127.0.0.1:9", "--project", "p", "--api-key", "-", stdin="\n")


@pytest.mark.redmine
@needs_redmine
def test_it_serves_redmine_with_the_key_from_a_file_encrypted_at_rest(db, tmp_path):
    url, key, project = REDMINE
    key_file = tmp_path / "redmine-key"
    key_file.write_text(key + "\n")
    args = ("--url", url, "--api-key-file", str(key_file), "--project", project, "--poll-seconds", "60")
    maps = ("--status-map", "Done=5", "--status-map", "In Progress = 2", "--tracker-map", "Task=2")
    assert "now serves its redmine tracker, looked at every 60 seconds" in run("redmine", *args, *maps)
    assert Node.local().tracker().sync_account().id

    shown = run()
    assert shown == (
        f"kind: redmine\nurl: {url}\napi_key: set\nproject: {project}\n"
        "status_map: Done = 5, In Progress = 2\npriority_map: none\ntracker_map: Task = 2\npoll_seconds: 60\n"
    )
    assert key not in shown, "the API key is never shown"
    with db_connection.cursor() as cursor:
        cursor.execute("SELECT tracker_settings FROM connections_node")
        assert key not in cursor.fetchone()[0]


@pytest.mark.redmine
@needs_redmine
def test_it_keeps_the_stored_key_when_none_is_given(db):
    url, key, project = REDMINE
    run("redmine", "--url", url, "--api-key", "-", "--project", project, stdin=key)
    run("redmine", "--url", url, "--project", project, "--priority-map", "Urgent=4")
    assert Node.local().tracker_config() == {
        "url": url,
        "api_key": key,
        "project": project,
        "priority_map": {"Urgent": 4},
    }


@pytest.mark.redmine
@needs_redmine
def test_it_says_so_when_redmine_refuses_the_key(db):
    url, _, project = REDMINE
    with pytest.raises(CommandError, match=r"Redmine refused the API key \(HTTP 401"):
        run("redmine", "--url", url, "--api-key", "wrong-key", "--project", project)
    assert Node.local().tracker_kind == "builtin"
