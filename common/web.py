"""Starlette plumbing shared by the suite's HTTP services: one error table, bounded JSON bodies,
the API-key check and the Prometheus endpoint."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from common.errors import (
    MISSING_KEY,
    BinderError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnauthorizedError,
)

DEFAULT_JSON_DEPTH = 32
HTTP_TYPES = {404: "notFound", 405: "methodNotAllowed", 400: "malformedRequest"}


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"type": type_, "error": message}, status_code=status, headers=headers)


async def binder_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BinderError)
    if exc.status_code >= 500:
        logger.warning(
            "{} {} answered {}: {}", request.method, request.url.path, exc.type, exc.message
        )
    return error_response(exc.status_code, exc.type, exc.message, exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = HTTP_TYPES.get(exc.status_code, "httpError")
    return error_response(exc.status_code, type_, str(exc.detail), dict(exc.headers or {}))


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    logger.opt(exception=exc).error("{} {} failed unexpectedly", request.method, request.url.path)
    return error_response(500, "internal", "internal error; see the service's log")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    BinderError: binder_error_handler,
    HTTPException: http_error_handler,
    Exception: unexpected_error_handler,
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"body larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:  # the client left, or its body stalled past the idle timeout
        raise MalformedRequestError("body: the client stopped sending it") from exc
    return b"".join(chunks)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def check_json_depth(body: bytes, limit: int) -> None:
    """Refuse (422) JSON nested deeper than ``limit`` arrays and objects, before the parser
    recurses into it (Python's parser would raise ``RecursionError``)."""
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            raise MalformedRequestError(f"body: JSON nested deeper than {limit} levels")


async def read_json_object(
    request: Request, limit: int, *, max_depth: int = DEFAULT_JSON_DEPTH
) -> dict[str, Any]:
    """A JSON object body; an empty body is an empty object."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    check_json_depth(body, max_depth)
    try:
        data = json.loads(body)
    except ValueError as exc:  # bad UTF-8, bad JSON, or a number of over 4,300 digits
        raise MalformedRequestError(f"body: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MalformedRequestError("body: must be a JSON object")
    return data


def presented_key(request: Request) -> str:
    """The key in ``Authorization``: raw (as Binder's clients send it), ``Bearer K`` or ``token K``."""
    header = request.headers.get("authorization", "").strip()
    scheme, _, rest = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and rest:
        return rest.strip()
    return header


def has_key(request: Request, api_key: str) -> bool:
    """Whether the request carries the API key (compared in constant time)."""
    given = presented_key(request)
    return bool(api_key and given and hmac.compare_digest(given.encode(), api_key.encode()))


def require_key(request: Request, api_key: str) -> None:
    if not has_key(request, api_key):
        raise UnauthorizedError(MISSING_KEY)


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
