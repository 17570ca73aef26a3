"""Errors of the deploy API, each with its HTTP status and Binder's wire ``type``."""

from __future__ import annotations

from common.errors import (
    BadDatabaseError,
    BadProxyError,
    BinderError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnauthorizedError,
)

__all__ = [
    "BadBackendError",
    "BadDatabaseError",
    "BadProxyError",
    "BinderError",
    "CapacityError",
    "ConflictError",
    "LaunchError",
    "MalformedRequestError",
    "NoRecordError",
    "NoTemplateError",
    "NotReadyError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "UnauthorizedError",
]


class NoTemplateError(BinderError):
    status_code = 404
    type = "noTemplate"


class NoRecordError(BinderError):
    status_code = 404
    type = "noRecord"


class CapacityError(BinderError):
    status_code = 429
    type = "capacity"


class RateLimitedError(BinderError):
    """A client over its own limits (per-client deployments or launches per minute)."""

    status_code = 429
    type = "rateLimited"


class BadBackendError(BinderError):
    status_code = 503
    type = "badBackend"


class NotReadyError(BinderError):
    """The server is starting: templates not loaded, records not reconciled yet."""

    status_code = 503
    type = "notReady"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class ConflictError(BinderError):
    status_code = 409
    type = "conflict"


class LaunchError(BinderError):
    """A launch that cannot succeed; its message becomes the deployment's ``reason``. Answered
    502 where it reaches a client (a failed preload): the backend or its registry failed, not
    this server."""

    status_code = 502
    type = "launchFailed"


class FencedError(BinderError):
    """A leader's write refused: its lease has passed, or another server holds it now."""

    status_code = 503
    type = "notLeader"
