"""The backend port: where a template's instances run. Domain types in and out only."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx

from common.local_http import RequestError, request
from common.proxy import PROBE_AGENT
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
    """A progress message of a launch under way (a pod's "Pulling image ..."), for watchers."""


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


LISTEN_POLL_FRACTION = 0.1
"""While an app does not listen yet, look again after this fraction of the time it has taken so
far (bounded below and above): a fast app is seen within a few milliseconds of listening, a slow
one costs a few dozen connect attempts, not one per 20 ms."""
LISTEN_POLL_BOUNDS = (0.002, 0.1)
FIRST_LOOK_FRACTION = 0.7
"""The first connect attempt waits this fraction of the quickest recent start of the same
template: no attempt is spent while the app cannot be listening yet."""
HTTP_PROBE_BOUNDS = (0.005, 1.0)
PROBE_TIMEOUT = 2.0
"""First and longest wait between HTTP probes of an app that listens but does not answer yet."""


@functools.cache
def _probe_tls() -> ssl.SSLContext:
    # Loading the CA bundle costs about 30 ms of CPU: once per process, not once per launch.
    return ssl.create_default_context()


async def accepts(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection (closed at once, nothing sent: the app sees
    no request). A refused attempt costs tens of microseconds, far less than an HTTP probe."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except OSError:
            return False
    return True


class StartTimes:
    """How long recent apps of each template took to listen, to know when to look first."""

    KEPT = 8

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = {}

    def first_look(self, template: str) -> float:
        seen = self._seen.get(template)
        return FIRST_LOOK_FRACTION * min(seen) if seen else 0.0

    def add(self, template: str, seconds: float) -> None:
        self._seen.setdefault(template, deque(maxlen=self.KEPT)).append(seconds)


async def wait_listening(
    host: str,
    port: int,
    *,
    deadline: float,
    alive: Callable[[], Awaitable[str | None]],
    first_look: float = 0.0,
) -> float:
    """Wait until ``host:port`` accepts connections; returns the seconds that took. The first
    attempt waits ``first_look``; then each looks again after a fraction of the time taken so
    far: a fast app is seen within milliseconds, a slow one costs a few dozen attempts."""
    start = time.monotonic()
    if first_look > 0:
        await anyio.sleep(min(first_look, max(0.0, deadline - start)))
    low, high = LISTEN_POLL_BOUNDS
    while not await accepts(host, port):
        reason = await alive()
        if reason is not None:
            raise LaunchError(reason)
        now = time.monotonic()
        if now > deadline:
            raise LaunchError("timed out waiting for the app to listen")
        await anyio.sleep(min(high, max(low, (now - start) * LISTEN_POLL_FRACTION)))
    return time.monotonic() - start


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


async def wait_http(
    url: str,
    *,
    deadline: float,
    alive: Callable[[], Awaitable[str | None]],
    starts: StartTimes | None = None,
    template: str = "",
) -> None:
    """Wait until ``url`` answers below 500; ``alive`` returns a reason once the app is gone.

    HTTP probes start only once the app listens (``wait_listening``, its first look timed by
    ``starts``, which learns how long this one took): the first goes at once, the next ones after
    a doubling interval. They name themselves in their ``User-Agent``."""
    parts = httpx.URL(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    first = starts.first_look(template) if starts else 0.0
    took = await wait_listening(parts.host, port, deadline=deadline, alive=alive, first_look=first)
    if starts is not None:
        starts.add(template, took)
    interval, longest = HTTP_PROBE_BOUNDS
    while True:
        reason = await alive()
        if reason is not None:
            raise LaunchError(reason)
        if await _answers(url):
            return
        if time.monotonic() > deadline:
            raise LaunchError("timed out waiting for the app to answer")
        await anyio.sleep(interval)
        interval = min(interval * 2, longest)


async def _answers(url: str) -> bool:
    """Whether ``url`` answers below 500 (a probe, by its ``User-Agent``): plain HTTP through
    :mod:`common.local_http`, a seventh of httpx's CPU; TLS through httpx."""
    headers = {"User-Agent": PROBE_AGENT}
    if url.startswith("http://"):
        try:
            return (await request(url, headers=headers, seconds=PROBE_TIMEOUT)).status < 500
        except RequestError:
            return False
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT, verify=_probe_tls(), headers=headers) as c:
        try:
            return (await c.get(url)).status_code < 500
        except httpx.HTTPError:
            return False
