"""What the ``connection_*`` commands share: find a connection, check input, print a connection row.

Input is checked by the REST API's own serializers, so a command accepts exactly what the
API accepts. Output is tab-separated, one record a line, with ``-`` for an empty value.
"""

from __future__ import annotations

from django.core.management.base import CommandError
from rest_framework import serializers

from connections.models import Connection

COLUMNS = ("id", "name", "status", "remote", "url", "rules", "last_contact")


def get_connection(pk: int) -> Connection:
    connection = Connection.objects.select_related("active_rules").filter(pk=pk).first()
    if connection is None:
        raise CommandError(f"There is no connection with id {pk}; connection_list shows them.")
    return connection


def validated(serializer: serializers.Serializer, options: dict[str, str] | None = None) -> dict:
    """The serializer's validated data, or its first error as a CommandError naming the option."""
    if serializer.is_valid():
        return serializer.validated_data
    field, messages = next(iter(serializer.errors.items()))
    name = (options or {}).get(field, field)
    message = messages[0] if isinstance(messages, list) else messages
    raise CommandError(f"{name}: {message}")


def cell(value) -> str:
    """One tab-separated cell: never empty, never containing a tab or a line break."""
    text = " ".join(str(value).split()) if value not in (None, "") else ""
    return text or "-"


def row(connection: Connection) -> str:
    rules = connection.active_rules.number if connection.active_rules else None
    last_contact = connection.last_contact.isoformat() if connection.last_contact else None
    values = (
        connection.pk,
        connection.name,
        connection.status,
        connection.remote_name,
        connection.remote_url,
        rules,
        last_contact,
    )
    return "\t".join(cell(v) for v in values)
