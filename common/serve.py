"""Entry-point plumbing shared by the services: options, settings, serving under uvicorn."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from common import quiet_server
from common.edge import edge_protocol
from common.errors import BinderError
from common.settings import HttpSettings, Settings, load_settings


def serve(
    app: Starlette, *, host: str, port: int, grace_seconds: int, limits: HttpSettings
) -> None:
    """Serve until SIGTERM/SIGINT, then finish requests for up to ``grace_seconds``.

    The edge ``limits`` bound every connection (see :mod:`common.edge`). ``X-Forwarded-For`` is
    not believed here: uvicorn would believe it from loopback, and the deploy API decides which
    proxies it trusts itself."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=edge_protocol(limits),
        timeout_keep_alive=max(1, math.ceil(limits.idle_timeout_seconds)),
        limit_concurrency=limits.max_connections,
        proxy_headers=False,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace_seconds,
    )
    quiet_server.run(config)


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
