"""The built-in tracker's filter language, shared by the search box, the REST API and triggers.

A query is a list of terms separated by spaces::

    project:BLUE status:"In Progress" label:backend assignee:alice -label:wontfix crash

``field:value`` terms (values with spaces in double quotes) must all match; a leading
``-`` negates a term; bare words must each appear in the summary or the description.
Fields: project, key, status, priority, type, assignee, reporter, label, is (open or
done), updated (``>=2026-01-31`` or ``<2026-01-31``), created (likewise). ``none`` as
the value of assignee or priority matches issues without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time

from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from trackers.builtin.models import Issue, Label, Status

FIELDS = ("project", "key", "status", "priority", "type", "assignee", "reporter", "label", "is", "updated", "created")
MAX_TERMS = 30
_TOKEN = re.compile(r'\s*(-?)(?:(\w+)(:|>=|<=|>|<))?(?:"([^"]*)"|(\S*))')
_COMPARISONS = (">=", "<=", ">", "<")


class QueryError(ValueError):
    """The query cannot be understood; the message says where."""


@dataclass(frozen=True)
class Term:
    field: str  # "" for a bare word
    value: str
    negate: bool = False


def parse(query: str) -> list[Term]:
    if not isinstance(query, str):
        raise QueryError("the query must be text")
    if len(query) > 1000:
        raise QueryError("the query is too long (at most 1000 characters)")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in query):
        raise QueryError("the query contains control characters")
    if query.count('"') % 2:
        raise QueryError('unbalanced double quote (")')
    terms = []
    position = 0
    query = query.strip()
    while position < len(query):
        match = _TOKEN.match(query, position)
        if not match or match.end() == position:
            raise QueryError(f"cannot read the query at {query[position : position + 20]!r}")
        negate, field, operator, quoted, bare = match.groups()
        value = quoted if quoted is not None else bare
        if field is not None:
            field = field.lower()
            if field not in FIELDS:
                raise QueryError(f"unknown field {field!r} (known: {', '.join(FIELDS)})")
            if operator != ":":
                value = operator + value  # updated>=DATE is written like updated:>=DATE
            if not value or value in _COMPARISONS:
                raise QueryError(f"{field}: needs a value")
        elif not value:
            raise QueryError(f"cannot read the query at {query[position : position + 20]!r}")
        terms.append(Term(field or "", value, bool(negate)))
        position = match.end()
        if len(terms) > MAX_TERMS:
            raise QueryError(f"too many terms (at most {MAX_TERMS})")
    return terms


def _moment(field: str, text: str) -> datetime:
    try:
        moment = parse_datetime(text)
        if moment is None:
            day = parse_date(text) if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) else None
            if day is None:
                raise ValueError
            moment = datetime.combine(day, time.min)
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment, UTC)
        # Databases disagree at the edges of the calendar; keep to years anyone means.
        if not 1900 <= moment.astimezone(UTC).year <= 9999:
            raise ValueError
    except (ValueError, OverflowError):
        raise QueryError(f"{field}: expected a date like 2026-01-31, got {text!r}") from None
    return moment


def _condition(term: Term) -> Q:
    field, value = term.field, term.value
    if field == "":
        return Q(summary__icontains=value) | Q(description__icontains=value)
    if field == "project":
        return Q(project__key__iexact=value)
    if field == "key":
        return Q(key__iexact=value)
    if field == "status":
        return Q(status__name__iexact=value)
    if field == "priority":
        return Q(priority__isnull=True) if value.lower() == "none" else Q(priority__name__iexact=value)
    if field == "type":
        return Q(type__iexact=value)
    if field in ("assignee", "reporter"):
        if value.lower() == "none":
            return Q(**{f"{field}__isnull": True})
        return Q(**{f"{field}__username": value})
    if field == "label":
        return Q(pk__in=Label.objects.filter(name=value).values("issue_id"))
    if field == "is":
        if value.lower() == "done":
            return Q(status__category=Status.Category.DONE)
        if value.lower() == "open":
            return ~Q(status__category=Status.Category.DONE)
        raise QueryError(f"is: expected open or done, got {value!r}")
    # updated / created
    if field not in ("updated", "created"):
        raise QueryError(f"{field}: compare with a colon, e.g. {field}:value")
    for op, lookup in ((">=", "gte"), ("<=", "lte"), (">", "gt"), ("<", "lt")):
        if value.startswith(op):
            return Q(**{f"{field}__{lookup}": _moment(field, value[len(op) :])})
    raise QueryError(f"{field}: expected >=DATE, >DATE, <=DATE or <DATE, got {value!r}")


def filter_issues(queryset: QuerySet[Issue], terms: list[Term]) -> QuerySet[Issue]:
    condition = Q()
    for term in terms:
        part = _condition(term)
        condition &= ~part if term.negate else part
    return queryset.filter(condition)


def search(queryset: QuerySet[Issue], query: str) -> QuerySet[Issue]:
    return filter_issues(queryset, parse(query))


def quote(value: str) -> str:
    """A value as it must be written in a query."""
    value = value.replace('"', "'")
    return f'"{value}"' if re.search(r"\s", value) or not value else value
