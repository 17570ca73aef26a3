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
from datetime import UTC
from typing import Any, Protocol

from loguru import logger

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


class RecordSink(Protocol):
    """Where records go besides stdout (the aggregator's sink): each as its wire record."""

    def push(self, record: dict[str, Any]) -> None: ...


class _Outputs:
    """The one loguru handler: each record is made into its wire record once, written to stdout
    as a JSON line and handed to every other sink."""

    def __init__(self, sinks: list[RecordSink]) -> None:
        self.sinks = sinks

    def __call__(self, message: Any) -> None:
        record = record_to_dict(message.record)
        line = json.dumps(record) + "\n"
        for sink in self.sinks:
            sink.push(record)
        sys.stdout.write(line)
        sys.stdout.flush()


def configure_logging(
    service: str, *, level: str = "INFO", sinks: list[RecordSink] | None = None
) -> None:
    logger.remove()
    logger.configure(extra={"service": service})
    # the handler reads ``message.record``: "{message}" spares loguru a formatted line
    logger.add(_Outputs(list(sinks or [])), level=level, format="{message}")
