"""The deploy server against the real database server, the real proxy and real processes."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import EXAMPLE_COMMAND, DeployServer, Proxy, wait_for

from common.processes import alive


def test_launch_serves_through_proxy_then_delete_removes_route_and_process(
    deploy: DeployServer, proxy: Proxy
) -> None:
    dep_id = deploy.launch()
    assert len(dep_id) == 32
    info = deploy.wait_status(dep_id, "deployed", "failed")
    assert info["status"] == "deployed", info
    assert info["location"] == f"127.0.0.1:{proxy.port}/user/{dep_id}"
    page = proxy.get(f"/user/{dep_id}/")
    assert page.status_code == 200
    assert dep_id in page.text
    pid = deploy.app_pids()[dep_id]
    assert alive(pid)

    response = httpx.delete(f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth)
    assert response.status_code == 200
    assert response.json()["status"] == "deleted"
    assert deploy.status(dep_id)["status"] == "deleted"
    assert f"/user/{dep_id}" not in proxy.routes()
    assert proxy.get(f"/user/{dep_id}/").status_code == 404
    wait_for(lambda: not alive(pid), timeout=10, what="the app process to end")


def test_twenty_concurrent_launches_all_deploy(deploy: DeployServer, proxy: Proxy) -> None:
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda _: deploy.launch(), range(20)))
    assert len(set(ids)) == 20
    for dep_id in ids:
        assert deploy.wait_status(dep_id, "deployed", "failed", timeout=60)["status"] == "deployed"
    routes = proxy.routes()
    assert all(f"/user/{i}" in routes for i in ids)
    assert all(proxy.get(f"/user/{i}/").status_code == 200 for i in ids)


def test_idle_app_is_culled_while_busy_one_survives(
    deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    deploy = deploy_factory(cull_interval_seconds=0.5).start()
    busy = deploy.launch("example", **{"cull-timeout": 3000})
    idle = deploy.launch("example", **{"cull-timeout": 3000})
    for dep_id in (busy, idle):
        deploy.wait_status(dep_id, "deployed")
    deadline = time.monotonic() + 20
    while deploy.status(idle)["status"] == "deployed":
        assert time.monotonic() < deadline, "the idle app was never culled"
        assert proxy.get(f"/user/{busy}/").status_code == 200
        time.sleep(0.3)
    culled = deploy.status(idle)
    assert culled["status"] == "deleted"
    assert "inactivity" in culled["reason"]
    # the busy one kept being used through the proxy the whole time
    assert deploy.status(busy)["status"] == "deployed"
    assert proxy.get(f"/user/{busy}/").status_code == 200


def test_app_older_than_max_age_is_culled(
    deploy_factory: Callable[..., DeployServer], proxy: Proxy
) -> None:
    deploy = deploy_factory(cull_interval_seconds=0.5, max_age_seconds=2).start()
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    info = deploy.wait_status(dep_id, "deleted", timeout=20)
    assert "maximum age" in info["reason"]


def test_pooled_launch_answers_location_on_first_poll(deploy: DeployServer, proxy: Proxy) -> None:
    resize = httpx.put(f"{deploy.url}/pools/example", json={"size": 2}, headers=deploy.auth)
    assert resize.status_code == 200
    wait_for(
        lambda: httpx.get(f"{deploy.url}/pools/example", headers=deploy.auth).json()["ready"] == 2,
        timeout=30,
        what="two pooled instances",
    )
    dep_id = deploy.launch()
    first = deploy.status(dep_id)
    assert first["status"] == "deployed"
    assert first["location"].endswith(f"/user/{dep_id}")
    assert proxy.get(f"/user/{dep_id}/").status_code == 200
    # the pool refills in the background
    wait_for(
        lambda: httpx.get(f"{deploy.url}/pools/example", headers=deploy.auth).json()["ready"] == 2,
        timeout=30,
        what="the pool to refill",
    )
    listed = httpx.get(f"{deploy.url}/applications/example", headers=deploy.auth).json()
    assert [d["id"] for d in listed] == [dep_id], "pooled instances are not users' deployments"


def test_kill9_mid_launch_then_restart_leaves_nothing_deploying_or_orphaned(
    deploy: DeployServer, proxy: Proxy
) -> None:
    ids = [deploy.launch() for _ in range(6)]
    deploy.kill9()
    deploy.start()
    final = {i: deploy.wait_status(i, "deployed", "failed", "deleted", timeout=60) for i in ids}
    pids = deploy.app_pids()
    routes = proxy.routes()
    for dep_id, info in final.items():
        if info["status"] == "deployed":
            assert alive(pids[dep_id])
            assert f"/user/{dep_id}" in routes
            assert proxy.get(f"/user/{dep_id}/").status_code == 200
        else:
            assert info.get("reason"), info
            assert dep_id not in pids
    # every running app belongs to a deployed record
    assert set(pids) <= {i for i, info in final.items() if info["status"] == "deployed"}


def test_deployed_apps_survive_a_server_restart(deploy: DeployServer, proxy: Proxy) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    pid = deploy.app_pids()[dep_id]
    deploy.kill9()
    deploy.start()
    assert deploy.status(dep_id)["status"] == "deployed"
    assert deploy.app_pids()[dep_id] == pid
    assert proxy.get(f"/user/{dep_id}/").status_code == 200


def test_app_that_dies_is_marked_failed_with_its_exit(deploy: DeployServer) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    deploy.kill_app(dep_id)
    info = deploy.wait_status(dep_id, "failed", timeout=15)
    assert "SIGKILL" in info["reason"]


def test_routes_come_back_after_the_proxy_restarts(deploy: DeployServer, proxy: Proxy) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    proxy.restart()
    assert f"/user/{dep_id}" not in proxy.routes()
    wait_for(
        lambda: proxy.get(f"/user/{dep_id}/").status_code == 200,
        timeout=20,
        what="the route to be registered again",
    )


def test_events_stream_each_phase_until_final(deploy: DeployServer) -> None:
    dep_id = deploy.launch()
    statuses = []
    with httpx.stream("GET", f"{deploy.url}/applications/example/{dep_id}/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                import json

                statuses.append(json.loads(line[6:])["status"])
                if statuses[-1] == "deployed":
                    httpx.delete(f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth)
    assert statuses[-1] == "deleted"
    assert "deployed" in statuses


def test_a_client_leaving_the_events_stream_is_no_error(deploy: DeployServer) -> None:
    dep_id = deploy.launch()
    url = f"{deploy.url}/applications/example/{dep_id}/events"
    with httpx.stream("GET", url, timeout=30) as r:
        for line in r.iter_lines():
            if '"status": "deployed"' in line:
                break  # and leave while the stream goes on
    # the server notices the client left, then ends its stream without an error
    httpx.delete(f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth)
    deploy.wait_status(dep_id, "deleted")
    assert '"level": "error"' not in (deploy.workdir / "deploy.log").read_text()


def test_failed_command_reports_exit_code_and_its_last_lines(deploy: DeployServer) -> None:
    template = {"command": ["/bin/sh", "-c", "echo starting; echo broken >&2; exit 3"]}
    put = httpx.put(f"{deploy.url}/templates/broken", json=template, headers=deploy.auth)
    assert put.status_code == 200, put.text
    dep_id = deploy.launch("broken")
    info = deploy.wait_status(dep_id, "failed", "deployed", template="broken")
    assert info["status"] == "failed"
    assert info["reason"] == "process exited with code 3; last output lines: starting | broken"


def test_a_command_the_apps_user_cannot_run_says_so(deploy: DeployServer) -> None:
    """A program under a folder only root may enter (an interpreter in root's home, say): the
    reason has the exit code and the line that says why. The folder is in the checkout, which
    the sandbox shows read-only, not under ``/tmp``, of which an app sees a private one."""
    assert os.geteuid() == 0, "needs root: apps run as a user of their own only then"
    private = Path(tempfile.mkdtemp(prefix="private-", dir=Path(__file__).parents[1]))
    try:
        private.chmod(0o700)
        program = private / "app"
        program.write_text("#!/bin/sh\necho never\n")
        program.chmod(0o755)
        put = httpx.put(
            f"{deploy.url}/templates/private", json={"command": [str(program)]}, headers=deploy.auth
        )
        assert put.status_code == 200, put.text
        info = deploy.wait_status(
            deploy.launch("private"), "failed", "deployed", template="private"
        )
        # 126 from a shell; 1 from the sandbox's exec, whose line names the program all the same
        assert re.match(r"process exited with code (126|1); last output lines: ", info["reason"])
        assert f"{program}: Permission denied" in info["reason"]
    finally:
        shutil.rmtree(private)


def test_slow_app_is_deployed_and_its_log_gets_no_line_per_probe(
    deploy: DeployServer, proxy: Proxy
) -> None:
    template = {"command": [*EXAMPLE_COMMAND, "--delay", "1.5"]}
    put = httpx.put(f"{deploy.url}/templates/slow", json=template, headers=deploy.auth)
    assert put.status_code == 200, put.text
    dep_id = deploy.launch("slow")
    info = deploy.wait_status(dep_id, "deployed", "failed", template="slow")
    assert info["status"] == "deployed", info
    log = deploy.home / "logs" / "apps" / f"{dep_id}.log"
    assert "GET " not in log.read_text(), "readiness probes were logged by the app"
    assert proxy.get(f"/user/{dep_id}/").status_code == 200
    wait_for(
        lambda: log.read_text().count("GET ") == 1,
        timeout=10,
        what="the app to log the one request made through the proxy",
    )


def test_client_leaving_the_events_stream_logs_no_error(deploy: DeployServer) -> None:
    dep_id = deploy.launch()
    with httpx.stream("GET", f"{deploy.url}/applications/example/{dep_id}/events", timeout=30) as r:
        for line in r.iter_lines():
            if '"status": "deployed"' in line:
                break
    response = httpx.delete(f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth)
    assert response.json()["status"] == "deleted"
    assert deploy.proc is not None
    assert "failed unexpectedly" not in deploy.proc.output()
