"""A person's first minutes on one live node, in a real Chromium: every step is a screenshot.

Signs in, looks at the issue list, creates an issue through the form, comments on it,
uploads a file, searches with the filter language and opens the admin. Any JavaScript
error on the way fails the test.
"""

from __future__ import annotations

import re

import pytest

from tests.browser import expect, login, needs_chromium, shot
from tests.livenodes import LiveNode

pytest_plugins = ["tests.browser"]
pytestmark = [pytest.mark.browser, needs_chromium]

SUMMARY = "Printer on fire in room 4"


@pytest.fixture
def blue(browser, tmp_path):
    node = LiveNode("Blue", tmp_path)
    try:
        yield node.start()
    finally:
        print(f"--- {node.name}'s log ---\n{node.log()}")  # pytest shows it when the test failed
        node.destroy()


def test_it_lets_a_person_work_through_the_pages(blue, page):
    blue.create_issue(summary="Printer on fire, but only a drill", labels=["browser"], priority="Low")

    page.goto(blue.url + "/accounts/login/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    shot(page, "login-page")
    login(page, blue.url)
    expect(page.locator(".account-name")).to_have_text("admin")
    shot(page, "signed-in")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Issues").click()
    expect(page.get_by_role("heading", name="Issues", exact=True)).to_be_visible()
    expect(page.get_by_role("row")).to_have_count(2)  # the header and the drill
    shot(page, "issue-list")

    page.get_by_role("link", name="New issue").first.click()
    expect(page.get_by_role("heading", name="New issue")).to_be_visible()
    page.get_by_label("Summary").fill(SUMMARY)
    page.get_by_label("Priority").select_option("High")
    page.get_by_label("Labels").fill("browser hardware")
    page.get_by_label("Description").fill("Smoke everywhere.\nThe extinguisher is on its way.")
    shot(page, "new-issue-form")
    page.get_by_role("button", name="Create issue").click()
    heading = page.get_by_role("heading", level=1)
    expect(heading).to_contain_text(SUMMARY)
    key = page.locator("h1 .issue-key").inner_text()
    assert re.fullmatch(r"BLUE-\d+", key), key
    details = page.get_by_role("complementary", name="Details")
    expect(details).to_contain_text("High")
    expect(details.get_by_role("link", name="hardware")).to_be_visible()
    expect(page.get_by_text("The extinguisher is on its way.")).to_be_visible()
    shot(page, "issue-created")

    page.get_by_role("textbox", name="Comment").fill("Fire brigade called.")
    page.get_by_role("button", name="Add comment").click()
    comment = page.locator("article.comment")
    expect(comment).to_have_count(1)
    expect(comment).to_contain_text("Fire brigade called.")
    expect(page.get_by_role("heading", name=re.compile(r"^Comments\s*1$"))).to_be_visible()
    shot(page, "comment-added")

    page.get_by_label("File").set_input_files(
        files=[{"name": "floor-plan.txt", "mimeType": "text/plain", "buffer": b"room 4: printer\n" * 64}]
    )
    page.get_by_role("button", name="Upload").click()
    attachment = page.get_by_role("link", name="floor-plan.txt")
    expect(attachment).to_be_visible()
    expect(page.get_by_role("row", name=re.compile("floor-plan.txt"))).to_contain_text("1.0\u00a0KB")
    shot(page, "attachment-uploaded")

    page.get_by_role("navigation", name="Breadcrumbs").get_by_role("link", name="Issues").click()
    page.get_by_role("searchbox", name="Search").fill("label:browser priority:High printer")
    page.get_by_role("button", name="Search").click()
    results = page.locator("table.issues tbody tr")
    expect(results).to_have_count(1)
    expect(results).to_contain_text(key)
    expect(results).to_contain_text(SUMMARY)
    expect(page.locator(".page-count")).to_have_text("1 issue")
    shot(page, "search")

    page.get_by_role("searchbox", name="Search").fill("colour:red printer")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_text("unknown field 'colour'")).to_be_visible()
    expect(page.get_by_text("Fix the search above to see issues.")).to_be_visible()
    expect(page.locator("table.issues")).to_have_count(0)
    shot(page, "search-that-cannot-be-read")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Admin").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()
    shot(page, "admin")
    page.get_by_role("link", name="Issues", exact=True).click()
    expect(page.get_by_role("link", name=re.compile(re.escape(key)))).to_be_visible()
    shot(page, "admin-issues")
