"""HTTP handlers of the deploy API. Shared objects come from the lifespan state."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from loguru import logger
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.settings import HttpSettings
from common.web import has_key, metrics_response, read_json_object, require_key
from services.deploy_kubernetes.answers import StatusAnswers
from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.limits import KEY_CLIENT, ClientLimits
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    check_name,
    parse_cull_timeout,
    parse_template,
)
from services.deploy_kubernetes.openapi import openapi_document
from services.deploy_kubernetes.records import Progress, Update
from services.deploy_kubernetes.service import Service
from services.deploy_kubernetes.web_routes import WEB_ROUTES

MAX_BODY = 64 * 1024
SSE_KEEPALIVE_SECONDS = 15.0


def _service(request: Request) -> Service:
    service: Service = request.state.service
    return service


def _auth(request: Request) -> Service:
    service = _service(request)
    require_key(request, service.api_key)
    return service


async def _json(request: Request) -> dict[str, Any]:
    """The JSON object body, within the edge limits."""
    edge: HttpSettings = request.state.edge
    return await read_json_object(request, MAX_BODY, max_depth=edge.max_json_depth)


def _who(request: Request) -> str:
    """Who asks, for the audit trail: ``api-key``, or the anonymous client's address."""
    limits: ClientLimits = request.state.client_limits
    client = limits.client_of(request)
    return f"{KEY_CLIENT} from {client}" if has_key(request, _service(request).api_key) else client


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise MalformedRequestError(f"{key}: unknown field")


async def launch(request: Request) -> Response:
    service = _service(request)
    if service.launch_requires_key:
        require_key(request, service.api_key)
    body = await _json(request)
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
    cull_ms = None if cull is None else parse_cull_timeout(cull)
    # per-client limits: a slot is taken before the launch and bound to its deployment after
    limits: ClientLimits = request.state.client_limits
    client = limits.client_of(request)
    keyed = has_key(request, service.api_key)
    reservation = None if keyed else limits.reserve(client)
    try:
        dep = await service.launcher.launch(
            template, cull_ms, client=KEY_CLIENT if keyed else client
        )
    except BaseException:
        if reservation is not None:
            reservation.cancel()  # no deployment was made
        raise
    if reservation is not None:
        reservation.bind(dep.id)
    request.state.deployment_id = dep.id
    # a pooled launch is ``deployed`` with its url already; it is logged once that is sent
    said = BackgroundTask(_log_launch, dep, _who(request))
    return JSONResponse(dep.to_api(), background=said)


async def _log_launch(dep: Deployment, who: str) -> None:
    pooled = " from the pool" if dep.status is Status.DEPLOYED else ""
    logger.bind(id=dep.id, template=dep.template).info("launched{} by {}", pooled, who)


async def status(request: Request) -> Response:
    request.state.poll = True  # clients ask again and again: logged at debug when it answers
    dep = await _service(request).get(request.path_params["template"], request.path_params["id"])
    answers: StatusAnswers = request.state.status_answers
    return Response(answers.of(dep), media_type="application/json")


async def list_deployments(request: Request) -> Response:
    service = _auth(request)
    template = request.path_params.get("template")
    if template is not None:
        service.catalog.get(template)
    wanted = request.query_params.get("status")
    statuses = None
    if wanted is not None:
        try:
            statuses = [Status(wanted)]
        except ValueError as exc:
            choices = ", ".join(s.value for s in Status)
            raise MalformedRequestError(f"status: must be one of {choices}") from exc
    deps = await service.records.find(template=template, statuses=statuses)
    return JSONResponse([d.to_api() for d in deps])


async def delete(request: Request) -> Response:
    service = _auth(request)
    dep = await service.delete(request.path_params["template"], request.path_params["id"])
    logger.bind(id=dep.id, template=dep.template).info("delete asked by {}", _who(request))
    return JSONResponse(dep.to_api())


async def events(request: Request) -> Response:
    service = _service(request)
    updates = service.watch(
        request.path_params["template"],
        request.path_params["id"],
        idle_seconds=SSE_KEEPALIVE_SECONDS,
    )
    first = await anext(updates)  # errors (404, 422) are answered before the stream starts
    assert first is not None

    async def stream() -> AsyncIterator[str]:
        # ``updates`` is consumed by this task alone: a client that leaves cancels this task
        # inside it, which ends it too; a leaving client is normal and logs nothing.
        try:
            yield _sse(first)
            async for dep in updates:
                yield ": keep-alive\n\n" if dep is None else _sse(dep)
        finally:
            await updates.aclose()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _sse(update: Update) -> str:
    if isinstance(update, Progress):
        return f"event: progress\ndata: {json.dumps({'message': update.message})}\n\n"
    return f"event: status\ndata: {json.dumps(update.to_api())}\n\n"


async def preload(request: Request) -> Response:
    service = _auth(request)
    template = service.catalog.get(request.path_params["template"])
    if request.method == "POST":
        await service.start_preload(template)
    return JSONResponse(
        {"template-name": template.name, "status": await service.preload_status(template)}
    )


async def list_templates(request: Request) -> Response:
    service = _service(request)
    keyed = has_key(request, service.api_key)  # env values only to holders of the key
    return JSONResponse([t.to_api(with_env=keyed) for t in service.catalog.all()])


async def get_template(request: Request) -> Response:
    service = _service(request)
    template = service.catalog.get(request.path_params["name"])
    return JSONResponse(template.to_api(with_env=has_key(request, service.api_key)))


async def put_template(request: Request) -> Response:
    service = _auth(request)
    name = check_name(request.path_params["name"], "name")
    template = parse_template(await _json(request), name=name)
    await service.catalog.put(template)
    logger.bind(template=name).info("template {} registered by {}", name, _who(request))
    return JSONResponse(template.to_api())


async def delete_template(request: Request) -> Response:
    service = _auth(request)
    await service.catalog.delete(request.path_params["name"])
    name = request.path_params["name"]
    logger.bind(template=name).info("template {} removed by {}", name, _who(request))
    return JSONResponse({"name": request.path_params["name"], "deleted": True})


async def pools(request: Request) -> Response:
    service = _auth(request)
    template = request.path_params["template"]
    if request.method == "GET":
        return JSONResponse(await service.pools.state(template))
    body = await _json(request)
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
    return metrics_response(_service(request).metrics.registry)


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
    *WEB_ROUTES,  # the front page, launch page, badges and operator console
]
