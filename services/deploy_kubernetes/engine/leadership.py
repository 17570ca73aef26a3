"""Loops that must run once, on whichever server holds their lease.

A :class:`Leadership` asks for its lease (:class:`~..store.base.Leases`) every quarter of the
lease's length. While it holds the lease it runs its loops, each under a supervisor of its own
term, in a context whose :data:`~..store.base.FENCE` names the lease and its epoch: every write
they make lands only while the lease is still this server's and unexpired by its clock. When the
lease is lost (another server took it: a new epoch), or cannot be renewed before it runs out (the
database is away), the loops are cancelled. A server that stalls (SIGSTOP) keeps its loops, but
when it wakes its lease has passed and its writes are refused; its next renewal ends them.

Two leases are used: the deployment server's ``leader`` (culling, pools, reconcile, adopting
launches of servers that died, history retention) and each host's ``routes:<host>`` (the
proxy of that host carries every route).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from loguru import logger

from common.background import LoopSupervisor
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.store.base import FENCE, Fence, Leases

STOP_SECONDS = 5.0
"""How long the loops of a term that ended are awaited."""


class Leadership:
    def __init__(
        self,
        *,
        leases: Leases,
        name: str,
        holder: str,
        seconds: float,
        loops: dict[str, Callable[[], Awaitable[Any]]],
        on_crash: Callable[[str], None] | None = None,
    ) -> None:
        self._leases = leases
        self.name = name
        self._holder = holder
        self.seconds = seconds
        self._loops = loops
        self._on_crash = on_crash
        self.fence: Fence | None = None
        self._term: LoopSupervisor | None = None
        self._valid_until = 0.0
        self.terms = 0
        """Terms this server has begun (how often it became the holder)."""

    @property
    def holding(self) -> bool:
        return self.fence is not None

    async def run(self) -> None:
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.seconds / 4)
        finally:
            await self._end_term()
            if self.fence is not None:
                fence, self.fence = self.fence, None
                try:
                    await self._leases.release(fence)  # the next holder need not wait it out
                except BinderError as exc:
                    logger.warning("lease {} not released: {}", self.name, exc.message)

    async def step(self) -> None:
        """Ask for the lease once; begin or end a term as the answer says."""
        asked = time.monotonic()
        try:
            fence = await self._leases.hold(self.name, self._holder, seconds=self.seconds)
        except BinderError as exc:
            if self.fence is not None and time.monotonic() > self._valid_until:
                logger.warning("lease {} lapsed: {}", self.name, exc.message)
                self.fence = None
                await self._end_term()
            return
        if fence is not None:
            self._valid_until = asked + self.seconds
        if fence == self.fence:
            return
        self.fence = fence
        await self._end_term()
        if fence is not None:
            self._begin_term(fence)

    def _begin_term(self, fence: Fence) -> None:
        self.terms += 1
        logger.info("holding lease {} (epoch {})", self.name, fence.epoch)
        term = LoopSupervisor(on_crash=self._on_crash)
        context = contextvars.copy_context()
        context.run(FENCE.set, fence)
        for name, loop in self._loops.items():
            context.run(term.run, name, loop, critical=False)
        self._term = term

    async def _end_term(self) -> None:
        if self._term is not None:
            term, self._term = self._term, None
            logger.info("lease {} no longer held here", self.name)
            try:
                with anyio.fail_after(STOP_SECONDS):
                    await term.cancel_all()
            except TimeoutError:  # its writes are fenced: they fail, whatever it does
                running = [name for name, state in term.loops.items() if state.running]
                logger.error("loops of lease {} still running: {}", self.name, running)
