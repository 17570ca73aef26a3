"""The paths and links a deployment is reached by: the relative paths a template or a launch names
(``ready-path``, ``activity-path``, ``urlpath``), checked once at the edge, and the ``url`` users
open, made from the public address, the deployment's base URL, its ``urlpath`` and its token."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from services.deploy_kubernetes.errors import MalformedRequestError

MAX_PATH = 1024
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
SAFE = "/:@!$&'()*+,;=-._~%?#"
"""Characters of a relative URL kept as they are; anything else (a space, a non-ASCII letter) is
percent-encoded."""


def check_relative_path(value: object, field: str) -> str:
    """``value`` when it is a relative URL path below a deployment's base URL (query and fragment
    allowed): no scheme, no leading ``/``, no ``..`` segment (percent-encoded or not), no
    backslash, no control character; ``MalformedRequestError`` naming ``field`` otherwise."""
    if not isinstance(value, str):
        raise MalformedRequestError(f"{field}: must be a string")
    problem = _problem(value)
    if problem:
        raise MalformedRequestError(f"{field}: {problem}")
    return quote(value, safe=SAFE)


def _problem(value: str) -> str | None:
    if len(value) > MAX_PATH:
        return f"must be at most {MAX_PATH} characters"
    decoded = unquote(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in value + decoded):
        return "must not contain control characters"
    if "\\" in value + decoded:
        return "must not contain a backslash"
    if value.startswith("/") or SCHEME_RE.match(value):
        return "must be a relative path (no scheme, no leading '/')"
    path = decoded.split("?", 1)[0].split("#", 1)[0]
    if ".." in path.split("/"):
        return "must not contain a '..' segment"
    return None


def app_url(base: str, urlpath: str = "", token: str | None = None) -> str:
    """``base`` (ending in ``/``) with ``urlpath`` below it and ``token`` in its query, before a
    fragment: what a user opens to land on the app, signed in."""
    path, hash_, fragment = urlpath.partition("#")
    url = base + path
    if token:
        url += ("&" if "?" in path else "?") + "token=" + quote(token, safe="")
    return url + hash_ + fragment
