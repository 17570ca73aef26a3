"""What is read of a followed file at once (a chunk), and its lines as log records.

A chunk runs from an offset to the end of the last whole line read (at most ``MAX_READ`` bytes
and ``MAX_LINES`` lines); a partial last line waits for its end, except in a rotated file, which
is read to its very end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.logging.ingest import LEVEL_ALIASES, LEVELS, storable

MAX_READ = 4 * 1024 * 1024
MAX_LINE = 64 * 1024
MAX_LINES = 20_000
"""Lines in a chunk at most: its bucket (about 120 bytes a line besides the text, which is at
most ``MAX_READ``) stays well under the database's 16 MiB document limit even when the lines are
short (4 MiB of one-character lines would be a 240 MiB document)."""


@dataclass
class Followed:
    """Where reading a followed file goes on: its inode and the offset read to."""

    inode: int
    offset: int


@dataclass(frozen=True)
class Chunk:
    """The lines of a followed file read at once, from ``start`` to ``end``."""

    key: str
    """The followed file's path (a rotated file's lines are stored under it too)."""
    inode: int
    start: int
    end: int
    records: list[dict[str, Any]]
    full: bool
    """``MAX_READ`` bytes or ``MAX_LINES`` lines were read: the file may hold more."""

    @property
    def chunk_id(self) -> str:
        return f"tail:{self.key}:{self.inode}:{self.start}"


def describe(path: Path) -> tuple[str, str | None, str]:
    """(service, deployment id, stream) of a followed file."""
    if path.parent.name == "apps":
        return "app", path.stem, "output"
    name = path.name.removesuffix(".log")
    service, _, stream = name.rpartition(".")
    if stream not in ("out", "err"):
        return name, None, "log"
    return service, None, stream


def read_chunk(*, path: Path, key: str, state: Followed, final: bool) -> Chunk | None:
    """The next chunk of ``path`` from ``state.offset``, or None when there is nothing whole to
    read (``final``: the file is no longer written, its last line is taken as it is)."""
    with open(path, "rb") as fh:
        fh.seek(state.offset)
        data = fh.read(MAX_READ)
    if not data:
        return None
    end = data.rfind(b"\n") + 1
    if end == 0:
        if not final and len(data) < MAX_READ:
            return None  # a partial last line: wait for its end
        end = len(data)
    records: list[dict[str, Any]] = []
    offset = state.offset
    for line in data[:end].splitlines(keepends=True):
        if len(records) == MAX_LINES:
            break  # the rest in a next chunk
        if line.strip():
            records.append(line_record(line, path=Path(key), inode=state.inode, offset=offset))
        offset += len(line)
    return Chunk(
        key=key,
        inode=state.inode,
        start=state.offset,
        end=offset,
        records=records,
        full=len(data) == MAX_READ or offset < state.offset + end,
    )


def line_record(line: bytes, *, path: Path, inode: int, offset: int) -> dict[str, Any]:
    """One record of one line. An app's line is its text, at level ``info``, with the id its
    file names: whatever the app prints (a JSON line with a ``level`` or a ``template`` too) is
    text, never a field of the record. The suite's own programs write JSON lines through loguru,
    whose level and fields are believed."""
    service, dep, stream = describe(path)
    text = line.decode(errors="replace").rstrip("\r\n")[:MAX_LINE]
    record: dict[str, Any] = {
        "_id": f"{inode}:{offset}",
        "time": datetime.now(UTC),
        "service": service,
        "level": "info",
        "message": text,
        "stream": stream,
        "file": path.name,
    }
    parsed = None if dep else _json_line(text)
    if parsed is not None:
        level = str(parsed.get("level", "info")).lower()
        record["level"] = (
            LEVEL_ALIASES.get(level, level) if level in (*LEVELS, *LEVEL_ALIASES) else "info"
        )
        record["message"] = storable(str(parsed.get("message", text)))
        for key in ("id", "template"):
            if isinstance(parsed.get(key), str):
                record[key] = storable(parsed[key])
    elif stream == "err" and any(w in text.lower() for w in ("error", "fatal", "traceback")):
        record["level"] = "error"
    if dep:
        record["id"] = dep
    return record


def _json_line(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:  # not JSON, or a number too long for int() (over 4,300 digits)
        return None
    return value if isinstance(value, dict) and "message" in value else None
