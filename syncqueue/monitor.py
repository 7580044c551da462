"""What the sync monitor pages show and do: queue counts, the throughput chart, event filters, queue actions.

Every read here is bounded whatever the size of the queue: aggregates come back grouped
(a few rows per connection or per minute), lists are sliced, and counts stop at
COUNT_LIMIT. The actions are operations on the queue, for staff; they go through
``flow``'s public functions where one exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any
from urllib.parse import quote

from django import forms
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, Prefetch, Q, QuerySet
from django.db.models.functions import TruncMinute
from django.utils import timezone

from connections.models import Connection, RulesVersion
from syncqueue import flow
from syncqueue.models import SyncEvent, Twin

Direction, Kind, Status = SyncEvent.Direction, SyncEvent.Kind, SyncEvent.Status

EVENTS_PER_PAGE = 50
# Past this many rows the pages say "10,000+" instead of counting: COUNT(*) over a big queue is slow.
COUNT_LIMIT = 10_000
BLOCKED_SHOWN = 50
CHART_MINUTES = 60

# The columns a list of events needs; payloads can be large, so lists never load them.
EVENT_LIST_FIELDS = (
    "id",
    "connection_id",
    "twin_id",
    "direction",
    "kind",
    "seq",
    "status",
    "attempts",
    "next_attempt",
    "error",
    "error_line",
    "created",
    "finished",
)


def remote_issue_url(connection: Connection, remote_key: str | None) -> str:
    """The remote node's page of ``remote_key``, or "" when the remote URL or key is not known."""
    if not (connection.remote_url and remote_key):
        return ""
    return f"{connection.remote_url.rstrip('/')}/issues/{quote(remote_key, safe='')}/"


def pretty_json(value: Any) -> str:
    """JSON for people: indented, keys sorted; the template escapes it."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def script_line(event: SyncEvent, fallback: RulesVersion | None = None) -> str:
    """The text of the script line an event failed on, or "".

    The error names the script ("incoming rules, line 5: ..."); a failed incoming event
    does not record its rules version, so the connection's active rules stand in.
    """
    rules = event.rules_version or fallback
    if not (rules and event.error_line):
        return ""
    script = rules.outgoing if event.error.startswith("outgoing rules") else rules.incoming
    lines = script.splitlines()
    return lines[event.error_line - 1].strip() if 0 < event.error_line <= len(lines) else ""


# --- counts -----------------------------------------------------------------------------------


@dataclass
class ConnectionCounts:
    connection: Connection
    blocked: int = 0
    by_direction: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rows(self) -> list[tuple[str, list[int]]]:
        """(direction label, counts in Status order) for each direction."""
        return [
            (label, [self.by_direction.get(value, {}).get(status, 0) for status in Status.values])
            for value, label in Direction.choices
        ]


def queue_counts(connections: Iterable[Connection]) -> list[ConnectionCounts]:
    """Events by direction and status, and blocked twins, per connection: two grouped queries."""
    counts = {c.pk: ConnectionCounts(c) for c in connections}
    grouped = SyncEvent.objects.order_by().values_list("connection_id", "direction", "status").annotate(n=Count("id"))
    for connection_id, direction, status, n in grouped:
        if connection_id in counts:
            counts[connection_id].by_direction.setdefault(direction, {})[status] = n
    blocked = (
        Twin.objects.filter(state=Twin.State.BLOCKED).order_by().values_list("connection_id").annotate(n=Count("id"))
    )
    for connection_id, n in blocked:
        if connection_id in counts:
            counts[connection_id].blocked = n
    return list(counts.values())


# --- the throughput chart ---------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT = 720, 160
PLOT_LEFT, PLOT_TOP, PLOT_BOTTOM = 40, 10, 135
SLOT = (CHART_WIDTH - PLOT_LEFT) / CHART_MINUTES


@dataclass
class Bar:
    status: str
    minute: datetime
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass
class Chart:
    start: datetime
    bars: list[Bar]
    done: int
    failed: int
    peak: int
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    plot_left: int = PLOT_LEFT
    plot_top: int = PLOT_TOP
    plot_bottom: int = PLOT_BOTTOM

    @property
    def summary(self) -> str:
        if not self.bars:
            return f"No event finished in the last {CHART_MINUTES} minutes."
        return (
            f"In the last {CHART_MINUTES} minutes {self.done} event(s) were done and {self.failed} failed; "
            f"the busiest minute finished {self.peak}."
        )

    @property
    def middle_x(self) -> float:
        return PLOT_LEFT + (CHART_WIDTH - PLOT_LEFT) / 2


def throughput(now: datetime | None = None) -> Chart:
    """Events done and failed per minute over the last hour, as stacked bars (done below failed).

    One grouped query over the (status, finished) index; the bars' geometry is computed
    here, so the template only writes it out.
    """
    now = now or timezone.now()
    start = now.replace(second=0, microsecond=0) - timedelta(minutes=CHART_MINUTES - 1)
    per_minute: dict[int, dict[str, int]] = {}
    rows = (
        SyncEvent.objects.filter(status__in=(Status.DONE, Status.FAILED), finished__gte=start)
        .annotate(minute=TruncMinute("finished"))
        .order_by()
        .values_list("minute", "status")
        .annotate(n=Count("id"))
    )
    for minute, status, n in rows:
        slot = int((minute - start).total_seconds() // 60)
        if 0 <= slot < CHART_MINUTES:
            per_minute.setdefault(slot, {})[status] = n
    peak = max((sum(counts.values()) for counts in per_minute.values()), default=0)
    scale = (PLOT_BOTTOM - PLOT_TOP) / peak if peak else 0
    bars = []
    for slot, counts in sorted(per_minute.items()):
        base = float(PLOT_BOTTOM)
        for status in (Status.DONE, Status.FAILED):
            count = counts.get(status, 0)
            if not count:
                continue
            height = max(count * scale, 1.0)
            base -= height
            bars.append(
                Bar(
                    status=status,
                    minute=start + timedelta(minutes=slot),
                    count=count,
                    x=round(PLOT_LEFT + slot * SLOT + 1, 1),
                    y=round(base, 1),
                    width=round(SLOT - 2, 1),
                    height=round(height, 1),
                )
            )
    done = sum(counts.get(Status.DONE, 0) for counts in per_minute.values())
    failed = sum(counts.get(Status.FAILED, 0) for counts in per_minute.values())
    return Chart(start=start, bars=bars, done=done, failed=failed, peak=peak)


# --- lists ------------------------------------------------------------------------------------


class CappedPaginator(Paginator):
    """A paginator that counts at most COUNT_LIMIT rows; ``capped`` says there are more."""

    limit = COUNT_LIMIT

    @cached_property
    def _bounded_count(self) -> int:
        return self.object_list.order_by()[: self.limit + 1].count()

    @cached_property
    def count(self) -> int:
        return min(self._bounded_count, self.limit)

    @property
    def capped(self) -> bool:
        return self._bounded_count > self.limit


def _any(choices) -> list[tuple[str, str]]:
    return [("", "Any"), *choices]


class EventFilter(forms.Form):
    connection = forms.TypedChoiceField(coerce=int, empty_value=None, required=False)
    direction = forms.ChoiceField(choices=_any(Direction.choices), required=False)
    status = forms.ChoiceField(choices=_any(Status.choices), required=False)
    kind = forms.ChoiceField(choices=_any(Kind.choices), required=False)
    key = forms.CharField(label="Key contains", max_length=100, required=False)

    def __init__(self, data, connections: Iterable[Connection]):
        super().__init__(data)
        self.fields["connection"].choices = _any([(c.pk, c.name) for c in connections])

    def apply(self, events: QuerySet[SyncEvent]) -> QuerySet[SyncEvent]:
        """Narrow ``events`` by the filters that are valid; an invalid one is shown as an error and ignored."""
        self.is_valid()
        data = self.cleaned_data
        if data.get("connection"):
            events = events.filter(connection_id=data["connection"])
        for name in ("direction", "status", "kind"):
            if data.get(name):
                events = events.filter(**{name: data[name]})
        if data.get("key"):
            key = data["key"]
            events = events.filter(Q(twin__local_key__icontains=key) | Q(twin__remote_key__icontains=key))
        return events


def event_list() -> QuerySet[SyncEvent]:
    """Events newest first, with what a row shows and without payloads."""
    return (
        SyncEvent.objects.select_related("twin", "connection")
        .only(
            *EVENT_LIST_FIELDS,
            "twin__local_key",
            "twin__remote_key",
            "twin__state",
            "connection__name",
            "connection__remote_url",
        )
        .order_by("-id")
    )


def blocked_twins() -> list[Twin]:
    """The newest blocked twins, each with its latest failed event (for the error's script line)."""
    failed = SyncEvent.objects.filter(status=Status.FAILED).select_related("rules_version").order_by("-id")
    return list(
        Twin.objects.filter(state=Twin.State.BLOCKED)
        .select_related("connection__active_rules")
        .defer("last_sent", "last_received", "comment_map", "attachment_map")
        .prefetch_related(Prefetch("events", queryset=failed[:1], to_attr="latest_failure"))
        .order_by("-id")[:BLOCKED_SHOWN]
    )


# --- actions ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What an action did: how many events it changed, and why it left the others alone."""

    changed: int = 0
    refused: list[str] = field(default_factory=list)


def retry_events(events: Iterable[SyncEvent]) -> Outcome:
    """Put failed events back in the queue, through their twin's resolve-and-retry.

    A twin's failed events go back together and its blocked state is lifted, so the
    worker applies them in sequence order again; retrying one failed event of a twin
    therefore retries all of that twin's failed events.
    """
    outcome = Outcome()
    twins: dict[int, Twin] = {}
    for event in events:
        if event.status != Status.FAILED:
            outcome.refused.append(f"Event {event.pk} is {event.get_status_display().lower()}, not failed.")
        else:
            twins[event.twin_id] = event.twin
    for twin in twins.values():
        outcome.changed += flow.resolve_and_retry(twin)
    return outcome


def discard_events(events: Iterable[SyncEvent], user) -> Outcome:
    """Mark failed or pending events done without applying or sending them ("discarded by <user>").

    Each twin's events are discarded in sequence order. What discarding means:

    - an incoming message is skipped: the twin's applied sequence moves past it, so the
      messages after it are applied; the remote side gets no acknowledgement of it. Only
      the twin's next message can be skipped, never one after a gap.
    - an outgoing message the rules failed to make (sequence 0) is dropped.
    - an outgoing message the other node never accepted is taken back only when it is the
      twin's last one: its sequence number is reused, and the next change is sent in full.
      Any other outgoing message is refused, because the other node applies a twin's
      messages in order and would wait for it forever.

    When no failed event is left on a blocked twin, the twin is unblocked.
    """
    outcome = Outcome()
    by = getattr(user, "get_username", lambda: str(user))()
    for event in sorted(events, key=lambda e: (e.twin_id, e.direction, e.seq, e.pk)):
        reason = _discard(event.pk, by)
        if reason:
            outcome.refused.append(f"Event {event.pk} was not discarded: {reason}.")
        else:
            outcome.changed += 1
    return outcome


def _discard(pk: int, by: str) -> str:
    """Discard one event; returns why not, or ""."""
    with transaction.atomic():
        twin_id = SyncEvent.objects.filter(pk=pk).values_list("twin_id", flat=True).first()
        if twin_id is None:
            return "it no longer exists"
        # The twin's lock orders this against the worker applying or queueing its events.
        twin = Twin.objects.select_for_update().get(pk=twin_id)
        event = SyncEvent.objects.get(pk=pk)
        if event.status not in (Status.PENDING, Status.FAILED):
            return f"it is {event.get_status_display().lower()}"
        if event.direction == Direction.INCOMING:
            if event.seq > twin.in_seq + 1:
                return f"it waits for message {twin.in_seq + 1} of its twin, and the ones after it would wait for it"
            twin.in_seq = max(twin.in_seq, event.seq)
        elif event.seq != 0:
            never_accepted = event.status == Status.FAILED or event.attempts == 0
            if event.seq != twin.out_seq or not never_accepted:
                return "the other node applies this twin's messages in order and would wait for it forever"
            twin.out_seq -= 1
            twin.last_sent_hash = ""
        changed = SyncEvent.objects.filter(pk=pk, status=event.status).update(
            status=Status.DONE,
            error=f"discarded by {by}",
            error_line=None,
            finished=timezone.now(),
            lease_owner="",
            lease_expires=None,
        )
        if not changed:
            return "a worker took it meanwhile"
        if twin.state == Twin.State.BLOCKED and not twin.events.filter(status=Status.FAILED).exists():
            twin.state = Twin.State.OK
            twin.blocked_reason = ""
        twin.save()
        flow.kick()
    return ""
