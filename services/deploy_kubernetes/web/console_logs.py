"""One deployment's log lines for the console, relayed from the log aggregator server-side.

The aggregator's token (when it has one) stays on the server: the page asks the deploy server,
which asks the aggregator with ``Authorization: Bearer <token>``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from common.owned_http import ForeignServerError, async_hooks
from services.deploy_kubernetes.errors import BinderError

LINES = 200


class LogsUnavailableError(BinderError):
    status_code = 503
    type = "badLogging"


class LogsRelay:
    def __init__(self, *, url: str, token: str = "", timeout: float = 5.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout),
            event_hooks=async_hooks("the logging token"),
        )

    async def recent(self, app: str) -> dict[str, Any]:
        """The newest lines of deployment ``app``, oldest first."""
        try:
            response = await self._client.get(
                "/logs", params={"app": app, "limit": str(LINES), "order": "newest"}
            )
        except ForeignServerError as exc:
            raise LogsUnavailableError(f"log aggregator not the suite's: {exc}") from exc
        except httpx.HTTPError as exc:
            raise LogsUnavailableError(
                f"log aggregator unreachable: {exc.__class__.__name__}"
            ) from exc
        if response.status_code != 200:
            raise LogsUnavailableError(f"log aggregator answered {response.status_code}")
        records = list(reversed(response.json().get("records", [])))
        return {"app": app, "records": records}

    async def stream(self, app: str) -> StreamingResponse:
        """The aggregator's live tail of ``app`` as server-sent events, passed through."""
        request = self._client.build_request(
            "GET",
            "/logs/stream",
            params={"app": app},
            timeout=httpx.Timeout(5.0, read=None),
        )
        try:
            upstream = await self._client.send(request, stream=True)
        except ForeignServerError as exc:
            raise LogsUnavailableError(f"log aggregator not the suite's: {exc}") from exc
        except httpx.HTTPError as exc:
            raise LogsUnavailableError(
                f"log aggregator unreachable: {exc.__class__.__name__}"
            ) from exc
        if upstream.status_code != 200:
            await upstream.aclose()
            raise LogsUnavailableError(f"log aggregator answered {upstream.status_code}")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                yield b"event: ended\ndata: {}\n\n"  # the page says the tail stopped

        return StreamingResponse(
            relay(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(upstream.aclose),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
