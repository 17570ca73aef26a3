"""The deploy API's access log: one record per request, into the suite's log like every other.

Each record carries the client's address (the request's caller, see :mod:`.caller`), the method,
the path, the status, the time taken and, where there is one, the deployment's ``id``. Headers are
never logged (the ``Authorization`` header holds the API key).

Probes (``/health``, ``/metrics``) and polls (a read of one deployment's status, which a client
asks again until it changes) answered below 400 are logged at debug: they come every few seconds
and change nothing; launches, deletes, template changes and every error stay at info. Each record
costs one loguru call with its fields as keyword arguments (no bound loggers made per request);
the message is made from the fields.
"""

from __future__ import annotations

import time

from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.deploy_kubernetes.engine.limits import Caller
from services.deploy_kubernetes.models import ID_RE

MAX_PATH_LOGGED = 200
PROBES = frozenset({"/health", "/metrics"})
MESSAGE = "{method} {path} {status} {ms:.1f} ms from {client}"


class AccessLog:
    """ASGI middleware logging each HTTP request once it is answered (or its stream has ended);
    inside :class:`~.caller.CallerMiddleware`, whose caller it names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
        path = str(scope.get("path", ""))[:MAX_PATH_LOGGED]
        state = scope.get("state", {})
        caller = state.get("caller")
        fields: dict[str, str | int | float] = {
            "client": caller.address if isinstance(caller, Caller) else "unknown",
            "method": scope["method"],
            "path": path,
            "status": status,
            "ms": round(ms, 1),
        }
        dep_id = scope.get("path_params", {}).get("id") or state.get("deployment_id")
        if isinstance(dep_id, str) and ID_RE.match(dep_id):
            fields["id"] = dep_id
        polled = path in PROBES or state.get("poll", False)
        if status < 400 and polled:
            logger.debug(MESSAGE, **fields)
        else:
            logger.info(MESSAGE, **fields)
