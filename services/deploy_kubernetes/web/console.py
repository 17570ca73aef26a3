"""The operator console: ``GET /console`` (a sign-in form, or the console once signed in) and
the same-origin JSON calls its page makes under ``/console/``; see :mod:`console_auth`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.settings import Settings
from common.web import read_json_object
from services.deploy_kubernetes.engine.deployer import Deployer
from services.deploy_kubernetes.engine.limits import Caller
from services.deploy_kubernetes.errors import MalformedRequestError, UnauthorizedError
from services.deploy_kubernetes.models import check_id
from services.deploy_kubernetes.web.console_auth import (
    COOKIE,
    Sessions,
    SignInThrottle,
    clear_session_cookie,
    key_matches,
    require_session,
    set_session_cookie,
    signed_in,
)
from services.deploy_kubernetes.web.console_data import ConsoleData, page_query
from services.deploy_kubernetes.web.console_logs import LogsRelay
from services.deploy_kubernetes.web.pages import page_response

MAX_BODY = 4096
PER_CLIENT_SETTINGS = ("per_client_max_deployments", "per_client_launches_per_minute")


@dataclass
class Console:
    """What the console keeps between requests: its sessions and its way to the logs."""

    sessions: Sessions
    logs: LogsRelay
    data: ConsoleData
    api_key: str = field(repr=False)
    """What a sign-in must present."""
    throttle: SignInThrottle = field(default_factory=SignInThrottle)
    """Wrong keys each client may present before its sign-ins are refused for a while."""

    @classmethod
    def create(cls, settings: Settings, deployer: Deployer) -> Console:
        # Per-client limits and the aggregator's token are read when this server's settings
        # have them; the console shows the limits as "not configured" otherwise.
        limits = {name: getattr(settings.deploy, name) for name in PER_CLIENT_SETTINGS}
        return cls(
            sessions=Sessions(deployer),
            logs=LogsRelay(url=settings.logging.url, token=settings.logging.token),
            data=ConsoleData(deployer, limits),
            api_key=settings.api_key,
        )

    async def aclose(self) -> None:
        await self.logs.aclose()


def _console(request: Request) -> Console:
    console: Console = request.state.console
    return console


def _data(request: Request) -> ConsoleData:
    return _console(request).data


async def _session(request: Request, *, changes_state: bool = False) -> Console:
    console = _console(request)
    await require_session(request, console.sessions, changes_state=changes_state)
    return console


async def console_page(request: Request) -> Response:
    if await signed_in(request, _console(request).sessions):
        return page_response(request, "console", title="Operator console", script="console.js")
    return page_response(request, "login", title="Operator console: sign in", script="login.js")


async def sign_in(request: Request) -> Response:
    console = _console(request)
    if request.headers.get("x-binder-console") != "1":
        raise UnauthorizedError("console sign-in needs the x-binder-console header")
    caller: Caller = request.state.caller  # worked out at the edge
    console.throttle.check(caller.address)
    body = await read_json_object(request, MAX_BODY)
    key = body.get("key")
    if not isinstance(key, str):
        raise MalformedRequestError("key: required, a string")
    if not key_matches(key, console.api_key):
        console.throttle.failed(caller.address)
        raise UnauthorizedError("wrong API key")
    response = JSONResponse({"signed-in": True})
    token = await console.sessions.create()
    set_session_cookie(response, token, secure=request.url.scheme == "https")
    return response


async def sign_out(request: Request) -> Response:
    console = await _session(request, changes_state=True)
    await console.sessions.end(request.cookies.get(COOKIE))
    response = JSONResponse({"signed-in": False})
    clear_session_cookie(response, secure=request.url.scheme == "https")
    return response


async def overview(request: Request) -> Response:
    await _session(request)
    return _json(await _data(request).overview())


async def deployments(request: Request) -> Response:
    await _session(request)
    query = page_query(dict(request.query_params))
    return _json(await _data(request).page(query))


async def delete_deployment(request: Request) -> Response:
    await _session(request, changes_state=True)
    deployer: Deployer = request.state.deployer
    dep = await deployer.delete(
        request.path_params["template"],
        request.path_params["id"],
        reason="deleted from the console",
    )
    _data(request).forget()
    return _json(dep.to_api())


async def resize_pool(request: Request) -> Response:
    await _session(request, changes_state=True)
    body = await read_json_object(request, MAX_BODY)
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1000:
        raise MalformedRequestError("size: must be an integer from 0 to 1000")
    deployer: Deployer = request.state.deployer
    return _json(await deployer.resize_pool(request.path_params["template"], size))


def _app(request: Request) -> str:
    return check_id(request.query_params.get("app", ""))


async def logs(request: Request) -> Response:
    console = await _session(request)
    return _json(await console.logs.recent(_app(request)))


async def logs_stream(request: Request) -> Response:
    console = await _session(request)
    return await console.logs.stream(_app(request))


def _json(data: Any) -> JSONResponse:
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


CONSOLE_ROUTES = [
    Route("/console", console_page, methods=["GET"]),
    Route("/console/session", sign_in, methods=["POST"]),
    Route("/console/session", sign_out, methods=["DELETE"]),
    Route("/console/api/overview", overview, methods=["GET"]),
    Route("/console/api/deployments", deployments, methods=["GET"]),
    Route("/console/api/deployments/{template}/{id}", delete_deployment, methods=["DELETE"]),
    Route("/console/api/pools/{template}", resize_pool, methods=["PUT"]),
    Route("/console/api/logs", logs, methods=["GET"]),
    Route("/console/api/logs/stream", logs_stream, methods=["GET"]),
]
