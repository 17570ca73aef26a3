"""The suite's services as control sees them: a command, an environment, ports, a readiness check.

Control never imports the services: it knows them as commands and health URLs only.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ORDER = ("db", "logging", "proxy", "deploy-kubernetes")


@dataclass(frozen=True)
class Service:
    """One supervised program."""

    name: str
    command: tuple[str, ...]
    ports: tuple[tuple[str, int], ...]
    """(address, port) pairs it listens on; checked free before it starts."""
    ready_url: str = ""
    """HTTP URL answering 200 once ready (empty: a MongoDB ``ping`` on the first port)."""
    ready_headers_secret: str = ""
    """Name of the secret sent as ``Authorization: token`` with the readiness request."""
    secrets: tuple[str, ...] = ()
    """Names of the secrets (``BINDER_API_KEY`` ...) this service gets in its environment."""
    env: dict[str, str] = field(default_factory=dict)
    stop_seconds: int = 10


def _python() -> str:
    return str(VENV_BIN / "python")


def embedded_db(settings: Settings) -> bool:
    """Whether the ``db`` program is the embedded server (which the suite provisions with its
    credentials and runs with authentication required)."""
    return not settings.db.uri and not settings.db.command and shutil.which("mongod") is None


def db_command(settings: Settings) -> tuple[str, ...]:
    """``mongod`` when configured or on PATH, else the embedded wire-compatible server."""
    if settings.db.command:
        return (*shlex.split(settings.db.command), "--port", str(settings.db.port))
    data = str(settings.home / "db")
    mongod = shutil.which("mongod")
    if mongod:
        return (
            mongod,
            "--bind_ip",
            settings.db.host,
            "--port",
            str(settings.db.port),
            "--dbpath",
            data,
        )
    return (
        _python(),
        "-m",
        "services.embedded_db",
        "--host",
        settings.db.host,
        "--port",
        str(settings.db.port),
        "--storage-path",
        data,
        "--auth",
    )


def _digest(settings: Settings, *sections: str) -> dict[str, str]:
    """A digest of the config sections a service reads, put in its environment so that its
    supervisord section changes (and only it restarts) when one of them changes."""
    parts = [repr(getattr(settings, name)) for name in sections]
    return {"BINDER_CONFIG_DIGEST": hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]}


def declare(settings: Settings, effective_config: Path) -> list[Service]:
    """Every service the suite runs with these settings, in start order."""
    config = ("--config", str(effective_config), "--home", str(settings.home))
    chp = ROOT / ".node" / "node_modules" / ".bin" / "configurable-http-proxy"
    out = []
    if not settings.db.uri:
        out.append(
            Service(
                "db",
                db_command(settings),
                ((settings.db.host, settings.db.port),),
                secrets=("BINDER_DB_URI",) if embedded_db(settings) else (),
                stop_seconds=15,
            )
        )
    out.append(
        Service(
            "logging",
            (_python(), "-m", "services.logging", *config),
            ((settings.logging.host, settings.logging.port),),
            ready_url=f"{settings.logging.url}/health",
            secrets=("BINDER_DB_URI", "BINDER_LOGGING_TOKEN"),
            env=_digest(settings, "db", "logging"),
        )
    )
    p = settings.proxy
    out.append(
        Service(
            "proxy",
            (
                str(chp),
                "--ip",
                p.ip,
                "--port",
                str(p.port),
                "--api-ip",
                p.api_ip,
                "--api-port",
                str(p.api_port),
                # warn: keeps 4xx/5xx answers and proxy errors, drops a line per API request
                # (the keeper's route checks) and per route change (the deploy server logs those)
                "--log-level",
                "warn",
            ),
            ((p.ip, p.port), (p.api_ip, p.api_port)),
            ready_url=f"{p.api_url}/api/routes",
            ready_headers_secret="CONFIGPROXY_AUTH_TOKEN",
            secrets=("CONFIGPROXY_AUTH_TOKEN",),
        )
    )
    d = settings.deploy
    host = "127.0.0.1" if d.host in ("0.0.0.0", "") else d.host
    out.append(
        Service(
            "deploy-kubernetes",
            (_python(), "-m", "services.deploy_kubernetes", *config),
            ((d.host, d.port),),
            ready_url=f"http://{host}:{d.port}/health",
            secrets=(
                "BINDER_API_KEY",
                "CONFIGPROXY_AUTH_TOKEN",
                "BINDER_DB_URI",
                "BINDER_LOGGING_TOKEN",
            ),
            env=_digest(settings, "db", "proxy", "logging", "deploy"),
        )
    )
    return out


def port_in_use(address: str, port: int) -> bool:
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def _bson_ping() -> bytes:
    def cstring(s: str) -> bytes:
        return s.encode() + b"\x00"

    body = b"\x10" + cstring("ping") + struct.pack("<i", 1) + b"\x02" + cstring("$db")
    body += struct.pack("<i", len("admin") + 1) + cstring("admin")
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def mongo_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """A MongoDB ``ping`` over the wire protocol (OP_MSG), answered ``ok: 1``."""
    doc = _bson_ping()
    payload = struct.pack("<I", 0) + b"\x00" + doc
    header = struct.pack("<iiii", 16 + len(payload), 1, 0, 2013)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(header + payload)
            reply = sock.recv(4096)
    except OSError:
        return False
    return (
        len(reply) > 21
        and b"ok\x00" in reply
        and (
            b"\x01ok\x00\x00\x00\x00\x00\x00\x00\xf0?" in reply
            or b"\x10ok\x00\x01\x00\x00\x00" in reply
        )
    )


def is_ready(service: Service, secrets: dict[str, str]) -> bool:
    if not service.ready_url:
        host, port = service.ports[0]
        return mongo_ping("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
    headers = {}
    if service.ready_headers_secret:
        headers["Authorization"] = f"token {secrets.get(service.ready_headers_secret, '')}"
    try:
        return httpx.get(service.ready_url, headers=headers, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
