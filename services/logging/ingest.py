"""Turning posted bodies (a JSON array or JSON lines) into records to store, and filters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from common.errors import MalformedRequestError
from common.logs import record_id
from common.web import check_json_depth

LEVELS = ("trace", "debug", "info", "success", "warning", "error", "critical")
LEVEL_ALIASES = {"warn": "warning", "err": "error", "fatal": "critical", "notice": "info"}
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_MESSAGE = 64 * 1024
MAX_EXTRA = 32
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: alone, it makes text that no document can store."""


def storable(text: str) -> str:
    """``text`` as UTF-8 can hold it: each lone surrogate (from a JSON escape such as
    ``"\\ud800"``) becomes ``?``. Stored as it was, it would fail the whole write it is in."""
    return text.encode("utf-8", "replace").decode("utf-8")


def mended(value: Any) -> Any:
    """Parsed JSON ``value`` with :func:`storable` text throughout (pairs are whole already)."""
    return json.loads(json.dumps(value, ensure_ascii=False).encode("utf-8", "replace"))


def parse_time(value: str, *, now: datetime | None = None, field: str = "time") -> datetime:
    """ISO 8601 (``Z`` allowed) or, for filters, a duration back from now (``10m``, ``2h``)."""
    match = DURATION_RE.match(value.strip())
    if match and now is not None:
        return now - timedelta(seconds=float(match.group(1)) * UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        hint = " or a duration such as 10m" if now is not None else ""
        raise MalformedRequestError(f"{field}: {value!r} is not an ISO time{hint}") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def normalise_level(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("level: must be a string")
    level = LEVEL_ALIASES.get(value.lower(), value.lower())
    if level not in LEVELS:
        raise ValueError(f"level: {value!r} is not one of {', '.join(LEVELS)}")
    return level


def to_record(data: Any) -> dict[str, Any]:
    """One stored record from one posted object; ``ValueError`` says why it is refused."""
    if not isinstance(data, dict):
        raise ValueError("a record must be a JSON object")
    for key in ("service", "message"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{key}: required, a non-empty string")
    if len(data["message"]) > MAX_MESSAGE:
        raise ValueError(f"message: longer than {MAX_MESSAGE} characters")
    time_value = data.get("time")
    if time_value is None:
        when = datetime.now(UTC)
    elif isinstance(time_value, str):
        try:
            when = parse_time(time_value)
        except MalformedRequestError as exc:
            raise ValueError(exc.message) from exc
    else:
        raise ValueError("time: must be an ISO 8601 string")
    rid = data.get("rid")
    if rid is not None and (not isinstance(rid, str) or not 8 <= len(rid) <= 64):
        raise ValueError("rid: must be a string of 8 to 64 characters")
    dep = data.get("id")
    if dep is not None and not isinstance(dep, str):
        raise ValueError("id: must be a string")
    extra = {
        k: v
        for k, v in data.items()
        if k not in ("time", "service", "level", "message", "id", "rid", "_id")
    }
    if len(extra) > MAX_EXTRA or any(k.startswith("$") or "." in k for k in extra):
        raise ValueError(f"extra fields: at most {MAX_EXTRA}, names without '$' or '.'")
    record = {
        "_id": rid or record_id(),
        "time": when,
        "service": data["service"],
        "level": normalise_level(data.get("level", "info")),
        "message": data["message"],
        **extra,
    }
    if dep:
        record["id"] = dep
    return record


def parse_body(
    body: bytes, *, max_depth: int = 32
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records and refusals (``{"index", "error"}``) from a JSON array or JSON lines."""
    check_json_depth(body, max_depth)
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise MalformedRequestError("body: not UTF-8") from exc
    stripped = text.lstrip()
    items: list[Any]
    refused: list[dict[str, Any]] = []
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or a number of over 4,300 digits
            raise MalformedRequestError(f"body: not a valid JSON array ({exc})") from exc
    else:
        items = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError as exc:  # JSONDecodeError, or a number of over 4,300 digits
                items.append(None)
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else exc
                refused.append(
                    {"index": len(items) - 1, "error": f"line {n + 1}: not JSON ({why})"}
                )
    if SURROGATE_ESCAPE.search(text):
        items = [mended(item) for item in items]
    records = []
    bad = {r["index"] for r in refused}
    for index, item in enumerate(items):
        if index in bad:
            continue
        try:
            records.append(to_record(item))
        except ValueError as exc:
            refused.append({"index": index, "error": str(exc)})
    return records, sorted(refused, key=lambda r: int(r["index"]))


@dataclass(frozen=True)
class LogFilters:
    service: str | None = None
    level: set[str] | None = None
    app: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        return (
            (self.service is None or record.get("service") == self.service)
            and (self.level is None or record.get("level") in self.level)
            and (self.app is None or record.get("id") == self.app)
            and (self.since is None or record["time"] >= self.since)
            and (self.until is None or record["time"] < self.until)
            and (self.q is None or self.q.lower() in str(record.get("message", "")).lower())
        )


def parse_filters(params: dict[str, str], *, now: datetime) -> LogFilters:
    """Filters from query parameters; ``level=warning`` means warning and above."""
    level = None
    if params.get("level"):
        try:
            lowest = normalise_level(params["level"])
        except ValueError as exc:
            raise MalformedRequestError(str(exc)) from exc
        level = set(LEVELS[LEVELS.index(lowest) :])
    return LogFilters(
        service=params.get("service") or None,
        level=level,
        app=params.get("app") or None,
        since=parse_time(params["since"], now=now, field="since") if params.get("since") else None,
        until=parse_time(params["until"], now=now, field="until") if params.get("until") else None,
        q=params.get("q") or None,
    )


def to_wire(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k != "_id"}
    when: datetime = record["time"]
    out["time"] = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out["rid"] = record["_id"]
    return out
