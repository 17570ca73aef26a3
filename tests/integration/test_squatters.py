"""Another user's program on a service's port while the service is down: the suite sends it no
credential, says who holds the port, and takes the port back once it is free."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import CHP, PROXY_EDGE, DeployServer, Proxy, free_port, wait_for
from squatter import NOBODY, Squatter


def _proxy_health(server: DeployServer) -> str:
    return str(httpx.get(server.url + "/health", timeout=5).json()["proxy"])


def test_a_squatted_proxy_api_port_gets_no_token_and_the_routes_come_back(
    deploy: DeployServer, proxy: Proxy
) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    proxy.stop()
    with Squatter(proxy.api_port) as squatter:
        wait_for(
            lambda: f"user {NOBODY}" in _proxy_health(deploy),
            timeout=20,
            what="the keeper to refuse the squatted port",
        )
        assert "not by the suite's user" in _proxy_health(deploy)
        assert proxy.token.encode() not in squatter.received()
    proxy.start()
    wait_for(
        lambda: proxy.get(f"/user/{dep_id}/").status_code == 200,
        timeout=20,
        what="the route put back in the restarted proxy",
    )
    assert _proxy_health(deploy) == "ok"


def test_the_log_sink_sends_no_record_to_a_squatted_aggregator_port(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    server = deploy_factory()
    match = re.search(r"\[logging\]\nport = (\d+)", server.config.read_text())
    assert match is not None
    with Squatter(int(match.group(1))) as squatter:
        server.start()
        assert server.proc is not None
        output = server.proc.output
        wait_for(
            lambda: "log sink: refused to send the logging token" in output(),
            timeout=20,
            what="the sink to refuse the squatted port",
        )
        assert server.logging_token.encode() not in squatter.received()
        assert squatter.received() == b""


def test_a_proxy_that_cannot_bind_its_public_port_ends_instead_of_serving_its_api(
    tmp_path: Path,
) -> None:
    public, api = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", public))
        taken.listen()
        done = subprocess.run(
            [
                "node",
                "--require",
                str(PROXY_EDGE),
                str(CHP),
                "--ip",
                "127.0.0.1",
                "--port",
                str(public),
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                str(api),
            ],
            env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": "t" * 32},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot listen (EADDRINUSE)" in done.stderr


def test_a_hijacked_route_is_pointed_back_within_seconds(
    deploy: DeployServer, proxy: Proxy
) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    route = f"/user/{dep_id}"
    target = proxy.routes()[route]["target"]
    for path, where in ((route, "http://127.0.0.1:9"), ("/", "http://127.0.0.1:9")):
        answer = httpx.post(  # as anyone holding the proxy's token could
            f"http://127.0.0.1:{proxy.api_port}/api/routes{path}",
            json={"target": where},
            headers={"Authorization": f"token {proxy.token}"},
            timeout=5,
        )
        assert answer.status_code == 201, answer.text
    started = time.monotonic()
    # the catch-all is the proxy's default route: pointed back at the deploy server's pages
    wait_for(
        lambda: (
            (routes := proxy.routes())[route]["target"] == target
            and routes.get("/", {}).get("target") == deploy.url
        ),
        timeout=10,
        what="the keeper to point the route and the catch-all back",
    )
    assert time.monotonic() - started < 6  # a few keeper rounds (2 s each)
    assert proxy.get(f"{route}/").status_code == 200
