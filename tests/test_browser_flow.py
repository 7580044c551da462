"""The whole story in a real Chromium, on two live nodes: connect, sync, break, fix, roll back.

A person connects Blue and Red through their pages, watches an issue made on Blue appear
on Red, breaks Red's incoming rules in the admin, sees the failure (with its line) in Red's
sync monitor, tries the fix with Test Run, saves it, resolves and retries, sees the twin
clear, and rolls back a version. The API is used only to read ids a person would not type.

The test goes as far as the pages exist: before each part it checks that its page answers
200, and skips the rest, naming the missing page, when it does not.

Selectors assumed for pages not built when this was written (adjust them here):
- /sync/queue/ (Red): a table row per failing twin holding Blue's issue key, the error
  ("division by zero") and the rule's line ("helpers.debug(1 / 0)"), with a button named
  "Resolve and retry".
Pages it relies on as built: the connection pages (/connections/new/, the invitation page's
code field and its live status, /connections/accept/, the trigger form on a connection's
page), the rule editor's add form (Ace editors over the "incoming" textarea, the "Twin"
field, the "Test Run" button), the Test Run page ("Save as a new version") and a saved
version's "Activate this version" button.
"""

from __future__ import annotations

import pytest

from tests.browser import answers, expect, login, needs_chromium, reload_until, shot
from tests.livenodes import LiveNode

pytest_plugins = ["tests.browser"]
pytestmark = [pytest.mark.browser, needs_chromium]

BREAKAGE = "helpers.debug(1 / 0)\n"


@pytest.fixture
def nodes(browser, tmp_path):
    blue, red = LiveNode("Blue", tmp_path), LiveNode("Red", tmp_path)
    try:
        blue.start()
        red.start()
        yield blue, red
    finally:
        for node in (blue, red):
            print(f"--- {node.name}'s log ---\n{node.log()}")  # pytest shows it when the test failed
            node.destroy()


def require(page, url: str, what: str) -> None:
    if not answers(page, url):
        pytest.skip(f"{what} ({url}) does not answer 200 yet: the rest of the flow is skipped")


def set_script(page, name: str, text: str) -> None:
    """Put ``text`` into the rule editor's ``name`` script: its Ace editor when there is one."""
    page.evaluate(
        """([name, text]) => {
            const textarea = document.querySelector(`textarea[name="${name}"]`);
            const widget = textarea.previousElementSibling;
            if (widget && widget.editor) widget.editor.setValue(text, 1);
            else textarea.value = text;
        }""",
        [name, text],
    )


def script(page, name: str) -> str:
    return page.evaluate(
        """(name) => {
            const textarea = document.querySelector(`textarea[name="${name}"]`);
            const widget = textarea.previousElementSibling;
            return widget && widget.editor ? widget.editor.getValue() : textarea.value;
        }""",
        name,
    )


def only_connection(node: LiveNode) -> int:
    connections = node.api("GET", "connections/")
    connections = connections["results"] if isinstance(connections, dict) else connections
    assert len(connections) == 1, f"{node.name} has {len(connections)} connections"
    return connections[0]["id"]


def connect(blue: LiveNode, blue_page, red: LiveNode, red_page) -> tuple[int, int]:
    require(blue_page, blue.url + "/connections/new/", "Blue's new-connection page")
    require(red_page, red.url + "/connections/accept/", "Red's accept-a-code page")
    blue_page.goto(blue.url + "/connections/new/")
    blue_page.get_by_label("Name").fill("Red")
    blue_page.get_by_label("Local project").select_option(blue.project)
    shot(blue_page, "blue-new-connection")
    blue_page.get_by_role("button", name="Make the invitation code").click()
    code = blue_page.get_by_label("The invitation code").input_value()
    assert code.startswith("EXL1-"), f"the invitation code looks wrong: {code!r}"
    expect(blue_page.get_by_text("Waiting for the other side to accept")).to_be_visible()
    shot(blue_page, "blue-invitation")

    red_page.goto(red.url + "/connections/accept/")
    red_page.get_by_label("Invitation code").fill(code)
    red_page.get_by_label("Local project").select_option(red.project)
    shot(red_page, "red-accept")
    red_page.get_by_role("button", name="Connect").click()
    expect(red_page.get_by_role("status")).to_contain_text("Connected to Blue. The connection is active.")
    expect(red_page.get_by_role("heading", level=1)).to_contain_text("Active")
    shot(red_page, "red-connected")

    # Blue's invitation page notices by itself, without a reload.
    expect(blue_page.get_by_text("Connected to Red.")).to_be_visible()
    expect(blue_page.locator("#connection-status")).to_have_text("Active")
    shot(blue_page, "blue-connected")
    return only_connection(blue), only_connection(red)


def add_trigger(node: LiveNode, page, connection: int) -> None:
    """Sync every issue of the node's project, with a trigger added on the connection's page."""
    page.goto(f"{node.url}/connections/{connection}/")
    page.get_by_label("Query").fill(f"project:{node.project}")
    page.get_by_role("button", name="Add trigger").click()
    expect(page.get_by_role("row").filter(has_text=f"project:{node.project}")).to_be_visible()
    shot(page, f"{node.name.lower()}-trigger-added")


def create_issue(node: LiveNode, page, summary: str) -> str:
    page.goto(node.url + "/issues/new/")
    page.get_by_label("Summary").fill(summary)
    page.get_by_role("button", name="Create issue").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(summary)
    return page.locator("h1 .issue-key").inner_text()


def save_rules(page, node: LiveNode, connection: int, incoming_change, comment: str) -> None:
    page.goto(f"{node.url}/admin/connections/rulesversion/add/?connection={connection}")
    set_script(page, "incoming", incoming_change(script(page, "incoming")))
    page.get_by_label("Comment").fill(comment)
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".messagelist .success")).to_be_visible()


def test_it_connects_syncs_breaks_fixes_and_rolls_back_through_the_pages(nodes, new_page):
    blue, red = nodes
    blue_page, red_page = new_page(), new_page()
    login(blue_page, blue.url)
    shot(blue_page, "blue-signed-in")
    login(red_page, red.url)
    shot(red_page, "red-signed-in")

    blue_connection, red_connection = connect(blue, blue_page, red, red_page)
    add_trigger(blue, blue_page, blue_connection)

    first = create_issue(blue, blue_page, "Printer on fire, from Blue")
    shot(blue_page, "blue-first-issue")
    red_page.goto(red.url + "/issues/")
    reload_until(red_page, lambda: red_page.get_by_role("link", name="Printer on fire, from Blue"), what=first)
    shot(red_page, "red-first-issue-arrived")

    original = red.api("GET", f"connections/{red_connection}/rules/")["results"][0]
    save_rules(red_page, red, red_connection, lambda incoming: incoming + BREAKAGE, "breaks every incoming change")
    shot(red_page, "red-rules-broken")

    second = create_issue(blue, blue_page, "Toner everywhere, from Blue")
    shot(blue_page, "blue-second-issue")
    require(red_page, red.url + "/sync/queue/", "Red's sync monitor")
    red_page.goto(red.url + "/sync/queue/")
    failure = reload_until(
        red_page,
        # The blocked twin's row (the event list also names the key, but has no retry button there).
        lambda: red_page.get_by_role("row")
        .filter(has_text=second)
        .filter(has=red_page.get_by_role("button", name="Resolve and retry")),
        what=f"{second}'s failure on Red",
    )
    expect(failure).to_contain_text("division by zero")
    expect(failure).to_contain_text(BREAKAGE.strip())
    shot(red_page, "red-monitor-shows-the-failure")

    require(red_page, red.url + "/admin/connections/rulesversion/testrun/", "the Test Run page")
    red_page.goto(f"{red.url}/admin/connections/rulesversion/add/?connection={red_connection}")
    set_script(red_page, "incoming", original["incoming"])
    red_page.get_by_label("Comment").fill("the fix")
    red_page.get_by_label("Twin").fill(second)
    red_page.get_by_role("button", name="Test Run").click()
    results = red_page.locator(".rules-results")
    expect(results.get_by_role("heading", name="Incoming rules")).to_be_visible()
    expect(results).to_contain_text(f"Would create a new issue in project {red.project}")
    expect(results.locator(".error")).to_have_count(0)
    shot(red_page, "red-test-run-of-the-fix")
    red_page.get_by_role("button", name="Save as a new version").click()
    expect(red_page.locator(".messagelist .success")).to_be_visible()
    shot(red_page, "red-fix-saved")

    red_page.goto(red.url + "/sync/queue/")
    blocked = red_page.get_by_role("row").filter(has_text=second).filter(has_text="division by zero")
    blocked.get_by_role("button", name="Resolve and retry").click()
    shot(red_page, "red-resolve-and-retry")
    red_page.goto(red.url + "/issues/")
    reload_until(red_page, lambda: red_page.get_by_role("link", name="Toner everywhere, from Blue"), what=second)
    shot(red_page, "red-second-issue-arrived")
    red_page.goto(red.url + "/sync/queue/")
    expect(red_page.get_by_role("row").filter(has_text=second).filter(has_text="division by zero")).to_have_count(0)
    shot(red_page, "red-monitor-clear")

    versions = {v["number"]: v for v in red.api("GET", f"connections/{red_connection}/rules/")["results"]}
    assert versions[max(versions)]["active"], "the fix saved from Test Run must be the active rules"
    red_page.goto(f"{red.url}/admin/connections/rulesversion/{versions[1]['id']}/change/")
    red_page.get_by_role("button", name="Activate this version").click()
    expect(red_page.locator(".messagelist .success")).to_be_visible()
    shot(red_page, "red-rolled-back-to-version-1")
    versions = {v["number"]: v for v in red.api("GET", f"connections/{red_connection}/rules/")["results"]}
    assert versions[1]["active"], "rolling back must make version 1 the active rules"
