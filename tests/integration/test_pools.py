"""Pools on the real server (local backend, real database and proxy): a pool fills with its
instances started together, concurrent launches on a pool never share an instance and keep the
capacity limits exact, and an answered claim survives kill -9 of the database and the server."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from harness import EXAMPLE_COMMAND, Database, DeployServer, Proxy, wait_for

SLOW_START = 2.0
"""Seconds the slow template's app waits before it listens."""


def _pool(deploy: DeployServer, template: str) -> dict[str, Any]:
    state: dict[str, Any] = httpx.get(
        f"{deploy.url}/pools/{template}", headers=deploy.auth, timeout=10
    ).json()
    return state


def _resize(deploy: DeployServer, template: str, size: int) -> None:
    put = httpx.put(
        f"{deploy.url}/pools/{template}", json={"size": size}, headers=deploy.auth, timeout=10
    )
    assert put.status_code == 200, put.text


def _ready(deploy: DeployServer, template: str, size: int) -> None:
    wait_for(lambda: _pool(deploy, template)["ready"] == size, timeout=60, what="a full pool")


def _burst(
    deploy: DeployServer, runs: int, template: str = "example", **headers: str
) -> list[httpx.Response]:
    url = f"/applications/{template}"
    with httpx.Client(base_url=deploy.url, timeout=30) as client, ThreadPoolExecutor(runs) as pool:
        return list(pool.map(lambda _: client.post(url, headers=headers), range(runs)))


def _users_active(deploy: DeployServer, template: str = "example") -> int:
    listed = httpx.get(f"{deploy.url}/applications/{template}", headers=deploy.auth).json()
    return sum(d["status"] in ("deploying", "deployed") for d in listed)


def test_pool_of_five_starts_its_instances_together(deploy: DeployServer) -> None:
    slow = {"command": [*EXAMPLE_COMMAND, "--delay", str(SLOW_START)], "port": 8888}
    put = httpx.put(f"{deploy.url}/templates/slow", json=slow, headers=deploy.auth, timeout=10)
    assert put.status_code == 200, put.text
    started = time.monotonic()
    _resize(deploy, "slow", 5)
    seen = wait_for(
        lambda: (state := _pool(deploy, "slow"))["starting"] == 5 and state,
        timeout=10,
        what="five instances starting at once",
    )
    assert seen["ready"] == 0
    _ready(deploy, "slow", 5)
    filled = time.monotonic() - started
    # one after another would take five starts (10 s); together about one, plus the machine's
    # time to start five processes
    assert filled < 4 * SLOW_START, f"the pool took {filled:.1f} s to fill"


def test_concurrent_launches_on_a_pool_hand_each_instance_out_once(
    deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    """Eight launches at once of one client allowed eight: the three ready instances go to three
    of them, each to one; the claims count for the client as the other launches do. (A burst
    beyond the client's limit races the claims against the other launches for its last places,
    and which launches get them is then not the pool's to say.)"""
    deploy = deploy_factory(per_client_max_deployments=8).start()
    _resize(deploy, "example", 3)
    _ready(deploy, "example", 3)
    answers = _burst(deploy, 8)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    launched = [r.json() for r in answers]
    assert len({d["id"] for d in launched}) == 8
    pooled = [d for d in launched if d["status"] == "deployed"]
    assert len(pooled) >= 3, "the three ready instances were handed out"
    assert len({d["url"] for d in pooled}) == len(pooled), "an instance went to two launches"
    for dep in pooled:  # each answer's app answers there, at once
        assert dep["location"].endswith(f"/user/{dep['id']}")
        assert proxy.get(f"/user/{dep['id']}/").status_code == 200
    refused = httpx.post(f"{deploy.url}/applications/example", timeout=10)
    assert refused.status_code == 429, "the claims counted for the client"
    assert refused.json()["type"] == "rateLimited"
    _ready(deploy, "example", 3)  # the pool refills beside the users' deployments
    assert _users_active(deploy) == 8


def test_concurrent_launches_on_a_pool_keep_the_server_limit_exact(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    deploy = deploy_factory(max_deployments=5).start()
    _resize(deploy, "example", 3)
    _ready(deploy, "example", 3)
    answers = _burst(deploy, 20, Authorization=deploy.api_key)
    accepted = [r.json() for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len({d["id"] for d in accepted}) == len(accepted)
    assert sum(d["status"] == "deployed" for d in accepted) >= 3
    assert 3 <= len(accepted) <= 5
    assert {r.status_code for r in refused} == {429}
    assert {r.json()["type"] for r in refused} == {"capacity"}

    def total() -> int:
        state = _pool(deploy, "example")
        running: int = _users_active(deploy) + state["ready"] + state["starting"]
        assert running <= 5, f"{running} deployments on a server that runs at most 5"
        return running

    # the pool takes what room the users left, and no more
    wait_for(lambda: total() == 5, timeout=30, what="the pool to take the room left")
    assert _users_active(deploy) == len(accepted)


def test_an_answered_claim_survives_kill9_and_is_never_handed_out_again(
    own_db: Database, deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    deploy = deploy_factory(db=own_db).start()
    pooled = {"command": list(EXAMPLE_COMMAND), "port": 8888, "pool-size": 2}
    put = httpx.put(f"{deploy.url}/templates/pooled", json=pooled, headers=deploy.auth)
    assert put.status_code == 200, put.text
    _ready(deploy, "pooled", 2)
    answer = httpx.post(f"{deploy.url}/applications/pooled", timeout=10).json()
    assert answer["status"] == "deployed"
    mine = answer["id"]
    own_db.kill9()  # an instant after the answer
    own_db.start()
    deploy.kill9()
    deploy.start()
    after = deploy.status(mine, "pooled")
    assert after.get("status") == "deployed", f"the claim was lost: {after}"
    assert proxy.get(f"/user/{mine}/").status_code == 200
    _ready(deploy, "pooled", 2)  # refilled; the claimed one is not among the pool's
    later = [r.json() for r in _burst(deploy, 2, "pooled")]
    assert [d["status"] for d in later] == ["deployed", "deployed"]
    assert mine not in {d["id"] for d in later}, "a claimed instance was handed out again"
    assert _users_active(deploy, "pooled") == 3


def test_a_pool_emptied_then_wanted_again_is_retired_then_refilled(deploy: DeployServer) -> None:
    """Once no template has a pool and none is left, refills skip their database read; a pool
    wanted again must still be filled, and one emptied must still be retired."""
    _resize(deploy, "example", 2)
    _ready(deploy, "example", 2)
    _resize(deploy, "example", 0)
    wait_for(
        lambda: _pool(deploy, "example")["ready"] + _pool(deploy, "example")["starting"] == 0,
        timeout=30,
        what="the emptied pool's instances retired",
    )
    for _ in range(3):  # launches that end wake refills, which find nothing to do
        launched = httpx.post(f"{deploy.url}/applications/example", timeout=30)
        assert launched.status_code == 200, launched.text
    _resize(deploy, "example", 1)
    _ready(deploy, "example", 1)
    claimed = httpx.post(f"{deploy.url}/applications/example", timeout=30).json()
    assert claimed["status"] == "deployed"  # from the pool, at once


def test_a_shipped_template_keeps_its_resized_pool_across_a_restart(deploy: DeployServer) -> None:
    _resize(deploy, "example", 1)
    _ready(deploy, "example", 1)
    deploy.stop()
    deploy.start()  # the template files seed the templates again
    assert _pool(deploy, "example")["size"] == 1
    _ready(deploy, "example", 1)
    listed = httpx.get(f"{deploy.url}/templates/example", headers=deploy.auth).json()
    assert listed["pool-size"] == 1
