"""Error names for Binder's original client (npm ``binder-client`` 1.0.3), which must work unchanged.

That client looks an error's ``type`` up among the names its protocol package
(``binder-protocol`` 1.2) lists for the endpoint it called, and prints the server's ``error``
when it finds it; any other name it prints as "An unidentifiable error occured: <body>". It
reads no other field. For an unknown template it knows ``registryError`` ("Could not fetch
template with name ... from registry") on ``deploy`` and ``preload``; this API's contract names
the same error ``noTemplate`` (404) for every client.

Both hold because the name is chosen per caller: a request the original client made (through
node's ``request`` library: ``Accept: application/json`` and no ``User-Agent``, which browsers,
curl, httpx, requests and node's own ``fetch`` all send) gets the client's name where it knows one
for that endpoint; every other request gets the contract's. The status and the message stay the
same. Where the client knows no name that fits (``noTemplate`` on ``statusAll``, ``capacity``,
``rateLimited``), it gets the contract's name, and prints the body as it always did.

Exit condition: delete this when the original client is no longer to be supported unchanged.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from common.web import binder_error_handler, error_response
from services.deploy_kubernetes.errors import BinderError

NAMES: dict[tuple[str, str], str] = {
    ("launch", "noTemplate"): "registryError",  # binder-protocol's deploy.deploy
    ("preload", "noTemplate"): "registryError",  # binder-protocol's deploy._preload
}
"""(the route's endpoint, this API's error type) -> the name the original client knows there."""


def from_original_client(request: Request) -> bool:
    """Whether ``request`` looks like the original client's (node's ``request`` library with
    ``json: true``): ``Accept: application/json`` and no ``User-Agent`` at all."""
    headers = request.headers
    return "user-agent" not in headers and headers.get("accept") == "application/json"


def client_name(request: Request, type_: str) -> str:
    """The error type to answer ``request`` with: the original client's name for it at this
    endpoint when the request is the original client's and it knows one, else ``type_``."""
    endpoint = getattr(request.scope.get("endpoint"), "__name__", "")
    known = NAMES.get((endpoint, type_))
    return known if known is not None and from_original_client(request) else type_


async def error_handler(request: Request, exc: Exception) -> Response:
    """The suite's ``BinderError`` handler, with the original client's names where they differ."""
    assert isinstance(exc, BinderError)
    name = client_name(request, exc.type)
    if name == exc.type:
        return await binder_error_handler(request, exc)
    return error_response(exc.status_code, name, exc.message, exc.headers)
