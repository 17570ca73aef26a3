"""Readiness: no connect attempt is spent while an app cannot be listening yet, and a template's
first launch is looked at from the start."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from services.deploy_kubernetes.backends import readiness
from services.deploy_kubernetes.backends.readiness import (
    DENSE_WINDOW,
    FIRST_LOOK_FRACTION,
    OutputWatch,
    StartTimes,
    wait_http,
    wait_listening,
)
from services.deploy_kubernetes.errors import LaunchError


@pytest.fixture
def knocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ports of the connect attempts readiness makes, as it makes them."""
    made: list[int] = []
    knock = readiness.accepts

    async def counted(host: str, port: int, *, seconds: float) -> bool:
        made.append(port)
        return await knock(host, port, seconds=seconds)

    monkeypatch.setattr(readiness, "accepts", counted)
    return made


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


def test_the_window_of_a_template_spans_its_recent_starts() -> None:
    starts = StartTimes()
    assert starts.window("jupyter") is None  # nothing seen: the sparse schedule alone
    for seconds in (1.0, 1.2):
        starts.add("jupyter", seconds)
    assert starts.window("jupyter") == (DENSE_WINDOW[0] * 1.0, DENSE_WINDOW[1] * 1.2)


def test_an_app_listening_when_its_template_did_is_looked_at_closely_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within the template's window attempts come every couple of milliseconds (the app is seen
    within a few of listening); before it, they stay as sparse as without one."""
    times: list[float] = []
    knock = readiness.accepts

    async def timed(host: str, port: int, *, seconds: float) -> bool:
        times.append(time.monotonic())
        return await knock(host, port, seconds=seconds)

    monkeypatch.setattr(readiness, "accepts", timed)

    async def main(window: tuple[float, float] | None) -> tuple[int, int]:
        times.clear()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            loop = asyncio.get_running_loop()
            began = time.monotonic()
            loop.call_later(0.4, listener.listen)
            await wait_listening(
                "127.0.0.1", port, deadline=loop.time() + 10, alive=_never_gone, window=window
            )
        before = sum(1 for t in times if t - began < 0.3)
        within = sum(1 for t in times if t - began >= 0.3)
        return before, within

    sparse_before, sparse_within = asyncio.run(main(None))
    before, within = asyncio.run(main((0.3, 0.5)))
    assert before <= sparse_before * 1.2 + 2  # the same schedule (a loaded loop's lag aside)
    assert sparse_within <= 6  # 10% of the time taken: one look per 30-40 ms
    assert within >= max(15, 3 * sparse_within)  # every 2 ms over 0.1 s, or a slow loop's best


def test_output_wakes_a_pause_before_its_end(tmp_path: Path) -> None:
    output = tmp_path / "app.log"
    output.write_bytes(b"")

    async def main() -> None:
        watch = OutputWatch()
        told = asyncio.create_task(watch.run())
        with watch.hints(output) as hints:
            assert hints is not None
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, lambda: output.write_text("serving on :8888\n"))
            with anyio.fail_after(10):  # the pause alone would last 60 s
                await hints.pause(soonest=0.0, latest=60.0)
        told.cancel()
        watch.close()

    asyncio.run(main())


def test_a_slow_app_that_prints_when_it_listens_costs_few_connect_attempts(
    tmp_path: Path, knocks: list[int]
) -> None:
    """Attempts follow the logarithm of the start time, and the app's line wakes the last one:
    a one-second start costs a couple of dozen attempts (the fixed 10% schedule took 50)."""
    output = tmp_path / "app.log"
    output.write_bytes(b"")

    async def main() -> None:
        watch = OutputWatch()
        told = asyncio.create_task(watch.run())
        with socket.socket() as listener, watch.hints(output) as hints:
            assert hints is not None
            listener.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]

            def listen() -> None:
                listener.listen()
                output.write_text("serving\n")

            loop = asyncio.get_running_loop()
            loop.call_later(1.0, listen)

            async def alive() -> str | None:
                return None

            await wait_listening(
                "127.0.0.1", port, deadline=loop.time() + 10, alive=alive, hints=hints
            )
        told.cancel()
        watch.close()

    asyncio.run(main())
    assert 1 <= len(knocks) <= 30


def test_an_app_that_writes_all_the_while_wakes_the_server_once_per_look(
    tmp_path: Path, knocks: list[int]
) -> None:
    """The output watch is one-shot, armed again at each look: an app writing all the while it
    starts (here from a thread of its own, as fast as it can) costs a wake-up per look at most,
    not one per write."""
    output = tmp_path / "app.log"
    output.write_bytes(b"")
    writes = 0
    done = threading.Event()

    def chatty() -> None:
        nonlocal writes
        with output.open("ab") as out:
            while not done.is_set():
                out.write(b"progress\n")
                out.flush()
                writes += 1
                time.sleep(0.0002)

    async def main() -> int:
        watch = OutputWatch()
        told = asyncio.create_task(watch.run())
        writer = threading.Thread(target=chatty)
        with socket.socket() as never, watch.hints(output) as hints:
            never.bind(("127.0.0.1", 0))  # bound, never listening: refused
            port = never.getsockname()[1]
            loop = asyncio.get_running_loop()

            async def alive() -> str | None:
                return None

            writer.start()
            try:
                with pytest.raises(LaunchError):
                    await wait_listening(
                        "127.0.0.1", port, deadline=loop.time() + 1.0, alive=alive, hints=hints
                    )
            finally:
                done.set()
                writer.join()
        told.cancel()
        watch.close()
        return watch.told

    told = asyncio.run(main())
    assert writes >= 3 * len(knocks)  # an app far chattier than the looks
    assert told <= len(knocks) + 1


async def _never_gone() -> str | None:
    return None


def _answering(status: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """An app's connection handler that answers every request with ``status``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # the connect attempts close without a request
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            await writer.wait_closed()

    return answer


def test_a_template_whose_apps_tell_when_they_listen_is_looked_at_on_their_word(
    tmp_path: Path, knocks: list[int]
) -> None:
    """Apps that write nothing until they listen, then a line, are seen at that line: their
    template loses its close window (whose attempts are spent for nothing), while a template
    whose apps write as they start keeps it. Both are seen, each launch answering."""
    starts = StartTimes()

    async def launch(template: str, *, early_line: bool) -> int:
        output = tmp_path / f"{template}.log"
        output.write_bytes(b"")
        knocks.clear()
        watch = OutputWatch()
        told = asyncio.create_task(watch.run())
        with socket.socket() as listener, watch.hints(output) as hints:
            listener.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            loop = asyncio.get_running_loop()
            began = loop.time()

            async def app() -> asyncio.Server:
                if early_line:  # a chatty start
                    await asyncio.sleep(0.05)
                    output.write_text("loading\n")
                await asyncio.sleep(max(0.0, began + 0.5 - loop.time()))
                server = await asyncio.start_server(_answering(b"200 OK"), sock=listener)
                with output.open("a") as out:
                    out.write("serving\n")
                return server

            serving = asyncio.create_task(app())
            await wait_http(
                f"http://127.0.0.1:{port}/",
                deadline=loop.time() + 10,
                alive=_never_gone,
                starts=starts,
                template=template,
                hints=hints,
            )
            (await serving).close()
        told.cancel()
        watch.close()
        return len(knocks)

    async def main() -> tuple[list[int], list[int]]:
        quiet = [await launch("quiet", early_line=False) for _ in range(4)]
        chatty = [await launch("chatty", early_line=True) for _ in range(4)]
        return quiet, chatty

    quiet, chatty = asyncio.run(main())
    assert starts.tells("quiet")
    assert starts.window("quiet") is None
    assert not starts.tells("chatty")
    assert starts.window("chatty") is not None
    # from the second launch on, each template has a start time to go by; the quiet one's
    # attempts stay sparse, the chatty one's come every couple of milliseconds near 0.5 s
    assert max(quiet[1:]) <= 12
    assert min(chatty[1:]) >= 2 * max(quiet[1:])


def test_an_app_that_never_listens_times_out_naming_its_port() -> None:
    async def main() -> None:
        with socket.socket() as never:
            never.bind(("127.0.0.1", 0))  # bound, never listening: refused
            port = never.getsockname()[1]
            deadline = time.monotonic() + 0.3
            with pytest.raises(LaunchError) as raised:
                await wait_listening("127.0.0.1", port, deadline=deadline, alive=_never_gone)
            assert raised.value.message == f"timed out waiting for the app to listen on port {port}"

    asyncio.run(main())


def test_an_app_that_answers_only_errors_times_out_naming_its_last_answer() -> None:
    """It listens, so it is probed over HTTP until the deadline; the reason names what it said."""

    async def main() -> None:
        server = await asyncio.start_server(_answering(b"503 Service Unavailable"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(LaunchError) as raised:
                await wait_http(
                    f"http://127.0.0.1:{port}/user/x/",
                    deadline=time.monotonic() + 0.3,
                    alive=_never_gone,
                )
        assert raised.value.message == (
            "timed out waiting for the app to be ready: it answered 503 at /user/x/: "
            "it must answer 2xx, 3xx or 401 there"
        )

    asyncio.run(main())


def test_a_connect_attempt_to_an_address_that_does_not_answer_gives_up_in_time() -> None:
    """A pod network this host cannot reach drops the attempt's SYN, as a listener whose queue
    is full does here: the attempt gives up after its time instead of TCP's minutes."""

    async def main() -> tuple[bool, float]:
        with socket.socket() as full, socket.socket() as queued:
            full.bind(("127.0.0.1", 0))
            full.listen(0)  # one connection waits to be accepted; further SYNs are dropped
            queued.connect(full.getsockname())
            started = time.monotonic()
            async with asyncio.timeout(5):
                answered = await readiness.accepts("127.0.0.1", full.getsockname()[1], seconds=0.2)
            return answered, time.monotonic() - started

    answered, took = asyncio.run(main())
    assert not answered
    assert took < 1.0
