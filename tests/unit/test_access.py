"""The deploy API's access log: one record per request with its fields; probes and status polls
at debug unless they fail."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from services.deploy_kubernetes.api.access import AccessLog
from services.deploy_kubernetes.api.caller import CallerMiddleware

DEP_ID = "0123456789abcdef0123456789abcdef"


async def status(request: Request) -> Response:
    request.state.poll = True
    found = request.path_params["template"] == "example"
    return JSONResponse({"id": request.path_params["id"]}, status_code=200 if found else 404)


async def delete(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["id"], "status": "deleted"})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, status_code=int(request.query_params.get("code", 200)))


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    sink = logger.add(
        lambda m: seen.append({"level": m.record["level"].name, **m.record["extra"]}),
        level="DEBUG",
        format="{message}",
    )
    yield seen
    logger.remove(sink)


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = Starlette(
        routes=[
            Route("/applications/{template}/{id}", status, methods=["GET"]),
            Route("/applications/{template}/{id}", delete, methods=["DELETE"]),
            Route("/health", health),
        ],
        middleware=[Middleware(CallerMiddleware, api_key="key"), Middleware(AccessLog)],
    )
    with TestClient(app, client=("203.0.113.9", 50000)) as c:
        yield c


def test_a_request_is_one_info_record_with_its_fields(
    client: TestClient, records: list[dict[str, Any]]
) -> None:
    assert client.delete(f"/applications/example/{DEP_ID}").status_code == 200
    [record] = records
    assert record["level"] == "INFO"
    assert record["client"] == "203.0.113.9"
    assert (record["method"], record["path"], record["status"]) == (
        "DELETE",
        f"/applications/example/{DEP_ID}",
        200,
    )
    assert record["id"] == DEP_ID
    assert isinstance(record["ms"], float)


def test_probes_are_at_debug_unless_they_fail(
    client: TestClient, records: list[dict[str, Any]]
) -> None:
    client.get("/health")
    client.get("/health?code=503")
    assert [(r["level"], r["status"]) for r in records] == [("DEBUG", 200), ("INFO", 503)]


def test_status_polls_are_at_debug_unless_they_fail(
    client: TestClient, records: list[dict[str, Any]]
) -> None:
    client.get(f"/applications/example/{DEP_ID}")
    client.get(f"/applications/nothing/{DEP_ID}")
    assert [(r["level"], r["status"]) for r in records] == [("DEBUG", 200), ("INFO", 404)]
