"""The docker backend against a real Docker engine (scripts/docker-engine starts it for make test)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import secrets
import socket
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import docker.errors
import httpx
import pytest
from harness import ROOT, Database, DeployServer, Proxy, wait_for
from jupyter_kernel import run_cell

from common.settings import derived_suite_label
from services.deploy_kubernetes.backends.base import Observed
from services.deploy_kubernetes.backends.docker.backend import DockerBackend

IMAGE = "binder-busybox:test"
WEB = {
    "image-source": IMAGE,
    "command": [
        "/bin/sh",
        "-c",
        # the app's user is not root: of the image's files it writes only in its own /tmp
        "mkdir -p /tmp/www{base_url} && echo app {id} > /tmp/www{base_url}index.html "
        "&& exec httpd -f -p {port} -h /tmp/www",
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
    _remove_suite(engine, label)


def _remove_suite(engine: Any, label: str) -> None:
    """What a suite of a test leaves on the shared engine: its containers and its network."""
    for c in engine.containers.list(all=True, filters={"label": f"binder.suite={label}"}):
        c.remove(force=True)
    for n in engine.networks.list(filters={"label": f"binder.suite={label}"}):
        n.remove()


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
    assert host["MemorySwap"] == 64 * 2**20  # no swap beyond the memory limit
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 1024  # the template names none: the default
    assert host["PortBindings"]["8888/tcp"][0]["HostIp"] == "127.0.0.1"
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert container.attrs["Config"]["User"] == "65534:65534"
    assert "GREETING=hello" in container.attrs["Config"]["Env"]
    (network,) = container.attrs["NetworkSettings"]["Networks"]
    options = engine.networks.get(network).attrs["Options"]
    assert options["com.docker.network.bridge.enable_icc"] == "false"

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


# --- strangers' code in containers -----------------------------------------------------------

HOSTILE_SOURCE = ROOT / "tests" / "hostile_app.py"


@pytest.fixture(scope="module")
def hostile_image(engine: Any) -> Iterator[str]:
    """The example app's image with the tests' hostile app (``tests/hostile_app.py``) in it."""
    digest = hashlib.sha256(HOSTILE_SOURCE.read_bytes()).hexdigest()[:12]
    name = f"binder-test/hostile:{digest}"
    base = engine.containers.create("binder-example:latest", command=["true"])
    try:
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(HOSTILE_SOURCE, arcname="hostile_app.py")
        base.put_archive("/app", archive.getvalue())
        base.commit(repository=name.split(":")[0], tag=digest)
    finally:
        base.remove(force=True)
    yield name
    with contextlib.suppress(docker.errors.DockerException):
        engine.images.remove(name)


def _hostile(server: DeployServer, image: str, **limits: Any) -> None:
    body = {
        "image-source": image,
        "command": [
            "python3",
            "/app/hostile_app.py",
            "--port",
            "{port}",
            "--base-url",
            "{base_url}",
            "--host",
            "0.0.0.0",
        ],
        "limits": {"memory": "128Mi", **limits},
    }
    put = httpx.put(f"{server.url}/templates/hostile", json=body, headers=server.auth)
    assert put.status_code == 200, put.text


def _launch_hostile(server: DeployServer) -> str:
    dep_id = server.launch("hostile")
    info = server.wait_status(dep_id, "deployed", "failed", template="hostile", timeout=60)
    assert info["status"] == "deployed", info
    return dep_id


def _run(proxy: Proxy, dep_id: str, script: str, *, timeout: float = 60) -> dict[str, Any]:
    answer = httpx.post(
        f"http://127.0.0.1:{proxy.port}/user/{dep_id}/run",
        content=script,
        headers={"X-Timeout": str(timeout)},
        timeout=timeout + 10,
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_the_app_is_not_root_and_holds_no_capability(
    docker_deploy: DeployServer, proxy: Proxy, hostile_image: str
) -> None:
    _hostile(docker_deploy, hostile_image)
    dep_id = _launch_hostile(docker_deploy)
    result = _run(proxy, dep_id, "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status")
    lines = result["out"].split()
    assert lines[0] == "65534", result
    status = dict(zip(lines[1::2], lines[2::2], strict=True))
    assert status == {"CapEff:": "0000000000000000", "CapBnd:": "0000000000000000"} | {
        "NoNewPrivs:": "1"
    }, result


def test_a_fork_loop_stops_at_the_pids_limit(
    docker_deploy: DeployServer, proxy: Proxy, hostile_image: str
) -> None:
    _hostile(docker_deploy, hostile_image, pids=64)
    dep_id = _launch_hostile(docker_deploy)
    # forks until they fail (in a subshell: the shell whose fork fails ends), then counts the
    # processes with the shell's own glob (a fork more would fail)
    script = (
        "(n=0; while [ $n -lt 300 ]; do sleep 5 & n=$((n+1)); done) 2>/dev/null; "
        "set -- /proc/[0-9]*; echo $#"
    )
    result = _run(proxy, dep_id, script)
    assert 20 < int(result["out"].split()[0]) <= 64, result
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks
    wait_for(  # the app answers again once its sleeps end
        lambda: proxy.get(f"/user/{dep_id}/").status_code == 200, what="the app to answer"
    )


def test_an_app_cannot_reach_another_apps_container(
    docker_deploy: DeployServer, proxy: Proxy, engine: Any, hostile_image: str
) -> None:
    _hostile(docker_deploy, hostile_image)
    first, second = _launch_hostile(docker_deploy), _launch_hostile(docker_deploy)
    other = engine.containers.get(f"binder-{second}")
    (address,) = [n["IPAddress"] for n in other.attrs["NetworkSettings"]["Networks"].values()]
    (gateway,) = [n["Gateway"] for n in other.attrs["NetworkSettings"]["Networks"].values()]
    host_port = other.attrs["NetworkSettings"]["Ports"]["8888/tcp"][0]["HostPort"]
    tries = [(address, "8888"), (gateway, host_port)]
    script = "; ".join(
        f"nc -w 2 {ip} {port} </dev/null && echo reached {ip}:{port}" for ip, port in tries
    )
    result = _run(proxy, first, script + "; true")
    assert "reached" not in result["out"], result
    # the host reaches it at that address: the address and port tried are right
    with socket.create_connection((address, 8888), timeout=5):
        pass


def test_the_containers_output_is_copied_for_the_aggregator(
    docker_deploy: DeployServer, proxy: Proxy, hostile_image: str
) -> None:
    _hostile(docker_deploy, hostile_image)
    dep_id = _launch_hostile(docker_deploy)
    _run(proxy, dep_id, "echo marker-$((6*7)) > /proc/1/fd/1")
    log = docker_deploy.home / "logs" / "apps" / f"{dep_id}.log"
    wait_for(
        lambda: log.exists() and "marker-42" in log.read_text(),
        what="the app's output in its log file",
    )
    assert "hostile app serving" in log.read_text()


def test_a_failed_preload_says_so_instead_of_completed(docker_deploy: DeployServer) -> None:
    body = {**WEB, "image-source": "127.0.0.1:1/binder-nothing:1"}  # nothing listens there
    assert httpx.put(
        f"{docker_deploy.url}/templates/ghost", json=body, headers=docker_deploy.auth
    ).is_success
    assert httpx.post(f"{docker_deploy.url}/preload/ghost", headers=docker_deploy.auth).is_success

    def state() -> httpx.Response | None:
        answer = httpx.get(f"{docker_deploy.url}/preload/ghost", headers=docker_deploy.auth)
        return (
            None if answer.status_code == 200 and answer.json()["status"] == "loading" else answer
        )

    answer = wait_for(state, timeout=60, what="the preload to end")
    assert answer.status_code == 502, answer.text
    assert answer.json()["type"] == "launchFailed"
    assert "127.0.0.1:1/binder-nothing:1" in answer.json()["error"]


def test_two_suites_on_one_engine_leave_each_others_containers_alone(
    tmp_path: Path, database: Database, engine: Any
) -> None:
    suites: list[tuple[DeployServer, Proxy]] = []
    try:
        for n in range(2):
            work = tmp_path / f"suite{n}"
            work.mkdir()
            proxy = Proxy(work).start()
            server = DeployServer(work, database, proxy, backend="docker")
            server.config.write_text(  # no suite_label: each suite's is derived from its home
                server.config.read_text().replace(
                    "[proxy]", f'database = "two{n}{secrets.token_hex(4)}"\n[proxy]', 1
                )
            )
            suites.append((server.start(), proxy))
            put = httpx.put(f"{server.url}/templates/web", json=WEB, headers=server.auth)
            assert put.status_code == 200, put.text
        (first, first_proxy), (second, _) = suites
        dep_id = first.launch("web")
        assert first.wait_status(dep_id, "deployed", "failed", template="web")["status"] == (
            "deployed"
        )
        second.stop()
        second.start()  # its reconcile removes its own orphans, none of the first suite's
        other = second.launch("web")
        second.wait_status(other, "deployed", "failed", template="web")
        assert engine.containers.get(f"binder-{dep_id}").status == "running"
        assert first.status(dep_id, "web")["status"] == "deployed"
        assert first_proxy.get(f"/user/{dep_id}/").status_code == 200
    finally:
        for server, proxy in suites:
            server.stop()
            proxy.stop()
            _remove_suite(engine, derived_suite_label(server.home))


def test_shipped_jupyter_template_runs_a_cell_through_the_proxy(
    docker_deploy: DeployServer, proxy: Proxy, engine: Any, label: str
) -> None:
    # its image (binder-jupyter:latest, scripts/app-images) has the environment at the host's path
    dep_id = docker_deploy.launch("jupyter")
    info = docker_deploy.wait_status(dep_id, "deployed", "failed", timeout=120, template="jupyter")
    assert info["status"] == "deployed", info
    token = info["url"].split("?token=", 1)[1]
    base = f"http://127.0.0.1:{proxy.port}/user/{dep_id}/"
    assert run_cell(base, token, "print(6 * 7)") == "42\n"
    assert httpx.get(base + "api/contents/hello.ipynb", timeout=10).status_code == 403
    (container,) = _containers(engine, label)
    assert container.attrs["HostConfig"]["Memory"] == 2**30
    assert container.attrs["HostConfig"]["Init"] is True
    assert token not in " ".join(container.attrs["Config"]["Cmd"])


def test_a_failed_container_says_its_last_lines(docker_deploy: DeployServer) -> None:
    body = {"image-source": "binder-test/exit:1", "command": ["/bin/app"]}
    put = httpx.put(f"{docker_deploy.url}/templates/exits", json=body, headers=docker_deploy.auth)
    assert put.status_code == 200, put.text
    dep_id = docker_deploy.launch("exits")
    info = docker_deploy.wait_status(dep_id, "failed", "deployed", template="exits")
    assert info["status"] == "failed"
    # stdout and stderr are two streams: the engine keeps their lines in the order they came
    reason, _, lines = info["reason"].partition("; last output lines: ")
    assert reason == "container exited with code 3"
    assert set(lines.split(" | ")) == {"starting up", "something went wrong"}


def test_closing_the_backend_ends_its_event_stream(engine: Any, label: str) -> None:
    """The engine's event stream is read in a thread of its own: closing the backend (the
    server stopping) ends it, rather than leaving the thread blocked in the engine's socket."""

    async def main() -> None:
        backend = DockerBackend(suite=label)

        async def tell(observed: Observed) -> None:
            pass

        await backend.open(tell)
        (watch,) = backend.loops().values()
        ended = anyio.Event()

        async def run() -> None:
            await watch()
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(0.5)  # the stream is open; nothing happens on the engine
            await backend.close()
            with anyio.fail_after(5):
                await ended.wait()

    anyio.run(main)
