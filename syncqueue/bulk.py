"""Writing many rows at once where Django's own way is slow."""

from __future__ import annotations

from collections.abc import Sequence

from django.db import connection as db
from django.db import models

# Rows per statement elsewhere than on PostgreSQL (bulk_update's batch).
CHUNK = 100


def binary_arrays(sender, connection, **kwargs) -> None:
    """On each new PostgreSQL connection (``connection_created``): lists go as binary arrays.

    Django's ``bulk_create`` sends each column as one array (``unnest``), and so does
    ``update_rows``. psycopg sends a list as array text unless told otherwise, escaping
    every quote of every value with a regular expression: a batch of queue events, whose
    payloads are JSON full of quotes, took over ten times as long to send as in binary,
    where nothing is escaped.
    """
    if connection.vendor == "postgresql":
        from psycopg.types.array import ListBinaryDumper

        connection.connection.adapters.register_dumper(list, ListBinaryDumper)


def update_rows(objects: Sequence[models.Model], fields: Sequence[str]) -> None:
    """Save ``fields`` of ``objects`` (all of one model, all saved before) in one statement.

    On PostgreSQL: ``UPDATE ... FROM unnest(<one array per column>)``. Django's
    ``bulk_update`` builds a ``CASE WHEN`` per row and field, and spent more CPU on that
    than the rest of a trigger's page (the rules included); a ``VALUES`` list of one
    parameter per value is a new statement text for every row count, which psycopg parses
    anew each time. One array per column keeps the text the same, so it is parsed once.
    Elsewhere, ``bulk_update``.
    """
    if not objects:
        return
    model = type(objects[0])
    if db.vendor != "postgresql":
        model._default_manager.bulk_update(objects, fields, batch_size=CHUNK)
        return
    meta = model._meta
    columns = [meta.pk, *(meta.get_field(name) for name in fields)]
    quote = db.ops.quote_name
    table = quote(meta.db_table)
    # "varchar(100)[]" is no type: the array takes the bare type, as Django's own unnest insert does.
    arrays = ", ".join(f"%s::{field.db_type(db).split('(')[0]}[]" for field in columns)
    names = ", ".join(f"c{n}" for n in range(len(columns)))
    assignments = ", ".join(f"{quote(field.column)} = v.c{n}" for n, field in enumerate(columns) if n)
    # Names come from the model; every value is a parameter.
    sql = (
        f"UPDATE {table} SET {assignments} FROM unnest({arrays}) AS v({names}) "  # noqa: S608
        f"WHERE {table}.{quote(meta.pk.column)} = v.c0"
    )
    params = [[field.get_db_prep_save(getattr(obj, field.attname), db) for obj in objects] for field in columns]
    with db.cursor() as cursor:
        cursor.execute(sql, params)
