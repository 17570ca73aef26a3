"""The web pages in headless Chromium (Debian's package, driven by Playwright) against the real
deploy server, database and proxy: front page, launch page, badges, operator console.

Every page is checked with axe-core (from npm, injected by the test) and for console errors, and a
screenshot of each is saved under the test's temporary folder."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import (
    CHROMIUM_ARGS,
    EXAMPLE_COMMAND,
    ROOT,
    Database,
    DeployServer,
    LoggingServer,
)
from playwright.sync_api import sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
AXE = ROOT / ".node" / "node_modules" / "axe-core" / "axe.min.js"
SLOW_COMMAND = ["/bin/sh", "-c", 'sleep 2; exec "$@"', "slow", *EXAMPLE_COMMAND]
"""The example app, started two seconds late: long enough to watch a launch in progress."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is missing: run scripts/setup as root (apt-get install chromium)"
        )
    if not AXE.exists():
        pytest.fail("axe-core is missing: run scripts/setup (npm install axe-core)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """One browser page, recording its console errors, with axe and screenshots at hand."""

    def __init__(self, context: Any, shots: Path) -> None:
        self.context, self.shots = context, shots
        self.page = context.new_page()
        self.console: list[tuple[str, str]] = []
        self.page.on(
            "console",
            lambda m: self.console.append((self.page.url, m.text)) if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda exc: self.console.append((self.page.url, str(exc))))

    def errors(self, origin: str) -> list[str]:
        """Console errors of our own pages (the app landed on is not ours to judge)."""
        return [text for url, text in self.console if url.startswith(origin)]

    def axe_violations(self) -> list[str]:
        self.page.add_script_tag(path=str(AXE))
        found = self.page.evaluate("async () => (await axe.run(document)).violations")
        return [f"{v['id']}: {v['help']} ({len(v['nodes'])} nodes)" for v in found]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def tab(browser: Any, tmp_path: Path) -> Iterator[Tab]:
    # bypass_csp lets the test inject axe-core into pages whose policy allows only their own scripts
    context = browser.new_context(bypass_csp=True, viewport={"width": 1100, "height": 800})
    yield Tab(context, tmp_path)
    context.close()


def _register(deploy: DeployServer, name: str, command: list[str] | tuple[str, ...]) -> None:
    response = httpx.put(
        f"{deploy.url}/templates/{name}",
        json={"command": list(command)},
        headers=deploy.auth,
        timeout=10,
    )
    assert response.status_code == 200, response.text


def _app_url(deploy: DeployServer) -> re.Pattern[str]:
    return re.compile(rf"http://127\.0\.0\.1:{deploy.proxy.port}/user/[0-9a-f]{{32}}/")


def test_front_page_lists_templates_with_launch_buttons_and_badges(
    deploy: DeployServer, tab: Tab
) -> None:
    page = tab.page
    page.goto(deploy.url + "/")
    card = page.locator("section.card", has_text="example")
    launch = card.get_by_role("link", name="Launch example", exact=True)
    assert launch.get_attribute("href") == "/launch/example"
    card.locator("summary").click()
    markdown = card.get_by_label("Markdown").input_value()
    public = f"http://127.0.0.1:{deploy.proxy.port}"  # [proxy] public_url, not the page's host
    assert markdown == f"[![launch example]({public}/badge/example.svg)]({public}/launch/example)"
    assert f'href="{public}/launch/example"' in card.get_by_label("HTML").input_value()
    card.get_by_label("Path to open in the app (optional)").fill("docs/a b.html")
    deep = f"{public}/launch/example?urlpath=docs%2Fa%20b.html"
    assert card.get_by_label("Markdown").input_value().endswith(f"({deep})")
    assert card.get_by_role("link", name="Badge: launch example").get_attribute("href") == deep
    assert page.evaluate("document.querySelector('img.badge').naturalWidth") > 0
    tab.shot("front")
    assert tab.axe_violations() == []
    page.set_viewport_size({"width": 360, "height": 740})
    tab.shot("front-narrow")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    assert tab.errors(deploy.url) == []


def test_launch_page_shows_progress_and_lands_on_the_app(deploy: DeployServer, tab: Tab) -> None:
    _register(deploy, "slow", SLOW_COMMAND)
    page = tab.page
    page.goto(deploy.url + "/launch/slow")
    starting = page.locator("#phase-starting")
    starting.locator(".state", has_text="in progress").wait_for()
    assert page.locator("#phase-request .state").inner_text() == "done"
    assert page.locator("#summary").inner_text() == "Starting the app…"
    tab.shot("launch-progress")
    assert tab.axe_violations() == []
    page.wait_for_url(_app_url(deploy), timeout=30_000)
    assert "Hello from Binder" in page.content()
    assert tab.errors(deploy.url) == []


def test_launch_of_example_lands_on_the_app(deploy: DeployServer, tab: Tab) -> None:
    tab.page.goto(deploy.url + "/launch/example")
    tab.page.wait_for_url(_app_url(deploy), timeout=30_000)
    assert tab.page.get_by_role("heading", name="Hello from Binder").is_visible()
    tab.shot("app")
    dep_id = tab.page.url.rstrip("/").rsplit("/", 1)[-1]
    assert deploy.status(dep_id)["status"] == "deployed"
    assert tab.errors(deploy.url) == []


def test_failed_launch_explains_the_exit_and_retries_without_reload(
    deploy: DeployServer, tab: Tab
) -> None:
    _register(deploy, "crash", ["/bin/sh", "-c", "echo broken >&2; exit 3"])
    page = tab.page
    page.goto(deploy.url + "/launch/crash")
    problem = page.locator("#problem")
    problem.get_by_text("exited with code 3").first.wait_for()
    assert "process exited with code 3" in problem.inner_text()
    assert page.locator("#phase-starting .state").inner_text() == "failed"
    first_url = page.url
    tab.shot("launch-failed")
    assert tab.axe_violations() == []
    page.evaluate("window.sameDocument = true")
    page.get_by_role("button", name="Try again").click()
    page.wait_for_function(f"location.href !== {json.dumps(first_url)} && location.search !== ''")
    problem.get_by_text("exited with code 3").first.wait_for()
    assert page.evaluate("window.sameDocument") is True  # no reload happened
    assert tab.errors(deploy.url) == []


def test_cut_event_stream_and_unreachable_server_still_land_on_the_app(
    deploy: DeployServer, tab: Tab
) -> None:
    _register(deploy, "slow", SLOW_COMMAND)
    page = tab.page
    # every event stream ends after one backend progress message, before any final status:
    # the page shows the message, then polls the status instead
    page.route(
        re.compile(r".*/events(\?.*)?$"),
        lambda route: route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body='event: progress\ndata: {"message": "Pulling image binder-example"}\n\n',
        ),
    )
    page.goto(deploy.url + "/launch/slow")
    note = page.locator("#connection")
    note.get_by_text("live updates were cut").wait_for()
    assert "Pulling image binder-example" in page.locator("#progress-list").inner_text()
    tab.shot("launch-cut")
    # then the server stops answering for a while
    page.route(re.compile(r".*/applications/slow/[0-9a-f]{32}$"), lambda route: route.abort())
    note.get_by_text("unreachable").wait_for()
    tab.shot("launch-unreachable")
    page.unroute(re.compile(r".*/applications/slow/[0-9a-f]{32}$"))
    page.wait_for_url(_app_url(deploy), timeout=30_000)
    assert "Hello from Binder" in page.content()


def test_launch_refused_for_capacity_says_when_to_retry(deploy_factory: Any, tab: Tab) -> None:
    deploy = deploy_factory(max_deployments=1).start()
    first = deploy.launch()
    deploy.wait_status(first, "deployed")
    page = tab.page
    page.goto(deploy.url + "/launch/example")
    page.locator("#problem-title", has_text="The service is full right now").wait_for()
    retry = page.locator("#retry")
    assert retry.is_disabled()
    assert re.fullmatch(r"Try again in \d+ s", retry.inner_text())
    tab.shot("launch-capacity")


def test_badges_are_valid_svg(deploy: DeployServer) -> None:
    for path, words in (
        ("/badge.svg", "launch: binder"),
        ("/badge/example.svg", "launch: example"),
    ):
        response = httpx.get(deploy.url + path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/svg+xml"
        root = ET.fromstring(response.content)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.get("aria-label") == words
    assert httpx.get(deploy.url + "/badge/nothing.svg").status_code == 404


def test_console_needs_the_key_lists_and_deletes_a_deployment(
    deploy: DeployServer, tab: Tab
) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    page = tab.page
    page.goto(deploy.url + "/console")
    assert page.locator("#dep-table").count() == 0
    assert dep_id not in page.content()
    assert page.request.get(deploy.url + "/console/api/deployments").status == 403
    tab.shot("console-signin")
    assert tab.axe_violations() == []
    page.get_by_label("API key").fill("not-the-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").get_by_text("not this server's API key").wait_for()
    tab.console.clear()  # the browser logs the refused sign-in (403) itself; that one is expected
    page.get_by_label("API key").fill(deploy.api_key)
    page.get_by_role("button", name="Sign in").click()
    row = page.locator(f"#dep-rows tr[data-id='{dep_id}']")
    row.wait_for()
    assert "deployed" in row.inner_text()
    cookie = next(c for c in tab.context.cookies() if c["name"] == "binder_console")
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/console")
    assert deploy.api_key not in cookie["value"]
    assert page.evaluate("document.cookie") == ""
    # a state change without the console header is refused even with the cookie
    refused = page.request.delete(f"{deploy.url}/console/api/deployments/example/{dep_id}")
    assert refused.status == 403
    page.locator("#capacity").get_by_text("1 of 100").wait_for()
    tab.shot("console")
    assert tab.axe_violations() == []
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Delete {dep_id}").click()
    row.locator(".status", has_text="deleted").wait_for()
    assert deploy.status(dep_id)["status"] == "deleted"
    page.set_viewport_size({"width": 360, "height": 740})
    tab.shot("console-narrow")
    assert tab.errors(deploy.url) == []


def _sign_in(page: Any, deploy: DeployServer) -> None:
    page.goto(deploy.url + "/console")
    page.get_by_label("API key").fill(deploy.api_key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#dep-table").wait_for()


def test_console_shows_a_deployments_logs_and_tails_new_lines(
    deploy_factory: Any, database: Database, tab: Tab
) -> None:
    deploy = deploy_factory()
    # the log aggregator shares the deploy server's home, so it follows the apps' output too
    aggregator = LoggingServer(deploy.workdir, database)
    aggregator.token = deploy.logging_token  # the deploy server relays the tail with its token
    deploy.config.write_text(
        re.sub(
            r"\[logging\]\nport = \d+",
            f"[logging]\nport = {aggregator.port}",
            deploy.config.read_text(),
        )
    )
    aggregator.start()
    try:
        deploy.start()
        dep_id = deploy.launch()
        deploy.wait_status(dep_id, "deployed")
        page = tab.page
        _sign_in(page, deploy)
        page.locator(f"#dep-rows tr[data-id='{dep_id}']").get_by_role("button", name="Logs").click()
        lines = page.locator("#logs-lines")
        page.locator("#logs-state", has_text="live").wait_for()
        lines.get_by_text("deployed").first.wait_for()  # the deploy server's own record
        assert deploy.proxy.get(f"/user/{dep_id}/live-tail-check").status_code == 200
        lines.get_by_text("/live-tail-check").first.wait_for(timeout=20_000)  # the app's output
        tab.shot("console-logs")
        assert tab.axe_violations() == []
        assert tab.errors(deploy.url) == []
    finally:
        deploy.stop()
        aggregator.stop()
