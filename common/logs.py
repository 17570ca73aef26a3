"""Loguru set-up for the suite's Python services: JSON lines with ``service`` and, where bound,
the deployment ``id``. Only entry points call :func:`configure_logging`.

Records go to stdout (and to the aggregator's sink where a service has one); stderr is left to
what does not pass through loguru (uvicorn's and asyncio's own tracebacks, a crash at start),
which the aggregator follows in each program's ``*.err.log``."""

from __future__ import annotations

import json
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC
from typing import Any

from loguru import logger

Sink = Callable[[Any], None]
RESERVED = ("time", "service", "level", "message")
MAX_TRACEBACK = 8000


def record_id() -> str:
    """A unique record id that sorts in the order ids were made (lines of one instant keep the
    order they were written in): nanoseconds since the epoch, then randomness."""
    return f"{time.time_ns():016x}{secrets.token_hex(6)}"


def record_to_dict(record: Any) -> dict[str, Any]:
    """A loguru record as the aggregator's wire record."""
    out: dict[str, Any] = {
        "time": record["time"]
        .astimezone(UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "service": record["extra"].get("service", "unknown"),
        "level": record["level"].name.lower(),
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        if key not in RESERVED and key != "service":
            out[key] = (
                value
                if isinstance(value, str | int | float | bool) or value is None
                else str(value)
            )
    if record["exception"] is not None:
        exc = record["exception"]
        out["exception"] = f"{exc.type.__name__ if exc.type else 'Exception'}: {exc.value}"
        lines = traceback.format_exception(exc.type, exc.value, exc.traceback)
        out["traceback"] = "".join(lines)[-MAX_TRACEBACK:]
    return out


def _stdout_sink(message: Any) -> None:
    sys.stdout.write(json.dumps(record_to_dict(message.record)) + "\n")
    sys.stdout.flush()


def configure_logging(
    service: str, *, level: str = "INFO", sinks: list[Sink] | None = None
) -> None:
    logger.remove()
    logger.configure(extra={"service": service})
    # the sinks read ``message.record``: "{message}" spares loguru a formatted line per sink
    logger.add(_stdout_sink, level=level, format="{message}")
    for sink in sinks or []:
        logger.add(sink, level=level, format="{message}")
