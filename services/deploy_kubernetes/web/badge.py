"""Launch badges for READMEs: ``GET /badge.svg`` ("launch | binder") and
``GET /badge/{template}.svg`` ("launch | <template>"), in the familiar flat two-part style."""

from __future__ import annotations

from html import escape

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.deploy_kubernetes.engine.deployer import Deployer

LABEL_COLOUR = "#555"
MESSAGE_COLOUR = "#579aca"
PADDING = 6
CACHE_SECONDS = 300
NARROW = set("fijlrt.,:;|!'I()[] ")
WIDE = set("mwMW@%")


def text_width(text: str) -> int:
    """An estimate of ``text``'s width in pixels in 11px Verdana (no font metrics at hand)."""
    total = 0.0
    for char in text:
        if char in NARROW:
            total += 3.8
        elif char in WIDE:
            total += 10.0
        elif char.isupper() or char.isdigit():
            total += 7.5
        else:
            total += 6.6
    return round(total)


def render_badge(*, label: str, message: str) -> str:
    """The badge as an SVG document, with its text as the accessible name."""
    left = text_width(label) + 2 * PADDING
    right = text_width(message) + 2 * PADDING
    width = left + right
    name = escape(f"{label}: {message}", quote=True)
    lab, msg = escape(label), escape(message)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
        f'aria-label="{name}">'
        f"<title>{name}</title>"
        '<linearGradient id="s" x2="0" y2="100%">'
        '<stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
        '<stop offset="1" stop-opacity=".1"/></linearGradient>'
        f'<clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/></clipPath>'
        '<g clip-path="url(#r)">'
        f'<rect width="{left}" height="20" fill="{LABEL_COLOUR}"/>'
        f'<rect x="{left}" width="{right}" height="20" fill="{MESSAGE_COLOUR}"/>'
        f'<rect width="{width}" height="20" fill="url(#s)"/></g>'
        '<g fill="#fff" text-anchor="middle" '
        'font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">'
        f'<text x="{left / 2}" y="15" fill="#010101" fill-opacity=".3">{lab}</text>'
        f'<text x="{left / 2}" y="14">{lab}</text>'
        f'<text x="{left + right / 2}" y="15" fill="#010101" fill-opacity=".3">{msg}</text>'
        f'<text x="{left + right / 2}" y="14">{msg}</text>'
        "</g></svg>"
    )


def _svg(body: str) -> Response:
    return Response(
        body,
        media_type="image/svg+xml",
        headers={"Cache-Control": f"public, max-age={CACHE_SECONDS}"},
    )


async def badge(request: Request) -> Response:
    return _svg(render_badge(label="launch", message="binder"))


async def template_badge(request: Request) -> Response:
    deployer: Deployer = request.state.deployer
    template = deployer.template(request.path_params["template"])  # 404 when unknown
    return _svg(render_badge(label="launch", message=template.name))


BADGE_ROUTES = [
    Route("/badge.svg", badge, methods=["GET"]),
    Route("/badge/{template}.svg", template_badge, methods=["GET"]),
]
