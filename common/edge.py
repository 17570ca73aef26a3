"""Edge limits of the suite's HTTP services: bounded request heads, read deadlines, header counts.

uvicorn's default HTTP parser (httptools, when installed) buffers a request head without a bound
one can configure, and uvicorn has no deadline for reading a head: a client may send a 50 MB
header line or hold a half-sent request open for minutes. h11 bounds its buffer
(``h11_max_incomplete_event_size``) and exposes the parser's state (``their_state``), so a small
subclass of uvicorn's own h11 protocol can answer 431 for a head that is too large and close a
connection whose head is too slow or whose body stalls. The count of header fields is checked by
a plain ASGI middleware, once h11 has parsed the (size-bounded) head.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.settings import HttpSettings

LINGER_SECONDS = 1.0
"""After a refusal, how long the rest of the client's head is read and dropped before closing (a
close with unread data would reset the connection before the client reads the answer)."""


def _raw_response(status: int, reason: str, type_: str, message: str) -> bytes:
    body = json.dumps({"type": type_, "error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class EdgeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a size bound (431) and a deadline on each request head, and
    an idle deadline within a request body. Subclassed per server with its ``limits``."""

    limits: ClassVar[HttpSettings] = HttpSettings()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head so far (its end may straddle two reads)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_seconds, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: the rest of the head is dropped
        if self.conn.their_state is h11.IDLE:  # bytes of a request head (and maybe its body)
            if self._timer is None:
                self._arm(self.limits.header_timeout_seconds, self._head_too_slow)
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4 - len(self._tail)
            self._tail = window[-3:]
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()
                return
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            return  # the head is not complete yet: its deadline keeps running
        self._head_bytes, self._tail = 0, b""
        if state is h11.SEND_BODY:
            self._arm(self.limits.idle_timeout_seconds, self._body_stalled)
        else:
            self._disarm()

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse_head(self) -> None:
        self._refused = True
        limit = self.limits.max_header_bytes
        self.transport.write(
            _raw_response(
                431,
                "Request Header Fields Too Large",
                "headersTooLarge",
                f"request line and headers larger than {limit} bytes",
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(LINGER_SECONDS, self.transport.close)

    def _head_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes:  # a request was begun: say why it is cut
            seconds = self.limits.header_timeout_seconds
            self.transport.write(
                _raw_response(
                    408,
                    "Request Timeout",
                    "requestTimeout",
                    f"request line and headers not received within {seconds:g} s",
                )
            )
        self.transport.close()

    def _body_stalled(self) -> None:
        self._timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # the app sees a disconnect


def edge_protocol(limits: HttpSettings) -> type[EdgeH11Protocol]:
    """:class:`EdgeH11Protocol` bound to ``limits`` (uvicorn takes a protocol class)."""
    return type("EdgeH11Protocol", (EdgeH11Protocol,), {"limits": limits})


class HeaderCountLimit:
    """ASGI middleware answering 431 to a request with more than ``max_count`` header fields."""

    def __init__(self, app: ASGIApp, *, max_count: int) -> None:
        self.app = app
        self.max_count = max_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or len(scope["headers"]) <= self.max_count:
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"type": "headersTooLarge", "error": f"more than {self.max_count} header fields"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 431,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
