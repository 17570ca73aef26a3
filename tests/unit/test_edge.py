"""The edge protocol in a real uvicorn server (httptools underneath) with a tiny app: what a client
sees of ordinary, pipelined, oversized, slow and malformed requests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from harness import free_port, wait_for
from starlette.types import Receive, Scope, Send

from common.serving.edge import edge_protocol
from common.settings import HttpSettings

LIMITS = HttpSettings(
    max_header_bytes=4096, max_header_count=20, header_timeout_seconds=0.5, idle_timeout_seconds=0.5
)


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers the request's path, its number of headers and the length of its body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = f"{scope['path']} {len(scope['headers'])} {len(body)}".encode()
    length = str(len(text)).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]}
    )
    await send({"type": "http.response.body", "body": text})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    chosen = free_port()
    config = uvicorn.Config(
        echo,
        host="127.0.0.1",
        port=chosen,
        http=edge_protocol(LIMITS),
        log_level="critical",
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="the test server")
    yield chosen
    server.should_exit = True
    thread.join(10)


def _talk(port: int, *pieces: bytes, pause: float = 0.0, wait: float = 5.0) -> bytes:
    """Send ``pieces`` (``pause`` seconds apart), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)  # a slow client, on purpose
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def test_kept_alive_and_pipelined_requests_are_all_answered(port: int) -> None:
    first = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    last = b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = _talk(port, first + post + last)
    assert answer.count(b"HTTP/1.1 200 ") == 3
    assert answer.endswith(b"/three 2 0")
    assert b"/two 2 5" in answer


def test_a_head_and_body_in_small_pieces_get_through(port: int) -> None:
    request = (
        b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd"
    )
    pieces = [request[i : i + 7] for i in range(0, len(request), 7)]
    answer = _talk(port, *pieces, pause=0.01)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"/slow 3 4")


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"],
        # one header value arriving in pieces: the parser reports it only once it is whole
        [b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * 500] * 12 + [b"\r\n\r\n"],
        [b"GET /" + b"u" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(21)) + b"\r\n"],
    ],
    ids=["one big header", "a big header in pieces", "a long URL", "too many headers"],
)
def test_heads_over_the_limits_get_a_readable_431(port: int, pieces: list[bytes]) -> None:
    answer = _talk(port, *pieces, pause=0.01)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b'"type": "headersTooLarge"' in answer


def test_a_head_within_the_limits_is_answered(port: int) -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(20))
    answer = _talk(port, head + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")  # 21 fields: Connection is one too
    answer = _talk(port, head[:-8] + b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"/ 20 0")


def test_a_half_sent_head_gets_408_and_silence_is_closed(port: int) -> None:
    started = time.monotonic()
    assert _talk(port, b"GET / HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408 ")
    assert _talk(port) == b""
    assert time.monotonic() - started < 3.0


def test_a_second_head_on_a_kept_alive_connection_has_its_deadline_too(port: int) -> None:
    answer = _talk(port, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 408 " in answer


def test_a_stalled_body_is_cut(port: int) -> None:
    started = time.monotonic()
    answer = _talk(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    assert b" 200 " not in answer.split(b"\r\n", 1)[0]
    assert time.monotonic() - started < 3.0


def test_a_malformed_request_gets_400(port: int) -> None:
    assert _talk(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_heads_held_for_their_body_still_reach_head_requests_and_empty_bodies(port: int) -> None:
    head = b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    answer = _talk(port, head + post)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert answer.endswith(b"/e 3 0")
