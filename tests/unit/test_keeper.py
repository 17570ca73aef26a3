"""The keeper learns of a proxy restart from one sentinel route, not by listing every route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeBackend, FakeProxy, FakeStore
from harness import wait_for
from starlette.testclient import TestClient

from common.settings import load_settings
from services.deploy_kubernetes.app import create_app


@pytest.fixture
def parts() -> tuple[FakeStore, FakeBackend, FakeProxy]:
    return FakeStore(), FakeBackend(), FakeProxy()


@pytest.fixture
def client(tmp_path: Path, parts: tuple[FakeStore, FakeBackend, FakeProxy]) -> Iterator[TestClient]:
    store, backend, proxy = parts
    settings = load_settings(home=tmp_path, environ={"BINDER_API_KEY": "k" * 32})
    app = create_app(settings, backend=backend, store=store, proxy=proxy, keeper_interval=0.02)
    with TestClient(app) as c:
        wait_for(lambda: c.get("/health").status_code == 200, timeout=5, what="ready")
        yield c


def test_routes_are_listed_only_after_a_proxy_restart(
    client: TestClient, parts: tuple[FakeStore, FakeBackend, FakeProxy]
) -> None:
    _, backend, proxy = parts
    dep_id = client.post("/applications/example").json()["id"]
    wait_for(
        lambda: client.get(f"/applications/example/{dep_id}").json()["status"] == "deployed",
        timeout=5,
        what="deployed",
    )
    listed, pings = proxy.listings, backend.pings
    wait_for(lambda: backend.pings >= pings + 10, timeout=5, what="ten keeper rounds")
    assert proxy.listings == listed, "the keeper listed every route on a quiet proxy"
    proxy.table.clear()  # the proxy restarted: its routes are gone
    wait_for(lambda: f"/user/{dep_id}" in proxy.table, timeout=5, what="the route put back")
    assert proxy.listings == listed + 1


def test_a_quiet_suite_reads_its_deployments_only_every_few_rounds(
    client: TestClient, parts: tuple[FakeStore, FakeBackend, FakeProxy]
) -> None:
    store, backend, _ = parts
    reads, pings = store.full_reads, backend.pings
    wait_for(lambda: backend.pings >= pings + 10, timeout=5, what="ten keeper rounds")
    assert 1 <= store.full_reads - reads <= 3, "the keeper read every deployment each round"
