"""Long-running tasks of a service (loops, watchers), started one by one and cancelled together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from loguru import logger

from common.errors import BinderError


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def repeat(
    step: Callable[[], Awaitable[Any]], *, every: float, what: str, delay_first: bool = False
) -> None:
    """Run ``step`` every ``every`` seconds for ever; a ``BinderError`` (a database or proxy
    that is away for now) is logged as ``<what> skipped`` and the loop goes on."""
    if delay_first:
        await asyncio.sleep(every)
    while True:
        try:
            await step()
        except BinderError as exc:
            logger.warning("{} skipped: {}", what, exc.message)
        await asyncio.sleep(every)
