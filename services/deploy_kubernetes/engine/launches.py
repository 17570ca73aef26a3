"""The launch tasks under way, by deployment id: started by the launcher, cancelled by the ender
(a delete or failure stops its launch), all cancelled when the server stops.

A launch task starts with a context of its own: one started by the leader's loops (a pool's
instance) does not inherit the leader's fence, so it finishes whoever leads by then."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Coroutine
from typing import Any


class Launches:
    """The launch tasks under way, by deployment id."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, dep_id: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(
            coro, name=f"launch {dep_id}", context=contextvars.Context()
        )
        self._tasks[dep_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(dep_id, None))

    def running(self, dep_id: str) -> bool:
        return dep_id in self._tasks

    async def cancel(self, dep_id: str) -> None:
        task = self._tasks.get(dep_id)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def cancel_all(self) -> None:
        for dep_id in list(self._tasks):
            await self.cancel(dep_id)
