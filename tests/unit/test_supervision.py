"""Background loops are supervised: a crash is logged, counted, shown in /health, restarted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeBackend, FakeProxy, FakeStore, FakeWindows
from harness import wait_for
from starlette.testclient import TestClient

from common.settings import load_settings
from services.deploy_kubernetes.app import create_app

KEY = "k" * 32


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> Iterator[TestClient]:
    settings = load_settings(home=tmp_path, environ={"BINDER_API_KEY": KEY})
    app = create_app(
        settings,
        backend=backend,
        store=FakeStore(),
        windows=FakeWindows(),
        proxy=FakeProxy(),
        keeper_interval=0.05,
    )
    with TestClient(app) as c:
        wait_for(lambda: c.get("/health").status_code == 200, timeout=5, what="ready")
        yield c


def _crashes(client: TestClient, loop: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'binder_loop_crashes_total{{loop="{loop}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_keeper_crashing_on_a_raw_error_is_restarted_and_shown(
    client: TestClient, backend: FakeBackend
) -> None:
    backend.ping_raises = RuntimeError("a client error nobody translated")
    wait_for(lambda: _crashes(client, "keeper") >= 2, timeout=10, what="the keeper to crash")
    health = client.get("/health")
    assert health.status_code == 503
    assert "RuntimeError" in health.json()["loop:keeper"]
    backend.ping_raises = None
    wait_for(lambda: client.get("/health").status_code == 200, timeout=10, what="ready again")
    assert client.get("/health").json()["loop:keeper"] == "ok"


def test_a_backend_loop_that_dies_is_restarted(tmp_path: Path) -> None:
    backend = FakeBackend()
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("watch broke")
        await backend_forever()

    async def backend_forever() -> None:
        import anyio

        await anyio.sleep_forever()

    backend.extra_loops["watch"] = flaky
    settings = load_settings(home=tmp_path, environ={"BINDER_API_KEY": KEY})
    app = create_app(
        settings, backend=backend, store=FakeStore(), windows=FakeWindows(), proxy=FakeProxy()
    )
    with TestClient(app) as c:
        wait_for(lambda: len(runs) >= 3, timeout=10, what="the loop to be restarted twice")
        assert _crashes(c, "backend:watch") == 2
        wait_for(lambda: c.get("/health").status_code == 200, timeout=10, what="ready")
