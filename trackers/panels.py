"""Panels other apps add to an entity's page, so the tracker shows sync state without importing the sync.

An app registers ``panel(request, key) -> str`` (rendered HTML) once at start-up; the
built-in tracker's issue page shows every registered panel's output. An app may also
register ``elsewhere(key) -> str``: where an issue the built-in tracker does not have
lives instead (a node serving Redmine sends ``/issues/<key>/`` links there).
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest
from django.utils.safestring import SafeString, mark_safe

Panel = Callable[[HttpRequest, str], str]
_panels: list[Panel] = []


def register(panel: Panel) -> None:
    if panel not in _panels:
        _panels.append(panel)


def render_all(request: HttpRequest, key: str) -> list[SafeString]:
    # Panels return template output, which Django has already escaped.
    return [mark_safe(html) for html in (panel(request, key) for panel in _panels) if html]


Elsewhere = Callable[[str], str]
_elsewhere: list[Elsewhere] = []


def register_elsewhere(finder: Elsewhere) -> None:
    if finder not in _elsewhere:
        _elsewhere.append(finder)


def page_elsewhere(key: str) -> str:
    """The first registered page for ``key`` outside the built-in tracker, or ""."""
    return next((url for url in (finder(key) for finder in _elsewhere) if url), "")
