"""The deploy API's access log: one record per request, into the suite's log like every other.

Each record carries the client's address (as the per-client limits see it), the method, the path,
the status, the time taken and, where there is one, the deployment's ``id``. Headers are never
logged (the ``Authorization`` header holds the API key).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.deploy_kubernetes.models import ID_RE

MAX_PATH_LOGGED = 200


class AccessLog:
    """ASGI middleware logging each HTTP request once it is answered (or its stream has ended)."""

    def __init__(self, app: ASGIApp, *, client_of: Callable[[Request], str]) -> None:
        self.app = app
        self.client_of = client_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # until the app answers otherwise

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._log(scope, status, (time.monotonic() - started) * 1000)

    def _log(self, scope: Scope, status: int, ms: float) -> None:
        client = self.client_of(Request(scope))
        path = str(scope.get("path", ""))[:MAX_PATH_LOGGED]
        dep_id = scope.get("path_params", {}).get("id") or scope.get("state", {}).get(
            "deployment_id"
        )
        fields = {"client": client, "method": scope["method"], "path": path, "status": status}
        log = logger.bind(**fields, ms=round(ms, 1))
        if isinstance(dep_id, str) and ID_RE.match(dep_id):
            log = log.bind(id=dep_id)
        log.info("{} {} {} {:.1f} ms from {}", scope["method"], path, status, ms, client)
