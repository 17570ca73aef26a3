"""The keeper holds the proxy's routes to the records each round, without reading every
deployment from the database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_for
from served import Parts, fake_parts, served
from starlette.testclient import TestClient

from common.proxy import ProxyRoute


@pytest.fixture
def parts() -> Parts:
    return fake_parts()


@pytest.fixture
def client(tmp_path: Path, parts: Parts) -> Iterator[TestClient]:
    with served(
        parts, home=tmp_path, environ={"BINDER_API_KEY": "k" * 32}, keeper_interval=0.02
    ) as c:
        yield c


def _deployed(client: TestClient) -> str:
    dep_id: str = client.post("/applications/example").json()["id"]
    wait_for(
        lambda: client.get(f"/applications/example/{dep_id}").json()["status"] == "deployed",
        timeout=5,
        what="deployed",
    )
    return dep_id


def test_routes_are_put_back_after_a_proxy_restart(client: TestClient, parts: Parts) -> None:
    _, _, proxy = parts
    dep_id = _deployed(client)
    proxy.table.clear()  # the proxy restarted: its routes are gone
    wait_for(lambda: f"/user/{dep_id}" in proxy.table, timeout=5, what="the route put back")


def test_hijacked_missing_and_stray_routes_are_repaired_within_rounds(
    client: TestClient, parts: Parts
) -> None:
    store, backend, proxy = parts
    first, second = _deployed(client), _deployed(client)
    target = proxy.table[f"/user/{first}"].target
    reads = store.full_reads
    proxy.table[f"/user/{first}"] = ProxyRoute(target="http://127.0.0.1:6666")  # hijacked
    del proxy.table[f"/user/{second}"]  # removed
    stray = "/user/" + "e" * 32
    proxy.table[stray] = ProxyRoute(target="http://127.0.0.1:6667")  # no such deployment
    # catches every path no app's route takes: pointed back at the deploy server's pages
    proxy.table["/"] = ProxyRoute(target="http://127.0.0.1:6668")
    pings = backend.pings
    wait_for(
        lambda: (
            proxy.table.get(f"/user/{first}") == ProxyRoute(target=target)
            and f"/user/{second}" in proxy.table
            and stray not in proxy.table
            and proxy.table.get("/") == ProxyRoute(target="http://127.0.0.1:8084")
        ),
        timeout=5,
        what="the routes held to the records",
    )
    assert backend.pings - pings <= 3, "repaired later than within a few keeper rounds"
    assert store.full_reads - reads <= 1, "the keeper read every deployment to hold routes"


def test_a_quiet_suite_reads_its_deployments_only_every_few_rounds(
    client: TestClient, parts: Parts
) -> None:
    store, backend, _ = parts
    reads, pings = store.full_reads, backend.pings
    wait_for(lambda: backend.pings >= pings + 10, timeout=5, what="ten keeper rounds")
    assert 1 <= store.full_reads - reads <= 3, "the keeper read every deployment each round"
