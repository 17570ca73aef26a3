"""The launch path's HTTP client against real sockets: the answers servers really give (a length,
chunks, the end of the connection), and every way a request fails becomes ``RequestError``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from common.errors import BadProxyError
from common.local_http import MAX_BODY, Answer, RequestError, request
from common.proxy import ProxyClient

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answering(raw: bytes, *, seen: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            length = next(
                (
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length")
                ),
                0,
            )
            seen.append(head + await reader.readexactly(length))
        writer.write(raw)
        await writer.drain()

    return handle


def served(handler: Handler, call: Callable[[str], Awaitable[T]]) -> T:
    async def main() -> T:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await call(f"http://127.0.0.1:{port}")

    return asyncio.run(main())


def test_reads_status_and_body_with_a_length_and_sends_json() -> None:
    seen: list[bytes] = []
    raw = b'HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{"a": true}'
    answer = served(
        answering(raw, seen=seen),
        lambda url: request(
            url + "/api/routes/user/x?q=1", method="POST", json={"t": 1}, seconds=2
        ),
    )
    assert answer.status == 201
    assert answer.json() == {"a": True}
    assert seen[0].startswith(b"POST /api/routes/user/x?q=1 HTTP/1.1\r\n")
    assert b"Content-Type: application/json" in seen[0]
    assert seen[0].endswith(b'{"t": 1}')


def test_reads_a_chunked_body_and_one_ended_by_the_close() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    answer = served(answering(chunked), lambda url: request(url, seconds=2))
    assert (answer.status, answer.body) == (200, b"abcde")
    closed = b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy"
    answer = served(answering(closed), lambda url: request(url, seconds=2))
    assert (answer.status, answer.body) == (503, b"busy")


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # closed without a word
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 10) + b"x" * (MAX_BODY + 10),
    ],
    ids=["closed", "garbage", "too-large"],
)
def test_a_bad_answer_is_a_request_error(raw: bytes) -> None:
    with pytest.raises(RequestError):
        served(answering(raw), lambda url: request(url, seconds=2))


def test_a_refused_or_silent_server_is_a_request_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(5)
        finally:
            writer.close()

    with pytest.raises(RequestError, match="TimeoutError"):
        served(silent, lambda url: request(url, seconds=0.2))

    async def refused() -> None:
        server = await asyncio.start_server(answering(b""), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        await request(f"http://127.0.0.1:{port}/", seconds=2)

    with pytest.raises(RequestError):
        asyncio.run(refused())


def test_only_plain_http() -> None:
    with pytest.raises(ValueError, match="plain http"):
        asyncio.run(request("https://127.0.0.1/", seconds=1))


def test_the_proxy_client_takes_a_404_as_a_missing_route_only() -> None:
    """A 404 is a route that is not there when one route is read or removed; on the route table
    (the health look) it is an API that is not the proxy's, and an error."""
    missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    async def calls(url: str) -> tuple[str | None, list[str]]:
        proxy = ProxyClient(api_url=url, token="t")
        errors = []
        for look in (proxy.ping, proxy.routes):
            try:
                await look()
            except BadProxyError as exc:
                errors.append(exc.message)
        await proxy.remove_route("/user/x")
        return await proxy.route("/user/x"), errors

    route, errors = served(answering(missing), calls)
    assert route is None
    assert errors == [
        "proxy API answered 404 to GET /api/routes",
        "proxy API answered 404 to GET /api/routes",
    ]


def test_a_stream_is_read_only_until_what_was_awaited_came() -> None:
    """An events stream that stays open: the request ends once ``until`` is satisfied."""

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for event in (b"data: deploying\n\n", b"data: deployed\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.05)
            await reader.read()  # never ends on its own: only when the client hangs up
        finally:
            writer.close()

    async def call(url: str) -> Answer:
        return await request(url, seconds=10, until=lambda body: b"deployed" in body)

    answer = served(stream, call)
    assert answer.status == 200
    assert answer.body.endswith(b"data: deployed\n\n")
