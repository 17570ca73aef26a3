"""httpx clients that send a credential only to a server of the suite's user.

Every httpx client that carries one of the suite's credentials (the logging token, the proxy's
token, the API key) is made with :func:`hooks` (or :func:`async_hooks`): each new connection is
checked with :func:`common.peers.check_peer` once it is open and before the request's first byte
is written, through httpcore's ``trace`` extension (its ``connection.connect_tcp.complete``
event hands over the new connection). A connection to another user's socket is closed and the
request fails with :class:`ForeignServerError`, an ``httpx.ConnectError``: callers that already
treat an unreachable service as such (retry, report it down) need nothing more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from common.peers import ForeignListenerError, check_peer

CONNECTED = "connection.connect_tcp.complete"


class ForeignServerError(httpx.ConnectError):
    """The port's server belongs to another user than the suite's: nothing was sent to it."""


def _checked(stream: Any, what: str, request: httpx.Request) -> ForeignServerError | None:
    try:
        check_peer(stream.get_extra_info("socket"), what=what)
    except ForeignListenerError as exc:
        return ForeignServerError(str(exc), request=request)
    return None


def hooks(what: str) -> dict[str, list[Callable[[httpx.Request], None]]]:
    """``event_hooks`` of an ``httpx.Client`` whose requests carry ``what`` (a credential's
    name, for the message of a refusal)."""

    def on_request(request: httpx.Request) -> None:
        def trace(event: str, info: dict[str, Any]) -> None:
            if event == CONNECTED:
                refused = _checked(info["return_value"], what, request)
                if refused is not None:
                    info["return_value"].close()
                    raise refused

        request.extensions["trace"] = trace

    return {"request": [on_request]}


def async_hooks(what: str) -> dict[str, list[Callable[[httpx.Request], Awaitable[None]]]]:
    """:func:`hooks` for an ``httpx.AsyncClient``."""

    async def on_request(request: httpx.Request) -> None:
        async def trace(event: str, info: dict[str, Any]) -> None:
            if event == CONNECTED:
                refused = _checked(info["return_value"], what, request)
                if refused is not None:
                    await info["return_value"].aclose()
                    raise refused

        request.extensions["trace"] = trace

    return {"request": [on_request]}
