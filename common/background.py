"""Background work of a service, supervised: every long-running loop is started here, a crash is
logged with its traceback, counted, shown in health and restarted with backoff; one-shot tasks
are tracked so that none is forgotten and none fails unseen.

Why not a library: tenacity and backoff retry a *call*; here a loop that should never end is
restarted, its state is reported to ``/health`` and ``/metrics``, and its backoff is forgiven once
it has run well for a while. That is a few lines on top of asyncio, written out below.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from loguru import logger

from common.errors import BinderError

FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 30.0
HEALTHY_AFTER_SECONDS = 60.0
"""A loop that ran this long before it crashed starts again from the first backoff."""


@dataclass
class LoopState:
    """What health and metrics show of one supervised loop."""

    name: str
    critical: bool
    running: bool = False
    crashes: int = 0
    last_error: str | None = None


class LoopSupervisor:
    """Runs named loops for ever (until cancelled) and one-shot tasks, and reports on them.

    ``on_crash(name)`` is called for each crash (the deploy server counts them in /metrics)."""

    def __init__(self, *, on_crash: Callable[[str], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loops: dict[str, LoopState] = {}
        self._on_crash = on_crash

    def run(
        self, name: str, factory: Callable[[], Awaitable[Any]], *, critical: bool = True
    ) -> None:
        """Run ``factory()`` now and again after every crash; ``critical`` loops make the
        service unready while they are down."""
        state = self.loops[name] = LoopState(name, critical)
        self._track(asyncio.get_running_loop().create_task(self._keep(state, factory)))

    async def _keep(self, state: LoopState, factory: Callable[[], Awaitable[Any]]) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            started = time.monotonic()
            state.running = True
            try:
                await factory()
                logger.warning("background loop {} returned; starting it again", state.name)
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:  # every crash is logged, counted and restarted
                state.crashes += 1
                state.last_error = f"{exc.__class__.__name__}: {exc}"[:200]
                logger.opt(exception=exc).error(
                    "background loop {} crashed ({}); restarting", state.name, state.last_error
                )
                if self._on_crash is not None:
                    self._on_crash(state.name)
            state.running = False
            if time.monotonic() - started > HEALTHY_AFTER_SECONDS:
                backoff = FIRST_BACKOFF_SECONDS
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A one-shot task; an exception it ends with is logged with its traceback."""
        task = asyncio.get_running_loop().create_task(coro)
        self._track(task)
        return task

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error(
                "background task {} failed", task.get_name()
            )

    def health(self) -> dict[str, str]:
        """``ok`` or why not, for each critical loop."""
        return {
            f"loop:{s.name}": "ok" if s.running else f"restarting after {s.last_error}"
            for s in self.loops.values()
            if s.critical
        }

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def repeat(
    step: Callable[[], Awaitable[Any]], *, every: float, what: str, delay_first: bool = False
) -> None:
    """Run ``step`` every ``every`` seconds for ever. A ``BinderError`` (a database or proxy
    that is away for now) is logged as ``<what> skipped`` and the loop goes on; anything else
    ends the loop, for its supervisor to log and restart."""
    if delay_first:
        await asyncio.sleep(every)
    while True:
        try:
            await step()
        except BinderError as exc:
            logger.warning("{} skipped: {}", what, exc.message)
        await asyncio.sleep(every)
