"""Running a service's Starlette app under uvicorn, the same way for every service."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette


def serve(app: Starlette, *, host: str, port: int, grace_seconds: int) -> None:
    """Serve until SIGTERM/SIGINT, then finish requests for up to ``grace_seconds``."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace_seconds,
    )
