"""HTTP handlers of the deploy API. Shared objects come from the lifespan state."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.web import metrics_response, read_json_object, require_key
from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    check_name,
    parse_cull_timeout,
    parse_template,
)
from services.deploy_kubernetes.openapi import openapi_document
from services.deploy_kubernetes.service import Service

MAX_BODY = 64 * 1024
SSE_KEEPALIVE_SECONDS = 15.0


def _service(request: Request) -> Service:
    service: Service = request.state.service
    return service


def _auth(request: Request) -> Service:
    service = _service(request)
    require_key(request, service.api_key)
    return service


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise MalformedRequestError(f"{key}: unknown field")


async def launch(request: Request) -> Response:
    service = _service(request)
    if service.launch_requires_key:
        require_key(request, service.api_key)
    body = await read_json_object(request, MAX_BODY)
    await service.check_launchable()
    if "template" in request.path_params:
        _only(body, {"cull-timeout"})
        template = request.path_params["template"]
    else:
        _only(body, {"template-name", "cull-timeout"})
        template = body.get("template-name")
        if not isinstance(template, str):
            raise MalformedRequestError("template-name: required, a string")
    check_name(template)
    cull = body.get("cull-timeout")
    dep = await service.deployer.launch(
        template, None if cull is None else parse_cull_timeout(cull)
    )
    return JSONResponse({"id": dep.id})


async def status(request: Request) -> Response:
    dep = await _service(request).deployer.get(
        request.path_params["template"], request.path_params["id"]
    )
    return JSONResponse(dep.to_api())


async def list_deployments(request: Request) -> Response:
    service = _auth(request)
    template = request.path_params.get("template")
    if template is not None:
        service.deployer.template(template)
    wanted = request.query_params.get("status")
    statuses = None
    if wanted is not None:
        try:
            statuses = [Status(wanted)]
        except ValueError as exc:
            choices = ", ".join(s.value for s in Status)
            raise MalformedRequestError(f"status: must be one of {choices}") from exc
    deps = await service.deployer.store.find(template=template, statuses=statuses)
    return JSONResponse([d.to_api() for d in deps])


async def delete(request: Request) -> Response:
    service = _auth(request)
    dep = await service.deployer.delete(request.path_params["template"], request.path_params["id"])
    return JSONResponse(dep.to_api())


async def events(request: Request) -> Response:
    deployer = _service(request).deployer
    updates = deployer.watch(request.path_params["template"], request.path_params["id"])
    first = await anext(updates)  # errors (404, 422) are answered before the stream starts

    async def stream() -> AsyncIterator[str]:
        yield _sse(first)
        pending: asyncio.Task[Any] | None = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(updates))
                done, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE_SECONDS)
                if not done:
                    yield ": keep-alive\n\n"
                    continue
                try:
                    item = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield _sse(item)
        finally:
            if pending is not None:  # the client left: end the pending step before closing
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            await updates.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _sse(item: Deployment | str) -> str:
    """A status record as ``event: status``; a backend's progress message as ``event: progress``."""
    if isinstance(item, str):
        return f"event: progress\ndata: {json.dumps({'message': item})}\n\n"
    return f"event: status\ndata: {json.dumps(item.to_api())}\n\n"


async def preload(request: Request) -> Response:
    service = _auth(request)
    template = service.deployer.template(request.path_params["template"])
    if request.method == "POST":
        await service.start_preload(template)
    return JSONResponse(
        {"template-name": template.name, "status": await service.preload_status(template)}
    )


async def list_templates(request: Request) -> Response:
    return JSONResponse([t.to_api() for t in _service(request).deployer.templates.values()])


async def get_template(request: Request) -> Response:
    return JSONResponse(_service(request).deployer.template(request.path_params["name"]).to_api())


async def put_template(request: Request) -> Response:
    service = _auth(request)
    name = check_name(request.path_params["name"], "name")
    template = parse_template(await read_json_object(request, MAX_BODY), name=name)
    await service.deployer.put_template(template)
    return JSONResponse(template.to_api())


async def delete_template(request: Request) -> Response:
    service = _auth(request)
    await service.deployer.delete_template(request.path_params["name"])
    return JSONResponse({"name": request.path_params["name"], "deleted": True})


async def pools(request: Request) -> Response:
    service = _auth(request)
    template = request.path_params["template"]
    if request.method == "GET":
        return JSONResponse(await service.pools.state(template))
    body = await read_json_object(request, MAX_BODY)
    _only(body, {"size"})
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1000:
        raise MalformedRequestError("size: must be an integer from 0 to 1000")
    return JSONResponse(await service.pools.resize(template, size))


async def health(request: Request) -> Response:
    checks = _service(request).health()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )


async def metrics(request: Request) -> Response:
    return metrics_response(_service(request).deployer.metrics.registry)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


ROUTES = [
    Route("/applications/", launch, methods=["POST"]),
    Route("/applications/", list_deployments, methods=["GET"]),
    Route("/applications/{template}", launch, methods=["POST"]),
    Route("/applications/{template}", list_deployments, methods=["GET"]),
    Route("/applications/{template}/{id}", status, methods=["GET"]),
    Route("/applications/{template}/{id}", delete, methods=["DELETE"]),
    Route("/applications/{template}/{id}/events", events, methods=["GET"]),
    Route("/preload/{template}", preload, methods=["GET", "POST"]),
    Route("/templates", list_templates, methods=["GET"]),
    Route("/templates/{name}", get_template, methods=["GET"]),
    Route("/templates/{name}", put_template, methods=["PUT"]),
    Route("/templates/{name}", delete_template, methods=["DELETE"]),
    Route("/pools/{template}", pools, methods=["GET", "PUT"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
