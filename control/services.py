"""The suite's services as control sees them: each one's declaration says everything control
acts on (command, environment, ports, readiness check, start priority, what runs after it
stops, whether it runs here at all). Control never asks for a service by name to decide what to
do with it.

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

from common.owned_http import hooks
from common.peers import listeners, suite_uid
from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ORDER = ("db", "logging", "proxy", "deploy-kubernetes")
PROXY_EDGE = ROOT / "services" / "proxy_edge.js"


@dataclass(frozen=True, kw_only=True)
class Service:
    """One service of the suite, as declared for these settings."""

    name: str
    command: tuple[str, ...]
    ports: tuple[tuple[str, int], ...]
    """(address, port) pairs it listens on; checked free before it starts."""
    priority: int
    """supervisord's priority: services start in increasing order, stop in decreasing."""
    ready_url: str = ""
    """HTTP URL answering 200 once ready (empty: a MongoDB ``ping`` on the first port)."""
    ready_headers_secret: str = ""
    """Name of the secret sent as ``Authorization: token`` with the readiness request."""
    secrets: tuple[str, ...] = ()
    """Names of the secrets (``BINDER_API_KEY`` ...) this service gets in its environment."""
    env: dict[str, str] = field(default_factory=dict)
    stop_seconds: int = 10
    stop_hook: tuple[str, ...] = ()
    """A command run (with the service's secrets) once the service has stopped, e.g. ending
    the apps it started on this host; empty for none."""
    hook_needs: tuple[str, ...] = ()
    """Services that must still run while the stop hook runs (it writes to the database)."""
    external: str = ""
    """Why the suite runs no program for this service (it is elsewhere); empty when it runs."""
    processes: int = 1
    """Processes of it that run at once (sharing its ports); more than one are named
    ``<name>:0`` ... ``<name>:<n-1>``, restarted one at a time, each awaited ready on its own."""
    ready_socket: str = ""
    """With several processes: the unix socket (``{n}``: the process's number) on which each
    one answers ``ready_url``'s path, so that each is asked itself (the shared port answers
    from any of them)."""

    def process_names(self) -> list[str]:
        """Its processes as supervisord names them."""
        if self.processes == 1:
            return [self.name]
        return [f"{self.name}:{n}" for n in range(self.processes)]


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


def proxy_edge_env(settings: Settings) -> dict[str, str]:
    """The bounds ``services/proxy_edge.js`` puts on the proxy's servers (see that file)."""
    return {
        "CHP_EDGE_PUBLIC_PORT": str(settings.proxy.port),
        "CHP_EDGE_PER_CLIENT": str(settings.proxy.per_client_max_connections),
        "CHP_EDGE_HEADER_TIMEOUT_MS": str(round(settings.http.header_timeout_seconds * 1000)),
        "CHP_EDGE_MAX_HEADERS": str(settings.http.max_header_count),
        "CHP_EDGE_TRUSTED": ",".join(settings.deploy.trusted_proxies),
    }


def declare(settings: Settings, effective_config: Path) -> list[Service]:
    """Every service the suite runs with these settings, in start order."""
    config = ("--config", str(effective_config), "--home", str(settings.home))
    chp = ROOT / ".node" / "node_modules" / ".bin" / "configurable-http-proxy"
    node = shutil.which("node") or "node"
    out = [
        Service(
            name="db",
            command=db_command(settings),
            ports=((settings.db.host, settings.db.port),),
            priority=10,
            secrets=("BINDER_DB_URI",) if embedded_db(settings) else (),
            stop_seconds=15,
            external="db.uri points at an external MongoDB: the suite runs no `db` program"
            if settings.db.uri
            else "",
        )
    ]
    out.append(
        Service(
            name="logging",
            command=(_python(), "-m", "services.logging", *config),
            ports=((settings.logging.host, settings.logging.port),),
            priority=20,
            ready_url=f"{settings.logging.url}/health",
            secrets=("BINDER_DB_URI", "BINDER_LOGGING_TOKEN"),
            env=_digest(settings, "db", "logging"),
        )
    )
    p = settings.proxy
    d = settings.deploy
    deploy_url = d.local_url
    out.append(
        Service(
            name="proxy",
            command=(
                node,
                "--require",  # bounds the proxy's servers (see the file)
                str(PROXY_EDGE),
                str(chp),
                "--ip",
                p.ip,
                "--port",
                str(p.port),
                "--api-ip",
                p.api_ip,
                "--api-port",
                str(p.api_port),
                # what no app's route takes goes to the deploy server: its pages at the public
                # address, and the page of a session that has ended for /user/<id>/ paths
                # without a route; a route whose app does not answer gets its error page
                # (the proxy asks /ended/503?url=<path>)
                "--default-target",
                deploy_url,
                "--error-target",
                f"{deploy_url}/ended",
                # warn: keeps 4xx/5xx answers and proxy errors, drops a line per API request
                # (the keeper's route checks) and per route change (the deploy server logs those)
                "--log-level",
                "warn",
            ),
            ports=((p.ip, p.port), (p.api_ip, p.api_port)),
            env=proxy_edge_env(settings),
            priority=30,
            ready_url=f"{p.api_url}/api/routes",
            ready_headers_secret="CONFIGPROXY_AUTH_TOKEN",
            secrets=("CONFIGPROXY_AUTH_TOKEN",),
        )
    )
    host = "127.0.0.1" if d.host in ("0.0.0.0", "") else d.host
    deploy = (_python(), "-m", "services.deploy_kubernetes", *config)
    # the apps of the local and docker backends run on this host and end with the suite; pods
    # belong to the cluster, and another host's suite may serve them
    on_this_host = d.backend != "kubernetes"
    several = d.servers > 1
    socket_path = str(settings.home / "run" / "deploy-kubernetes.{n}.sock") if several else ""
    out.append(
        Service(
            name="deploy-kubernetes",
            command=deploy,
            ports=((d.host, d.port),),
            priority=40,
            ready_url=f"http://{host}:{d.port}/health",
            secrets=(
                "BINDER_API_KEY",
                "CONFIGPROXY_AUTH_TOKEN",
                "BINDER_DB_URI",
                "BINDER_LOGGING_TOKEN",
            ),
            env={
                **_digest(settings, "db", "proxy", "logging", "deploy"),
                # each process answers on the shared port and on a socket of its own
                **({"BINDER_READY_SOCKET": socket_path} if several else {}),
            },
            stop_hook=(*deploy, "--stop-apps") if on_this_host else (),
            hook_needs=("db",),  # the apps' records become `deleted` before the database stops
            processes=d.servers,
            ready_socket=socket_path,
        )
    )
    return sorted(out, key=lambda service: service.priority)


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


def _overlap(a: str, b: str) -> bool:
    return a == b or {a, b} & {"0.0.0.0", "::", ""} != set()


def listening_as_the_suite(address: str, port: int) -> bool:
    """Whether a socket of the suite's user listens on ``address:port``, and none of another
    user's on the same address (or a wildcard one)."""
    found = [f for f in listeners(port) if _overlap(f.address, address)]
    ours = suite_uid()
    return any(f.uid == ours for f in found) and all(f.uid == ours for f in found)


def is_ready(service: Service, secrets: dict[str, str], process: int | None = None) -> bool:
    """Every port of ``service`` is the suite's (a proxy that could not bind its public port is
    not ready, however well its API answers) and its readiness check answers; a secret sent
    with the check goes only to a server of the suite's user. Of a service of several
    processes, ``process`` is asked on its own socket (the shared port answers from any)."""
    if not all(listening_as_the_suite(host, port) for host, port in service.ports):
        return False
    if process is not None and service.ready_socket:
        path = httpx.URL(service.ready_url).path
        transport = httpx.HTTPTransport(uds=service.ready_socket.format(n=process))
        try:
            with httpx.Client(transport=transport, timeout=1.0) as client:
                return client.get(f"http://localhost{path}").status_code == 200
        except httpx.HTTPError:
            return False
    if not service.ready_url:
        host, port = service.ports[0]
        return mongo_ping("127.0.0.1" if host in ("0.0.0.0", "") else host, port)
    headers = {}
    if service.ready_headers_secret:
        headers["Authorization"] = f"token {secrets.get(service.ready_headers_secret, '')}"
    try:
        with httpx.Client(timeout=1.0, event_hooks=hooks(service.ready_headers_secret)) as c:
            return c.get(service.ready_url, headers=headers).status_code == 200
    except httpx.HTTPError:
        return False
