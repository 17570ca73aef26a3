"""Entry-point plumbing shared by the services: options, settings, serving under uvicorn."""

from __future__ import annotations

import argparse
import math
import socket
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from common.errors import BinderError
from common.serving import quiet_server
from common.serving.edge import ClientConnections, edge_protocol
from common.settings import HttpSettings, Settings, load_settings


def listening_sockets(
    *, host: str, port: int, reuse_port: bool, unix_path: Path | None
) -> list[socket.socket]:
    """The sockets a server answers on: ``host:port``, shared with the other processes bound
    to it (``SO_REUSEPORT``: the kernel spreads connections over them) when ``reuse_port``;
    and a unix socket of its own (owner only) when ``unix_path`` is given."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    tcp.bind((host, port))
    out = [tcp]
    if unix_path is not None:
        unix_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        unix_path.unlink(missing_ok=True)  # a process before this one left it
        own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        own.bind(str(unix_path))
        unix_path.chmod(0o600)
        out.append(own)
    return out  # not inheritable: a child holding a listener keeps it in the group, unserved


MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrate_queued_connections() -> str | None:
    """Have the kernel hand the connections queued on a closing listener of an ``SO_REUSEPORT``
    group to another listener of the group (``net.ipv4.tcp_migrate_req``, Linux 5.14), instead
    of resetting them: without it, a server stopping in a rolling restart resets the connections
    that arrived in its last instant (1 or 2 of a restart under a launch a few 100 ms apart,
    measured). Set for the host's network namespace where it is 0 (needs root). None when it
    is in effect, else why not."""
    try:
        if MIGRATE_SYSCTL.read_text().strip() != "1":
            MIGRATE_SYSCTL.write_text("1\n")
    except OSError as exc:
        return f"net.ipv4.tcp_migrate_req could not be set ({exc.strerror})"
    return None


def serve(
    app: Starlette,
    *,
    host: str,
    port: int,
    grace_seconds: int,
    limits: HttpSettings,
    clients: ClientConnections | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then finish requests for up to ``grace_seconds``; on
    ``sockets`` (:func:`listening_sockets`) when given, else on ``host:port``.

    The edge ``limits`` bound every connection, and ``clients`` those of each client, where
    given (see :mod:`common.serving.edge`).
    ``X-Forwarded-For`` is not believed here: uvicorn would believe it from loopback, and the
    deploy API decides which proxies it trusts itself."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=edge_protocol(limits, clients),
        timeout_keep_alive=max(1, math.ceil(limits.idle_timeout_seconds)),
        limit_concurrency=limits.max_connections,
        proxy_headers=False,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace_seconds,
    )
    quiet_server.run(config, sockets)


def service_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The options every service's entry point takes: ``--config`` and ``--home``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML file overriding the defaults")
    parser.add_argument(
        "--home", type=Path, help="the suite's home (default $BINDER_HOME or ~/.binder)"
    )
    return parser


def settings_or_exit(name: str, args: argparse.Namespace) -> Settings:
    """The settings those options name; a bad config exits 1 with one line on stderr."""
    try:
        return load_settings(args.config, home=args.home)
    except BinderError as exc:
        print(f"{name}: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from exc
