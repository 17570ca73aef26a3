"""The docker backend against a real Docker engine (scripts/docker-engine starts it for make test)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from harness import DeployServer, Proxy, wait_for

IMAGE = "binder-busybox:test"
WEB = {
    "image-source": IMAGE,
    "command": [
        "/bin/sh",
        "-c",
        "mkdir -p /www{base_url} && echo app {id} > /www{base_url}index.html "
        "&& exec httpd -f -p {port} -h /www",
    ],
    "port": 8888,
    "limits": {"memory": "64Mi", "cpu": "500m"},
    "env": {"GREETING": "hello"},
}


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"the Docker engine or {IMAGE} is missing ({exc}): run scripts/docker-engine start"
        )
    yield client
    client.close()


@pytest.fixture
def label() -> str:
    return f"test{secrets.token_hex(4)}"


@pytest.fixture
def docker_deploy(
    deploy_factory: Callable[..., DeployServer], engine: Any, label: str
) -> Iterator[DeployServer]:
    server = deploy_factory(backend="docker")
    server.config.write_text(
        server.config.read_text() + f'[deploy.docker]\nsuite_label = "{label}"\n'
    )
    server.start()
    put = httpx.put(f"{server.url}/templates/web", json=WEB, headers=server.auth)
    assert put.status_code == 200, put.text
    yield server
    server.stop()
    for c in engine.containers.list(all=True, filters={"label": f"binder.suite={label}"}):
        c.remove(force=True)


def _containers(engine: Any, label: str) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": f"binder.suite={label}"}))


def test_launch_runs_a_limited_labelled_container_served_through_the_proxy(
    docker_deploy: DeployServer, proxy: Proxy, engine: Any, label: str
) -> None:
    dep_id = docker_deploy.launch("web")
    info = docker_deploy.wait_status(dep_id, "deployed", "failed", template="web")
    assert info["status"] == "deployed", info
    page = proxy.get(f"/user/{dep_id}/")
    assert page.status_code == 200
    assert f"app {dep_id}" in page.text
    (container,) = _containers(engine, label)
    assert container.labels["binder.id"] == dep_id
    assert container.labels["binder.template"] == "web"
    host = container.attrs["HostConfig"]
    assert host["Memory"] == 64 * 2**20
    assert host["NanoCpus"] == 500_000_000
    assert host["PortBindings"]["8888/tcp"][0]["HostIp"] == "127.0.0.1"
    assert "GREETING=hello" in container.attrs["Config"]["Env"]

    r = httpx.delete(f"{docker_deploy.url}/applications/web/{dep_id}", headers=docker_deploy.auth)
    assert r.json()["status"] == "deleted"
    assert _containers(engine, label) == []
    assert f"/user/{dep_id}" not in proxy.routes()


def test_shipped_example_template_answers_through_the_proxy(
    docker_deploy: DeployServer, proxy: Proxy, engine: Any, label: str
) -> None:
    # its image-source is built by scripts/app-images (run by scripts/docker-engine start)
    dep_id = docker_deploy.launch("example")
    info = docker_deploy.wait_status(dep_id, "deployed", "failed")
    assert info["status"] == "deployed", info
    page = proxy.get(f"/user/{dep_id}/")
    assert page.status_code == 200
    assert "Hello from Binder" in page.text
    assert dep_id in page.text
    (container,) = _containers(engine, label)
    assert container.attrs["Config"]["Image"] == "binder-example:latest"


def test_container_removed_behind_the_servers_back_makes_its_record_final(
    docker_deploy: DeployServer, engine: Any, label: str
) -> None:
    dep_id = docker_deploy.launch("web")
    docker_deploy.wait_status(dep_id, "deployed", template="web")
    (container,) = _containers(engine, label)
    container.remove(force=True)
    info = docker_deploy.wait_status(dep_id, "failed", timeout=20, template="web")
    assert "container" in info["reason"]


def test_missing_image_fails_with_a_reason(docker_deploy: DeployServer) -> None:
    body = {**WEB, "image-source": "binder-no-such-image:1"}
    assert (
        httpx.put(
            f"{docker_deploy.url}/templates/ghost", json=body, headers=docker_deploy.auth
        ).status_code
        == 200
    )
    dep_id = docker_deploy.launch("ghost")
    info = docker_deploy.wait_status(dep_id, "failed", "deployed", template="ghost")
    assert info["status"] == "failed"
    assert "image pull failed" in info["reason"]


def test_restart_mid_launch_leaves_no_orphan_and_nothing_deploying(
    docker_deploy: DeployServer, proxy: Proxy, engine: Any, label: str
) -> None:
    ids = [docker_deploy.launch("web") for _ in range(4)]
    docker_deploy.kill9()
    # a container nobody has a record of, as a crash between create and record would leave
    orphan = engine.containers.run(
        IMAGE,
        ["sleep", "600"],
        detach=True,
        labels={"binder.suite": label, "binder.id": "f" * 32, "binder.template": "web"},
    )
    docker_deploy.start()
    final = {
        i: docker_deploy.wait_status(i, "deployed", "failed", timeout=60, template="web")
        for i in ids
    }
    wait_for(
        lambda: orphan.id not in {c.id for c in _containers(engine, label)},
        timeout=20,
        what="the orphan container to be removed",
    )
    live = {c.labels["binder.id"] for c in _containers(engine, label)}
    assert live == {i for i, info in final.items() if info["status"] == "deployed"}
    for dep_id in live:
        assert proxy.get(f"/user/{dep_id}/").status_code == 200
