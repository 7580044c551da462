"""Writing many rows at once where Django's own way is slow."""

from __future__ import annotations

from collections.abc import Sequence

from django.db import connection as db
from django.db import models

# Rows per statement: 100 rows of a dozen columns stay far inside PostgreSQL's parameter limit.
CHUNK = 100


def update_rows(objects: Sequence[models.Model], fields: Sequence[str]) -> None:
    """Save ``fields`` of ``objects`` (all of one model, all saved before) in one statement per CHUNK.

    On PostgreSQL: ``UPDATE ... FROM (VALUES ...)``, each value cast to its column's type.
    Django's ``bulk_update`` builds a ``CASE WHEN`` per row and field, and spent more CPU on
    that than the rest of a trigger's page (the rules included). Elsewhere, ``bulk_update``.
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
    row = "(" + ", ".join(f"CAST(%s AS {field.db_type(db)})" for field in columns) + ")"
    assignments = ", ".join(f"{quote(field.column)} = v.column{n}" for n, field in enumerate(columns[1:], start=2))
    for start in range(0, len(objects), CHUNK):
        chunk = objects[start : start + CHUNK]
        params = [field.get_db_prep_save(getattr(obj, field.attname), db) for obj in chunk for field in columns]
        # Names come from the model; every value is a parameter.
        sql = (
            f"UPDATE {quote(meta.db_table)} SET {assignments} "  # noqa: S608
            f"FROM (VALUES {', '.join([row] * len(chunk))}) AS v "
            f"WHERE {quote(meta.db_table)}.{quote(meta.pk.column)} = v.column1"
        )
        with db.cursor() as cursor:
            cursor.execute(sql, params)
