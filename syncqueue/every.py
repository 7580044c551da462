"""Housekeeping a process does at most once every so many seconds, however often it is asked."""

from __future__ import annotations

import time
from collections.abc import Hashable


class Every:
    """At most once every ``seconds`` in this process, per key (one clock when no key is given)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable = None, *, force: bool = False) -> bool:
        """Whether it is time again for ``key`` (always, with ``force``); when it is, its clock restarts."""
        now = time.monotonic()
        last = self._last.get(key)
        if not force and last is not None and now - last < self.seconds:
            return False
        self._last[key] = now
        return True

    def reset(self, key: Hashable = None) -> None:
        """Make the next ``due(key)`` true, whenever it comes."""
        self._last.pop(key, None)
