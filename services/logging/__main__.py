"""Entry point: ``python -m services.logging --config PATH``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loguru import logger

from common.errors import BinderError
from common.logs import configure_logging
from common.serve import serve
from common.settings import load_settings
from services.logging.app import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.logging", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML file overriding the defaults")
    parser.add_argument(
        "--home", type=Path, help="the suite's home (default $BINDER_HOME or ~/.binder)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, home=args.home)
    except BinderError as exc:
        print(f"logging: {exc.message}", file=sys.stderr)
        return 1
    configure_logging("logging")
    logger.info("log aggregator on {}:{}", settings.logging.host, settings.logging.port)
    serve(
        create_app(settings),
        host=settings.logging.host,
        port=settings.logging.port,
        grace_seconds=3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
