"""Edge limits of the suite's HTTP services: bounded request heads, read deadlines, header counts.

uvicorn's fast HTTP parser (httptools, llhttp underneath) has no bound on a request head one can
configure, and uvicorn has no deadline for reading a head: a client may send a 50 MB header line,
20,000 header fields, or hold a half-sent request open for minutes. A small subclass of uvicorn's
own httptools protocol adds the bounds:

* the parser's callbacks count what it reports: the fields of a head (``on_header``) and the
  bytes of its request line and fields (``on_url``, ``on_header``);
* httptools keeps a header field to itself until the next one begins (a single 1 MB value is
  reported only once it is whole), so the bytes of a head are also counted as they arrive, before
  they are fed to the parser: what the parser holds back is bounded too;
* a head over either bound is answered 431 (the rest of it is read and dropped for a moment, so
  that the client reads the answer), a head not complete in time 408, and a request body that
  stalls is cut.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import ClassVar, NoReturn

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from common.settings import HttpSettings

LINGER_SECONDS = 1.0
"""After a refusal, how long the rest of the client's head is read and dropped before closing (a
close with unread data would reset the connection before the client reads the answer)."""

HEAD_END = b"\r\n\r\n"


def _raw_response(status: int, reason: str, type_: str, message: str) -> bytes:
    body = json.dumps({"type": type_, "error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head over the limits (httptools wraps it
    in ``HttpParserCallbackError``)."""


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request head (431), a deadline on it
    (408) and an idle deadline within a request body. Subclassed per server with its
    ``limits``."""

    limits: ClassVar[HttpSettings] = HttpSettings()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True  # waiting for (or reading) a request line and headers
        self._begun = False  # the parser has seen the first byte of the current request
        self._arrived = 0  # bytes of the current head that arrived so far
        self._tail = b""  # the last bytes of the head so far (its end may straddle two reads)
        self._fields = 0
        self._reported = 0  # bytes of the head the parser reported in callbacks
        self._refusal: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_seconds, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # lingering after a refusal: the rest of the head is dropped
        if self._in_head and not self._count_arrived(data):
            self._refusal = self._too_large()
            self._answer_431()
            return
        super().data_received(data)  # a refusal in a callback comes back as send_400_response
        if self._refusal is not None or self.transport.is_closing():
            return
        if not self._in_head:
            if self.transport.get_protocol() is not self:  # upgraded: no longer HTTP/1.1 here
                self._disarm()
                return
            self._arm(self.limits.idle_timeout_seconds, self._body_stalled)  # it must not stall
        elif not self._begun:
            self._disarm()  # between requests: uvicorn's keep-alive deadline runs
        elif self._timer is None:  # a head begun on a kept-alive connection
            self._arm(self.limits.header_timeout_seconds, self._head_too_slow)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            self._disarm()
            super().send_400_response(msg)
        else:
            self._answer_431()

    def _count_arrived(self, data: bytes) -> bool:
        """Add the head's share of ``data``; False when the head is now over the limit."""
        window = self._tail + data
        end = window.find(HEAD_END)
        self._arrived += len(data) if end < 0 else end + len(HEAD_END) - len(self._tail)
        self._tail = window[-3:]
        return self._arrived <= self.limits.max_header_bytes

    def _too_large(self) -> str:
        return f"request line and headers larger than {self.limits.max_header_bytes} bytes"

    def _over(self, message: str) -> NoReturn:
        """Stop the parser: the head is over a limit (answered in :meth:`send_400_response`)."""
        self._refusal = message
        raise _HeadRefused(message)

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._fields = self._reported = 0

    def on_url(self, url: bytes) -> None:
        self._reported += len(url)
        if self._reported > self.limits.max_header_bytes:
            self._over(self._too_large())
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._reported += len(name) + len(value) + 4  # ": " and CRLF
        if self._fields > self.limits.max_header_count:
            self._over(f"more than {self.limits.max_header_count} header fields")
        if self._reported > self.limits.max_header_bytes:
            self._over(self._too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arrived, self._tail = 0, b""
        super().on_headers_complete()
        if self.cycle is not None and not isinstance(self.cycle.transport, _OneWrite):
            self.cycle.transport = _OneWrite(self.transport, self.cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._in_head, self._begun = True, False
        super().on_message_complete()

    # deadlines and refusals
    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _answer_431(self) -> None:
        self._disarm()
        message = self._refusal or ""
        self.transport.write(
            _raw_response(431, "Request Header Fields Too Large", "headersTooLarge", message)
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _head_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self._begun or self._arrived:  # a request was begun: say why it is cut
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
        if not self.transport.is_closing() and not self._in_head:
            self.transport.close()  # the app sees a disconnect


class _OneWrite:
    """The transport as one response cycle sees it: the head of a response whose length is known
    is held until the body's first bytes, and both go in one write (one system call, one packet)
    instead of two. Whatever else the cycle does (closing) first writes what is held."""

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held = b""
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif not self._head_seen and self._cycle.response_started:
            self._head_seen = True
            cycle = self._cycle
            if (
                cycle.chunked_encoding is False
                and cycle.expected_content_length > 0
                and cycle.scope["method"] != "HEAD"
            ):
                self._held = data  # a body of known length follows: written with it
                return
        self._transport.write(data)

    def close(self) -> None:
        if self._held:
            self._transport.write(self._held)
            self._held = b""
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def edge_protocol(limits: HttpSettings) -> type[EdgeHttpToolsProtocol]:
    """:class:`EdgeHttpToolsProtocol` bound to ``limits`` (uvicorn takes a protocol class)."""
    return type("EdgeHttpToolsProtocol", (EdgeHttpToolsProtocol,), {"limits": limits})
