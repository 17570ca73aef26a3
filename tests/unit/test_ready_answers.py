"""Readiness judges the app's answer, not only that there is one: a 404 (the app does not serve
its base URL) or a 403 (it refuses the host name) keeps a launch waiting, and the reason it fails
with names that answer; the app's own activity is read where its template says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from services.deploy_kubernetes.backends.readiness import not_ready, ready_answer, wait_http
from services.deploy_kubernetes.engine.activity import AppActivity
from services.deploy_kubernetes.errors import LaunchError
from services.deploy_kubernetes.models import Deployment, Status, Template, now

Handler = Callable[[str, dict[str, str]], tuple[int, object]]


@asynccontextmanager
async def app(handler: Handler) -> AsyncIterator[tuple[int, list[tuple[str, dict[str, str]]]]]:
    """A tiny HTTP server on a free port: ``handler(path, headers)`` gives each answer."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        except asyncio.IncompleteReadError:  # a connect attempt: nothing asked
            pass
        finally:
            writer.close()
            await writer.wait_closed()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        line, *fields = head.split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
        path = line.split()[1]
        seen.append((path, headers))
        status, body = handler(path, headers)
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def _alive() -> str | None:
    return None


@pytest.mark.parametrize(
    ("status", "ready"),
    [(200, True), (302, True), (401, True), (404, False), (403, False), (500, False)],
)
def test_2xx_3xx_and_401_are_ready(status: int, ready: bool) -> None:
    assert ready_answer(status) is ready


def test_an_app_answering_404_keeps_its_launch_waiting_and_the_reason_names_it() -> None:
    async def main() -> str:
        async with app(lambda path, _: (404, "not found")) as (port, seen):
            with pytest.raises(LaunchError) as failed:
                await wait_http(
                    f"http://127.0.0.1:{port}/user/abc/",
                    deadline=asyncio.get_running_loop().time() + 0.5,
                    alive=_alive,
                )
            assert len(seen) > 1  # it kept probing until the deadline
            return failed.value.message

    reason = asyncio.run(main())
    assert reason == (
        "timed out waiting for the app to be ready: "
        "it answered 404 at /user/abc/: does the app serve {base_url}?"
    )
    assert "answered 403 at /user/abc/api: does the app refuse" in not_ready(403, "/user/abc/api")
    assert not_ready(None, "/x") == "timed out waiting for the app to answer"


def test_an_app_answering_401_at_its_ready_path_is_ready() -> None:
    async def main() -> None:
        async with app(lambda path, _: (401 if path == "/user/abc/api" else 404, {})) as (port, _):
            with anyio.fail_after(5):
                await wait_http(
                    f"http://127.0.0.1:{port}/user/abc/api",
                    deadline=asyncio.get_running_loop().time() + 5,
                    alive=_alive,
                )

    asyncio.run(main())


def _deployment(port: int, token: str | None = "tok") -> Deployment:
    return Deployment(
        id="0" * 32,
        template="nb",
        status=Status.DEPLOYED,
        created=now(),
        cull_timeout_ms=60_000,
        target=f"http://127.0.0.1:{port}",
        token=token,
    )


def test_the_apps_own_activity_counts_and_a_busy_kernel_is_activity_now() -> None:
    earlier = datetime(2026, 1, 1, 12, tzinfo=UTC)
    kernels: list[dict[str, str]] = [{"id": "k", "execution_state": "idle"}]

    def jupyter(path: str, headers: dict[str, str]) -> tuple[int, object]:
        if headers.get("authorization") != "token tok":
            return 403, {}
        if path == f"/user/{'0' * 32}/api/status":
            return 200, {"last_activity": earlier.isoformat().replace("+00:00", "Z")}
        if path == f"/user/{'0' * 32}/api/kernels?no_track_activity=1":
            return 200, kernels
        return 404, {}

    template = Template(name="nb", command=("x",), activity_path="api/status")

    async def main() -> tuple[datetime | None, datetime | None, datetime | None]:
        reader = AppActivity()
        async with app(jupyter) as (port, _):
            idle = await reader.last_activity(_deployment(port), template)
            kernels[0]["execution_state"] = "busy"
            busy = await reader.last_activity(_deployment(port), template)
            untold = await reader.last_activity(
                _deployment(port), Template(name="nb", command=("x",))
            )
        return idle, busy, untold

    idle, busy, untold = asyncio.run(main())
    assert idle == earlier
    assert busy is not None
    assert busy > now() - timedelta(seconds=5)
    assert untold is None
