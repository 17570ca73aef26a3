"""The backend port: where a template's instances run. Domain types in and out only."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services.deploy_kubernetes.models import Template


class State(enum.StrEnum):
    """What a backend sees of one deployment's object."""

    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """One instance to start: the deployment id, its template, the base URL it serves under and
    the launch's secret (``{token}``, empty where the template takes none)."""

    id: str
    template: Template
    token: str = field(default="", repr=False)
    pooled: bool = False
    """An instance for a template's pool: no one waits for its start."""

    @property
    def base_url(self) -> str:
        return f"/user/{self.id}/"

    @property
    def ready_path(self) -> str:
        """The path where the app answers once it is ready: the template's ``ready-path`` below
        the base URL (the base URL itself by default)."""
        return self.base_url + self.template.ready_path

    def substitute(self, word: str, *, port: int, python: str) -> str:
        return (
            word.replace("{port}", str(port))
            .replace("{base_url}", self.base_url)
            .replace("{id}", self.id)
            .replace("{token}", self.token)
            .replace("{python}", python)
        )

    def environment(self, *, port: int, python: str) -> dict[str, str]:
        """What the app finds in its environment, beside what its backend adds (``HOME``): the
        template's ``env`` (substituted as the command is), then ``PORT``, ``BASE_URL``,
        ``BINDER_ID`` and, where the template takes ``{token}``, ``BINDER_TOKEN``."""
        env = {
            k: self.substitute(v, port=port, python=python) for k, v in self.template.env.items()
        }
        env.update({"PORT": str(port), "BASE_URL": self.base_url, "BINDER_ID": self.id})
        if self.token:
            env["BINDER_TOKEN"] = self.token
        return env


@dataclass(frozen=True, kw_only=True)
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

    def running(self) -> Observed:
        """The same object seen ready: running at the same target, nothing else to tell."""
        return Observed(
            id=self.id,
            state=State.RUNNING,
            target=self.target,
            ref=self.ref,
            template=self.template,
        )


Lines = list[str]
"""Lines of an app's output (a name of its own: ``list`` is a method of the backends)."""

Notify = Callable[[Observed], Coroutine[Any, Any, None]]
"""Called by a backend when one of its objects changes state on its own (an app exited), or with
a progress message (``Observed.event``) while it starts."""


class Backend(Protocol):
    """A place that runs templates: local processes, Docker containers, Kubernetes pods."""

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
        """Wait until the app answers at its ``target`` from this host, the proxy's (so that the
        proxy reaches it as the probe did, and a launch needs no request through the proxy to
        know its route works); raise ``LaunchError`` with a reason when it cannot."""

    async def stop(self, dep_id: str, ref: dict[str, Any]) -> None:
        """Remove everything the launch created; a missing object is not an error."""

    async def list(self) -> list[Observed]:
        """Every object this backend holds for the suite, running or exited."""

    async def preload(self, template: Template) -> None:
        """Start pulling the template's image wherever apps may run."""

    async def preload_status(self, template: Template) -> str:
        """``loading`` or ``completed``."""

    async def output(self, dep_id: str, *, lines: int) -> Lines:
        """The last ``lines`` lines the app printed (stdout and stderr), oldest first; none
        where it printed nothing or its object is gone. ``BadBackendError`` when the backend
        cannot be asked."""


OUTPUT_LINE_CHARS = 300
"""Longest output line kept whole; a longer one is cut, saying so."""
OUTPUT_TAIL_BYTES = 64 * 1024
"""How far from the end of an output file its last lines are looked for."""


def output_lines(text: str, lines: int) -> list[str]:
    """The last ``lines`` non-blank lines of ``text``, each cut to ``OUTPUT_LINE_CHARS``, with
    terminal escapes and other control characters left out."""
    out = []
    for line in text.splitlines()[-(lines * 4 + 4) :]:
        line = _CONTROL.sub("", line).rstrip()
        if line.strip():
            cut = len(line) > OUTPUT_LINE_CHARS
            out.append(line[:OUTPUT_LINE_CHARS] + (" [...]" if cut else ""))
    return out[-lines:] if lines > 0 else []


_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def last_lines(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of the file at ``path`` (its last 64 KiB are read); none when
    there is no such file. Blocking: call it from a worker thread."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - OUTPUT_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    return output_lines(data.decode(errors="replace"), lines)


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
