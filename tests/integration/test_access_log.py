"""What the deploy server tells about its clients: an access line per request and who launched,
deleted or changed what; template env values only to key holders; quiet event-stream leavers."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
from harness import DeployServer, wait_for


def _records(deploy: DeployServer) -> list[dict[str, Any]]:
    out = []
    for line in (deploy.workdir / "deploy.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_each_request_is_logged_and_changes_say_who_made_them(deploy: DeployServer) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    httpx.delete(f"{deploy.url}/applications/example/{dep_id}", headers=deploy.auth, timeout=30)
    put = httpx.put(
        f"{deploy.url}/templates/other",
        json={"command": ["true"]},
        headers=deploy.auth,
        timeout=10,
    )
    assert put.status_code == 200
    unknown = "0" * 32
    assert httpx.get(f"{deploy.url}/applications/example/{unknown}", timeout=10).status_code == 404

    def access_lines() -> list[dict[str, Any]]:
        return [r for r in _records(deploy) if r.get("id") == unknown]

    wait_for(access_lines, what="the access line of the last request")
    records = _records(deploy)
    launch = next(r for r in records if r.get("method") == "POST")
    assert launch["path"] == "/applications/example"
    assert launch["status"] == 200
    assert launch["id"] == dep_id
    assert launch["client"] == "127.0.0.1"
    assert launch["service"] == "deploy-kubernetes"
    assert isinstance(launch["ms"], float)
    # the harness polled the status until deployed: answered 200, each poll is at debug
    assert not [r for r in records if r.get("method") == "GET" and r.get("id") == dep_id]
    [failed_poll] = [r for r in records if r.get("method") == "GET" and r.get("id") == unknown]
    assert (failed_poll["status"], failed_poll["level"]) == (404, "info")
    messages = [r["message"] for r in records]
    assert "launched by 127.0.0.1" in messages
    assert "delete asked by api-key from 127.0.0.1" in messages
    assert "template other registered by api-key from 127.0.0.1" in messages
    assert deploy.api_key not in (deploy.workdir / "deploy.log").read_text()


def test_template_env_values_are_shown_only_with_the_key(deploy: DeployServer) -> None:
    anonymous = httpx.get(f"{deploy.url}/templates", timeout=10).json()
    assert anonymous
    assert all("env" not in t for t in anonymous)
    assert "env" not in httpx.get(f"{deploy.url}/templates/example", timeout=10).json()
    keyed = httpx.get(f"{deploy.url}/templates", headers=deploy.auth, timeout=10).json()
    example = next(t for t in keyed if t["name"] == "example")
    assert example["env"] == {"EXAMPLE_GREETING": "Hello from Binder"}


def test_clients_leaving_event_streams_early_log_nothing_above_debug(
    deploy: DeployServer,
) -> None:
    dep_id = deploy.launch()
    deploy.wait_status(dep_id, "deployed")
    path = f"/applications/example/{dep_id}/events"
    for _ in range(10):  # what a browser tab does: read the first event, then go away
        with socket.create_connection(("127.0.0.1", deploy.port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            seen = b""
            while b"event: status" not in seen:
                seen += sock.recv(4096)

    def streams_ended() -> bool:
        ended = [r for r in _records(deploy) if r.get("path") == path]
        return len(ended) == 10

    wait_for(streams_ended, what="the ten streams' access lines")
    text = (deploy.workdir / "deploy.log").read_text(errors="replace")
    assert "Traceback" not in text
    assert "aclose" not in text
    assert not [r for r in _records(deploy) if r["level"] in ("error", "critical")]
