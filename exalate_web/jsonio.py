"""JSON in and out through orjson, with the standard library where orjson says no.

A sync spends much of its time turning replicas into JSON and back: payloads to and from
PostgreSQL, message bodies, a rules run's output. orjson does that several times faster
than the ``json`` module. It refuses a few things ``json`` takes (integers beyond 64 bits,
keys that are not text, a NaN or Infinity to read); those go the ``json`` module's way,
and what ``json`` refused (a date, a dataclass) is refused still. Unlike ``json``, orjson
writes a NaN or Infinity as null; the sync refuses them before anything is written (a
message's body, a script's output).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
from django.db import models
from psycopg.types.json import Jsonb, JsonbBinaryDumper, JsonbDumper

# Dates and dataclasses go to ``default`` (or are refused) as the json module has them.
_AS_JSON_DOES = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def dumps(value: Any, *, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON of ``value``."""
    try:
        return orjson.dumps(value, default=default, option=_AS_JSON_DOES)
    except orjson.JSONEncodeError:
        # As before orjson: a lone surrogate, which UTF-8 cannot carry, goes out escaped.
        return json.dumps(value, default=default, separators=(",", ":")).encode()


def loads(data: bytes | str, **fallback: Any) -> Any:
    """``data`` read as JSON; ``fallback`` are the ``json.loads`` arguments for what orjson refuses."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data, **fallback)


class JSONField(models.JSONField):
    """Django's JSONField, read through orjson. (Migrations see Django's own: nothing in the
    database differs.) Written through orjson on PostgreSQL, by ``for_postgresql``."""

    def from_db_value(self, value, expression, connection):
        if isinstance(value, str) and self.decoder is None:
            try:
                return orjson.loads(value)
            except orjson.JSONDecodeError:
                pass  # Django's way, and its answer
        return super().from_db_value(value, expression, connection)

    def deconstruct(self):
        name, _, args, kwargs = super().deconstruct()
        return name, "django.db.models.JSONField", args, kwargs


def for_postgresql(sender, connection, **kwargs) -> None:
    """On each new PostgreSQL connection (``connection_created``): jsonb values go out through orjson."""
    if connection.vendor == "postgresql":
        connection.connection.adapters.register_dumper(Jsonb, _JsonbDumper)
        connection.connection.adapters.register_dumper(Jsonb, _JsonbBinaryDumper)


def _plain(obj: Any) -> bool:
    # Django wraps a JSONField's value with json.dumps as its encoder, unless the field names
    # an encoder of its own, which is then used as it is.
    return isinstance(obj, Jsonb) and obj.dumps is json.dumps


class _JsonbDumper(JsonbDumper):
    def dump(self, obj: Any):
        return dumps(obj.obj) if _plain(obj) else super().dump(obj)


class _JsonbBinaryDumper(JsonbBinaryDumper):
    def dump(self, obj: Any):
        return b"\x01" + dumps(obj.obj) if _plain(obj) else super().dump(obj)
