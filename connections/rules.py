"""Saving, checking and activating rules versions; the default rules every connection starts with."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Max

from connections.models import Connection, RulesVersion
from connections.scripting import ScriptError, check_script

DEFAULT_OUTGOING = """\
# Outgoing rules: fill `replica` from the local `issue`; the other side sees only the replica.
replica.summary = issue.summary
replica.description = issue.description
replica.type = issue.type
replica.status = issue.status
replica.priority = issue.priority
replica.labels = issue.labels
replica.assignee = issue.assignee
replica.reporter = issue.reporter
replica.comments = helpers.comments_to_send()
replica.attachments = helpers.attachments_to_send()
"""

DEFAULT_INCOMING = """\
# Incoming rules: set fields of the local `issue` from the remote `replica`.
# `previous` is the last replica received (None on the first sync).
if first_sync:
    issue.project = connection.project
    issue.type = replica.type or "Task"
# Only what changed on the other side since the last sync is applied; a field changed on
# both sides is settled by the connection's conflict policy and recorded.
helpers.merge_fields(
    summary=replica.summary,
    description=replica.description,
    status=helpers.map_value(replica.status, {}, default=replica.status),
    priority=replica.priority,
    labels=replica.labels,
    assignee=helpers.find_user(replica.assignee),
)
helpers.merge_comments()
helpers.merge_attachments()
"""


# Fields only: the same mapping without comments and attachments.
FIELDS_ONLY_OUTGOING = "".join(line + "\n" for line in DEFAULT_OUTGOING.splitlines() if "_to_send()" not in line)
FIELDS_ONLY_INCOMING = "".join(
    line + "\n"
    for line in DEFAULT_INCOMING.splitlines()
    if line not in ("helpers.merge_comments()", "helpers.merge_attachments()")
)

# The rules a new connection can start from: name -> (label, outgoing, incoming).
TEMPLATES = {
    "default": ("Everything: fields, comments and attachments", DEFAULT_OUTGOING, DEFAULT_INCOMING),
    "fields": ("Fields only: no comments or attachments", FIELDS_ONLY_OUTGOING, FIELDS_ONLY_INCOMING),
}


def template_choices() -> list[tuple[str, str]]:
    return [(name, label) for name, (label, _, _) in TEMPLATES.items()]


class RulesError(Exception):
    def __init__(self, error: ScriptError):
        super().__init__(str(error))
        self.error = error


def check(outgoing: str, incoming: str) -> list[ScriptError]:
    return [e for e in (check_script(outgoing, "outgoing"), check_script(incoming, "incoming")) if e is not None]


@transaction.atomic
def save_rules(
    connection: Connection, outgoing: str, incoming: str, *, author=None, comment: str = "", activate: bool = True
) -> RulesVersion:
    """A new version of the rules; refused with RulesError if a script does not compile."""
    errors = check(outgoing, incoming)
    if errors:
        raise RulesError(errors[0])
    connection = Connection.objects.select_for_update().get(pk=connection.pk)
    number = (connection.rules_versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = RulesVersion.objects.create(
        connection=connection, number=number, outgoing=outgoing, incoming=incoming, author=author, comment=comment
    )
    if activate:
        connection.active_rules = version
        connection.save(update_fields=["active_rules"])
    return version


def activate(version: RulesVersion) -> None:
    """Make ``version`` the active rules of its connection (rollback is activating an older one)."""
    Connection.objects.filter(pk=version.connection_id).update(active_rules=version)


def install_template(connection: Connection, name: str = "default", author=None) -> RulesVersion:
    """The first rules of a new connection, from one of TEMPLATES."""
    label, outgoing, incoming = TEMPLATES[name]
    comment = "Default rules" if name == "default" else f"Template: {label}"
    return save_rules(connection, outgoing, incoming, author=author, comment=comment)


def install_defaults(connection: Connection, author=None) -> RulesVersion:
    return install_template(connection, "default", author)
