"""uvicorn's server, waking when there is something to do rather than ten times a second.

uvicorn's main loop sleeps 0.1 s at a time to refresh its ``Date`` header (once a second) and to
see whether a signal asked it to stop: on an idle service those wake-ups cost about a millisecond
of CPU per second (a bare app measured on two cores). This one wakes once a second for the header
and at once when SIGTERM or SIGINT comes; everything else is uvicorn's own.

It overrides ``uvicorn.Server.main_loop`` and extends ``handle_exit``, uvicorn internals: the
versions of uvicorn it was checked against are the upper bounds in ``pyproject.toml``.
``tests/unit/test_quiet_server.py`` holds what it exists for (a tick a second, and a prompt stop).

Exit condition: delete it when uvicorn's own main loop stops waking every 0.1 s (when it waits on
its exit event between the once-a-second header refreshes).

Once serving, it also moves everything made while starting (modules, the app, the clients) out
of the garbage collector's scans (``gc.freeze``): a full collection of the deploy server took
23-32 ms of its one thread, every 3 s under launches, and landed in bursts of launches; 1.6-2.2
ms after (measured with ``gc.callbacks`` during bursts of 10). Objects are still freed by their
reference counts; only cycles among them are never collected, and none is made to be dropped.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
from types import FrameType

import anyio
import uvicorn

DATE_TICKS = 10
"""uvicorn refreshes its ``Date`` header on the ticks that are a multiple of this."""
STARTUP_FAILURE = 3
"""uvicorn's exit status when the server could not start."""


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = asyncio.Event()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        gc.freeze()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + DATE_TICKS) % 864_000
            with anyio.move_on_after(1.0):
                await self._signalled.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None:  # a signal handler: wake the loop the thread-safe way
            self._loop.call_soon_threadsafe(self._signalled.set)


def run(config: uvicorn.Config, sockets: list[socket.socket] | None = None) -> None:
    """Serve ``config``'s app until a signal, as ``uvicorn.run`` does (one process, no reload),
    on ``sockets`` when given."""
    config.load_app()
    server = QuietServer(config)
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)
