"""The `jupyter` template as people use it, on the real suite (database, proxy in front of the
deploy server's pages, local backend) in Debian's headless Chromium: a badge, a launch with a deep
link, JupyterLab, a cell run through the proxy's kernel websocket; a broken template explained; a
session's end explained to its open tab; culling by the app's own activity. And the same template
on the Kubernetes test cluster's real node."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import CHROMIUM_ARGS, DeployServer, wait_for
from jupyter_kernel import run_cell
from kubernetes import client
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
VENV = Path("/var/cache/binder-jupyter/current")
LAUNCHER = VENV / "bin" / "binder-jupyter"
NOTEBOOK = "lab/tree/hello.ipynb"
KERNEL_IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run scripts/setup as root")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


@pytest.fixture
def jupyter(deploy_factory: Callable[..., DeployServer]) -> Callable[..., DeployServer]:
    """A deploy server of the local backend whose proxy serves its pages (the suite's set-up),
    with the shipped templates; the `jupyter` template's environment must be built."""
    if not LAUNCHER.exists():
        pytest.fail(f"{LAUNCHER} is missing: run `make setup` as root (scripts/jupyter/build-env)")

    def make(**deploy: Any) -> DeployServer:
        return deploy_factory(front=True, **deploy).start()

    return make


def _public(deploy: DeployServer) -> str:
    return f"http://127.0.0.1:{deploy.proxy.port}"


def _lab_url(deploy: DeployServer) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(_public(deploy))}/user/([0-9a-f]{{32}})/lab/tree/hello\.ipynb")


def _run_first_cell(page: Any) -> None:
    """In the open notebook: wait for its kernel, run its code cell, wait for the output.

    JupyterLab loads dozens of scripts; Chromium aborts those in flight whenever this host's
    network interfaces change (ERR_NETWORK_CHANGED: the Docker engine making and removing the
    bridges and veths of other tests' containers), and a page that lost one never runs a cell.
    Such a page is loaded again, twice at most; the cell must then print 42."""
    for attempt in range(3):
        try:
            page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=60_000)
            page.locator(KERNEL_IDLE).first.wait_for(timeout=60_000)
            page.locator(".jp-CodeCell .jp-InputArea-editor").first.click(timeout=10_000)
            page.keyboard.press("Shift+Enter")
            page.locator(".jp-OutputArea-output", has_text="42").first.wait_for(timeout=30_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.reload()


def _badge_to_notebook(page: Any, deploy: DeployServer) -> str:
    """From the front page (through the proxy, as users reach it), the jupyter card's badge with
    the notebook's path typed in, to the notebook open in JupyterLab; its deployment's id."""
    page.goto(_public(deploy) + "/")
    card = page.locator("section.card", has_text="jupyter")
    card.locator("summary").click()
    card.get_by_label("Path to open in the app (optional)").fill(NOTEBOOK)
    markdown = card.get_by_label("Markdown").input_value()
    assert f"({_public(deploy)}/launch/jupyter?urlpath=lab%2Ftree%2Fhello.ipynb)" in markdown
    card.get_by_role("link", name="Badge: launch jupyter").click()
    page.wait_for_url(re.compile(r".*/launch/jupyter\?urlpath=lab%2Ftree%2Fhello\.ipynb$"))
    page.wait_for_url(_lab_url(deploy), timeout=180_000)
    found = _lab_url(deploy).match(page.url)
    assert found is not None
    dep_id = found.group(1)
    info = deploy.status(dep_id, "jupyter")
    assert info["status"] == "deployed"
    assert info["url"].startswith(f"{_public(deploy)}/user/{dep_id}/{NOTEBOOK}?token=")
    return dep_id


def test_badge_deep_link_to_jupyterlab_runs_a_cell_then_the_ended_page_launches_again(
    jupyter: Callable[..., DeployServer], page: Any
) -> None:
    deploy = jupyter()
    dep_id = _badge_to_notebook(page, deploy)
    _run_first_cell(page)
    # the session ends while its tab is open: the tab's next page says what happened
    httpx.delete(
        f"{deploy.url}/applications/jupyter/{dep_id}", headers=deploy.auth, timeout=30
    ).raise_for_status()
    ended = page.reload()
    assert ended.status == 404
    page.get_by_role("heading", name="This session has ended").wait_for()
    assert "It was deleted at " in page.locator("#ended").inner_text()
    page.get_by_role("link", name="Launch jupyter again").click()
    page.wait_for_url(_lab_url(deploy), timeout=120_000)
    again = _lab_url(deploy).match(page.url).group(1)  # type: ignore[union-attr]
    assert again != dep_id
    assert deploy.status(again, "jupyter")["status"] == "deployed"


def test_a_template_that_ignores_its_base_url_fails_naming_the_404_and_shows_its_output(
    jupyter: Callable[..., DeployServer], page: Any
) -> None:
    deploy = jupyter(launch_timeout_seconds=15)
    shipped = httpx.get(f"{deploy.url}/templates/jupyter", headers=deploy.auth).json()
    broken = {
        **shipped,
        "name": "nobase",
        "command": [w for w in shipped["command"] if not w.startswith("--ServerApp.base_url")],
    }
    httpx.put(
        f"{deploy.url}/templates/nobase", json=broken, headers=deploy.auth, timeout=10
    ).raise_for_status()
    page.goto(_public(deploy) + "/launch/nobase")
    problem = page.locator("#problem")
    problem.wait_for(timeout=60_000)
    assert page.locator("#problem-title").inner_text() == "The app does not serve its address"
    detail = page.locator("#problem-detail").inner_text()
    assert re.search(
        r"answered 404 at /user/[0-9a-f]{32}/api: does the app serve \{base_url\}\?", detail
    ), detail
    assert "last output lines: " in detail
    output = page.locator("#output")
    assert output.get_attribute("open") is not None  # opened by itself on failure
    assert "Jupyter Server" in page.locator("#output-lines").inner_text()


def test_a_kernel_computing_unwatched_is_kept_and_a_closed_tab_is_culled(
    jupyter: Callable[..., DeployServer], page: Any
) -> None:
    deploy = jupyter(cull_interval_seconds=1)
    timeout_ms = 6000
    busy = deploy.launch("jupyter", **{"cull-timeout": timeout_ms})
    watched = deploy.launch("jupyter", **{"cull-timeout": timeout_ms})
    info = deploy.wait_status(busy, "deployed", timeout=120, template="jupyter")
    token = info["url"].split("?token=", 1)[1]
    # a cell computing for 20 s with nobody attached: no byte passes the proxy meanwhile
    run_cell(f"{_public(deploy)}/user/{busy}/", token, "import time; time.sleep(20)", detach=True)
    ran = time.monotonic()
    # the other one: a tab opened, then closed
    tab_url = deploy.wait_status(watched, "deployed", timeout=120, template="jupyter")["url"]
    page.goto(tab_url)
    page.locator(".jp-LabShell").wait_for(timeout=60_000)
    page.close()
    closed = time.monotonic()
    ended = deploy.wait_status(watched, "deleted", timeout=30, template="jupyter")
    assert "inactivity" in ended["reason"]
    assert time.monotonic() - closed >= timeout_ms / 1000 - 1
    while time.monotonic() - ran < 20:  # the busy one lives on, however long its silence
        assert deploy.status(busy, "jupyter")["status"] == "deployed"
        time.sleep(0.5)
    culled = deploy.wait_status(busy, "deleted", timeout=30, template="jupyter")
    assert "inactivity" in culled["reason"]
    wait_for(lambda: busy not in deploy.app_pids(), what="the culled app's end")


def test_kube_node_badge_deep_link_to_jupyterlab_runs_a_cell(
    deploy_factory: Callable[..., DeployServer], kube: tuple[str, Any], namespace: str, page: Any
) -> None:
    """The same template, unchanged, on the test cluster's real node: its image
    (binder-jupyter:latest, pulled from the cluster's registry) holds the environment at the
    host's path."""
    deploy = deploy_factory(front=True, backend="kubernetes", launch_timeout_seconds=180)
    deploy.config.write_text(
        deploy.config.read_text()
        + f'[deploy.kubernetes]\nkubeconfig = "{kube[0]}"\nnamespace = "{namespace}"\n'
    )
    deploy.start()
    dep_id = _badge_to_notebook(page, deploy)
    _run_first_cell(page)
    pod: dict[str, Any] = (
        client.CoreV1Api(kube[1]).read_namespaced_pod(f"binder-{dep_id}", namespace).to_dict()
    )
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert container["readiness_probe"]["http_get"]["path"] == f"/user/{dep_id}/api"
    assert not any("token" in word.lower() for word in container["command"])
    httpx.delete(
        f"{deploy.url}/applications/jupyter/{dep_id}", headers=deploy.auth, timeout=30
    ).raise_for_status()
