"""Browser tests' fixtures: one Chromium per session, a fresh page per test, screenshots.

Test modules load this with ``pytest_plugins = ["tests.browser"]`` and mark themselves
with ``pytestmark = [pytest.mark.browser, needs_chromium]``. Without Chromium at
/usr/bin/chromium (or without playwright) every browser test is skipped with the reason.

Pages reach only loopback: any other request is aborted and fails the test, and the
browser's own host resolver knows no other name. Each action waits at most ten seconds.
Every ``shot()`` saves tests/artifacts/screenshots/<test>-<NN>-<step>.png and fails the
test if the page logged a JavaScript error since the last step.

PYTEST_DONT_REWRITE: test modules import this before pytest loads it as their plugin, too
late for assertion rewriting; its asserts carry their own messages instead.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from tests.livenodes import PASSWORD

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the tests skip; modules importing ``expect`` from here still load
    sync_playwright = expect = None

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, Request, Route

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent / "artifacts" / "screenshots"
ACTION_TIMEOUT_MS = 10_000
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Any host name other than loopback fails to resolve, whoever asks for it.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]


def _missing() -> str:
    if sync_playwright is None:
        return "playwright is not installed in this environment; scripts/test installs requirements.txt"
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM}; .ci/run installs it"
    return ""


SKIP_REASON = _missing()
needs_chromium = pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON or "Chromium is here")

if sync_playwright is not None:
    expect.set_options(timeout=ACTION_TIMEOUT_MS)


@dataclass
class PageLog:
    """What one page did that a test must know about: its test, its steps, its errors."""

    test: str
    steps: list[str]  # shared by the test's pages, so that their screenshots sort in order
    errors: list[str] = field(default_factory=list)


# One entry per open page; shot() and the fixtures' teardown read it.
_logs: dict[Page, PageLog] = {}


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[[], Page]]:
    """Opens pages, each in its own context: own cookies, so two nodes on one host keep their sessions."""
    test = _slug(request.node.name)
    for stale in SCREENSHOTS.glob(f"{test}-*.png"):
        stale.unlink()
    contexts, steps = [], []

    def open_page() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=False)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        context.set_default_navigation_timeout(ACTION_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        log = _logs[page] = PageLog(test, steps)
        context.route("**/*", lambda route, req: _loopback_only(route, req, log))
        page.on("console", lambda message: message.type == "error" and log.errors.append(_console_text(message)))
        page.on("pageerror", lambda error: log.errors.append(f"uncaught: {error}"))
        return page

    yield open_page
    pages = [page for context in contexts for page in context.pages]
    leftover = [error for page in pages if page in _logs for error in _logs[page].errors]
    if request.node.stash.get(_failed_key, False):
        for page in pages:
            _save(page, "failed")
    for page in pages:
        _logs.pop(page, None)
    for context in contexts:
        context.close()
    assert not leftover, "JavaScript errors after the last step:\n" + "\n".join(leftover)


@pytest.fixture
def page(new_page: Callable[[], Page]) -> Page:
    return new_page()


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-")


def _console_text(message) -> str:
    where = message.location.get("url", "")
    return f"console: {message.text}" + (f" ({where})" if where else "")


def _loopback_only(route: Route, request: Request, log: PageLog) -> None:
    parts = urlsplit(request.url)
    if parts.scheme in ("data", "blob") or (parts.hostname or "") in LOOPBACK_HOSTS:
        route.continue_()
    else:
        log.errors.append(f"blocked a request off loopback: {request.url}")
        route.abort("blockedbyclient")


def _save(page: Page, step: str) -> Path:
    log = _logs[page]
    log.steps.append(step)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{log.test}-{len(log.steps):02d}-{_slug(step)}.png"
    with contextlib.suppress(PlaywrightError):  # a page that cannot be drawn must not hide the test's failure
        page.screenshot(path=path, full_page=True)
    return path


def shot(page: Page, step: str) -> Path:
    """Save a screenshot of this step and fail if the page logged a JavaScript error."""
    path = _save(page, step)
    errors, _logs[page].errors[:] = list(_logs[page].errors), []
    assert not errors, f"JavaScript errors by step {step!r}:\n" + "\n".join(errors)
    return path


def login(page: Page, node_url: str, username: str = "admin", password: str = PASSWORD) -> None:
    """Sign in through the login page, as a person would."""
    page.goto(node_url + "/accounts/login/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


def answers(page: Page, url: str) -> bool:
    """Whether ``url`` answers 200 to this page's session: how a test checks that a page exists yet."""
    return page.request.get(url, max_redirects=0, timeout=ACTION_TIMEOUT_MS).status == 200


def reload_until(page: Page, locator: Callable[[], Locator], timeout: float = 40, what: str = "it") -> Locator:
    """Reload ``page`` until ``locator()`` is visible, as a person waiting for a sync would."""
    deadline = time.monotonic() + timeout
    while True:
        found = locator()
        if found.count() and found.first.is_visible():
            return found.first
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not show on {page.url} within {timeout} s")
        time.sleep(1)
        page.reload()


_failed_key = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # Lets new_page's teardown screenshot every page of a failed test, as it was.
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_failed_key] = True
    return report
