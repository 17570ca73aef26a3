"""Readiness of an app the deploy server can reach itself (local processes, Docker containers,
Kubernetes pods at their IP):
first that it listens, learnt by connect attempts that cost tens of microseconds and send it
nothing, then that it answers, by HTTP probes that name themselves in their ``User-Agent``.

Connect attempts are spent only while the app may be listening: the first waits for a fraction of
the quickest recent start of its template (:class:`StartTimes`); the next ones come after a
fraction of the time taken so far, so their number grows with the logarithm of the start time,
not with the time. Where the app's output is a file (the local backend), the kernel tells of
each write (:class:`OutputWatch`) and an attempt follows at once: most servers print a line once
they listen, so they are seen at that moment and the fallback schedule can be sparse. Around
the time recent apps of the template began to listen, attempts come every
:data:`DENSE_POLL_SECONDS`: an app that listens when its template's apps did is seen within a
few milliseconds, however long it took (JupyterLab listens only after a second of chatty start;
the sparse schedule saw it 25-50 ms late). A template whose recent apps wrote nothing until
they listened, then wrote (:meth:`Hints.told`), has no such window: its apps' first line wakes the
look that sees them. The window's attempts were a fifth of the server's CPU in a burst of 10
of the example app: 100 ms a burst with them, 80 without, and the burst all deployed 13 ms
sooner without (medians of 15 bursts each way, alternated in one suite).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

import anyio
import httpx
from asyncinotify import Inotify, Mask, Watch
from loguru import logger

from common.local_http import RequestError, request
from common.proxy import PROBE_AGENT
from services.deploy_kubernetes.errors import LaunchError

LISTEN_POLL_FRACTION = 0.1
"""While an app does not listen yet, look again after this fraction of the time it has taken so
far (bounded below and above): a fast app is seen within a few milliseconds of listening, a slow
one costs a few dozen connect attempts, not one per 20 ms."""
LISTEN_POLL_BOUNDS = (0.002, 0.1)
HINTED_POLL_FRACTION = 0.25
"""The same where the app's output wakes the wait (:class:`OutputWatch`): an app that prints
nothing when it listens is seen at most a quarter of its start time late."""
HINTED_POLL_BOUNDS = (0.002, 2.0)
HINT_GAP_FRACTION = 0.05
"""After an attempt, output wakes the next one no sooner than this fraction of the time taken so
far: an app that prints all the while it starts costs a bounded number of attempts."""
FIRST_LOOK_FRACTION = 0.7
"""The first connect attempt waits this fraction of the quickest recent start of the same
template: no attempt is spent while the app cannot be listening yet."""
DENSE_WINDOW = (0.9, 1.25)
"""From this fraction of the quickest recent start of the template to this one of the slowest,
connect attempts come every :data:`DENSE_POLL_SECONDS` (a refused attempt costs tens of
microseconds: a one-second app's window costs a few milliseconds of the server)."""
DENSE_POLL_SECONDS = 0.002
HTTP_PROBE_BOUNDS = (0.005, 1.0)
PROBE_TIMEOUT = 2.0
"""First and longest wait between HTTP probes of an app that listens but does not answer yet."""

Alive = Callable[[], Awaitable[str | None]]
"""None while the app runs; the reason it is gone once it is."""


class Hints(Protocol):
    """Signs of progress of a starting app, to look at it when something happened."""

    async def pause(self, *, soonest: float, latest: float) -> None:
        """Wait ``latest`` seconds, or less: from ``soonest`` on, until a sign comes."""

    def look(self) -> None:
        """A look at the app begins."""

    def refused(self) -> None:
        """The look found the app not listening yet."""

    def told(self) -> bool:
        """Whether the app gave no sign before a look that found it not listening, and gave one
        since: it tells when it listens."""


class OutputWatch:
    """The writes to starting apps' output files, as the kernel tells (inotify), as
    :class:`Hints`: one watch per file while its app starts, on one inotify instance for the
    backend's life (closing an instance waits out a kernel grace period: up to 15 ms of a
    blocked event loop, measured here, where a watch costs microseconds). A watch is one-shot:
    the kernel tells of the first write after it is armed, then of nothing until the wait has
    looked and armed it again, so an app that writes all the while it starts wakes the server
    once per look, not once per write. :meth:`run` hands the kernel's events out as they come.

    Why: an app is seen the moment it prints that it listens, while the connect attempts of the
    fallback schedule stay few (``tests/unit/test_readiness.py`` holds both: few attempts for a
    slow app that prints when it listens, one wake-up per look for one that prints all along).
    Exit condition: delete it when the server learns of an app's listening socket from the
    kernel itself (the local sandbox's own network namespace, watched through sock_diag), or if
    every launch comes from a pool, so that how soon a starting app is seen no longer matters."""

    def __init__(self) -> None:
        try:
            self._inotify: Inotify | None = Inotify()
        except OSError as exc:  # the user's inotify instances used up, say: slower, not broken
            logger.warning("readiness without output hints: {}", exc)
            self._inotify = None
        self._woken: dict[int, asyncio.Event] = {}
        self.told = 0
        """Events handed out so far."""

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    async def run(self) -> None:
        """Wake the waits of the files written (a loop for the server's supervisor)."""
        if self._inotify is None:
            return
        async for event in self._inotify:
            if event.watch is not None and (woken := self._woken.get(event.watch.wd)):
                self.told += 1
                woken.set()

    @contextlib.contextmanager
    def hints(self, path: Path) -> Iterator[Hints | None]:
        """Signs of progress of the app writing ``path``; None when it cannot be watched."""
        hints = _OutputHints(self, path)
        if not hints.arm():
            yield None
            return
        try:
            yield hints
        finally:
            hints.disarm()

    def arm(self, path: Path, woken: asyncio.Event) -> Watch | None:
        """Set ``woken`` at the next write to ``path`` (once); None when it cannot be watched."""
        if self._inotify is None:
            return None
        try:
            watch = self._inotify.add_watch(path, Mask.MODIFY | Mask.ONESHOT)
        except OSError:
            return None
        self._woken[watch.wd] = woken
        return watch

    def disarm(self, watch: Watch) -> None:
        self._woken.pop(watch.wd, None)
        if self._inotify is not None:
            with contextlib.suppress(OSError):  # it fired (one-shot), or the file is gone
                self._inotify.rm_watch(watch)


class _OutputHints:
    """One starting app's output, as :class:`Hints`."""

    def __init__(self, owner: OutputWatch, path: Path) -> None:
        self._owner = owner
        self._path = path
        self._woken = asyncio.Event()
        self._watch: Watch | None = None
        self._wrote = False
        self._wrote_at_look = False
        self._wrote_before = False

    def arm(self) -> bool:
        if self._watch is not None:
            self._owner.disarm(self._watch)
        self._watch = self._owner.arm(self._path, self._woken)
        return self._watch is not None

    def disarm(self) -> None:
        if self._watch is not None:
            self._owner.disarm(self._watch)
            self._watch = None

    async def pause(self, *, soonest: float, latest: float) -> None:
        await anyio.sleep(soonest)
        with anyio.move_on_after(max(0.0, latest - soonest)):
            await self._woken.wait()
        if self._woken.is_set():  # the one-shot watch fired and is gone: armed again before
            self._woken.clear()  # the look that follows, so a write during it is told
            self._wrote = True
            self.arm()

    def _written(self) -> bool:
        return self._wrote or self._woken.is_set()

    def look(self) -> None:
        # what was written before the attempt: a write told after a refusal may have come
        # once the app listened (the loop is late to hear of the refusal under load)
        self._wrote_at_look = self._written()

    def refused(self) -> None:
        self._wrote_before = self._wrote_before or self._wrote_at_look

    def told(self) -> bool:
        return not self._wrote_before and self._written()


@functools.cache
def _probe_tls() -> ssl.SSLContext:
    # Loading the CA bundle costs about 30 ms of CPU: once per process, not once per launch.
    return ssl.create_default_context()


async def accepts(host: str, port: int, *, seconds: float = PROBE_TIMEOUT) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``seconds`` (closed at once, nothing
    sent: the app sees no request). A refused attempt costs tens of microseconds, far less than
    an HTTP probe; one to an address that does not answer (a pod network this host cannot
    reach) gives up after ``seconds``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(seconds):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except (OSError, TimeoutError):
            return False
    return True


class StartTimes:
    """How long recent apps of each template took to listen, to know when to look first, and
    whether they told when they listened (:meth:`Hints.told`)."""

    KEPT = 8

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = {}
        self._told: dict[str, deque[bool]] = {}

    def first_look(self, template: str) -> float:
        seen = self._seen.get(template)
        return FIRST_LOOK_FRACTION * min(seen) if seen else 0.0

    def window(self, template: str) -> tuple[float, float] | None:
        """When an app of ``template`` is likely to begin to listen (seconds from its start),
        None before one was seen, or when most of its recent apps told when they listened
        (:data:`DENSE_WINDOW`)."""
        seen = self._seen.get(template)
        if not seen or self.tells(template):
            return None
        return DENSE_WINDOW[0] * min(seen), DENSE_WINDOW[1] * max(seen)

    def tells(self, template: str) -> bool:
        """Whether most of the recent apps of ``template`` told when they listened."""
        told = self._told.get(template, ())
        return 2 * sum(told) > len(told)

    def add(self, template: str, seconds: float, *, told: bool | None = None) -> None:
        """An app of ``template`` listened after ``seconds``; ``told``: whether it told so
        (None: nothing was watched)."""
        self._seen.setdefault(template, deque(maxlen=self.KEPT)).append(seconds)
        if told is not None:
            self._told.setdefault(template, deque(maxlen=self.KEPT)).append(told)


async def wait_listening(
    host: str,
    port: int,
    *,
    deadline: float,
    alive: Alive,
    first_look: float = 0.0,
    hints: Hints | None = None,
    window: tuple[float, float] | None = None,
) -> float:
    """Wait until ``host:port`` accepts connections; returns the seconds that took. The first
    attempt waits ``first_look``; then each looks again after a fraction of the time taken so
    far, or as soon as ``hints`` tell of progress, and every :data:`DENSE_POLL_SECONDS` within
    ``window`` (seconds from the start: :meth:`StartTimes.window`)."""
    start = time.monotonic()
    if first_look > 0:
        await anyio.sleep(min(first_look, max(0.0, deadline - start)))
    fraction, (low, high) = (
        (LISTEN_POLL_FRACTION, LISTEN_POLL_BOUNDS)
        if hints is None
        else (HINTED_POLL_FRACTION, HINTED_POLL_BOUNDS)
    )
    while True:
        if hints is not None:
            hints.look()
        if await accepts(host, port, seconds=_within(deadline)):
            break
        if hints is not None:
            hints.refused()
        reason = await alive()
        if reason is not None:
            raise LaunchError(reason)
        now = time.monotonic()
        if now > deadline:
            raise LaunchError(f"timed out waiting for the app to listen on port {port}")
        taken = now - start
        latest = min(high, max(low, taken * fraction), max(low, deadline - now))
        if window is not None and window[0] <= taken <= window[1]:
            await anyio.sleep(DENSE_POLL_SECONDS)
            continue
        if window is not None and taken < window[0]:
            latest = min(latest, max(DENSE_POLL_SECONDS, window[0] - taken))
        if hints is None:
            await anyio.sleep(latest)
        else:
            soonest = min(latest, max(low, taken * HINT_GAP_FRACTION))
            await hints.pause(soonest=soonest, latest=latest)
    return time.monotonic() - start


async def wait_http(
    url: str,
    *,
    deadline: float,
    alive: Alive,
    starts: StartTimes | None = None,
    template: str = "",
    hints: Hints | None = None,
) -> None:
    """Wait until ``url`` answers as a ready app does (:func:`ready_answer`); ``alive`` returns
    a reason once the app is gone. Any other answer keeps it waiting until ``deadline``, and the
    reason then names the last answer (:func:`not_ready`).

    HTTP probes start only once the app listens (``wait_listening``, its first look timed by
    ``starts``, which learns how long this one took, woken by ``hints``): the first goes at once,
    the next ones after a doubling interval."""
    parts = httpx.URL(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    first = starts.first_look(template) if starts else 0.0
    window = starts.window(template) if starts else None
    took = await wait_listening(
        parts.host,
        port,
        deadline=deadline,
        alive=alive,
        first_look=first,
        hints=hints,
        window=window,
    )
    interval, longest = HTTP_PROBE_BOUNDS
    while True:
        reason = await alive()
        if reason is not None:
            raise LaunchError(reason)
        status = await _answer(url, seconds=_within(deadline))
        if status is not None and ready_answer(status):
            if starts is not None:  # once it answers: what it wrote on listening came by then
                starts.add(template, took, told=hints.told() if hints is not None else None)
            return
        if time.monotonic() > deadline:
            raise LaunchError(not_ready(status, parts.path))
        await anyio.sleep(interval)
        interval = min(interval * 2, longest)


def ready_answer(status: int) -> bool:
    """Whether an app that answers ``status`` at its ready path is ready: 2xx, 3xx (a redirect to
    its login or its UI) or 401 (it wants the credentials the user's link carries). A 404 (it does
    not serve the base URL), a 403 (it refuses the request, as JupyterLab refuses a host name it
    does not know) or a 5xx is not: those apps would greet the user with that very error."""
    return 200 <= status < 400 or status == 401


HINTS = {
    404: "does the app serve {base_url}?",
    403: "does the app refuse requests for the public host name "
    "(JupyterLab: --ServerApp.allow_remote_access=True)?",
}


def not_ready(status: int | None, path: str) -> str:
    """Why an app was not ready by its deadline, naming its last answer (the launcher puts the
    time it waited after "timed out")."""
    if status is None:
        return "timed out waiting for the app to answer"
    hint = HINTS.get(status, "it must answer 2xx, 3xx or 401 there")
    return f"timed out waiting for the app to be ready: it answered {status} at {path}: {hint}"


def _within(deadline: float) -> float:
    """How long one probe may take: ``PROBE_TIMEOUT``, and not much past ``deadline``."""
    return min(PROBE_TIMEOUT, max(0.05, deadline - time.monotonic()))


async def _answer(url: str, *, seconds: float) -> int | None:
    """The status ``url`` answers a probe (named by its ``User-Agent``) with, None when it gives
    none: plain HTTP through :mod:`common.local_http`, a seventh of httpx's CPU; TLS through
    httpx."""
    headers = {"User-Agent": PROBE_AGENT}
    if url.startswith("http://"):
        try:
            return (await request(url, headers=headers, seconds=seconds)).status
        except RequestError:
            return None
    async with httpx.AsyncClient(timeout=seconds, verify=_probe_tls(), headers=headers) as c:
        try:
            return (await c.get(url)).status_code
        except httpx.HTTPError:
            return None
