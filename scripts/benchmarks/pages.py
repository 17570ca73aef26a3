"""Benchmark of the web pages in headless Chromium (``scripts/bench pages``): the time from opening
``/launch/example`` to the app's page being shown, unpooled and pooled; from opening
``/launch/jupyter?urlpath=lab/tree/hello.ipynb`` (a click on its badge) to the notebook's kernel
ready in JupyterLab, unpooled and pooled; and the operator console's load time with 2,000
deployment records in the database."""

from __future__ import annotations

import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from harness import CHROMIUM_ARGS, DeployServer, seed_history, wait_for

from scripts.benchmarks.shared import report, suite

RECORDS = 2000
SEEDED = re.compile(r"of 2,0\d\d$")
"""The console's page count once the seeded records (and the benchmark's own launches) show."""


def _launch_in_browser(page: Any, server: DeployServer, app: re.Pattern[str]) -> float:
    start = time.perf_counter()
    page.goto(f"{server.url}/launch/example", wait_until="commit")
    page.wait_for_url(app, wait_until="load", timeout=30_000)
    elapsed = time.perf_counter() - start
    dep_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    httpx.delete(f"{server.url}/applications/example/{dep_id}", headers=server.auth, timeout=10)
    return elapsed


KERNEL_READY = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
"""JupyterLab's notebook toolbar once its kernel is connected and idle."""


def _click_to_kernel(page: Any, server: DeployServer) -> float:
    """Seconds from opening the jupyter badge's link to the notebook's kernel ready."""
    public = f"http://127.0.0.1:{server.proxy.port}"
    lab = re.compile(rf"{re.escape(public)}/user/([0-9a-f]{{32}})/lab/tree/hello\.ipynb")
    start = time.perf_counter()
    page.goto(f"{server.url}/launch/jupyter?urlpath=lab/tree/hello.ipynb", wait_until="commit")
    page.wait_for_url(lab, timeout=120_000)
    page.locator(KERNEL_READY).first.wait_for(timeout=120_000)
    elapsed = time.perf_counter() - start
    found = lab.match(page.url)
    assert found is not None
    httpx.delete(
        f"{server.url}/applications/jupyter/{found.group(1)}", headers=server.auth, timeout=30
    )
    return elapsed


def _jupyter(page: Any, server: DeployServer, runs: int) -> tuple[list[float], list[float]]:
    """Click-to-kernel-ready, unpooled then pooled (two instances waiting)."""
    _click_to_kernel(page, server)  # warm-up: the first start reads a cold disk
    unpooled = [_click_to_kernel(page, server) for _ in range(runs)]
    c = httpx.Client(base_url=server.url, headers=server.auth, timeout=30)
    c.put("/pools/jupyter", json={"size": 2})
    pooled = []
    for _ in range(runs):
        wait_for(
            lambda: c.get("/pools/jupyter").json()["ready"] >= 2,
            timeout=120,
            interval=0.05,
            what="the jupyter pool to be full",
        )
        pooled.append(_click_to_kernel(page, server))
    c.put("/pools/jupyter", json={"size": 0})
    c.close()
    return unpooled, pooled


def _console_load(page: Any, server: DeployServer) -> float:
    start = time.perf_counter()
    page.goto(f"{server.url}/console", wait_until="commit")
    page.locator("#page-info", has_text=SEEDED).wait_for(timeout=30_000)
    return time.perf_counter() - start


def _console_sort(page: Any) -> float:
    start = time.perf_counter()
    header = page.locator("#dep-table th[data-sort='status']")
    before = header.get_attribute("aria-sort")
    header.get_by_role("button").click()
    page.wait_for_function(
        "([b]) => document.querySelector(\"#dep-table th[data-sort='status']\")"
        ".getAttribute('aria-sort') !== b",
        arg=[before],
    )
    return time.perf_counter() - start


def bench_pages(runs: int) -> None:
    from playwright.sync_api import sync_playwright

    print(
        f"pages in headless Chromium: open /launch/example -> app shown, median of {runs}; "
        f"/launch/jupyter?urlpath=... -> kernel ready, median of {max(1, runs // 2)}"
    )
    with (
        suite(cull_interval_seconds=3600) as server,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_context().new_page()
        app = re.compile(rf"http://127\.0\.0\.1:{server.proxy.port}/user/[0-9a-f]{{32}}/")
        # a week of history, numbered as the store numbers ended records (before any launch;
        # in a thread: Playwright's event loop runs in this one)
        start = datetime.now(UTC) - timedelta(days=7)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(seed_history, server.db.uri, "binder", count=RECORDS, start=start).result()
        _launch_in_browser(page, server, app)  # warm-up
        unpooled = [_launch_in_browser(page, server, app) for _ in range(runs)]
        c = httpx.Client(base_url=server.url, headers=server.auth, timeout=30)
        c.put("/pools/example", json={"size": 3})
        pooled = []
        for _ in range(runs):
            wait_for(
                lambda: c.get("/pools/example").json()["ready"] >= 3,
                timeout=30,
                interval=0.01,
                what="the pool to be full",
            )
            pooled.append(_launch_in_browser(page, server, app))
        c.put("/pools/example", json={"size": 0})
        c.close()
        kernel_unpooled, kernel_pooled = _jupyter(page, server, max(1, runs // 2))
        page.goto(f"{server.url}/console")
        page.get_by_label("API key").fill(server.api_key)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#page-info", has_text=SEEDED).wait_for(timeout=30_000)
        loads = [_console_load(page, server) for _ in range(runs)]
        sorts = [_console_sort(page) for _ in range(runs)]
        browser.close()
    report(
        "pages",
        {
            "launch_page_unpooled_p50_ms": statistics.median(unpooled) * 1000,
            "launch_page_pooled_p50_ms": statistics.median(pooled) * 1000,
            "jupyter_click_to_kernel_unpooled_p50_ms": statistics.median(kernel_unpooled) * 1000,
            "jupyter_click_to_kernel_pooled_p50_ms": statistics.median(kernel_pooled) * 1000,
            "console_load_2000_p50_ms": statistics.median(loads) * 1000,
            "console_sort_2000_p50_ms": statistics.median(sorts) * 1000,
        },
        {},
    )
