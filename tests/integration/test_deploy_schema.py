"""Schemathesis over the server's own /openapi.json: no 5xx, every answer fits the document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from harness import DeployServer

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


def test_schemathesis_finds_no_server_error_or_schema_break(
    deploy: DeployServer, tmp_path: Path
) -> None:
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
