"""Signals for the layers above: the sync queue listens, connections do not import it."""

from django.dispatch import Signal

# Sent after commit when a connection becomes active; the queue sends what it collected.
connection_activated = Signal()
