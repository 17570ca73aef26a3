"""``GET /ended/{id}``: what a request for a session that is gone gets, in words: what ended it and
when (deleted, culled after N min idle, reached its maximum age, failed and why), with a button to
launch its template again. The proxy sends such requests here: a ``/user/<id>/...`` path without a
route reaches the deploy server as the proxy's default target (:func:`gone_user_path`), and a route
whose app does not answer gets the proxy's error target, ``/ended/503?url=<path>``. Requests that
ask for JSON (``Accept: application/json``, as API clients do) get it.

Every link is made from the public address (``[proxy] public_url``), never from the request's
``Host``: through the proxy's error target the request this page answers is not the user's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.deploy_kubernetes.engine.culler import AGE_CULL, IDLE_CULL
from services.deploy_kubernetes.engine.deployer import Deployer
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Deployment, Status, iso
from services.deploy_kubernetes.web.pages import page_response

USER_PATH_RE = re.compile(r"^/user/([0-9a-f]{32})(?:/|\Z)")
CODE_RE = re.compile(r"^[0-9]{3}\Z")


@dataclass(frozen=True)
class Ending:
    """How a session ended, in the page's words and for JSON."""

    kind: str
    """``deleted`` | ``culled`` | ``max-age`` | ``failed`` | ``stopped`` | ``running`` | ``unknown``."""
    title: str
    text: str


def ending(dep: Deployment | None, *, max_age_seconds: float, not_answering: bool) -> Ending:
    """What to tell of session ``dep`` (None: never known here). Pure, tested on its own."""
    if dep is None:
        return Ending("unknown", "No such session", "No session with this address is known here.")
    when = _when(dep)
    reason = dep.reason or ""
    if dep.status is Status.FAILED:
        return Ending("failed", "This session has ended", f"It failed{when}: {reason}")
    if dep.status is Status.DELETED:
        if reason.startswith(IDLE_CULL):
            minutes = dep.cull_timeout_ms / 60000
            text = f"It was culled after {minutes:g} min idle{when}."
            return Ending("culled", "This session has ended", text)
        if reason.startswith(AGE_CULL):
            hours = max_age_seconds / 3600
            text = f"It reached its maximum age of {hours:g} h{when}."
            return Ending("max-age", "This session has ended", text)
        if reason == "stopped with the suite":
            return Ending("stopped", "This session has ended", f"The service was stopped{when}.")
        return Ending("deleted", "This session has ended", f"It was deleted{when} ({reason}).")
    if not_answering:
        text = "Its app does not answer right now. Reload in a moment, or launch a new one."
        return Ending("running", "This session is not answering", text)
    text = "It has not ended, but its address is not served right now. Reload in a moment."
    return Ending("running", "This session is still running", text)


def _when(dep: Deployment) -> str:
    if dep.ended_at is None:
        return ""
    return f" at {dep.ended_at.strftime('%Y-%m-%d %H:%M')} UTC"


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _launch_link(deployer: Deployer, dep: Deployment) -> str | None:
    """The launch page of ``dep``'s template (with its ``urlpath``), if the template is still
    there."""
    try:
        deployer.template(dep.template)
    except BinderError:
        return None
    link = f"{deployer.public_url}/launch/{quote(dep.template, safe='')}"
    return link + (f"?urlpath={quote(dep.urlpath, safe='')}" if dep.urlpath else "")


async def _answer(request: Request, dep_id: str | None, *, not_answering: bool) -> Response:
    deployer: Deployer = request.state.deployer
    dep = await deployer.session(dep_id) if dep_id else None
    told = ending(dep, max_age_seconds=deployer.max_age_seconds, not_answering=not_answering)
    launch = _launch_link(deployer, dep) if dep is not None else None
    headers = {"Cache-Control": "no-store"}
    if _wants_json(request):
        body: dict[str, Any] = {"type": "ended", "error": f"{told.title}. {told.text}"}
        body.update({"ended-because": told.kind, "id": dep_id})
        if dep is not None:
            body.update({"template-name": dep.template, "status": dep.status.value})
            body.update({"ended": iso(dep.ended_at), "reason": dep.reason, "launch": launch})
        return JSONResponse(body, status_code=404, headers=headers)
    button = (
        f'<p><a class="button" href="{escape(launch)}">Launch {escape(dep.template)} again</a></p>'
        if launch is not None and dep is not None
        else ""
    )
    response = page_response(
        request,
        "ended",
        title=told.title,
        status_code=404,
        heading=escape(told.title),
        text=escape(told.text),
        kind=escape(told.kind),
        button=button,
        home=escape(deployer.public_url + "/"),
    )
    response.headers.update(headers)
    return response


async def ended(request: Request) -> Response:
    """``/ended/{id}``, and ``/ended/<code>?url=<path>`` as the proxy's error target asks."""
    key = request.path_params["id"]
    if CODE_RE.match(key):
        found = USER_PATH_RE.match(request.query_params.get("url", ""))
        return await _answer(request, found.group(1) if found else None, not_answering=key != "404")
    return await _answer(request, key, not_answering=False)


async def gone_user_path(request: Request) -> Response:
    """A ``/user/<id>/...`` request that the proxy had no route for (its default target)."""
    found = USER_PATH_RE.match(request.url.path)
    return await _answer(request, found.group(1) if found else None, not_answering=False)


ENDED_ROUTES = [
    Route("/ended/{id}", ended, methods=["GET"]),
    Route("/user/{rest:path}", gone_user_path),
]
