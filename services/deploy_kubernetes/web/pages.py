"""The suite's web pages: ``GET /`` (templates, launch buttons, badge snippets) and
``GET /launch/{template}`` (launch, live progress and the app's output, land on the app). Pages
are plain HTML from ``templates/`` with their scripts and styles served from ``static/`` at
``/static``; nothing comes from another host. Absolute links (the badge snippets) are made from the
public address (``[proxy] public_url``), never from the request's ``Host``."""

from __future__ import annotations

from html import escape
from pathlib import Path
from string import Template as Text

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.deploy_kubernetes.engine.deployer import Deployer
from services.deploy_kubernetes.errors import BinderError
from services.deploy_kubernetes.models import Template, parse_urlpath

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def render(page: str, **values: str) -> str:
    """``templates/<page>.html`` with ``$values`` filled in (callers escape what they pass)."""
    return Text((TEMPLATES / f"{page}.html").read_text()).substitute(values)


def page_response(
    request: Request,
    body_name: str,
    *,
    title: str,
    script: str = "",
    status_code: int = 200,
    **values: str,
) -> Response:
    """A whole page: the layout around ``templates/<body_name>.html``, with its script."""
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


def template_card(template: Template, base: str) -> str:
    """A template's card; ``base`` is the public address its badge snippets link to (``home.js``
    adds a path to open, typed in the card, to the snippets and the badge's link)."""
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
        public_launch=escape(launch),
        public_badge=escape(badge),
        badge=escape(f"/badge/{name}.svg"),
        image=escape(template.image_source or template.image_name or "-"),
        markdown=escape(markdown),
        html=escape(html),
    )


async def home(request: Request) -> Response:
    deployer: Deployer = request.state.deployer
    templates = sorted(deployer.templates(), key=lambda t: t.name)
    cards = "\n".join(template_card(t, deployer.public_url) for t in templates)
    if not cards:
        cards = '<p class="empty">No templates are registered yet.</p>'
    return page_response(request, "home", title="Binder", script="home.js", cards=cards)


async def launch_page(request: Request) -> Response:
    deployer: Deployer = request.state.deployer
    name = request.path_params["template"]
    try:
        template = deployer.template(name)
    except BinderError as exc:
        return page_response(
            request,
            "missing",
            title="No such template",
            heading="No such template",
            status_code=404,
            message=escape(exc.message),
        )
    try:
        urlpath = parse_urlpath(request.query_params.get("urlpath", ""))
    except BinderError as exc:
        return page_response(
            request,
            "missing",
            title="Not a path to open",
            heading="Not a path to open",
            status_code=422,
            message=escape(f"This launch link asks to open a path it cannot: {exc.message}"),
        )
    return page_response(
        request,
        "launch",
        title=f"Launching {template.name}",
        script="launch.js",
        template=escape(template.name),
        urlpath=escape(urlpath),
    )


PAGE_ROUTES = [
    Route("/", home, methods=["GET"]),
    Route("/launch/{template}", launch_page, methods=["GET"]),
    Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
]
