"""JSON through orjson, with the json module's answers wherever orjson would differ."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from django.db import connection

from exalate_web import jsonio
from syncqueue.models import SyncEvent, Twin
from tests.syncpair import connect_red

BIG = 2**70


def test_it_reads_and_writes_what_json_does():
    value = {"summary": "Café ☕", "n": -3, "x": 1.5, "ok": True, "none": None, "list": [1, "two", {"3": []}]}
    assert jsonio.loads(jsonio.dumps(value)) == value == json.loads(jsonio.dumps(value))


def test_it_takes_the_json_modules_way_for_what_orjson_refuses():
    assert jsonio.loads(jsonio.dumps({"big": BIG})) == {"big": BIG}
    assert jsonio.loads(jsonio.dumps({1: "one"})) == {"1": "one"}, "keys become text, as json has them"
    assert jsonio.loads(b'{"big": 1180591620717411303424}') == {"big": BIG}
    assert math.isnan(jsonio.loads("NaN"))
    assert jsonio.loads(jsonio.dumps({"odd": "\ud800"})) == {"odd": "\ud800"}, "a lone surrogate, escaped"


def test_it_refuses_what_json_refuses():
    with pytest.raises(TypeError):
        jsonio.dumps({"when": datetime.now(UTC)})
    with pytest.raises(ValueError):
        jsonio.loads("NaN", parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    with pytest.raises(ValueError):
        jsonio.loads(b"{not json")


@pytest.mark.django_db
def test_the_queues_json_goes_through_orjson_and_keeps_every_value(project):
    twin = Twin.objects.create(connection=connect_red(), local_key="BLUE-1")
    payload = {"replica": {"summary": "Ünïcode", "custom": {"huge": BIG, "half": 0.5}}, "list": [None, True]}
    event = SyncEvent.objects.create(
        connection=twin.connection, twin=twin, direction="outgoing", kind="update", seq=1, payload=payload
    )
    assert SyncEvent.objects.get(pk=event.pk).payload == payload
    SyncEvent.objects.bulk_create(
        [SyncEvent(connection=twin.connection, twin=twin, direction="outgoing", kind="update", seq=2, payload=payload)]
    )
    assert SyncEvent.objects.get(seq=2).payload == payload
    if connection.vendor == "postgresql":
        from psycopg.adapt import PyFormat
        from psycopg.types.json import Jsonb

        dumper = connection.connection.adapters.get_dumper(Jsonb, PyFormat.BINARY)
        assert dumper.__module__ == jsonio.__name__
