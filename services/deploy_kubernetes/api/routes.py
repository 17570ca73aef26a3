"""HTTP handlers of the deploy API: each reads the request, calls one of the deployer's use cases
and renders its answer. Shared objects come from the lifespan state; the caller from
:mod:`.caller`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.settings import HttpSettings
from common.web import read_json_object
from services.deploy_kubernetes.api.answers import StatusAnswers
from services.deploy_kubernetes.api.caller import caller_of
from services.deploy_kubernetes.api.streams import EventStreams, HeldStream
from services.deploy_kubernetes.engine.deployer import Deployer
from services.deploy_kubernetes.engine.output import Output
from services.deploy_kubernetes.engine.records import Progress, Update
from services.deploy_kubernetes.errors import MalformedRequestError
from services.deploy_kubernetes.models import (
    Deployment,
    Status,
    check_name,
    parse_cull_timeout,
    parse_template,
    parse_urlpath,
)

MAX_BODY = 64 * 1024
SSE_KEEPALIVE_SECONDS = 15.0


def _deployer(request: Request) -> Deployer:
    deployer: Deployer = request.state.deployer
    return deployer


def _auth(request: Request) -> Deployer:
    """The deployer, for a caller with the API key (403 otherwise)."""
    caller_of(request).require_key()
    return _deployer(request)


async def _json(request: Request) -> dict[str, Any]:
    """The JSON object body, within the edge limits."""
    edge: HttpSettings = request.state.edge
    return await read_json_object(request, MAX_BODY, max_depth=edge.max_json_depth)


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise MalformedRequestError(f"{key}: unknown field")


async def launch(request: Request) -> Response:
    deployer = _deployer(request)
    caller = caller_of(request)
    deployer.authorize_launch(caller)
    body = await _json(request)
    await deployer.check_launchable()
    if "template" in request.path_params:
        _only(body, {"cull-timeout", "urlpath"})
        template = request.path_params["template"]
    else:
        _only(body, {"template-name", "cull-timeout", "urlpath"})
        template = body.get("template-name")
        if not isinstance(template, str):
            raise MalformedRequestError("template-name: required, a string")
    check_name(template)
    cull = body.get("cull-timeout")
    cull_ms = None if cull is None else parse_cull_timeout(cull)
    urlpath = parse_urlpath(body.get("urlpath", ""))
    dep = await deployer.launch(template, cull_ms, caller=caller, urlpath=urlpath)
    request.state.deployment_id = dep.id
    # a pooled launch is ``deployed`` with its url already; it is logged once that is sent
    said = BackgroundTask(_log_launch, dep, caller.who)
    return JSONResponse(dep.to_api(with_token=True), background=said)


async def _log_launch(dep: Deployment, who: str) -> None:
    pooled = " from the pool" if dep.status is Status.DEPLOYED else ""
    logger.bind(id=dep.id, template=dep.template).info("launched{} by {}", pooled, who)


async def status(request: Request) -> Response:
    request.state.poll = True  # clients ask again and again: logged at debug when it answers
    dep = await _deployer(request).deployment(
        request.path_params["template"], request.path_params["id"]
    )
    answers: StatusAnswers = request.state.status_answers
    return Response(answers.of(dep), media_type="application/json")


async def list_deployments(request: Request) -> Response:
    """The active deployments and the newest ended ones, at most ``?limit=``; a ``Link`` header
    names the next (older) page, as GitHub's API does, so the body stays the plain array that
    Binder's clients read."""
    deployer = _auth(request)
    params = request.query_params
    page = await deployer.deployments(
        template=request.path_params.get("template"),
        status=params.get("status"),
        limit=params.get("limit"),
        cursor=params.get("cursor"),
    )
    headers = {}
    if page.next_cursor is not None:
        following = request.url.include_query_params(cursor=page.next_cursor)
        headers["Link"] = f'<{following}>; rel="next"'
    return JSONResponse([d.to_api() for d in page.deployments], headers=headers)


async def delete(request: Request) -> Response:
    deployer = _auth(request)
    dep = await deployer.delete(request.path_params["template"], request.path_params["id"])
    who = caller_of(request).who
    logger.bind(id=dep.id, template=dep.template).info("delete asked by {}", who)
    return JSONResponse(dep.to_api())


async def events(request: Request) -> Response:
    streams: EventStreams = request.state.event_streams
    release = streams.take(caller_of(request))  # 429 for a client holding its maximum
    try:
        updates = _deployer(request).watch(
            request.path_params["template"],
            request.path_params["id"],
            idle_seconds=SSE_KEEPALIVE_SECONDS,
            output=request.query_params.get("output") == "1",
        )
        first = await anext(updates)  # errors (404, 422) are answered before the stream starts
    except BaseException:
        release()
        raise
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
    return HeldStream(stream(), media_type="text/event-stream", headers=headers, release=release)


def _sse(update: Update | Output) -> str:
    if isinstance(update, Progress):
        return f"event: progress\ndata: {json.dumps({'message': update.message})}\n\n"
    if isinstance(update, Output):
        return f"event: output\ndata: {json.dumps({'lines': list(update.lines)})}\n\n"
    return f"event: status\ndata: {json.dumps(update.to_api(with_token=True))}\n\n"


async def preload(request: Request) -> Response:
    deployer = _auth(request)
    name = request.path_params["template"]
    state = await deployer.preload(name, start=request.method == "POST")
    return JSONResponse({"template-name": name, "status": state})


async def list_templates(request: Request) -> Response:
    keyed = caller_of(request).keyed  # env values only to holders of the key
    return JSONResponse([t.to_api(with_env=keyed) for t in _deployer(request).templates()])


async def get_template(request: Request) -> Response:
    template = _deployer(request).template(request.path_params["name"])
    return JSONResponse(template.to_api(with_env=caller_of(request).keyed))


async def put_template(request: Request) -> Response:
    deployer = _auth(request)
    name = check_name(request.path_params["name"], "name")
    template = parse_template(await _json(request), name=name)
    await deployer.put_template(template)
    who = caller_of(request).who
    logger.bind(template=name).info("template {} registered by {}", name, who)
    return JSONResponse(template.to_api())


async def delete_template(request: Request) -> Response:
    deployer = _auth(request)
    name = request.path_params["name"]
    await deployer.delete_template(name)
    logger.bind(template=name).info("template {} removed by {}", name, caller_of(request).who)
    return JSONResponse({"name": name, "deleted": True})


async def pools(request: Request) -> Response:
    deployer = _auth(request)
    template = request.path_params["template"]
    if request.method == "GET":
        return JSONResponse(await deployer.pool(template))
    body = await _json(request)
    _only(body, {"size"})
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1000:
        raise MalformedRequestError("size: must be an integer from 0 to 1000")
    return JSONResponse(await deployer.resize_pool(template, size))


async def health(request: Request) -> Response:
    checks = _deployer(request).health()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )


async def metrics(request: Request) -> Response:
    return Response(await _deployer(request).metrics_text(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    document: dict[str, Any] = request.state.openapi  # made once, by the app
    return JSONResponse(document)


API_ROUTES = [
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
