"""The ``docker`` backend: one container per deployment on this host's Docker engine.

Containers carry the labels ``binder.suite``, ``binder.id`` and ``binder.template``; the app's port
is published on 127.0.0.1 only, on a port the engine picks. The Docker SDK is synchronous, so every
call runs in a worker thread; an engine that cannot be reached becomes ``BadBackendError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import docker
import docker.errors
from loguru import logger

from services.deploy_kubernetes.backends.base import (
    LaunchSpec,
    Notify,
    Observed,
    State,
    in_daemon_thread,
)
from services.deploy_kubernetes.backends.readiness import wait_http
from services.deploy_kubernetes.errors import BadBackendError, LaunchError
from services.deploy_kubernetes.models import Template, cpu_cores, memory_bytes

T = TypeVar("T")
SUITE_LABEL = "binder.suite"


def container_spec(spec: LaunchSpec, *, suite: str) -> dict[str, Any]:
    """The arguments of ``containers.run`` for ``spec`` (pure, so it is tested as a dict)."""
    template = spec.template
    port = template.port
    command = [spec.substitute(w, port=port, python="python3") for w in template.command]
    env = {**template.env, "PORT": str(port), "BASE_URL": spec.base_url, "BINDER_ID": spec.id}
    out: dict[str, Any] = {
        "image": template.image_source or template.image_name,
        "command": command,
        "name": f"binder-{spec.id}",
        "detach": True,
        "environment": env,
        "labels": {SUITE_LABEL: suite, "binder.id": spec.id, "binder.template": template.name},
        "ports": {f"{port}/tcp": ("127.0.0.1", None)},
    }
    if "memory" in template.limits:
        out["mem_limit"] = memory_bytes(template.limits["memory"])
    if "cpu" in template.limits:
        out["nano_cpus"] = int(cpu_cores(template.limits["cpu"]) * 1e9)
    return out


def _reason(attrs: dict[str, Any]) -> str:
    state = attrs.get("State", {})
    if state.get("OOMKilled"):
        return "container was killed: out of memory"
    if state.get("Error"):
        return f"container failed: {state['Error']}"
    return f"container exited with code {state.get('ExitCode')}"


class DockerBackend:
    name = "docker"
    ready_at_target = True

    def __init__(self, *, host: str = "", suite: str = "binder") -> None:
        self._host = host
        self._suite = suite
        self._client: Any = None
        self._notify: Notify | None = None
        self._preloads: dict[str, str] = {}
        self._pulls: set[asyncio.Task[None]] = set()
        self._closing = threading.Event()
        self.api_calls: dict[str, int] = {}
        self._removing: set[str] = set()

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        verb = getattr(fn, "__name__", "call")
        self.api_calls[verb] = self.api_calls.get(verb, 0) + 1
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except docker.errors.DockerException as exc:
            if isinstance(exc, docker.errors.NotFound | docker.errors.ImageNotFound):
                raise
            raise BadBackendError(f"Docker engine unreachable or failing: {exc}") from exc

    async def open(self, notify: Notify) -> None:
        self._notify = notify
        try:
            self._client = await anyio.to_thread.run_sync(
                lambda: (
                    docker.DockerClient(base_url=self._host) if self._host else docker.from_env()
                )
            )
        except docker.errors.DockerException as exc:
            raise BadBackendError(f"Docker engine unreachable: {exc}") from exc

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        async def events() -> None:
            token = anyio.lowlevel.current_token()
            await in_daemon_thread(self._watch_events, token)

        return {"docker events": events}

    def _watch_events(self, token: Any) -> None:
        """Tell the deployer about containers that die on their own (runs in its own thread)."""
        filters = {"label": f"{SUITE_LABEL}={self._suite}", "event": "die", "type": "container"}
        while not self._closing.is_set():
            try:
                for event in self._client.events(decode=True, filters=filters):
                    attrs = event.get("Actor", {}).get("Attributes", {})
                    dep_id = attrs.get("binder.id")
                    if dep_id in self._removing:  # our own removal: nobody to tell
                        continue
                    if dep_id and self._notify is not None:
                        obs = Observed(
                            dep_id,
                            State.EXITED,
                            None,
                            {"container": event.get("id")},
                            f"container exited with code {attrs.get('exitCode')}",
                            attrs.get("binder.template"),
                        )
                        notify = self._notify

                        async def deliver(o: Observed = obs, tell: Notify = notify) -> None:
                            await tell(o)

                        anyio.from_thread.run(deliver, token=token)
            except Exception as exc:  # the engine restarted or the loop closed: look again
                if self._closing.is_set():
                    return
                logger.warning("Docker event stream interrupted: {}", exc)
                self._closing.wait(1.0)

    async def close(self) -> None:
        self._closing.set()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(self._client.close)

    async def ping(self) -> None:
        try:
            await self._call(self._client.ping)
        except docker.errors.DockerException as exc:  # a raw answer left by _call
            raise BadBackendError(f"Docker engine answered: {exc}") from exc

    async def launch(self, spec: LaunchSpec) -> Observed:
        args = container_spec(spec, suite=self._suite)
        try:  # never an implicit pull at launch: images arrive by preload, or are built here
            await self._call(self._client.images.get, args["image"])
        except docker.errors.ImageNotFound as exc:
            raise LaunchError(
                f"image pull failed: {args['image']} is not on this host "
                f"(POST /preload/{spec.template.name} pulls it)"
            ) from exc
        try:
            container = await self._call(self._client.containers.run, **args)
        except docker.errors.NotFound as exc:
            raise LaunchError(f"container could not start: {exc.explanation}") from exc
        await self._call(container.reload)
        binding = (container.attrs["NetworkSettings"]["Ports"] or {}).get(
            f"{spec.template.port}/tcp"
        )
        if not binding:  # an app that exited at once has no port any more: say why it exited
            if container.status not in ("created", "running"):
                raise LaunchError(_reason(container.attrs))
            raise LaunchError(f"container {container.short_id} published no port")
        target = f"http://127.0.0.1:{binding[0]['HostPort']}"
        ref = {"container": container.id}
        return Observed(spec.id, State.STARTING, target, ref, None, spec.template.name)

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        container = await self._call(self._client.containers.get, observed.ref["container"])

        async def alive() -> str | None:
            await self._call(container.reload)
            return None if container.status in ("created", "running") else _reason(container.attrs)

        assert observed.target is not None
        await wait_http(observed.target + spec.base_url, deadline=deadline, alive=alive)
        return Observed(
            spec.id, State.RUNNING, observed.target, observed.ref, None, observed.template
        )

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        name = ref.get("container") or f"binder-{dep_id}"
        self._removing.add(dep_id)
        try:
            with contextlib.suppress(docker.errors.NotFound):
                container = await self._call(self._client.containers.get, name)
                await self._call(container.remove, force=True)
        finally:  # the engine's die event for it arrives within moments, then it is forgotten
            asyncio.get_running_loop().call_later(30, self._removing.discard, dep_id)

    async def list(self) -> list[Observed]:
        found = await self._call(
            self._client.containers.list,
            all=True,
            filters={"label": f"{SUITE_LABEL}={self._suite}"},
        )
        out = []
        for c in found:
            dep_id = c.labels.get("binder.id")
            if not dep_id:
                continue
            running = c.status in ("created", "running")
            ports = c.attrs.get("NetworkSettings", {}).get("Ports") or {}
            binding = next((v for v in ports.values() if v), None)
            target = f"http://127.0.0.1:{binding[0]['HostPort']}" if binding else None
            out.append(
                Observed(
                    dep_id,
                    State.RUNNING if running else State.EXITED,
                    target,
                    {"container": c.id},
                    None if running else _reason(c.attrs),
                    c.labels.get("binder.template"),
                )
            )
        return out

    async def preload(self, template: Template) -> None:
        """Pull the template's image in the background; ``preload_status`` says when it ended."""
        if self._preloads.get(template.name) == "loading":
            return
        image = template.image_source or template.image_name
        with contextlib.suppress(docker.errors.ImageNotFound):
            await self._call(self._client.images.get, image)
            self._preloads[template.name] = "completed"
            return  # already on this host: nothing to pull
        self._preloads[template.name] = "loading"

        async def pull() -> None:
            try:
                await self._call(self._client.images.pull, image)
            except (docker.errors.DockerException, BadBackendError) as exc:
                logger.warning("preload of {} failed: {}", image, exc)
            finally:
                self._preloads[template.name] = "completed"

        self._pulls.add(asyncio.get_running_loop().create_task(pull()))

    async def preload_status(self, template: Template) -> str:
        return self._preloads.get(template.name, "completed")
