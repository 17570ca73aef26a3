"""Every error of the deploy API, answered with its status and typed body, on the real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from harness import EXAMPLE_COMMAND, Database, DeployServer, Proxy, wait_for

MISSING = "0123456789abcdef0123456789abcdef"


def _error(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == type_, body
    message = body["error"]
    assert isinstance(message, str)
    assert message
    return message


def test_unknown_template_and_unknown_id(deploy: DeployServer) -> None:
    c = deploy.client()
    _error(c.post("/applications/nope"), 404, "noTemplate")
    _error(c.post("/applications/", json={"template-name": "nope"}), 404, "noTemplate")
    _error(c.get(f"/applications/example/{MISSING}"), 404, "noRecord")
    _error(c.delete(f"/applications/example/{MISSING}", headers=deploy.auth), 404, "noRecord")
    _error(c.get("/templates/nope"), 404, "noTemplate")
    dep_id = deploy.launch()
    # an id is only found under its own template
    put = c.put("/templates/other", json={"command": ["true"]}, headers=deploy.auth)
    assert put.status_code == 200
    _error(c.get(f"/applications/other/{dep_id}"), 404, "noRecord")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/applications/example", b"{not json", "body"),
        ("/applications/example", b"[1, 2]", "body"),
        ("/applications/example", b'{"cull-timeout": "soon"}', "cull-timeout"),
        ("/applications/example", b'{"cull-timeout": -5}', "cull-timeout"),
        ("/applications/example", b'{"cull_timeout": 5000}', "cull_timeout"),
        ("/applications/", b"{}", "template-name"),
        ("/applications/", b'{"template-name": 7}', "template-name"),
        ("/applications/", b'{"template-name": "../etc"}', "template-name"),
    ],
)
def test_malformed_launch_requests_name_the_field(
    deploy: DeployServer, path: str, body: bytes, field: str
) -> None:
    response = httpx.post(
        deploy.url + path, content=body, headers={"Content-Type": "application/json"}
    )
    assert field in _error(response, 422, "malformedRequest")


def test_malformed_path_parameters(deploy: DeployServer) -> None:
    c = deploy.client()
    assert "id" in _error(c.get("/applications/example/NOT-AN-ID"), 422, "malformedRequest")
    assert "template-name" in _error(
        c.get(f"/applications/{'x' * 80}/{MISSING}"), 422, "malformedRequest"
    )


def test_binder_cli_numeric_string_cull_timeout_is_accepted(deploy: DeployServer) -> None:
    response = httpx.post(
        f"{deploy.url}/applications/", json={"template-name": "example", "cull-timeout": "60000"}
    )
    assert response.status_code == 200


def test_endpoints_that_need_the_key_refuse_without_it(deploy: DeployServer) -> None:
    c = deploy.client()
    for method, path in [
        ("GET", "/applications/"),
        ("GET", "/applications/example"),
        ("DELETE", f"/applications/example/{MISSING}"),
        ("POST", "/preload/example"),
        ("GET", "/preload/example"),
        ("PUT", "/templates/x"),
        ("DELETE", "/templates/example"),
        ("GET", "/pools/example"),
        ("PUT", "/pools/example"),
    ]:
        _error(c.request(method, path), 403, "unauthorized")
        _error(c.request(method, path, headers={"Authorization": "wrong"}), 403, "unauthorized")
    for header in (deploy.api_key, f"Bearer {deploy.api_key}", f"token {deploy.api_key}"):
        assert c.get("/applications/", headers={"Authorization": header}).status_code == 200


def test_launch_can_be_closed_to_keyless_callers(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    deploy = deploy_factory(launch_requires_key=True).start()
    _error(httpx.post(f"{deploy.url}/applications/example"), 403, "unauthorized")
    assert httpx.post(f"{deploy.url}/applications/example", headers=deploy.auth).status_code == 200


def test_capacity_total_and_per_template_answer_429_with_retry_after(
    deploy_factory: Callable[..., DeployServer],
) -> None:
    deploy = deploy_factory(max_deployments=3).start()
    put = httpx.put(
        f"{deploy.url}/templates/small",
        headers=deploy.auth,
        json={
            "command": list(EXAMPLE_COMMAND),
            "max-deployments": 1,
        },
    )
    assert put.status_code == 200, put.text
    deploy.launch("small")
    response = httpx.post(f"{deploy.url}/applications/small")
    _error(response, 429, "capacity")
    assert int(response.headers["Retry-After"]) > 0
    deploy.launch()
    deploy.launch()
    response = httpx.post(f"{deploy.url}/applications/example")
    _error(response, 429, "capacity")
    assert "Retry-After" in response.headers


def test_oversized_body_is_refused(deploy: DeployServer) -> None:
    big = json.dumps({"cull-timeout": 5000, "pad": "x" * 200_000})
    response = httpx.post(f"{deploy.url}/applications/example", content=big)
    _error(response, 413, "payloadTooLarge")


def test_bad_template_definitions_are_refused(deploy: DeployServer) -> None:
    c = deploy.client()
    cases = [
        ({"command": []}, "command"),
        ({"command": ["x"], "limits": {"memory": "lots"}}, "limits.memory"),
        ({"command": ["x"], "port": 70000}, "port"),
        ({"command": ["x"], "env": {"A": 1}}, "env"),
    ]
    for body, field in cases:
        assert field in _error(
            c.put("/templates/t1", json=body, headers=deploy.auth), 422, "malformedRequest"
        )


def test_database_outage_answers_503_and_recovers(
    tmp_path: Path, proxy: Proxy, deploy_factory: Callable[..., DeployServer]
) -> None:
    (tmp_path / "own-db").mkdir()
    db = Database(tmp_path / "own-db").start()
    deploy = deploy_factory(db=db).start()
    try:
        db.stop()
        response = httpx.post(f"{deploy.url}/applications/example", timeout=15)
        _error(response, 503, "badDatabase")
        wait_for(
            lambda: httpx.get(f"{deploy.url}/health").status_code == 503,
            timeout=15,
            what="/health to report the outage",
        )
        db.start()
        wait_for(
            lambda: httpx.get(f"{deploy.url}/health").status_code == 200,
            timeout=30,
            what="/health to recover",
        )
        dep_id = deploy.launch()
        assert deploy.wait_status(dep_id, "deployed")["status"] == "deployed"
    finally:
        db.stop()


def test_proxy_outage_fails_health_and_recovers(deploy: DeployServer, proxy: Proxy) -> None:
    proxy.stop()
    wait_for(
        lambda: httpx.get(f"{deploy.url}/health").status_code == 503,
        timeout=15,
        what="/health to report the proxy outage",
    )
    proxy.start()
    wait_for(
        lambda: httpx.get(f"{deploy.url}/health").status_code == 200,
        timeout=15,
        what="/health to recover",
    )
