"""The suite's web pages: ``GET /`` (templates, launch buttons, badge snippets) and
``GET /launch/{template}`` (launch, live progress, land on the app). Pages are plain HTML from
``web/`` with their scripts and styles served from ``/static``; nothing comes from another host."""

from __future__ import annotations

from html import escape
from pathlib import Path
from string import Template as Text

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Template
from services.deploy_kubernetes.service import Service

WEB = Path(__file__).resolve().parent / "web"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def render(page: str, **values: str) -> str:
    """``web/<page>.html`` with ``$values`` filled in (callers escape what they pass)."""
    return Text((WEB / f"{page}.html").read_text()).substitute(values)


def page_response(
    request: Request,
    body_name: str,
    *,
    title: str,
    script: str = "",
    status_code: int = 200,
    **values: str,
) -> Response:
    """A whole page: the layout around ``web/<body_name>.html``, with its script."""
    body = render(body_name, **values)
    tag = f'<script src="/static/{script}" defer></script>' if script else ""
    document = render("layout", title=escape(title), body=body, script=tag)
    headers = {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
    return HTMLResponse(document, status_code=status_code, headers=headers)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def template_card(template: Template, base: str) -> str:
    name = template.name
    launch = f"{base}/launch/{name}"
    badge = f"{base}/badge/{name}.svg"
    markdown = f"[![launch {name}]({badge})]({launch})"
    html = f'<a href="{launch}"><img src="{badge}" alt="launch {name}"></a>'
    return render(
        "card",
        name=escape(name),
        id=escape(name.replace(".", "-")),
        launch=escape(f"/launch/{name}"),
        badge=escape(f"/badge/{name}.svg"),
        image=escape(template.image_source or template.image_name or "-"),
        markdown=escape(markdown),
        html=escape(html),
    )


async def home(request: Request) -> Response:
    service: Service = request.state.service
    templates = sorted(service.catalog.all(), key=lambda t: t.name)
    base = _base(request)
    cards = "\n".join(template_card(t, base) for t in templates)
    if not cards:
        cards = '<p class="empty">No templates are registered yet.</p>'
    return page_response(request, "home", title="Binder", script="home.js", cards=cards)


async def launch_page(request: Request) -> Response:
    service: Service = request.state.service
    name = request.path_params["template"]
    try:
        template = service.catalog.get(name)
    except BinderError as exc:
        return page_response(
            request,
            "missing",
            title="No such template",
            status_code=404,
            message=escape(exc.message),
        )
    return page_response(
        request,
        "launch",
        title=f"Launching {template.name}",
        script="launch.js",
        template=escape(template.name),
    )


PAGE_ROUTES = [
    Route("/", home, methods=["GET"]),
    Route("/launch/{template}", launch_page, methods=["GET"]),
    Mount("/static", app=StaticFiles(directory=WEB / "static"), name="static"),
]
