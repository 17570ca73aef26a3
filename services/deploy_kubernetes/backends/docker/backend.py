"""The ``docker`` backend: one container per deployment on this host's Docker engine.

Containers carry the labels ``binder.suite``, ``binder.id`` and ``binder.template``; the app's port
is published on 127.0.0.1 only, on a port the engine picks. What a container is (its user, its
capabilities, its limits, its network) is built in :mod:`.spec`; its output is copied for the
log aggregator by :mod:`.output`. The suite's label is its own (derived from its home unless
configured), so two suites on one engine never list, adopt or remove each other's containers;
the suite's network (inter-container traffic off) is made at its first launch and removed when
the backend closes with no container left on it (at ``stop-all``).

The Docker SDK is synchronous, so every call runs in a worker thread. Everything the SDK raises
is translated here: an engine that cannot be reached or fails becomes ``BadBackendError``, a
missing container or image ``_Missing`` (a ``BadBackendError`` too), which the methods that
expect one handle, so that nothing of the SDK crosses the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import docker
import docker.errors
import requests.exceptions
from loguru import logger

from services.deploy_kubernetes.backends.base import (
    LaunchSpec,
    Lines,
    Notify,
    Observed,
    State,
    in_daemon_thread,
    output_lines,
)
from services.deploy_kubernetes.backends.docker.output import OutputCopier
from services.deploy_kubernetes.backends.docker.spec import (
    NETWORK_OPTIONS,
    SUITE_LABEL,
    app_user,
    container_spec,
    network_name,
)
from services.deploy_kubernetes.backends.readiness import wait_http
from services.deploy_kubernetes.errors import BadBackendError, LaunchError
from services.deploy_kubernetes.models import Template

T = TypeVar("T")


class _Missing(BadBackendError):
    """The engine has no such container or image (its 404): handled by the methods that expect
    one; anywhere else a ``BadBackendError`` like any other failure."""

    def __init__(self, explanation: str) -> None:
        super().__init__(f"Docker engine: no such object: {explanation}")
        self.explanation = explanation


def _reason(attrs: dict[str, Any]) -> str:
    state = attrs.get("State", {})
    if state.get("OOMKilled"):
        return "container was killed: out of memory"
    if state.get("Error"):
        return f"container failed: {state['Error']}"
    return f"container exited with code {state.get('ExitCode')}"


class DockerBackend:
    def __init__(self, *, suite: str, host: str = "", log_dir: Path | None = None) -> None:
        """``log_dir``: where each container's output is copied (none copied without it)."""
        self._host = host
        self._suite = suite
        self._network = network_name(suite)
        self._network_made = False
        self._network_lock = asyncio.Lock()
        self._output = OutputCopier(log_dir) if log_dir is not None else None
        self._client: Any = None
        self._notify: Notify | None = None
        self._preloads: dict[str, str] = {}
        """Per template: ``loading``, ``completed`` or why its last pull failed."""
        self._pulls: set[asyncio.Task[None]] = set()
        self._closing = threading.Event()
        self._events: Any = None
        """The engine's event stream being read (closed by :meth:`close`, which ends its read)."""
        self.api_calls: dict[str, int] = {}
        self._removing: set[str] = set()

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        verb = getattr(fn, "__name__", "call")
        self.api_calls[verb] = self.api_calls.get(verb, 0) + 1
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except docker.errors.NotFound as exc:  # ImageNotFound too
            raise _Missing(str(exc.explanation or exc)) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
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
        """Tell the deployer about containers that die on their own, and copy the output of
        those that start (runs in its own thread)."""
        label = f"{SUITE_LABEL}={self._suite}"
        filters = {"label": label, "event": ["die", "start"], "type": "container"}
        while not self._closing.is_set():
            try:
                self._follow_running(label)
                self._events = self._client.events(decode=True, filters=filters)
                if self._closing.is_set():  # closed while it opened: close() missed it
                    self._events.close()
                for event in self._events:
                    attrs = event.get("Actor", {}).get("Attributes", {})
                    dep_id = attrs.get("binder.id")
                    if event.get("status", event.get("Action")) == "start":
                        self._follow(event.get("id"), dep_id)
                        continue
                    if dep_id in self._removing:  # our own removal: nobody to tell
                        continue
                    if dep_id and self._notify is not None:
                        obs = Observed(
                            id=dep_id,
                            state=State.EXITED,
                            ref={"container": event.get("id")},
                            reason=f"container exited with code {attrs.get('exitCode')}",
                            template=attrs.get("binder.template"),
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

    def _follow_running(self, label: str) -> None:
        """Copy the output of the suite's running containers (after a server restart)."""
        if self._output is None:
            return
        for container in self._client.containers.list(filters={"label": label}):
            self._output.follow(container, container.labels.get("binder.id", ""))

    def _follow(self, container_id: str | None, dep_id: str | None) -> None:
        if self._output is None or not container_id or not dep_id:
            return
        with contextlib.suppress(docker.errors.DockerException):
            self._output.follow(self._client.containers.get(container_id), dep_id)

    async def close(self) -> None:
        self._closing.set()
        if self._events is not None:  # its thread is blocked reading it: ends the read
            with contextlib.suppress(Exception):
                self._events.close()
        if self._client is not None:
            await self._remove_network_if_unused()
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(self._client.close)

    async def _remove_network_if_unused(self) -> None:
        """Remove the suite's network when no container is left on it (the engine refuses
        while one is: the apps outlive a server restart)."""
        try:
            network = await self._call(self._client.networks.get, self._network)
            await self._call(network.reload)
            if not network.attrs.get("Containers"):
                await self._call(network.remove)
        except BadBackendError as exc:
            logger.debug("the suite's network stays: {}", exc.message)

    async def _ensure_network(self, *, again: bool = False) -> None:
        """Make the suite's network (inter-container traffic off) unless it is there."""
        async with self._network_lock:
            if self._network_made and not again:
                return
            found = await self._call(
                self._client.networks.list, names=[self._network], filters={"label": SUITE_LABEL}
            )
            if not [n for n in found if n.name == self._network]:
                await self._call(
                    self._client.networks.create,
                    self._network,
                    driver="bridge",
                    options=NETWORK_OPTIONS,
                    labels={SUITE_LABEL: self._suite},
                )
            self._network_made = True

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def launch(self, spec: LaunchSpec) -> Observed:
        image_name = spec.template.image_source or spec.template.image_name
        try:  # never an implicit pull at launch: images arrive by preload, or are built here
            image = await self._call(self._client.images.get, image_name)
        except _Missing as exc:
            raise LaunchError(
                f"image pull failed: {image_name} is not on this host "
                f"(POST /preload/{spec.template.name} pulls it)"
            ) from exc
        user = app_user((image.attrs.get("Config") or {}).get("User") or "")
        args = container_spec(spec, suite=self._suite, network=self._network, user=user)
        await self._ensure_network()
        try:
            container = await self._run(args)
        except _Missing as exc:
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
        return Observed(
            id=spec.id, state=State.STARTING, target=target, ref=ref, template=spec.template.name
        )

    async def _run(self, args: dict[str, Any]) -> Any:
        """Create and start the container; once more if the suite's network was removed since
        it was made (by hand, or by a server that closed)."""
        try:
            return await self._call(self._client.containers.run, **args)
        except _Missing as exc:
            if "network" not in exc.explanation:
                raise
            with contextlib.suppress(BadBackendError):  # the half-made container, if any
                gone = await self._call(self._client.containers.get, args["name"])
                await self._call(gone.remove, force=True)
            await self._ensure_network(again=True)
            return await self._call(self._client.containers.run, **args)

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        try:
            container = await self._call(self._client.containers.get, observed.ref["container"])
        except _Missing as exc:
            raise LaunchError("container was removed") from exc

        async def alive() -> str | None:
            try:
                await self._call(container.reload)
            except _Missing:
                return "container was removed"
            return None if container.status in ("created", "running") else _reason(container.attrs)

        assert observed.target is not None
        await wait_http(observed.target + spec.ready_path, deadline=deadline, alive=alive)
        return observed.running()

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        name = ref.get("container") or f"binder-{dep_id}"
        self._removing.add(dep_id)
        try:
            with contextlib.suppress(_Missing):
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
                    id=dep_id,
                    state=State.RUNNING if running else State.EXITED,
                    target=target,
                    ref={"container": c.id},
                    reason=None if running else _reason(c.attrs),
                    template=c.labels.get("binder.template"),
                )
            )
        return out

    async def output(self, dep_id: str, *, lines: int) -> Lines:
        """The container's last lines of output, as the engine kept them (its log)."""
        try:
            container = await self._call(self._client.containers.get, f"binder-{dep_id}")
            logs = await self._call(container.logs, tail=lines * 2 + 2)
        except _Missing:
            return []
        return output_lines(bytes(logs).decode(errors="replace"), lines)

    async def preload(self, template: Template) -> None:
        """Pull the template's image in the background; ``preload_status`` says when it ended
        (and why, when it failed: until the next preload)."""
        if self._preloads.get(template.name) == "loading":
            return
        image = template.image_source or template.image_name
        with contextlib.suppress(_Missing):
            await self._call(self._client.images.get, image)
            self._preloads[template.name] = "completed"
            return  # already on this host: nothing to pull
        self._preloads[template.name] = "loading"

        async def pull() -> None:
            try:
                await self._call(self._client.images.pull, image)
            except BadBackendError as exc:
                logger.warning("preload of {} failed: {}", image, exc.message)
                self._preloads[template.name] = f"image pull failed for {image}: {exc.message}"
            else:
                self._preloads[template.name] = "completed"

        task = asyncio.get_running_loop().create_task(pull())
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    async def preload_status(self, template: Template) -> str:
        """``loading`` or ``completed``; a failed pull raises ``LaunchError`` with its reason,
        as on kubernetes."""
        state = self._preloads.get(template.name, "completed")
        if state not in ("loading", "completed"):
            raise LaunchError(state)
        return state
