"""Plain HTTP/1.1 requests to services on this host (the proxy's API and public port, apps being
probed), for the launch path, where every request counts.

httpx costs about 1.4 ms of CPU per request here (measured against the example app; aiohttp about
0.55 ms), and a launch makes three of them. This sends one request on a fresh connection with
``Connection: close`` and lets httptools' C parser (llhttp, which uvicorn uses too) read the
answer: about 0.2 ms. Only ``http://``; anything else (TLS) goes through httpx.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from common.peers import ForeignListenerError, check_peer

MAX_BODY = 4 * 1024 * 1024
"""The largest answer read: the proxy's route table of a few thousand routes fits."""


class RequestError(OSError):
    """The request could not be made or its answer could not be read."""


class ForeignServerError(RequestError):
    """The port's server belongs to another user than the suite's: nothing was sent to it."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)


class _Reader:
    """httptools' callbacks: the status and body of one answer."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.complete = False
        self.headers_done = False

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data
        if len(self.body) > MAX_BODY:
            raise RequestError(f"answer larger than {MAX_BODY} bytes")

    def on_message_complete(self) -> None:
        self.complete = True


def _encode(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def request(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    seconds: float,
    until: Callable[[bytes], bool] | None = None,
    credential: str = "",
) -> Answer:
    """One request to ``url`` (``http://`` only), answered within ``seconds``;
    ``RequestError`` when it fails in any way. With ``until``, the answer is read only until
    ``until(the body so far)`` is true (a stream's, such as server-sent events). A request
    naming the ``credential`` it carries is sent only to a server of the suite's user
    (:func:`common.peers.check_peer`, about 15 µs); to another's, nothing is sent and
    :class:`ForeignServerError` says whose it is."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not a plain http URL: {url}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent = dict(headers or {})
    body = None
    if json is not None:
        body = jsonlib.dumps(json).encode()
        sent["Content-Type"] = "application/json"
    message = _encode(method, target, parts.netloc, sent, body)
    reader = _Reader()
    parser = httptools.HttpResponseParser(reader)
    try:
        async with asyncio.timeout(seconds):
            stream, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            try:
                if credential:
                    check_peer(writer.get_extra_info("socket"), what=credential)
                writer.write(message)
                while not reader.complete:
                    data = await stream.read(65536)
                    if not data:  # closed: an answer without a length ends here
                        break
                    parser.feed_data(data)
                    if until is not None and until(bytes(reader.body)):
                        break
            finally:
                writer.close()
    except ForeignListenerError as exc:
        raise ForeignServerError(str(exc)) from exc
    except (OSError, TimeoutError, httptools.HttpParserError) as exc:
        raise RequestError(f"{method} {url}: {exc.__class__.__name__}") from exc
    if not reader.headers_done:
        raise RequestError(f"{method} {url}: closed before an answer")
    return Answer(parser.get_status_code(), bytes(reader.body))
