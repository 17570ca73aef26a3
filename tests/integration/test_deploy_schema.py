"""Schemathesis over the server's own /openapi.json: no 5xx, every answer fits the document."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from harness import ROOT, DeployServer, wait_for

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_openapi_document_describes_every_route(deploy: DeployServer) -> None:
    doc = httpx.get(f"{deploy.url}/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/applications/",
        "/applications/{template}",
        "/applications/{template}/{id}",
        "/applications/{template}/{id}/events",
        "/preload/{template}",
        "/templates",
        "/templates/{name}",
        "/pools/{template}",
        "/health",
        "/metrics",
    } <= paths


def test_health_schema_describes_every_field_health_answers(deploy: DeployServer) -> None:
    schema = httpx.get(f"{deploy.url}/openapi.json").json()["components"]["schemas"]["Health"]
    wait_for(lambda: httpx.get(f"{deploy.url}/health").status_code == 200, what="ready")
    answer = httpx.get(f"{deploy.url}/health").json()
    assert set(schema["required"]) <= set(answer)
    loops = schema.get("additionalProperties")  # the loops' fields, loop:<name>
    for field, value in answer.items():
        described = schema["properties"].get(field) or (
            loops if field.startswith("loop:") else None
        )
        assert isinstance(described, dict), f"/health answers {field!r}, its schema lacks it"
        assert described["type"] == "string", field
        assert isinstance(value, str), field
        assert value in described.get("enum", [value]), field
    assert any(field.startswith("loop:") for field in answer)  # the loops' fields are checked


def test_schemathesis_finds_no_server_error_or_schema_break(
    deploy_factory: Callable[..., DeployServer], tmp_path: Path
) -> None:
    # the example template alone: the fuzzer launches every template it finds, dozens of times,
    # and as many JupyterLabs starting at once would starve two cores (its answers then time out)
    templates = tmp_path / "templates"
    templates.mkdir()
    shutil.copy(ROOT / "configs" / "templates" / "example.toml", templates)
    deploy = deploy_factory(templates_dir=str(templates)).start()
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [
            str(st),
            "run",
            f"{deploy.url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--header",
            f"Authorization: {deploy.api_key}",
            "--request-timeout",
            "20",
            "--generation-database",
            "none",
            "--exclude-operation-id",
            "never",
            "--exclude-path",
            "/applications/{template}/{id}/events",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
