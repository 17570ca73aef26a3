"""Readiness: no connect attempt is spent while an app cannot be listening yet, and a template's
first launch is looked at from the start."""

from __future__ import annotations

import asyncio
import socket

from services.deploy_kubernetes.backends.base import FIRST_LOOK_FRACTION, StartTimes, wait_listening


def test_first_look_follows_the_quickest_recent_start_of_the_template() -> None:
    starts = StartTimes()
    assert starts.first_look("example") == 0.0
    for seconds in (0.30, 0.05, 0.20):
        starts.add("example", seconds)
    assert starts.first_look("example") == FIRST_LOOK_FRACTION * 0.05
    assert starts.first_look("slow") == 0.0
    for _ in range(StartTimes.KEPT):  # only recent starts count
        starts.add("example", 0.5)
    assert starts.first_look("example") == FIRST_LOOK_FRACTION * 0.5


def test_wait_listening_sees_a_listening_app_and_says_how_long_it_took() -> None:
    async def main() -> float:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]

            async def alive() -> str | None:
                return None

            loop = asyncio.get_running_loop()
            return await wait_listening(
                "127.0.0.1", port, deadline=loop.time() + 5, alive=alive, first_look=0.05
            )

    took = asyncio.run(main())
    assert took >= 0.05  # the first attempt waited its first look
