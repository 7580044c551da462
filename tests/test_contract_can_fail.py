"""The contract checks catch adapters that break a rule.

Each broken adapter below is the built-in one with one rule broken; the named check
must fail on it, or the contract suite could not tell a good adapter from a bad one.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests import contract
from tests.test_tracker_contract import builtin_harness
from trackers.base import NotFound, Page, TrackerError
from trackers.builtin.adapter import BuiltinTracker


class DropsLabels(BuiltinTracker):
    def create(self, project, fields):
        return super().create(project, {k: v for k, v in fields.items() if k != "labels"})


class UpdateOverwritesUnnamedFields(BuiltinTracker):
    def update(self, key, fields):
        return super().update(key, {"description": "", **fields})


class NotFoundLooksTransient(BuiltinTracker):
    def get(self, key):
        try:
            return super().get(key)
        except NotFound as e:
            raise TrackerError(str(e), permanent=False) from e


class OutageLooksPermanent(BuiltinTracker):
    def get(self, key):
        try:
            return super().get(key)
        except TrackerError as e:
            raise TrackerError(str(e), permanent=True) from e


class RepeatsThePreviousPage(BuiltinTracker):
    """Its cursor moves, but each page starts one entity too early."""

    def changed_since(self, since, *, cursor=None, limit=100):
        page = super().changed_since(since, cursor=cursor, limit=limit)
        if cursor is None or not page.entities:
            return page
        previous = super().changed_since(since, cursor=None, limit=1).entities
        return dataclasses.replace(page, entities=previous + page.entities[: limit - 1])


class LeaksDatabaseErrors(BuiltinTracker):
    def get(self, key):
        try:
            return super().get(key)
        except TrackerError as e:
            raise (e.__cause__ or RuntimeError(str(e))) from None


class ForgetsComments(BuiltinTracker):
    def get(self, key):
        return dataclasses.replace(super().get(key), comments=())


class CorruptsAttachmentBytes(BuiltinTracker):
    def add_attachment(self, key, filename, content, content_type):
        if isinstance(content, bytes):
            content = content[:-1]
        return super().add_attachment(key, filename, content, content_type)


class IgnoresTheWatermark(BuiltinTracker):
    def changed_since(self, since, *, cursor=None, limit=100):
        page = super().changed_since(None, cursor=cursor, limit=limit)
        return Page(page.entities[:1], None, page.high_water)


BROKEN = [
    (DropsLabels, contract.check_it_creates_and_reads_back_an_entity),
    (UpdateOverwritesUnnamedFields, contract.check_it_updates_only_the_given_fields),
    (NotFoundLooksTransient, contract.check_it_raises_not_found_for_an_unknown_entity),
    (OutageLooksPermanent, contract.check_it_reports_an_outage_as_a_transient_error),
    (LeaksDatabaseErrors, contract.check_it_reports_an_outage_as_a_transient_error),
    (LeaksDatabaseErrors, contract.check_it_raises_not_found_for_an_unknown_entity),
    (RepeatsThePreviousPage, contract.check_it_pages_through_changes_without_repeats),
    (ForgetsComments, contract.check_it_adds_edits_and_deletes_comments),
    (CorruptsAttachmentBytes, contract.check_it_adds_reads_and_removes_attachments),
    (IgnoresTheWatermark, contract.check_it_lists_an_entity_again_after_it_changes),
]


@pytest.mark.parametrize(
    ("adapter", "check"), BROKEN, ids=[f"{adapter.__name__}-{check.__name__[9:]}" for adapter, check in BROKEN]
)
def test_it_fails_an_adapter_that_breaks_a_rule(db, django_user_model, adapter, check):
    harness = builtin_harness(django_user_model)
    harness.tracker = adapter(account="sync")
    with pytest.raises(AssertionError):
        check(harness)
