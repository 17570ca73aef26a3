"""The deploy API's OpenAPI document, kept beside the routes it describes; the web front end's
paths (:mod:`services.deploy_kubernetes.web.openapi_pages`) are merged in by the app."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
STATUS = {"type": "string", "enum": ["deploying", "deployed", "failed", "deleted"]}
DEPENDENCY = (
    "ok, unknown (not looked at yet), or why not: its error, 'no answer within N s', or "
    "'stale: no answer in time'"
)
CULL = {
    "type": "integer",
    "minimum": 1000,
    "maximum": 2592000000,
    "description": "Inactivity in milliseconds after which the app is culled",
}
RELATIVE_TEXT = (
    "A path below the app's base URL: relative (no scheme, no leading '/'), no '..' segment, "
    "no backslash, no control character"
)
RELATIVE = {"type": "string", "maxLength": 1024, "description": RELATIVE_TEXT}
URLPATH = {
    **RELATIVE,
    "description": f"What `url` opens below the app's base URL (lab/tree/a.ipynb). {RELATIVE_TEXT}",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        403: "Missing or wrong API key",
        404: "Unknown template or id",
        413: "Body too large",
        422: "Malformed request (the error names the field)",
        429: "Capacity reached (type capacity), or this client over its own limits (type "
        "rateLimited: per_client_max_deployments, per_client_launches_per_minute, "
        "per_client_event_streams, or per_client_max_connections on any path); see Retry-After",
        431: "Request headers too large or too many",
        502: "The image's last pull failed (type launchFailed; the error says why): POST again "
        "to retry",
        503: "Database, proxy or backend unreachable (badDatabase, badProxy, badBackend), or "
        "the server still starting (notReady, with Retry-After)",
    }
    out = {str(c): _json(_ref("Error"), text[c]) for c in codes}
    if 429 in codes:
        out["429"]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return out


def _param(name: str, schema: dict[str, Any], where: str = "path") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


PAGE = [
    _param("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}, "query"),
    _param("cursor", {"type": "string", "pattern": "^e[0-9]{1,18}$"}, "query"),
]
"""A list's window: at most ``limit`` (default 1000); older ended ones from ``cursor`` (as the
``Link`` header of the page before names it)."""


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    errors: tuple[int, ...] = (),
    auth: bool = False,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_required: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*errors, 431)}}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": body}},
        }
    if auth:
        op["security"] = [{"apiKey": []}]
    return op


TPL = _param("template", NAME)
DEP = _param("id", ID)


def openapi_document(extra_paths: dict[str, Any]) -> dict[str, Any]:
    """The document, with ``extra_paths`` (the web pages') after the API's own."""
    deployment = _json(_ref("Deployment"), "The deployment")
    listed = _json(
        {"type": "array", "items": _ref("Deployment")},
        "Deployments, oldest first; a Link header (rel=next) names the page of older ones",
    )
    listed["headers"] = {"Link": {"schema": {"type": "string"}}}
    launched = _json(
        _ref("Deployment"),
        "Accepted: the new deployment, `deploying` while its launch goes on in the background "
        "(follow it on its events stream), or, taken from the template's pool, `deployed` "
        "already with its `location` and `url`",
    )
    launch_errors = (404, 413, 422, 429, 503)
    template = _json(_ref("Template"), "The template")
    pool = _json(_ref("Pool"), "The template's pool")
    preload = _json(
        {
            "type": "object",
            "properties": {
                "template-name": NAME,
                "status": {"type": "string", "enum": ["loading", "completed"]},
            },
        },
        "Preload state",
    )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Binder deploy API",
            "version": "1.0.0",
            "description": "Launch templates, poll their status and location, stop them.",
        },
        "paths": {
            "/applications/": {
                "post": _op(
                    "Launch a template named in the body",
                    launched,
                    errors=launch_errors,
                    body=_ref("LaunchByName"),
                    body_required=True,
                ),
                "get": _op(
                    "All deployments: the active ones and the newest ended ones",
                    listed,
                    errors=(403, 422, 503),
                    auth=True,
                    params=[_param("status", STATUS, "query"), *PAGE],
                ),
            },
            "/applications/{template}": {
                "post": _op(
                    "Launch a template",
                    launched,
                    errors=launch_errors,
                    params=[TPL],
                    body=_ref("Launch"),
                ),
                "get": _op(
                    "Deployments of a template: the active ones and the newest ended ones",
                    listed,
                    errors=(403, 404, 422, 503),
                    auth=True,
                    params=[TPL, _param("status", STATUS, "query"), *PAGE],
                ),
            },
            "/applications/{template}/{id}": {
                "get": _op("One deployment", deployment, errors=(404, 422, 503), params=[TPL, DEP]),
                "delete": _op(
                    "Stop a deployment",
                    deployment,
                    errors=(403, 404, 422, 503),
                    auth=True,
                    params=[TPL, DEP],
                ),
            },
            "/applications/{template}/{id}/events": {
                "get": {
                    "summary": "Server-sent events of each status change until a final one",
                    "description": (
                        "Each status change is an `event: status` whose data is the deployment "
                        "record (as GET answers it), the first one being its status now. While it "
                        "deploys, a backend that sees its object's progress (on kubernetes the "
                        "Pod's events: Scheduled, Pulling, Pulled, Started, readiness) "
                        'also sends `event: progress` with data `{"message": "<reason>: <text>"}` '
                        "(a watcher arriving mid-launch gets the last few first). With "
                        "`?output=1`, while it deploys, `event: output` with data "
                        '`{"lines": [...]}` carries the app\'s last lines of output whenever '
                        "they change. The stream ends after a final status (failed, deleted), "
                        "so it goes on while the app runs; comments keep it alive."
                    ),
                    "parameters": [
                        TPL,
                        DEP,
                        _param("output", {"type": "string", "enum": ["0", "1"]}, "query"),
                    ],
                    "responses": {
                        "200": {
                            "description": "Event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(404, 422, 429, 503),
                    },
                },
            },
            "/preload/{template}": {
                "post": _op(
                    "Pre-pull the template's image everywhere",
                    preload,
                    errors=(403, 404, 422, 503),
                    auth=True,
                    params=[TPL],
                ),
                "get": _op(
                    "Preload state",
                    preload,
                    errors=(403, 404, 422, 502, 503),
                    auth=True,
                    params=[TPL],
                ),
            },
            "/templates": {
                "get": _op(
                    "Registered templates",
                    _json({"type": "array", "items": _ref("Template")}, "Templates"),
                )
            },
            "/templates/{name}": {
                "get": _op(
                    "One template", template, errors=(404, 422), params=[_param("name", NAME)]
                ),
                "put": _op(
                    "Register a template",
                    template,
                    errors=(403, 413, 422, 503),
                    auth=True,
                    params=[_param("name", NAME)],
                    body=_ref("TemplateIn"),
                    body_required=True,
                ),
                "delete": _op(
                    "Remove a template",
                    _json({"type": "object"}, "Removed"),
                    errors=(403, 404, 422, 503),
                    auth=True,
                    params=[_param("name", NAME)],
                ),
            },
            "/pools/{template}": {
                "get": _op(
                    "Pool state", pool, errors=(403, 404, 422, 503), auth=True, params=[TPL]
                ),
                "put": _op(
                    "Resize the pool",
                    pool,
                    errors=(403, 404, 413, 422, 503),
                    auth=True,
                    params=[TPL],
                    body={
                        "type": "object",
                        "required": ["size"],
                        "properties": {"size": {"type": "integer", "minimum": 0, "maximum": 1000}},
                        "additionalProperties": False,
                    },
                    body_required=True,
                ),
            },
            "/health": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": _json(_ref("Health"), "Ready"),
                        "503": _json(_ref("Health"), "Not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {"get": _op("This document", _json({"type": "object"}, "OpenAPI"))},
            **extra_paths,
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "The raw key, or 'Bearer K', or 'token K'",
                }
            },
            "schemas": SCHEMAS,
        },
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {"type": {"type": "string"}, "error": {"type": "string"}},
    },
    "Launch": {
        "type": "object",
        "properties": {"cull-timeout": CULL, "urlpath": URLPATH},
        "additionalProperties": False,
    },
    "LaunchByName": {
        "type": "object",
        "required": ["template-name"],
        "additionalProperties": False,
        "properties": {"template-name": NAME, "cull-timeout": CULL, "urlpath": URLPATH},
    },
    "Deployment": {
        "type": "object",
        "required": ["id", "template-name", "status", "created"],
        "properties": {
            "id": ID,
            "template-name": NAME,
            "status": STATUS,
            "location": {
                "type": "string",
                "description": "<public host>/user/<id>, no scheme; absent once it has ended",
            },
            "url": {
                "type": "string",
                "description": "Where users open it: <public_url>/user/<id>/<urlpath>, with "
                "?token=<the launch's secret> where the template takes {token} (the token only "
                "in the answers of the launch, the status and the events of that id); absent "
                "once ended",
            },
            "reason": {"type": "string"},
            "created": {"type": "string", "format": "date-time"},
            "last-activity": {"type": "string", "format": "date-time"},
        },
    },
    "TemplateIn": {
        "type": "object",
        "required": ["command"],
        "additionalProperties": False,
        "properties": {
            "name": NAME,
            "image-name": {"type": "string"},
            "image-source": {"type": "string"},
            "command": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "env": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
            },
            "limits": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"memory": {"type": "string"}, "cpu": {"type": "string"}},
            },
            "cull-timeout": CULL,
            "pool-size": {"type": "integer", "minimum": 0, "maximum": 1000},
            "max-deployments": {"type": "integer", "minimum": 1, "maximum": 100000},
            "ready-path": RELATIVE,
            "activity-path": RELATIVE,
        },
    },
    "Template": {
        "type": "object",
        "required": ["name", "command", "port"],
        "properties": {
            "name": NAME,
            "command": {"type": "array", "items": {"type": "string"}},
            "port": {"type": "integer"},
            "image-name": {"type": "string"},
            "image-source": {"type": "string"},
            "env": {
                "type": "object",
                "description": "Only shown to requests carrying the API key",
            },
            "limits": {"type": "object"},
            "cull-timeout": {"type": "integer"},
            "pool-size": {"type": "integer"},
            "max-deployments": {"type": "integer"},
            "ready-path": {"type": "string"},
            "activity-path": {"type": "string"},
        },
    },
    "Pool": {
        "type": "object",
        "properties": {
            "template-name": NAME,
            "size": {"type": "integer"},
            "ready": {"type": "integer"},
            "starting": {"type": "integer"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "database", "proxy", "backend", "reconciled"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "database": {"type": "string", "description": DEPENDENCY},
            "proxy": {"type": "string", "description": DEPENDENCY},
            "backend": {"type": "string", "description": DEPENDENCY},
            "reconciled": {
                "type": "string",
                "enum": ["ok", "pending"],
                "description": "Whether the start-up reconcile of the records has finished",
            },
        },
        "additionalProperties": {
            "type": "string",
            "description": "One field per critical background loop, named loop:<name> "
            "(loop:keeper, loop:culler, loop:pools, loop:backend:<name>): ok, or "
            "'restarting after <error>'",
        },
    },
}
