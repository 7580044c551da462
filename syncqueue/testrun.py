"""Test Run: what draft rules would do to real issues and replicas, without writing anything.

The draft is an unsaved ``RulesVersion`` (the processors only read its scripts). Every run
happens inside a transaction that is always rolled back, so even a helper that wrote by
mistake would leave no trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from connections.models import Connection, RulesVersion
from connections.scripting import ScriptError, StopSync
from syncqueue import flow, processors
from syncqueue.models import Twin
from syncqueue.replica import entity_view
from trackers.base import Tracker, TrackerError

MAX_KEYS = 20


class TestRunError(Exception):
    """The Test Run cannot start (bad input); the message says why, in plain words."""

    __test__ = False  # not a pytest test class, whatever its name


@dataclass
class Failure:
    """Why a run gave no result: a script error (with its line), a stop, or the tracker."""

    message: str
    line: int | None = None
    source_line: str = ""
    stopped: bool = False

    @classmethod
    def of(cls, error: Exception, rules: RulesVersion) -> Failure:
        if isinstance(error, ScriptError):
            source = rules.outgoing if error.script == "outgoing" else rules.incoming
            return cls(str(error), line=error.line, source_line=source_line(source, error.line))
        if isinstance(error, StopSync):
            return cls(f"the rules stopped the sync: {error.reason or 'no reason given'}", stopped=True)
        return cls(str(getattr(error, "message", error)))


@dataclass
class OutgoingResult:
    key: str
    replica: dict | None = None
    debug: list[str] = field(default_factory=list)
    failure: Failure | None = None

    @property
    def replica_json(self) -> str:
        return json.dumps(self.replica, indent=2, sort_keys=True, ensure_ascii=False)


@dataclass
class FieldChange:
    name: str
    old: Any
    new: Any

    @property
    def old_json(self) -> str:
        return json.dumps(self.old, ensure_ascii=False)

    @property
    def new_json(self) -> str:
        return json.dumps(self.new, ensure_ascii=False)


@dataclass
class Operation:
    """One planned comment or attachment change, as the admin reads it."""

    action: str
    remote_id: str
    local_id: str | None
    detail: str


@dataclass
class IncomingResult:
    source: str
    local_key: str | None
    create: bool = False
    project: str | None = None
    changes: list[FieldChange] = field(default_factory=list)
    comments: list[Operation] = field(default_factory=list)
    attachments: list[Operation] = field(default_factory=list)
    debug: list[str] = field(default_factory=list)
    failure: Failure | None = None

    @property
    def changes_nothing(self) -> bool:
        return not (self.create or self.changes or self.comments or self.attachments)


def source_line(source: str, line: int | None) -> str:
    """The text of line ``line`` (1-based) of ``source``, to show next to an error."""
    lines = source.splitlines()
    return lines[line - 1] if line and 0 < line <= len(lines) else ""


def draft_rules(connection: Connection, outgoing: str, incoming: str) -> RulesVersion:
    """Draft rules for a Test Run; never saved."""
    return RulesVersion(connection=connection, outgoing=outgoing, incoming=incoming)


@contextmanager
def nothing_written() -> Iterator[None]:
    """Whatever happens inside is rolled back, even when it succeeds."""
    with transaction.atomic():
        try:
            yield
        finally:
            transaction.set_rollback(True)


def parse_keys(text: str) -> list[str]:
    """Issue keys separated by commas, spaces or lines, in order, each once."""
    keys = list(dict.fromkeys(k.strip().upper() for k in text.replace(",", " ").split() if k.strip()))
    if len(keys) > MAX_KEYS:
        raise TestRunError(f"at most {MAX_KEYS} issue keys at a time, not {len(keys)}")
    return keys


def parse_replica(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise TestRunError(f"the pasted replica is not valid JSON: {e.msg} ({where})") from None
    if not isinstance(value, Mapping):
        raise TestRunError('the pasted replica must be a JSON object, like {"summary": "..."}')
    return dict(value)


def run_outgoing(
    connection: Connection, rules: RulesVersion, keys: list[str], *, tracker: Tracker | None = None
) -> list[OutgoingResult]:
    """The replica the outgoing rules make of each local issue, or why they made none."""
    tracker = tracker or flow.local_tracker()
    results = []
    with nothing_written():
        twins = {t.local_key: t for t in Twin.objects.filter(connection=connection, local_key__in=keys)}
        for key in keys:
            result = OutgoingResult(key=key)
            try:
                entity = tracker.get(key)
                result.replica, result.debug = processors.run_outgoing(connection, rules, entity, twins.get(key))
            except (ScriptError, StopSync, TrackerError) as e:
                result.failure = Failure.of(e, rules)
            results.append(result)
    return results


def run_incoming(
    connection: Connection,
    rules: RulesVersion,
    *,
    twin: Twin | None = None,
    replica: Mapping[str, Any] | None = None,
    tracker: Tracker | None = None,
) -> IncomingResult:
    """What the incoming rules would change on the local issue for ``replica``.

    Without ``replica`` the twin's last received one is used. With a twin, ``previous`` is
    its last received replica and the local issue is the twin's; without one, it is a first sync.
    """
    if twin is not None and twin.connection_id != connection.pk:
        raise TestRunError(f"twin {twin} belongs to another connection")
    if replica is None:
        if twin is None:
            raise TestRunError("choose a twin or paste a replica")
        # The message waiting or failed is what a fix has to handle; else the last one applied.
        waiting = (
            twin.events.filter(direction="incoming", kind__in=("update", "ack"), status__in=("failed", "pending"))
            .order_by("seq")
            .first()
        )
        if waiting is not None and waiting.payload.get("replica"):
            replica, source = (
                waiting.payload["replica"],
                f"{waiting.get_status_display().lower()} message #{waiting.seq} of twin {twin}",
            )
        elif twin.last_received is not None:
            replica, source = twin.last_received, f"last replica received by twin {twin}"
        else:
            raise TestRunError(f"twin {twin} has received nothing yet; paste a replica instead")
    else:
        source = f"pasted replica, applied to twin {twin}" if twin else "pasted replica, as a first sync"
    tracker = tracker or flow.local_tracker()
    local_key = twin.local_key if twin else None
    result = IncomingResult(source=source, local_key=local_key)
    with nothing_written():
        try:
            entity = tracker.get(local_key) if local_key else None
            plan = processors.plan_incoming(
                connection,
                rules,
                replica,
                twin.last_received if twin else None,
                entity,
                twin,
                find_user=flow.find_user_for(tracker),
            )
        except (ScriptError, StopSync, TrackerError) as e:
            result.failure = Failure.of(e, rules)
            return result
    before = entity_view(entity)
    result.create, result.project, result.debug = plan.create, plan.project, plan.debug
    result.changes = [FieldChange(name, _old_value(before, name), new) for name, new in plan.fields.items()]
    result.comments = [_comment_operation(op) for op in plan.comments]
    result.attachments = [_attachment_operation(op) for op in plan.attachments]
    return result


def _old_value(before: dict, name: str) -> Any:
    # The plan names an assignee by id; the entity holds the whole person.
    if name == "assignee":
        return before["assignee"]["id"] if before["assignee"] else None
    return before[name]


def _comment_operation(op: tuple) -> Operation:
    if op[0] == "add":
        return Operation("add", op[1], None, op[2])
    if op[0] == "update":
        return Operation("update", op[1], op[2], op[3])
    return Operation(op[0], op[1], op[2], "")


def _attachment_operation(op: tuple) -> Operation:
    if op[0] == "add":
        meta = op[2]
        return Operation("add", op[1], None, f"{meta.get('filename') or 'attachment'} ({meta.get('size') or 0} bytes)")
    return Operation(op[0], op[1], op[2], "")
