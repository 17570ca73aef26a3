"""Two deploy servers of one suite on one host, each with its parked sandbox slots: no uid or
slot is handed out twice, and an app ended through the server that did not launch it leaves
nothing of its sandbox (cgroup, namespace, claims) behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import DeployServer, wait_for

from services.deploy_kubernetes.backends.local.sandboxed import suite_cgroups
from services.deploy_kubernetes.backends.local.state import suite_label

APPS = 12


@pytest.fixture
def pair(deploy_factory: Callable[..., DeployServer]) -> tuple[DeployServer, DeployServer]:
    if os.geteuid() != 0:
        pytest.fail("sandboxed apps need the tests to run as root (the deploy server is root)")
    options: dict[str, Any] = {
        "leader_lease_seconds": 2.0,
        "per_client_max_deployments": 1000,
        "per_client_launches_per_minute": 10**6,
    }
    first = deploy_factory(**options).start()
    assert first.settings().deploy.local.sandbox
    second = deploy_factory(home=first.home, **options)
    second.api_key = first.api_key  # one suite: one key
    return first, second.start()


def _uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _leftovers(state: Path) -> tuple[set[str], set[int], set[int], set[str]]:
    """Apps' cgroups, parked slots' numbers, the suite's namespaces' numbers, claim files."""
    cgroups = suite_cgroups(state)
    prefix = f"b{suite_label(state)[:6]}-"
    netns = {int(n.removeprefix(prefix)) for n in os.listdir("/run/netns") if n.startswith(prefix)}
    claims = set(os.listdir(state / "claims")) if (state / "claims").exists() else set()
    return set(cgroups.apps()), set(cgroups.unclaimed()), netns, claims


def test_two_servers_share_no_uid_and_an_app_ended_through_the_other_leaves_nothing(
    pair: tuple[DeployServer, DeployServer],
) -> None:
    a, b = pair

    def launch(n: int) -> tuple[DeployServer, str]:
        server = a if n % 2 else b
        answer = httpx.post(f"{server.url}/applications/example", timeout=30)
        assert answer.status_code == 200, answer.text
        return server, answer.json()["id"]

    with ThreadPoolExecutor(max_workers=APPS) as pool:
        launched = list(pool.map(launch, range(APPS)))
    for server, dep_id in launched:
        assert server.wait_status(dep_id, "deployed", "failed")["status"] == "deployed"
    uids: dict[str, int] = {}
    for _, dep_id in launched:
        seen = {uid for pid in a.app_processes(dep_id) if (uid := _uid(pid))}
        assert len(seen) == 1, f"{dep_id} runs as {seen}"
        uids[dep_id] = seen.pop()
    assert len(set(uids.values())) == APPS, "two apps were given one uid"

    for server, dep_id in launched:  # each ended through the server that did not launch it
        other = b if server is a else a
        gone = httpx.delete(f"{other.url}/applications/example/{dep_id}", headers=a.auth)
        assert gone.status_code == 200, gone.text
    for _, dep_id in launched:
        assert a.status(dep_id)["status"] == "deleted"

    state = a.home / "run" / "local"

    def clean() -> tuple[set[str], set[int], set[int], set[str]] | None:
        apps, parked, netns, claims = _leftovers(state)
        slot_claims = {int(c.removeprefix("slot-")) for c in claims if c.startswith("slot-")}
        uid_claims = {c for c in claims if c.startswith("uid-")}
        done = not apps and netns == parked == slot_claims and len(uid_claims) == len(parked)
        return (apps, parked, netns, claims) if done else None

    wait_for(clean, timeout=30, what="nothing of the ended apps' sandboxes left but parked slots")
    assert not {uid for uid in uids.values() if _uid_running(uid)}, "an app's uid runs on"


def _uid_running(uid: int) -> bool:
    return any(entry.isdigit() and _uid(int(entry)) == uid for entry in os.listdir("/proc"))
