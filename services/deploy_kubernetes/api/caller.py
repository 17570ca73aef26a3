"""Who is asking, worked out once per request at the edge: a :class:`Caller` on the request's
state (``request.state.caller``), which the routes, the pages and the access log read.

The address is the peer's, or, when the peer is a trusted proxy, the right-most address of
``X-Forwarded-For`` that is not a trusted proxy (the left part of the header is whatever the
client chose to send). The suite's own proxy is always trusted: the server's edge marks its
connections (``SUITE_PROXY``, known from the kernel, see :mod:`common.serving.edge`), since it
fronts the deploy server for every public user. The caller is ``keyed`` when it presents the API key in ``Authorization``
(raw, ``Bearer K`` or ``token K``; compared in constant time).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from common.serving.edge import SUITE_PROXY
from common.web import has_key
from services.deploy_kubernetes.engine.limits import Caller

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


class CallerMiddleware:
    """ASGI middleware putting each HTTP request's :class:`Caller` on its state."""

    def __init__(self, app: ASGIApp, *, api_key: str, trusted_proxies: Iterable[str] = ()) -> None:
        self.app = app
        self._api_key = api_key
        self._trusted: tuple[Network, ...] = tuple(
            ipaddress.ip_network(p, strict=False) for p in trusted_proxies
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            caller = Caller(address=self.address_of(request), keyed=has_key(request, self._api_key))
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    def _trusted_address(self, text: str) -> bool:
        address = _address(text)
        return address is not None and any(address in net for net in self._trusted)

    def address_of(self, request: Request) -> str:
        """The client's address: the peer, or the right-most untrusted ``X-Forwarded-For`` hop."""
        peer = request.client.host if request.client else "unknown"
        from_proxy = bool(request.scope.get("state", {}).get(SUITE_PROXY))
        if not from_proxy and (not self._trusted or not self._trusted_address(peer)):
            return peer
        hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
        for hop in reversed([h for h in hops if h]):
            if not self._trusted_address(hop):
                return hop if _address(hop) is not None else peer
        return peer


def caller_of(request: Request) -> Caller:
    """The request's caller, as :class:`CallerMiddleware` worked it out."""
    caller: Caller = request.state.caller
    return caller
