"""Two suites on one database with the kubernetes backend, as two ops hosts behind a load
balancer: each host's proxy carries every route, and either host's deploy API serves every
deployment. A launch through one host is deleted through the other, and its route leaves both
proxies."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Database, DeployServer, Proxy, wait_for


@pytest.fixture
def two_hosts(
    tmp_path: Path, database: Database, kube: tuple[str, Any], namespace: str
) -> Iterator[list[tuple[DeployServer, Proxy]]]:
    name = f"hosts{secrets.token_hex(4)}"
    hosts: list[tuple[DeployServer, Proxy]] = []
    try:
        for n in range(2):
            workdir = tmp_path / f"host{n}"
            workdir.mkdir()
            proxy = Proxy(workdir).start()
            server = DeployServer(
                workdir, database, proxy, backend="kubernetes", launch_timeout_seconds=90
            )
            server.config.write_text(
                server.config.read_text().replace("[proxy]", f'database = "{name}"\n[proxy]', 1)
                + f'[deploy.kubernetes]\nkubeconfig = "{kube[0]}"\nnamespace = "{namespace}"\n'
            )
            if hosts:
                server.api_key = hosts[0][0].api_key  # one service: one key
            hosts.append((server.start(), proxy))
        yield hosts
    finally:
        for server, proxy in hosts:
            server.stop()
            proxy.stop()


def test_a_launch_through_one_host_is_deleted_through_the_other_and_leaves_both_proxies(
    two_hosts: list[tuple[DeployServer, Proxy]],
) -> None:
    (one, one_proxy), (other, other_proxy) = two_hosts
    dep_id = one.launch()
    info = one.wait_status(dep_id, "deployed", "failed", timeout=120)
    assert info["status"] == "deployed", info
    route = f"/user/{dep_id}"

    def served() -> bool:
        return all(
            route in p.routes() and p.get(f"{route}/").status_code == 200
            for p in (one_proxy, other_proxy)
        )

    wait_for(served, timeout=20, what="the app through every host's proxy")
    assert other.status(dep_id)["status"] == "deployed", "either host serves every deployment"
    deleted = httpx.delete(
        f"{other.url}/applications/example/{dep_id}", headers=other.auth, timeout=30
    )
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["status"] == "deleted"
    wait_for(
        lambda: all(route not in p.routes() for p in (one_proxy, other_proxy)),
        timeout=20,
        what="the route gone from both proxies",
    )
    assert one.status(dep_id)["status"] == "deleted"
