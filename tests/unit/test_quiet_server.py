"""The quiet uvicorn server: while idle it wakes once a second (uvicorn's own loop, ten times),
still refreshing its Date header on each wake-up, and it stops at once when asked to exit."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import uvicorn
from harness import free_port, wait_for
from starlette.types import Receive, Scope, Send

from common.serving.quiet_server import DATE_TICKS, QuietServer


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


class CountingServer(QuietServer):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ticks: list[int] = []

    async def on_tick(self, counter: int) -> bool:
        self.ticks.append(counter)
        return await super().on_tick(counter)


def test_an_idle_server_wakes_once_a_second_and_stops_at_once() -> None:
    port = free_port()
    config = uvicorn.Config(hello, host="127.0.0.1", port=port, log_level="warning")
    server = CountingServer(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="the server to start")
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hi"
    server.ticks.clear()
    time.sleep(1.5)
    idle = len(server.ticks)
    assert 1 <= idle <= 3, f"{idle} wake-ups in 1.5 s (uvicorn's own loop: 15)"
    assert all(counter % DATE_TICKS == 0 for counter in server.ticks)  # each refreshes the Date
    asked = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - asked < 0.5, "the exit waited for the next tick"
