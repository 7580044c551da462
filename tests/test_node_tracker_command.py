import io
import os

import pytest
from django.core.management import CommandError, call_command
from django.db import connection as db_connection

from connections.models import Node

REDMINE = [os.environ.get(name) for name in ("REDMINE_URL", "REDMINE_API_KEY", "REDMINE_PROJECT")]
needs_redmine = pytest.mark.skipif(
    not all(REDMINE),
    reason="REDMINE_URL, REDMINE_API_KEY and REDMINE_PROJECT are not set; scripts/redmine up starts one",
)


def run(*args) -> str:
    out = io.StringIO()
    call_command("node_tracker", *args, stdout=out)
    return out.getvalue()


def test_it_shows_the_built_in_tracker_by_default(db):
    assert run().startswith("builtin\t{}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jira"], "unknown tracker kind 'jira'"),
        (["redmine", "--url", "http://127.0.0.1:9"], "needs --api-key, --project"),
        (["builtin", "--url", "http://x"], "are for Redmine"),
        (["redmine", "--url", "http://127.0.0.1:9", "--api-key", "k", "--project", "p"], "does not work"),
    ],
)
def test_it_refuses_bad_settings_and_keeps_the_old_ones(db, args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert Node.local().tracker_kind == "builtin"


@pytest.mark.redmine
@needs_redmine
def test_it_serves_redmine_with_the_key_encrypted_at_rest(db):
    url, key, project = REDMINE
    assert "now serves its redmine tracker" in run("redmine", "--url", url, "--api-key", key, "--project", project)
    node = Node.local()
    assert node.tracker().sync_account().id
    assert key not in run(), "the API key is never shown"
    with db_connection.cursor() as cursor:
        cursor.execute("SELECT tracker_settings FROM connections_node")
        assert key not in cursor.fetchone()[0]


@pytest.mark.redmine
@needs_redmine
def test_it_says_so_when_redmine_refuses_the_key(db):
    url, _, project = REDMINE
    with pytest.raises(CommandError, match="does not work with these settings"):
        run("redmine", "--url", url, "--api-key", "wrong-key", "--project", project)
