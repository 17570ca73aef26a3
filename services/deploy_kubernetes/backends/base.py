"""The backend port: where a template's instances run. Domain types in and out only."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx

from services.deploy_kubernetes.errors import LaunchError
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


Notify = Callable[[Observed], Coroutine[Any, Any, None]]
"""Called by a backend when one of its objects changes state on its own (an app exited), or with
a progress message (``Observed.event``) while it starts."""


class Backend(Protocol):
    """A place that runs templates: local processes, Docker containers, Kubernetes pods."""

    name: str
    api_calls: dict[str, int]
    """Calls made to the backend's API by verb (empty where there is no API), for /metrics."""

    async def open(self, notify: Notify) -> None:
        """Connect; ``notify`` is called whenever an object exits or vanishes on its own (and, on
        backends that see them, with progress messages of starting objects)."""

    async def close(self) -> None:
        """Disconnect, leaving the running apps alone (they survive a server restart)."""

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


async def wait_http(
    url: str, *, deadline: float, alive: Callable[[], Awaitable[str | None]], interval: float = 0.02
) -> None:
    """Poll ``url`` until it answers below 500; ``alive`` returns a reason once the app is gone."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            reason = await alive()
            if reason is not None:
                raise LaunchError(reason)
            try:
                response = await client.get(url)
                if response.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError("timed out waiting for the app to answer")
            await anyio.sleep(interval)
            interval = min(interval * 1.5, 0.5)
