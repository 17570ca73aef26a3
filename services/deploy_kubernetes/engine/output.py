"""The apps' own output, as their backend keeps it: its last lines end every failure reason, and a
launch page shows it live while the app starts (:func:`follow`).

The output is the app's, and shown as such: to whoever holds the deployment's id (the launch page,
the status answer), and in the suite's log through failure reasons. The launch's token is cut out
of every line first, so an app that prints it does not leak it there.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
from loguru import logger

from services.deploy_kubernetes.backends.base import Backend
from services.deploy_kubernetes.engine.records import Update
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Deployment, Status

REASON_LINES = 5
"""Lines of output at the end of a failure reason."""
PANEL_LINES = 40
"""Lines of output a launch page shows."""
READ_SECONDS = 2.0
"""A backend that takes longer to tell an app's output is not waited for."""


@dataclass(frozen=True)
class Output:
    """An app's last lines of output, for the watchers of its launch."""

    id: str
    lines: tuple[str, ...]


def scrub(lines: list[str], token: str | None) -> list[str]:
    """``lines`` with the launch's ``token`` cut out."""
    if not token:
        return lines
    return [line.replace(token, "[token]") for line in lines]


class AppOutput:
    def __init__(self, *, backend: Backend) -> None:
        self._backend = backend

    async def last(self, dep: Deployment, lines: int) -> list[str]:
        """``dep``'s app's last ``lines`` lines of output; none when its backend cannot tell
        (gone, unreachable, too slow)."""
        with anyio.move_on_after(READ_SECONDS):
            try:
                found = await self._backend.output(dep.id, lines=lines)
            except BinderError as exc:
                logger.bind(id=dep.id).debug("no output of the app: {}", exc.message)
                return []
            return scrub(found, dep.token)
        return []

    async def reason(self, dep: Deployment, reason: str) -> str:
        """``reason`` followed by the app's last lines of output, where it printed any."""
        lines = await self.last(dep, REASON_LINES)
        return f"{reason}; last output lines: {' | '.join(lines)}" if lines else reason

    async def follow(
        self,
        dep: Deployment,
        updates: AsyncGenerator[Update | None, None],
        *,
        every: float,
        keepalive: float,
    ) -> AsyncGenerator[Update | Output | None, None]:
        """``updates`` (a watch of ``dep``, answering None after each ``every`` seconds without
        news) with an :class:`Output` whenever the app's output has changed while it deploys,
        and None (a keep-alive) after each ``keepalive`` seconds without anything to tell."""
        told: tuple[str, ...] = ()
        quiet = 0.0
        deploying = dep.status is Status.DEPLOYING
        async for update in updates:
            final_look = False
            if isinstance(update, Deployment):
                final_look = deploying and update.status.final  # it may be gone by now
                deploying = update.status is Status.DEPLOYING
            if update is not None and not final_look:
                quiet = 0.0
                yield update
            if deploying or final_look:
                lines = tuple(await self.last(dep, PANEL_LINES))
                if lines and lines != told:
                    told = lines
                    quiet = 0.0
                    yield Output(dep.id, lines)
            if final_look:
                yield update
            elif update is None:
                quiet += every
                if quiet >= keepalive:
                    quiet = 0.0
                    yield None
