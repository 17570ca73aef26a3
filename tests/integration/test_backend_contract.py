"""One lifecycle suite run against every real backend, so they behave alike (and the fake too)."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fakes import FakeBackend

from services.deploy_kubernetes.backends.base import Backend, LaunchSpec, Observed, State
from services.deploy_kubernetes.errors import LaunchError
from services.deploy_kubernetes.models import Template, new_id

SERVE = "mkdir -p /www{base_url} && echo ok > /www{base_url}index.html && exec httpd -f -p {port} -h /www"


def _local(tmp: Path) -> tuple[Backend, Template, Template]:
    from services.deploy_kubernetes.backends.local import LocalBackend

    web = Template(
        name="web",
        command=(
            "{python}",
            "-m",
            "services.example_app",
            "--port",
            "{port}",
            "--base-url",
            "{base_url}",
        ),
        limits={"memory": "256Mi"},
    )
    bad = Template(name="bad", command=("/bin/sh", "-c", "exit 3"))
    return (
        LocalBackend(state_dir=tmp / "state", log_dir=tmp / "logs", python=sys.executable),
        web,
        bad,
    )


def _docker(tmp: Path) -> tuple[Backend, Template, Template]:
    from services.deploy_kubernetes.backends.docker import DockerBackend

    web = Template(
        name="web",
        image_source="binder-busybox:test",
        command=("/bin/sh", "-c", SERVE),
        port=8888,
        limits={"memory": "64Mi"},
    )
    bad = Template(
        name="bad", image_source="binder-busybox:test", command=("/bin/sh", "-c", "exit 3")
    )
    return DockerBackend(suite=f"contract{secrets.token_hex(3)}"), web, bad


def _fake(tmp: Path) -> tuple[Backend, Template, Template]:
    backend = FakeBackend()
    return backend, Template(name="web", command=("x",)), Template(name="bad", command=("x",))


BACKENDS: dict[str, Callable[[Path], tuple[Backend, Template, Template]]] = {
    "local": _local,
    "docker": _docker,
    "fake": _fake,
}


@pytest.fixture(params=list(BACKENDS))
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Backend, Template, Template]:
    backend, web, bad = BACKENDS[request.param](tmp_path)
    return request.param, backend, web, bad


def _run(backend: Backend, body: Callable[[list[Observed]], Any]) -> Any:
    events: list[Observed] = []

    async def main() -> Any:
        async def notify(obs: Observed) -> None:
            events.append(obs)

        await backend.open(notify)
        try:
            return await body(events)
        finally:
            for obs in await backend.list():
                await backend.stop(obs.id, obs.ref)
            await backend.close()

    return anyio.run(main)


def test_launch_ready_list_stop(kit: tuple[str, Backend, Template, Template]) -> None:
    name, backend, web, _ = kit

    async def body(events: list[Observed]) -> None:
        spec = LaunchSpec(new_id(), web)
        started = await backend.launch(spec)
        assert started.state is State.STARTING
        assert spec.id in {o.id for o in await backend.list()}
        ready = await backend.wait_ready(spec, started, deadline=time.monotonic() + 30)
        assert ready.state is State.RUNNING
        assert ready.target
        if name != "fake":
            async with httpx.AsyncClient() as client:
                assert (await client.get(ready.target + spec.base_url)).status_code == 200
        await backend.stop(spec.id, ready.ref)
        assert spec.id not in {o.id for o in await backend.list()}
        await backend.stop(spec.id, ready.ref)  # stopping twice is no error

    _run(backend, body)


def test_app_that_exits_fails_with_its_exit_code(
    kit: tuple[str, Backend, Template, Template],
) -> None:
    name, backend, _, bad = kit
    if name == "fake":
        backend.fail_with = "process exited with code 3"  # type: ignore[attr-defined]

    async def body(events: list[Observed]) -> None:
        spec = LaunchSpec(new_id(), bad)

        async def start() -> None:  # the exit may be seen at launch or while waiting
            started = await backend.launch(spec)
            await backend.wait_ready(spec, started, deadline=time.monotonic() + 30)

        with pytest.raises(LaunchError, match="exited with code 3"):
            await start()

    _run(backend, body)
