"""Two deploy servers of one host on one database (as ``[deploy] servers = 2`` runs them, each
addressed on a port of its own here): the records are the only truth they share. Capacity and
per-client limits are exact across them, a launch's events reach a watcher on the other, a
console session made on one is valid on the other, the leader moves when it dies or stalls, and
a launch whose server dies is finished by the other."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import pytest
from harness import EXAMPLE_COMMAND, Database, DeployServer, Proxy, wait_for

from services.deploy_kubernetes.errors import FencedError
from services.deploy_kubernetes.models import Deployment, Status, new_id, now
from services.deploy_kubernetes.store.base import FENCE, Change
from services.deploy_kubernetes.store.mongo import MongoStore

LEASE = 2.0
"""The leader's lease in these tests (seconds): a takeover within a few of them."""


@pytest.fixture
def pair(
    deploy_factory: Callable[..., DeployServer],
) -> Callable[..., tuple[DeployServer, DeployServer]]:
    def make(**deploy: Any) -> tuple[DeployServer, DeployServer]:
        options = {"leader_lease_seconds": LEASE, **deploy}
        first = deploy_factory(**options).start()
        second = deploy_factory(home=first.home, **options)
        second.api_key = first.api_key  # one suite: one key
        return first, second.start()

    return make


def _post(server: DeployServer, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/applications/example", headers=headers, timeout=30)


def test_a_burst_over_two_servers_admits_exactly_the_capacity(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    a, b = pair(
        max_deployments=20, per_client_max_deployments=1000, per_client_launches_per_minute=10**6
    )
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda n: _post(a if n % 2 else b), range(50)))
    codes = Counter(r.status_code for r in answers)
    assert codes == {200: 20, 429: 30}, codes
    refused = [r.json() for r in answers if r.status_code == 429]
    assert {r["type"] for r in refused} == {"capacity"}
    for server in (a, b):
        capacity = _console(server)["capacity"]
        assert (capacity["active"], capacity["max-deployments"]) == (20, 20)


def test_per_client_limits_are_exact_across_two_servers(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    a, b = pair(per_client_max_deployments=5, per_client_launches_per_minute=1000)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda n: _post(a if n % 2 else b), range(20)))
    assert Counter(r.status_code for r in answers) == {200: 5, 429: 15}
    assert all("per_client_max_deployments" in r.text for r in answers if r.status_code == 429)


def test_launch_windows_are_exact_across_two_servers(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    a, b = pair(per_client_max_deployments=1000, per_client_launches_per_minute=6)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda n: _post(a if n % 2 else b), range(20)))
    assert Counter(r.status_code for r in answers) == {200: 6, 429: 14}
    assert all("per_client_launches_per_minute" in r.text for r in answers if r.status_code == 429)


def test_a_launch_is_followed_on_the_other_server(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    a, b = pair()
    template = {"command": [*EXAMPLE_COMMAND, "--delay", "1.5"]}
    put = httpx.put(f"{a.url}/templates/slow", json=template, headers=a.auth, timeout=10)
    assert put.status_code == 200, put.text
    wait_for(
        lambda: httpx.get(f"{b.url}/templates/slow", timeout=5).status_code == 200,
        timeout=10,
        what="the template registered on one server to be known to the other",
    )
    dep_id = a.launch("slow")
    statuses: list[str] = []
    with httpx.stream("GET", f"{b.url}/applications/slow/{dep_id}/events", timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and "status" in line:
                statuses.append(json.loads(line[6:])["status"])
                if statuses[-1] in ("deployed", "failed"):
                    break
    assert statuses[0] == "deploying"
    assert statuses[-1] == "deployed"
    assert b.status(dep_id, "slow")["status"] == "deployed"


def _sign_in(server: DeployServer) -> httpx.Cookies:
    answer = httpx.post(
        f"{server.url}/console/session",
        json={"key": server.api_key},
        headers={"X-Binder-Console": "1"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.cookies


def _console(server: DeployServer, cookies: httpx.Cookies | None = None) -> dict[str, Any]:
    cookies = cookies or _sign_in(server)
    answer = httpx.get(f"{server.url}/console/api/overview", cookies=cookies, timeout=10)
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def test_a_console_session_made_on_one_server_is_valid_on_the_other(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    a, b = pair()
    cookies = _sign_in(a)
    assert "capacity" in _console(b, cookies)
    out = httpx.delete(
        f"{b.url}/console/session", cookies=cookies, headers={"X-Binder-Console": "1"}, timeout=10
    )
    assert out.status_code == 200
    answer = httpx.get(f"{a.url}/console/api/overview", cookies=cookies, timeout=10)
    assert answer.status_code == 403, "a session ended on one server ends on every one"


def _leader(*servers: DeployServer) -> DeployServer:
    def one() -> DeployServer | None:
        leading = [s for s in servers if s.proc is not None and s.proc.alive() and s.leads()]
        return leading[0] if len(leading) == 1 else None

    found: DeployServer = wait_for(one, timeout=20, what="exactly one leader")
    return found


def test_the_leader_moves_when_it_is_killed_and_its_launch_is_finished_by_the_other(
    pair: Callable[..., tuple[DeployServer, DeployServer]], proxy: Proxy
) -> None:
    a, b = pair()
    leader = _leader(a, b)
    other = b if leader is a else a
    template = {"command": [*EXAMPLE_COMMAND, "--delay", "2"]}
    put = httpx.put(f"{leader.url}/templates/slow", json=template, headers=leader.auth)
    assert put.status_code == 200, put.text
    wait_for(
        lambda: httpx.get(f"{other.url}/templates/slow", timeout=5).status_code == 200,
        timeout=10,
        what="the template on the other server",
    )
    dep_id = leader.launch("slow")  # its app listens only after 2 s
    leader.kill9()
    killed = time.monotonic()
    assert _leader(other) is other
    took_over = time.monotonic() - killed
    assert took_over < 3 * LEASE + 5, f"the other server led only after {took_over:.1f} s"
    info = other.wait_status(dep_id, "deployed", "failed", timeout=60, template="slow")
    assert info["status"] == "deployed", info
    assert proxy.get(f"/user/{dep_id}/").status_code == 200
    pids = other.app_pids()
    assert set(pids) == {dep_id}, "one app, the adopted launch's, and no orphan"


def test_a_stalled_leader_loses_its_lease_and_gives_up_its_loops(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    a, b = pair()
    leader = _leader(a, b)
    other = b if leader is a else a
    assert leader.proc is not None
    os.kill(leader.proc.pid, signal.SIGSTOP)
    try:
        wait_for(other.leads, timeout=3 * LEASE + 5, what="the other server to lead")
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
    wait_for(lambda: not leader.leads(), timeout=2 * LEASE + 5, what="the stalled one to let go")
    assert other.leads()
    log = (leader.workdir / "deploy.log").read_text()
    assert "lease leader no longer held here" in log


def test_launches_go_on_while_one_of_two_servers_dies(
    pair: Callable[..., tuple[DeployServer, DeployServer]],
) -> None:
    """A storm of launches on both; one is killed; every launch answered ends deployed (or
    failed with a reason), none stays deploying, and no app runs without a deployed record."""
    a, b = pair(
        max_deployments=200, per_client_max_deployments=1000, per_client_launches_per_minute=10**6
    )
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def storm(server: DeployServer) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set() and len(answered) < 60:
                try:
                    r = http.post("/applications/example")
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    with lock:
                        answered.append(r.json()["id"])

    threads = [threading.Thread(target=storm, args=(s,)) for s in (a, b, a, b)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answered) >= 20, timeout=30, what="launches under way")
    a.kill9()
    stop.set()
    for thread in threads:
        thread.join(30)
    final = {i: b.wait_status(i, "deployed", "failed", timeout=90) for i in answered}
    assert all(f["status"] == "deployed" or f.get("reason") for f in final.values())
    running = set(b.app_pids())
    deployed = {i for i, f in final.items() if f["status"] == "deployed"}
    assert deployed <= running

    def every_app_has_a_deployed_record() -> bool:
        # a launch the killed server had begun but not answered is finished by the other (its
        # record deployed, its id never told to a client) or failed and its app removed
        listed = b.client().get("/applications/", params={"status": "deployed"}, headers=b.auth)
        listed.raise_for_status()
        return set(b.app_pids()) <= {d["id"] for d in listed.json()}

    wait_for(every_app_has_a_deployed_record, timeout=20, what="no app without a record")


def test_a_leaders_write_lands_only_while_its_lease_is_its_own(database: Database) -> None:
    """The fence, on the real database: a write made under the leader's lease fails once the
    lease has passed by the writer's clock (a stall), and once another server took it."""

    async def main() -> None:
        name = f"fence{secrets.token_hex(4)}"
        one = MongoStore(uri=database.uri, database=name)
        two = MongoStore(uri=database.uri, database=name)
        await one.open()
        try:
            fence = await one.hold("leader", "one", seconds=0.5)
            assert fence is not None
            assert await two.hold("leader", "two", seconds=0.5) is None, "held: not taken"
            dep = Deployment(
                id=new_id(), template="t", status=Status.DEPLOYING, created=now(), cull_timeout_ms=1
            )
            token = FENCE.set(fence)
            try:
                await one.insert(dep)  # lands: the lease is the writer's
                await anyio.sleep(0.6)  # stalled past the lease, nobody took it yet
                with pytest.raises(FencedError):
                    await one.move(dep.id, Status.DELETED, Change(reason="late"))
                taken = await two.hold("leader", "two", seconds=5)
                assert taken is not None
                assert taken.epoch == fence.epoch + 1
                with pytest.raises(FencedError):
                    await one.update(dep.id, Change(reason="late"))
            finally:
                FENCE.reset(token)
            stored = await one.get(dep.id)
            assert stored is not None
            assert (stored.status, stored.reason) == (Status.DEPLOYING, None), "nothing landed"
            assert (await one.counts()).total == 1
        finally:
            await one.close()
            await two.close()

    anyio.run(main)
