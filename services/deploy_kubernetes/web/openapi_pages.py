"""The OpenAPI description of the web pages, badges and the operator console's calls (merged into
the deploy API's document by :mod:`openapi`). Static assets under ``/static`` are not listed."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
ERROR = {"$ref": "#/components/schemas/Error"}
TEXT = {"type": "string"}
CONSOLE_HEADER = {
    "name": "X-Binder-Console",
    "in": "header",
    "required": True,
    "description": "Must be 1; no cross-site form can send it",
    "schema": {"type": "string", "enum": ["1"]},
}
SESSION = {
    "description": "The console's session cookie (HttpOnly, set by POST /console/session)",
    "name": "binder_console",
    "in": "cookie",
    "required": False,
    "schema": {"type": "string"},
}


def _content(kind: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {kind: {"schema": schema}}}


def _html(description: str) -> dict[str, Any]:
    return _content("text/html", TEXT, description)


def _error(description: str) -> dict[str, Any]:
    return _content("application/json", ERROR, description)


def _object(description: str) -> dict[str, Any]:
    return _content("application/json", {"type": "object"}, description)


def _console_call(
    summary: str, *, params: list[dict[str, Any]] | None = None, changes: bool = False
) -> dict[str, Any]:
    responses = {
        "200": _object(summary),
        "403": _error("Not signed in to the console, or the X-Binder-Console header is missing"),
        "404": _error("Unknown template or id"),
        "422": _error("Malformed parameter (the error names it)"),
        "503": _error("Database, backend or log aggregator unreachable"),
    }
    all_params = [SESSION, *(params or []), *([CONSOLE_HEADER] if changes else [])]
    return {"summary": summary, "parameters": all_params, "responses": responses}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def page_paths() -> dict[str, Any]:
    template = _path("template", NAME)
    svg = _content("image/svg+xml", TEXT, "The badge")
    return {
        "/": {
            "get": {
                "summary": "Templates to launch, with badges",
                "responses": {"200": _html("Page")},
            }
        },
        "/launch/{template}": {
            "get": {
                "summary": "Launch a template and follow it to the app (in the browser)",
                "parameters": [template],
                "responses": {
                    "200": _html("The launch page"),
                    "404": {
                        "description": "No such template",
                        "content": {
                            "text/html": {"schema": TEXT},
                            "application/json": {"schema": ERROR},
                        },
                    },
                },
            }
        },
        "/ended/{id}": {
            "get": {
                "summary": "What a request for a session that is gone gets: what ended it and "
                "when, and a link to launch its template again (the proxy's error target asks "
                "/ended/<code>?url=<path>)",
                "parameters": [
                    _path("id", {"type": "string", "maxLength": 64}),
                    _query("url", {"type": "string", "maxLength": 1024}),
                ],
                "responses": {
                    "404": {
                        "description": "The session's end (or that none is known)",
                        "content": {
                            "text/html": {"schema": TEXT},
                            "application/json": {"schema": ERROR},
                        },
                    }
                },
            }
        },
        "/badge.svg": {"get": {"summary": "A launch badge", "responses": {"200": svg}}},
        "/badge/{template}.svg": {
            "get": {
                "summary": "The launch badge of a template",
                "parameters": [template],
                "responses": {
                    "200": svg,
                    "404": _error("No such template"),
                    "422": _error("Malformed template name"),
                },
            }
        },
        **console_paths(),
    }


def console_paths() -> dict[str, Any]:
    template = _path("template", NAME)
    deployments = [
        _query(
            "status", {"type": "string", "enum": ["deploying", "deployed", "failed", "deleted"]}
        ),
        _query("template", NAME),
        _query("q", {"type": "string", "maxLength": 100}),
        _query(
            "sort",
            {"type": "string", "enum": ["created", "status", "template", "last-activity", "id"]},
        ),
        _query("order", {"type": "string", "enum": ["asc", "desc"]}),
        _query("offset", {"type": "integer", "minimum": 0}),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
    ]
    key_body = {
        "type": "object",
        "required": ["key"],
        "properties": {"key": {"type": "string"}},
    }
    size_body = {
        "type": "object",
        "required": ["size"],
        "properties": {"size": {"type": "integer", "minimum": 0, "maximum": 1000}},
    }
    sign_in = _console_call("Sign in with the API key; sets the session cookie", changes=True)
    sign_in["parameters"] = [CONSOLE_HEADER]
    sign_in["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": key_body}},
    }
    sign_in["responses"]["413"] = _error("Body too large")
    sign_in["responses"]["429"] = _error(
        "Too many wrong keys from this client in the last minute; see Retry-After"
    )
    sign_in["responses"]["429"]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    resize = _console_call("Resize a template's pool", params=[template], changes=True)
    resize["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": size_body}},
    }
    resize["responses"]["413"] = _error("Body too large")
    stream = _console_call(
        "Live tail of a deployment's log lines", params=[_query("app", ID, True)]
    )
    stream["responses"]["200"] = _content("text/event-stream", TEXT, "Server-sent events")
    return {
        "/console": {
            "get": {
                "summary": "The operator console (a sign-in form without a session)",
                "parameters": [SESSION],
                "responses": {"200": _html("Page")},
            }
        },
        "/console/session": {
            "post": sign_in,
            "delete": _console_call("Sign out", changes=True),
        },
        "/console/api/overview": {
            "get": _console_call("Capacity, limits, templates and pools, failures, latency")
        },
        "/console/api/deployments": {
            "get": _console_call("One page of deployments, filtered and sorted", params=deployments)
        },
        "/console/api/deployments/{template}/{id}": {
            "delete": _console_call(
                "Stop a deployment", params=[template, _path("id", ID)], changes=True
            )
        },
        "/console/api/pools/{template}": {"put": resize},
        "/console/api/logs": {
            "get": _console_call(
                "A deployment's recent log lines", params=[_query("app", ID, True)]
            )
        },
        "/console/api/logs/stream": {"get": stream},
    }
