"""The backend port: where a template's instances run. Domain types in and out only."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.deploy_kubernetes.models import Template


class State(enum.StrEnum):
    """What a backend sees of one deployment's object."""

    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class LaunchSpec:
    """One instance to start: the deployment id, its template and the base URL it serves under."""

    id: str
    template: Template

    @property
    def base_url(self) -> str:
        return f"/user/{self.id}/"

    def substitute(self, word: str, *, port: int, python: str) -> str:
        return (
            word.replace("{port}", str(port))
            .replace("{base_url}", self.base_url)
            .replace("{id}", self.id)
            .replace("{python}", python)
        )


@dataclass(frozen=True)
class Observed:
    """A backend object as last seen. ``target`` is where the proxy should send the app's traffic.

    ``event`` is a progress message (an image being pulled, a container started) told through
    ``Notify`` while the object is starting; such an Observed reports nothing else.
    """

    id: str
    state: State
    target: str | None = None
    ref: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    template: str | None = None
    event: str | None = None
    """A progress message of a launch under way (a pod's "Pulling image ..."), for watchers."""


Notify = Callable[[Observed], Coroutine[Any, Any, None]]
"""Called by a backend when one of its objects changes state on its own (an app exited), or with
a progress message (``Observed.event``) while it starts."""


class Backend(Protocol):
    """A place that runs templates: local processes, Docker containers, Kubernetes pods."""

    name: str
    api_calls: dict[str, int]
    """Calls made to the backend's API by verb (empty where there is no API), for /metrics."""
    ready_at_target: bool
    """Whether ``wait_ready`` saw the app answer at its ``target`` from this host, the proxy's:
    the proxy then reaches the app as the probe did, and a launch needs no request through the
    proxy to know its route works. False for pods, whose readiness is the kubelet's."""

    async def open(self, notify: Notify) -> None:
        """Connect; ``notify`` is called whenever an object exits or vanishes on its own (and, on
        backends that see them, with progress messages of starting objects)."""

    async def close(self) -> None:
        """Disconnect, leaving the running apps alone (they survive a server restart)."""

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The backend's long-running loops (watches, event readers), by name, for the deploy
        server's supervisor to run, log, restart and report on."""

    async def ping(self) -> None:
        """Raise ``BadBackendError`` when the backend cannot be reached."""

    async def launch(self, spec: LaunchSpec) -> Observed:
        """Create the object for ``spec`` and return at once (state STARTING)."""

    async def wait_ready(
        self, spec: LaunchSpec, observed: Observed, *, deadline: float
    ) -> Observed:
        """Wait until the app answers; raise ``LaunchError`` with a reason when it cannot."""

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        """Remove everything the launch created; a missing object is not an error."""

    async def list(self) -> list[Observed]:
        """Every object this backend holds for the suite, running or exited."""

    async def preload(self, template: Template) -> None:
        """Start pulling the template's image wherever apps may run."""

    async def preload_status(self, template: Template) -> str:
        """``loading`` or ``completed``."""


async def in_daemon_thread(func: Callable[..., None], *args: Any) -> None:
    """Run ``func`` (a blocking loop: a watch, an event stream) in a daemon thread and wait for
    it to end; what it raises is raised here, for the supervisor to log and restart.

    A daemon thread, not a worker thread of the event loop's pool: a loop blocked in a socket
    read must never hold up the process's exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            func(*args)
        except BaseException as exc:  # handed to the awaiting task, which raises it
            error = exc
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=getattr(func, "__name__", "loop"), daemon=True).start()
    await done
