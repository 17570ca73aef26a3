"""The suite's error tree: one root carrying an HTTP status and a wire ``type`` name."""

from __future__ import annotations


class BinderError(Exception):
    """Root of every error the suite raises on purpose.

    ``type`` is the name clients see in ``{"type": ..., "error": ...}``; ``status_code`` the HTTP
    status a service answers with.
    """

    status_code: int = 500
    type: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ConfigError(BinderError):
    status_code = 500
    type = "badConfig"


class UnauthorizedError(BinderError):
    status_code = 403
    type = "unauthorized"


MISSING_KEY = "missing or wrong API key in the Authorization header"
"""The message of a request refused for want of the API key."""


class NotFoundError(BinderError):
    status_code = 404
    type = "notFound"


class MalformedRequestError(BinderError):
    status_code = 422
    type = "malformedRequest"


class PayloadTooLargeError(BinderError):
    status_code = 413
    type = "payloadTooLarge"


class BadDatabaseError(BinderError):
    status_code = 503
    type = "badDatabase"


class BadProxyError(BinderError):
    status_code = 503
    type = "badProxy"
