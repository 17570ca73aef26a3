"""Entry point: ``python -m services.logging --config PATH``."""

from __future__ import annotations

import sys

from loguru import logger

from common.logs import configure_logging
from common.serving.serve import serve, service_parser, settings_or_exit
from services.logging.app import create_app


def main(argv: list[str] | None = None) -> int:
    args = service_parser("services.logging", __doc__).parse_args(argv)
    settings = settings_or_exit("logging", args)
    configure_logging("logging")
    logger.info("log aggregator on {}:{}", settings.logging.host, settings.logging.port)
    serve(
        create_app(settings),
        host=settings.logging.host,
        port=settings.logging.port,
        grace_seconds=3,
        limits=settings.http,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
