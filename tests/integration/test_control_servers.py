"""``[deploy] servers = 2`` under the real supervisord: two deploy-server processes on one port,
shown as ``deploy-kubernetes:0`` and ``:1``, restarted one at a time so that launches never stop,
and every suite process gone after ``stop-all``."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import wait_for
from integration.test_control import Control, _suite_pids

from common.peers import listeners


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Control]:
    base = tmp_path_factory.mktemp("servers")
    c = Control(base / "home", base / "binder.toml")
    c.config.write_text(
        c.config.read_text()
        + "servers = 2\nper_client_max_deployments = 1000\n"
        + "per_client_launches_per_minute = 1000000\n"
    )
    c.run("start-all", "--config", str(c.config), check=True)
    yield c
    c.run("stop-all")


def test_two_servers_share_the_port_and_show_as_two_rows(control: Control) -> None:
    status = control.status()
    servers = {k: v for k, v in status.items() if k.startswith("deploy-kubernetes")}
    assert set(servers) == {"deploy-kubernetes:0", "deploy-kubernetes:1"}
    assert all(r["state"] == "RUNNING" and r["ready"] for r in servers.values()), servers
    assert len({r["pid"] for r in servers.values()}) == 2
    one = control.run("deploy-kubernetes", "status", "--json")
    assert one.returncode == 0, one.stdout + one.stderr
    dep_id = control.launch()  # on either; read on either
    assert control.through_proxy(dep_id) == 200


def test_a_restart_rolls_the_servers_one_at_a_time_and_launches_never_stop(
    control: Control,
) -> None:
    before = {k: v["pid"] for k, v in control.status().items() if ":" in k}
    kept = control.launch()  # an app that outlives the servers it was launched by
    codes: Counter[int | str] = Counter()
    stop = threading.Event()

    def launch_all_along() -> None:
        # a connection per request, as Binder's client makes them: a kept-alive connection that
        # a stopping server closes as a request is sent on it fails that request (HTTP/1.1's
        # own race, which a client retries)
        fresh = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=control.deploy_url, timeout=10, limits=fresh) as http:
            while not stop.is_set():
                try:
                    r = http.post("/applications/example")
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        dep_id = r.json()["id"]
                        http.delete(
                            f"/applications/example/{dep_id}",
                            headers={"Authorization": control.api_key},
                        )
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                stop.wait(0.05)

    thread = threading.Thread(target=launch_all_along)
    thread.start()
    try:
        wait_for(lambda: codes[200] >= 3, timeout=30, what="launches under way")
        restarted = control.run("restart", "deploy-kubernetes")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        launched_before = codes[200]
        wait_for(lambda: codes[200] >= launched_before + 3, timeout=30, what="launches after")
    finally:
        stop.set()
        thread.join(30)
    assert set(codes) == {200}, f"launches stopped during the restart: {codes}"
    # no child of a stopped server (an app's sandbox helper) holds its listener: the kernel
    # would hand it connections that nothing accepts
    port = int(control.deploy_url.rsplit(":", 1)[1])
    assert len(listeners(port)) == len(before), listeners(port)
    assert control.through_proxy(kept) == 200
    after = {k: v["pid"] for k, v in control.status().items() if ":" in k}
    assert set(after) == set(before)
    assert all(after[k] != before[k] for k in before), "each server was restarted"


def test_stop_all_leaves_no_process(tmp_path: Path) -> None:
    c = Control(tmp_path / "home", tmp_path / "binder.toml")
    c.config.write_text(c.config.read_text() + "servers = 2\n")
    c.run("start-all", "--config", str(c.config), check=True)
    c.run("stop-all", check=True)
    wait_for(lambda: not _suite_pids(c.home), timeout=15, what="no process of the suite")
