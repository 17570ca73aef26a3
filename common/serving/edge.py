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
  stalls is cut;
* where the server bounds the connections of one client (:class:`ClientConnections`), a
  connection over its client's share is answered 429 at once and closed, before uvicorn counts
  it: one client cannot hold the server's ``limit_concurrency`` connections, at which uvicorn
  answers 503 to everyone;
* a connection from ``127.0.0.1`` whose socket the kernel says is the suite user's
  (:func:`common.peers.peer_uid`) is the suite's own proxy, which carries every public user:
  it is not counted, and its requests say so (``state[SUITE_PROXY]``), so that the deploy API
  believes its ``X-Forwarded-For``. No app can make such a connection: a sandboxed one has a
  network of its own, an unsandboxed or containerised one another user or network.

It subclasses uvicorn's ``HttpToolsProtocol`` and uses its private state and httptools' parser
callbacks: the versions of uvicorn and httptools it was checked against are the upper bounds in
``pyproject.toml``. ``tests/unit/test_edge.py`` holds what it exists for, against a real server.

Exit condition: delete it when uvicorn bounds a request head itself on its httptools protocol
(its size and field count, and a deadline to read it), as a server option.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from typing import ClassVar, NoReturn

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from common.peers import peer_uid, suite_uid
from common.settings import HttpSettings

SUITE_PROXY = "suite_proxy"
"""Key of a request's ``scope["state"]``: True on a connection of the suite's own proxy."""

SUITE_PROXY_ADDRESSES = ("127.0.0.1", "::1")
"""Where the suite's proxy connects from (it reaches the deploy server at 127.0.0.1); other
loopback addresses are ordinary clients (the tests' clients use them)."""

LINGER_SECONDS = 1.0
"""After a refusal, how long the rest of the client's head is read and dropped before closing (a
close with unread data would reset the connection before the client reads the answer)."""

HEAD_END = b"\r\n\r\n"


def _raw_response(status: int, reason: str, type_: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"type": type_, "error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class ClientConnections:
    """The open connections of each client address, at most ``per_client`` each; addresses in
    ``exempt`` (trusted proxies, whose connections carry many clients) are not counted.

    A counter per address, kept by the server's protocol instances (one event loop, no lock).
    No library bounds connections per client in front of an ASGI app (rate limiters such as
    ``limits`` count events in time windows, not what is open now); this is a dictionary."""

    def __init__(self, *, per_client: int, exempt: tuple[str, ...] = ()) -> None:
        self.per_client = per_client
        self._exempt = tuple(ipaddress.ip_network(e, strict=False) for e in exempt)
        self._open: dict[str, int] = {}
        self.refused = 0

    def admit(self, address: str) -> bool:
        """Count a new connection of ``address``; False (nothing counted) when it is over."""
        held = self._open.get(address, 0)
        if held >= self.per_client:
            if self._exempted(address):
                return True
            self.refused += 1
            return False
        self._open[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self._open.get(address, 0) - 1
        if held > 0:
            self._open[address] = held
        else:
            self._open.pop(address, None)

    def from_suite_proxy(self, transport: asyncio.BaseTransport, address: str) -> bool:
        """Whether ``transport``'s connection is the suite's proxy's: from 127.0.0.1 (or ::1)
        and, the kernel says, a socket of the suite's user (about 26 µs, on loopback only)."""
        if address not in SUITE_PROXY_ADDRESSES:
            return False
        sock = transport.get_extra_info("socket")
        try:
            return sock is not None and peer_uid(sock) == suite_uid()
        except OSError:  # the client is gone already, or sock_diag unavailable
            return False

    def _exempted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._exempt)


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head over the limits (httptools wraps it
    in ``HttpParserCallbackError``)."""


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request head (431), a deadline on it
    (408) and an idle deadline within a request body. Subclassed per server with its
    ``limits``."""

    limits: ClassVar[HttpSettings] = HttpSettings()
    clients: ClassVar[ClientConnections | None] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._address: str | None = None  # counted in ``clients``
        self._turned_away = False
        self._suite_proxy = False
        if self.clients is not None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else ""
            self._suite_proxy = self.clients.from_suite_proxy(transport, address)
            if not self._suite_proxy:
                if not self.clients.admit(address):
                    self._turn_away(transport)
                    return
                self._address = address
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
        if self._turned_away:
            return  # uvicorn never knew of it
        if self._address is not None and self.clients is not None:
            self.clients.release(self._address)
        self._disarm()
        super().connection_lost(exc)

    def _turn_away(self, transport: asyncio.Transport) -> None:
        """Answer 429 to a connection over its client's share, then close it (after a moment in
        which what the client sends is dropped, so that it reads the answer)."""
        self._turned_away = True
        assert self.clients is not None
        message = f"this client has {self.clients.per_client} connections open: close one first"
        transport.write(
            _raw_response(
                429, "Too Many Requests", "rateLimited", message, extra="retry-after: 1\r\n"
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._turned_away:
            return
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
        if self._suite_proxy:
            self.scope["state"][SUITE_PROXY] = True
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


def edge_protocol(
    limits: HttpSettings, clients: ClientConnections | None = None
) -> type[EdgeHttpToolsProtocol]:
    """:class:`EdgeHttpToolsProtocol` bound to ``limits`` and, where connections are bounded per
    client, to the server's ``clients`` (uvicorn takes a protocol class)."""
    return type(
        "EdgeHttpToolsProtocol", (EdgeHttpToolsProtocol,), {"limits": limits, "clients": clients}
    )
