"""Entry point: ``python -m services.deploy_kubernetes --config PATH``.

The API key comes from ``BINDER_API_KEY`` and the proxy token from ``CONFIGPROXY_AUTH_TOKEN``,
never from the command line.
"""

from __future__ import annotations

import asyncio
import sys

from loguru import logger

from common.errors import BinderError
from common.logs import configure_logging
from common.serve import serve, service_parser, settings_or_exit
from services.deploy_kubernetes.app import create_app, stop_apps
from services.deploy_kubernetes.backends.local import app_user
from services.logging.sink import AggregatorSink


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
            app_user(settings.deploy.local)  # refused before anything starts, naming the key
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
    try:
        serve(
            create_app(settings, collectors=(sink.collector(),)),
            host=settings.deploy.host,
            port=settings.deploy.port,
            grace_seconds=5,
            limits=settings.http,
        )
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
