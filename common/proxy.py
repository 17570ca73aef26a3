"""Client of configurable-http-proxy's REST API (routes and their ``last_activity``)."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import httpx

from common.errors import BadProxyError

PROBE_AGENT = "binder-readiness/1"
"""``User-Agent`` of the deploy server's readiness probes and route checks, so that apps (the
example app does) can leave them out of their request logs."""


class Proxy(Protocol):
    """The proxy port: what the deploy server needs of configurable-http-proxy."""

    async def aclose(self) -> None: ...
    async def ping(self) -> None: ...
    async def add_route(self, path: str, target: str) -> None: ...
    async def remove_route(self, path: str) -> None: ...
    async def routes(self) -> dict[str, tuple[str, datetime | None]]: ...
    async def route(self, path: str) -> str | None:
        """The target of one route, or None when the proxy has no such route."""

    async def public_get(self, path: str) -> int: ...


class ProxyClient:
    """Adds, removes and lists ``/user/<id>`` routes. Errors become ``BadProxyError``."""

    def __init__(self, *, api_url: str, token: str, public_url: str, timeout: float = 5.0) -> None:
        self._api = httpx.AsyncClient(
            base_url=api_url,
            headers={"Authorization": f"token {token}"},
            timeout=timeout,
        )
        self._public = httpx.AsyncClient(
            base_url=public_url, timeout=timeout, headers={"User-Agent": PROBE_AGENT}
        )

    async def aclose(self) -> None:
        await self._api.aclose()
        await self._public.aclose()

    async def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = await self._api.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise BadProxyError(f"proxy API unreachable: {exc.__class__.__name__}") from exc
        if response.status_code >= 400 and not (method == "DELETE" and response.status_code == 404):
            raise BadProxyError(f"proxy API answered {response.status_code} to {method} {path}")
        return response

    async def ping(self) -> None:
        await self._call("GET", "/api/routes")

    async def add_route(self, path: str, target: str) -> None:
        await self._call("POST", f"/api/routes{path}", json={"target": target})

    async def remove_route(self, path: str) -> None:
        await self._call("DELETE", f"/api/routes{path}")

    async def route(self, path: str) -> str | None:
        try:
            response = await self._api.get(f"/api/routes{path}")
        except httpx.HTTPError as exc:
            raise BadProxyError(f"proxy API unreachable: {exc.__class__.__name__}") from exc
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise BadProxyError(f"proxy API answered {response.status_code} to GET {path}")
        target = response.json().get("target")
        return str(target) if target else None

    async def routes(self) -> dict[str, tuple[str, datetime | None]]:
        """Every route as ``{path: (target, last_activity)}``."""
        data = (await self._call("GET", "/api/routes")).json()
        out: dict[str, tuple[str, datetime | None]] = {}
        for path, info in data.items():
            stamp = info.get("last_activity")
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
            out[path] = (info.get("target", ""), when)
        return out

    async def public_get(self, path: str) -> int:
        """Status of a GET through the public port (0 when the proxy cannot be reached); the
        request names itself a probe (``PROBE_AGENT``)."""
        try:
            response = await self._public.get(path)
        except httpx.HTTPError:
            return 0
        return response.status_code
