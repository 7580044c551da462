"""Signals a tracker sends so that the sync can react at once instead of polling.

``entity_changed`` is sent after the write has committed, with
``sender`` = the tracker kind, ``key``, ``change`` (created, updated, deleted,
comment_added, comment_updated, comment_deleted, attachment_added, attachment_removed)
and ``actor`` (the Person who made the change, or None).
"""

from django.dispatch import Signal

entity_changed = Signal()
