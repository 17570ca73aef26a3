"""Entry point: ``python -m services.deploy_kubernetes --config PATH``.

The API key comes from ``BINDER_API_KEY`` and the proxy token from ``CONFIGPROXY_AUTH_TOKEN``,
never from the command line. When ``[deploy] servers`` is more than one, each of the processes
binds the port with ``SO_REUSEPORT`` and also answers on the unix socket ``BINDER_READY_SOCKET``
names (its own: control asks it whether it is ready).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from loguru import logger

from common.errors import BinderError
from common.logs import configure_logging
from common.serving.edge import ClientConnections
from common.serving.serve import (
    listening_sockets,
    migrate_queued_connections,
    serve,
    service_parser,
    settings_or_exit,
)
from services.deploy_kubernetes.app import build_backend, create_app, stop_apps
from services.deploy_kubernetes.backends.local.checks import check_local
from services.logging.sink import AggregatorSink

FAULT_RECORD_DELAY = "_BINDER_FAULT_RECORD_DELAY_SECONDS"
"""For fault-injection tests only (``tests/integration/test_durability.py``): seconds the local
backend pauses between an app's start and the launch's return (unsandboxed: its pid file), which
widens the window in which a crash used to orphan an app enough to hit it. Not a setting: read
here alone, never shipped."""


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("services.deploy_kubernetes", __doc__)
    parser.add_argument(
        "--stop-apps",
        action="store_true",
        help="stop every app the backend runs on this host, mark their records deleted, and exit "
        "(used when the suite is stopped)",
    )
    args = parser.parse_args(argv)
    settings = settings_or_exit("deploy-kubernetes", args)
    if args.stop_apps:
        configure_logging("deploy-kubernetes")
        try:
            count = asyncio.run(stop_apps(settings))
        except BinderError as exc:
            print(f"deploy-kubernetes: {exc.message}", file=sys.stderr)
            return 1
        print(f"stopped {count} apps")
        return 0
    if settings.deploy.backend == "local":
        try:
            check_local(settings.deploy.local)  # refused before anything starts, naming the key
        except BinderError as exc:
            print(f"deploy-kubernetes: {exc.message}", file=sys.stderr)
            return 1
    sink = AggregatorSink(settings.logging.url, token=settings.logging.token)
    configure_logging("deploy-kubernetes", sinks=[sink])
    if not settings.api_key:
        logger.warning("BINDER_API_KEY is not set: every endpoint that needs the key answers 403")
    logger.info(
        "deploy server on {}:{} with the {} backend",
        settings.deploy.host,
        settings.deploy.port,
        settings.deploy.backend,
    )
    delay = float(os.environ.get(FAULT_RECORD_DELAY) or 0)
    backend = build_backend(settings, record_delay=delay) if delay else None
    own = os.environ.get("BINDER_READY_SOCKET")
    if settings.deploy.servers > 1 and (why := migrate_queued_connections()) is not None:
        logger.warning("{}: a server stopping resets the connections queued on it", why)
    try:
        sockets = (
            listening_sockets(
                host=settings.deploy.host,
                port=settings.deploy.port,
                reuse_port=True,
                unix_path=Path(own) if own else None,
            )
            if settings.deploy.servers > 1
            else None
        )
        serve(
            create_app(
                settings,
                backend=backend,
                collectors=(sink.collector(),),
                wait_started=60.0 if settings.deploy.servers > 1 else 0.0,
            ),
            host=settings.deploy.host,
            port=settings.deploy.port,
            grace_seconds=5,
            limits=settings.http,
            clients=ClientConnections(
                per_client=settings.deploy.per_client_max_connections,
                exempt=settings.deploy.trusted_proxies,
            ),
            sockets=sockets,
        )
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
