"""Client of configurable-http-proxy's REST API (routes and their ``last_activity``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from loguru import logger

from common.errors import BadProxyError
from common.local_http import Answer, ForeignServerError, RequestError, request

PROBE_AGENT = "binder-readiness/1"
"""``User-Agent`` of the deploy server's readiness probes, so that apps (the example app does) can
leave them out of their request logs."""


@dataclass(frozen=True, kw_only=True)
class ProxyRoute:
    """One route of the proxy: where it sends the traffic, and when it last carried some."""

    target: str
    last_activity: datetime | None = None


class Proxy(Protocol):
    """The proxy port: what the deploy server needs of configurable-http-proxy."""

    async def aclose(self) -> None: ...
    async def ping(self) -> None: ...
    async def add_route(self, path: str, target: str) -> None: ...
    async def remove_route(self, path: str) -> None: ...
    async def routes(self) -> dict[str, ProxyRoute]: ...
    async def route(self, path: str) -> str | None:
        """The target of one route, or None when the proxy has no such route."""


class ProxyClient:
    """Adds, removes and lists ``/user/<id>`` routes. Errors become ``BadProxyError``.

    Requests go through :mod:`common.local_http`: a launch makes two of them, and httpx would
    cost seven times the CPU."""

    def __init__(self, *, api_url: str, token: str, timeout: float = 5.0) -> None:
        self._api = api_url.rstrip("/")
        self._auth = {"Authorization": f"token {token}"}
        self._timeout = timeout

    async def aclose(self) -> None:
        return None

    async def _call(
        self, method: str, path: str, json: Any = None, *, missing_ok: bool = False
    ) -> Answer:
        """The API's answer; ``BadProxyError`` when it fails, a 404 included unless
        ``missing_ok`` (a route that is not there)."""
        try:
            answer = await request(
                self._api + path,
                method=method,
                headers=self._auth,
                json=json,
                seconds=self._timeout,
                credential="the proxy's token",
            )
        except ForeignServerError as exc:
            logger.error("proxy API: {}", exc)
            raise BadProxyError(f"proxy API not the suite's: {exc}") from exc
        except RequestError as exc:
            raise BadProxyError(f"proxy API unreachable: {exc}") from exc
        if answer.status >= 400 and not (missing_ok and answer.status == 404):
            raise BadProxyError(f"proxy API answered {answer.status} to {method} {path}")
        return answer

    async def ping(self) -> None:
        await self._call("GET", "/api/routes")

    async def add_route(self, path: str, target: str) -> None:
        await self._call("POST", f"/api/routes{path}", {"target": target})

    async def remove_route(self, path: str) -> None:
        await self._call("DELETE", f"/api/routes{path}", missing_ok=True)

    async def route(self, path: str) -> str | None:
        answer = await self._call("GET", f"/api/routes{path}", missing_ok=True)
        if answer.status == 404:
            return None
        target = answer.json().get("target")
        return str(target) if target else None

    async def routes(self) -> dict[str, ProxyRoute]:
        """Every route, by its path."""
        data = (await self._call("GET", "/api/routes")).json()
        out: dict[str, ProxyRoute] = {}
        for path, info in data.items():
            stamp = info.get("last_activity")
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
            out[path] = ProxyRoute(target=info.get("target", ""), last_activity=when)
        return out
