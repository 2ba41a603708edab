"""The operator console in a real browser: Debian's headless Chromium driven by Playwright
against a real console server and database. Sign-in, the overview, filtering, an item's
timeline, a retry with and without the CSRF token, a viewer refused, and episodes whose
markdown tries to run script (a ``<script>``, an ``onerror`` attribute, a ``javascript:``
link) running nothing.

Chromium comes from the distribution (``apt-get install chromium-headless-shell``; .ci/run
does): without it these tests skip, and fail under MF_TEST_REQUIRE_ALL=1 as CI runs them.
Set SCREENSHOTS_DIR=docs/images to refresh the screenshots docs/console.md shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .conftest import REQUIRE_ALL
from .console_support import PASSWORDS, ConsoleServer, console_server, seed_story, write_users

Conn = psycopg.Connection[Any]
CHROMIUM = Path("/usr/lib/chromium/chromium-headless-shell")

try:
    import playwright.sync_api as playwright_api
except ImportError:  # the test extra installs it; CI must not skip for want of it
    if REQUIRE_ALL:
        raise
    pytest.skip("playwright is not installed (pip install -e '.[test]')", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium-headless-shell; .ci/run does)"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[ConsoleServer]:
    with console_server(db_url, write_users(tmp_path / "users")) as running:
        yield running


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    opened.script_errors = errors
    yield opened
    context.close()


def shoot(page: Any, name: str, tmp_path: Path) -> None:
    """A screenshot: into SCREENSHOTS_DIR (docs/images for docs/console.md) when set."""
    folder = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"console-{name}.png"), full_page=False)


def sign_in(page: Any, server: ConsoleServer, name: str, path: str = "/") -> None:
    page.goto(server.url + path)
    page.get_by_label("User").fill(name)
    page.get_by_label("Password").fill(PASSWORDS[name])
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_leads_to_the_overview(page: Any, server: ConsoleServer, db: Conn,
                                       tmp_path: Path) -> None:
    seed_story(db)
    page.goto(server.url + "/")
    assert page.url.startswith(server.url + "/login")
    page.get_by_label("User").fill("olivia")
    page.get_by_label("Password").fill("not her password")
    page.get_by_role("button", name="Sign in").click()
    playwright_api.expect(page.get_by_role("alert")).to_have_text(
        "Wrong user name or password.")
    page.get_by_label("User").fill("olivia")
    page.get_by_label("Password").fill(PASSWORDS["olivia"])
    page.get_by_role("button", name="Sign in").click()
    playwright_api.expect(page.get_by_role("heading", level=1)).to_contain_text("Overview")
    assert page.locator("svg.chart").count() == 2
    playwright_api.expect(page.locator(".card.failed b")).to_have_text("1")
    shoot(page, "overview", tmp_path)
    assert page.script_errors == []


def test_filtering_items_and_following_one_to_its_timeline(
    page: Any, server: ConsoleServer, db: Conn, tmp_path: Path,
) -> None:
    story = seed_story(db)
    sign_in(page, server, "victor", "/items")
    rows = page.locator("table.items tr")
    playwright_api.expect(rows).to_have_count(4)  # header + 3 items
    page.get_by_label("State").select_option("failed")
    page.get_by_label("Error contains").fill("empty text")
    page.get_by_role("button", name="Filter").click()
    playwright_api.expect(rows).to_have_count(2)
    shoot(page, "items", tmp_path)
    page.get_by_role("link", name=story["failed"]["id"]).click()
    timeline = page.locator("ol.timeline")
    playwright_api.expect(timeline).to_contain_text("attempt 1: provider timeout after 120 s")
    playwright_api.expect(timeline).to_contain_text("gpt-test: 1200 + 800 tokens")
    playwright_api.expect(page.locator(".episode h2")).to_have_text("Weekly briefing")
    shoot(page, "item", tmp_path)


def test_a_generated_episode_cannot_run_script(page: Any, server: ConsoleServer,
                                               db: Conn) -> None:
    """The block holds a <script>, an onerror handler and a javascript: link: the page shows
    them as text, and none of them runs (not even when the link text is clicked)."""
    story = seed_story(db)
    sign_in(page, server, "olivia", f"/items/{story['failed']['id']}")
    episode = page.locator(".episode")
    playwright_api.expect(episode).to_contain_text("<script>window.__xss = 'script';</script>")
    assert episode.locator("script, img, [onerror]").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    episode.get_by_text("Read the source").click()
    assert page.evaluate("() => window.__xss") is None
    assert page.script_errors == []


def test_a_retry_needs_confirmation_and_the_forms_token(
    page: Any, server: ConsoleServer, db: Conn, tmp_path: Path,
) -> None:
    story = seed_story(db)
    item_id = story["failed"]["id"]
    sign_in(page, server, "olivia", f"/items/{item_id}")
    page.get_by_role("link", name="Retry…").click()
    shoot(page, "confirm", tmp_path)
    # A forged form (another site's, or a stale token) is refused and changes nothing.
    page.locator("main input[name=csrf]").evaluate("input => { input.value = 'forged'; }")
    page.get_by_role("button", name="Yes, retry").click()
    playwright_api.expect(page.get_by_role("alert")).to_contain_text("security token")
    assert db.execute("SELECT status FROM episode_schedule_queue WHERE id = %s",
                      [item_id]).fetchone() == {"status": "failed"}
    page.goto(f"{server.url}/items/{item_id}/retry")
    page.get_by_role("button", name="Yes, retry").click()
    playwright_api.expect(page.get_by_role("status")).to_contain_text("Retried")
    playwright_api.expect(page.locator(".badge")).to_have_text("pending")
    playwright_api.expect(page.locator("ol.timeline")).to_contain_text(
        "queue_item.retry by olivia (console): failed → pending")


def test_a_viewer_is_refused_an_action(page: Any, server: ConsoleServer, db: Conn) -> None:
    story = seed_story(db)
    item_id = story["failed"]["id"]
    sign_in(page, server, "victor", f"/items/{item_id}")
    playwright_api.expect(page.locator("h1")).to_contain_text(item_id)
    assert page.get_by_role("link", name="Retry…").count() == 0
    page.goto(f"{server.url}/items/{item_id}/retry")
    page.get_by_role("button", name="Yes, retry").click()
    playwright_api.expect(page.get_by_role("alert")).to_contain_text(
        "can see everything but change nothing")
    assert db.execute("SELECT status FROM episode_schedule_queue WHERE id = %s",
                      [item_id]).fetchone() == {"status": "failed"}
