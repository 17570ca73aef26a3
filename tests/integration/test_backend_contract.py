"""One lifecycle suite run against every real backend, so they behave alike (and the fake too)."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fakes import FakeBackend
from harness import EXAMPLE_COMMAND

from services.deploy_kubernetes.backends.base import Backend, LaunchSpec, Observed, State
from services.deploy_kubernetes.backends.local.sandboxed import SandboxedBackend
from services.deploy_kubernetes.errors import LaunchError
from services.deploy_kubernetes.models import Template, new_id

SERVE = (
    "mkdir -p /tmp/www{base_url} && echo ok > /tmp/www{base_url}index.html "
    "&& exec httpd -f -p {port} -h /tmp/www"
)


def _local(tmp: Path) -> tuple[Backend, Template, Template]:
    from services.deploy_kubernetes.backends.local.backend import LocalBackend

    web = Template(
        name="web",
        command=EXAMPLE_COMMAND,
        limits={"memory": "256Mi"},
    )
    bad = Template(name="bad", command=("/bin/sh", "-c", "exit 3"))
    return (
        LocalBackend(state_dir=tmp / "state", log_dir=tmp / "logs", python=sys.executable),
        web,
        bad,
    )


def _sandboxed(tmp: Path) -> tuple[Backend, Template, Template]:
    from common.settings import LocalSettings
    from services.deploy_kubernetes.backends.local.sandboxed import SandboxedBackend

    _, web, bad = _local(tmp)
    backend = SandboxedBackend(
        state_dir=tmp / "state", log_dir=tmp / "logs", settings=LocalSettings(sandbox_slots=2)
    )
    return backend, web, bad


def _docker(tmp: Path) -> tuple[Backend, Template, Template]:
    from services.deploy_kubernetes.backends.docker.backend import DockerBackend

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


def _kubernetes(tmp: Path) -> tuple[Backend, Template, Template]:
    from services.deploy_kubernetes.backends.kubernetes.backend import KubernetesBackend

    kubeconfig, namespace = _KUBE["kubeconfig"], _KUBE["namespace"]
    # images of scripts/app-images, pulled by the test cluster's node from its registry
    web = Template(
        name="web",
        image_source="binder-example:latest",
        command=EXAMPLE_COMMAND,
        port=8888,
        limits={"memory": "64Mi", "cpu": "100m"},
    )
    bad = Template(name="bad", image_source="binder-test/exit:1", command=("/bin/app",))
    backend = KubernetesBackend(
        kubeconfig=kubeconfig, namespace=namespace, suite=f"contract{secrets.token_hex(3)}"
    )
    return backend, web, bad


_KUBE: dict[str, str] = {}


def _fake(tmp: Path) -> tuple[Backend, Template, Template]:
    backend = FakeBackend()
    return backend, Template(name="web", command=("x",)), Template(name="bad", command=("x",))


BACKENDS: dict[str, Callable[[Path], tuple[Backend, Template, Template]]] = {
    "local": _local,
    "sandboxed": _sandboxed,
    "docker": _docker,
    "kubernetes": _kubernetes,
    "fake": _fake,
}


@pytest.fixture(params=list(BACKENDS))
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Backend, Template, Template]:
    if request.param == "kubernetes":  # the control plane starts only for the cases that need it
        _KUBE["kubeconfig"] = request.getfixturevalue("kube")[0]
        _KUBE["namespace"] = request.getfixturevalue("namespace")
    backend, web, bad = BACKENDS[request.param](tmp_path)
    return request.param, backend, web, bad


async def _awaited(step: Callable[[], Awaitable[None]]) -> None:
    await step()


def _run(backend: Backend, body: Callable[[list[Observed]], Any]) -> Any:
    events: list[Observed] = []

    async def main() -> Any:
        async def notify(obs: Observed) -> None:
            events.append(obs)

        await backend.open(notify)
        try:
            async with anyio.create_task_group() as loops:
                for loop in backend.loops().values():  # watches, run as the deploy server does
                    loops.start_soon(_awaited, loop)
                try:
                    return await body(events)
                finally:
                    loops.cancel_scope.cancel()
        finally:
            for obs in await backend.list():
                await backend.stop(obs.id, obs.ref)
            await backend.close()
            if isinstance(backend, SandboxedBackend):
                assert await backend.retire()  # nothing of its sandboxes is left on the host

    return anyio.run(main)


def test_launch_ready_list_stop(kit: tuple[str, Backend, Template, Template]) -> None:
    name, backend, web, _ = kit

    async def body(events: list[Observed]) -> None:
        spec = LaunchSpec(id=new_id(), template=web)
        started = await backend.launch(spec)
        assert started.state is State.STARTING
        assert spec.id in {o.id for o in await backend.list()}
        ready = await backend.wait_ready(spec, started, deadline=time.monotonic() + 60)
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
        spec = LaunchSpec(id=new_id(), template=bad)
        reason = ""
        try:  # the exit is seen at launch, while waiting, or (ready first) told to notify
            started = await backend.launch(spec)
            await backend.wait_ready(spec, started, deadline=time.monotonic() + 30)
        except LaunchError as exc:
            reason = exc.message
        with anyio.fail_after(30):
            while not reason:
                told = [e for e in events if e.id == spec.id and e.reason]
                reason = str(told[0].reason) if told else ""
                await anyio.sleep(0.05)
        assert "exited with code 3" in reason

    _run(backend, body)


def test_local_apps_never_share_a_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may hand the same free port to two launches in a row (it picks at random):
    the second app is given another one, not the port the first is about to listen on."""
    from services.deploy_kubernetes.backends.local import backend as local

    backend, web, _ = _local(tmp_path)
    handed: list[int] = []
    real = local._free_port

    def twice(host: str) -> int:
        port = handed[-1] if len(handed) == 1 else real(host)  # the first port, twice
        handed.append(port)
        return port

    monkeypatch.setattr(local, "_free_port", twice)

    async def body(events: list[Observed]) -> None:
        specs = [LaunchSpec(id=new_id(), template=web) for _ in range(2)]
        started = [await backend.launch(spec) for spec in specs]
        assert handed[0] == handed[1]  # the kernel's repeat happened
        assert started[0].target != started[1].target
        deadline = time.monotonic() + 60
        for spec, obs in zip(specs, started, strict=True):
            ready = await backend.wait_ready(spec, obs, deadline=deadline)
            assert ready.target is not None
            async with httpx.AsyncClient() as client:
                assert (await client.get(ready.target + spec.base_url)).status_code == 200

    _run(backend, body)


def test_sandbox_slots_are_made_beside_a_pools_start_not_beside_a_launchs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot's making takes CPU from an app that starts: while a launch's app starts, the slot
    refill waits (here for good, the quiet wait made endless) until it is ready; a pool's
    instance starts for no one waiting, so the slots it spends are made again at once, and a
    busy pool leaves no empty slot pool to the next burst."""
    from services.deploy_kubernetes.backends.local import slots

    monkeypatch.setattr(slots, "REFILL_QUIET_SECONDS", 3600.0)
    backend, _, _ = _sandboxed(tmp_path)
    assert isinstance(backend, SandboxedBackend)
    slow = Template(name="slow", command=(*EXAMPLE_COMMAND, "--delay", "3"))

    async def start(pooled: bool) -> tuple[list[int], int]:
        """The parked slots seen while the app starts, and when it is ready."""
        await _until(lambda: backend.running_slots() == 2)
        spec = LaunchSpec(id=new_id(), template=slow, pooled=pooled)
        started = await backend.launch(spec)
        seen: list[int] = []
        async with anyio.create_task_group() as tasks:

            async def look() -> None:
                while True:
                    seen.append(backend.running_slots())
                    await anyio.sleep(0.01)

            tasks.start_soon(look)
            await backend.wait_ready(spec, started, deadline=time.monotonic() + 60)
            tasks.cancel_scope.cancel()
        at_ready = backend.running_slots()
        await _until(lambda: backend.running_slots() == 2)  # made once it was ready
        await backend.stop(spec.id, started.ref)
        return seen, at_ready

    async def body(events: list[Observed]) -> None:
        seen, _ = await start(pooled=True)
        assert seen[0] == 1
        assert 2 in seen  # made again while the pool's app was starting
        seen, at_ready = await start(pooled=False)
        assert set(seen) == {1}  # nothing made while the launch's app was starting
        assert at_ready == 1

    _run(backend, body)


async def _until(check: Callable[[], bool]) -> None:
    """Return once ``check()`` holds, looked at every 10 ms; fail after 10 s."""
    with anyio.fail_after(10):
        while True:
            if check():
                return
            await anyio.sleep(0.01)
