"""Following the files supervisord writes (``<home>/logs/*.log``) and the apps' output
(``<home>/logs/apps/<id>.log``), rotation included.

Each chunk read is stored under an id naming its file, inode and starting offset, with the offset
it ends at; a chunk read again after a crash (between storing it and storing the offset) is found
by that id, and reading goes on from where the stored one ended, so no line is stored twice.
Offsets are kept in the database, so a restarted aggregator goes on where it left off.

A file is looked at when the kernel tells it changed (:mod:`services.logging.changes`), so nothing
is read or stat'ed while no log grows; every file is looked at once at the start and then every
``rescan_seconds``, in case a change went unseen.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from services.logging.changes import Changes
from services.logging.ingest import LEVEL_ALIASES, LEVELS
from services.logging.store import LogStore

MAX_READ = 4 * 1024 * 1024
MAX_LINE = 64 * 1024

Sink = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass
class Followed:
    inode: int
    offset: int


def describe(path: Path, logs_dir: Path) -> tuple[str, str | None, str]:
    """(service, deployment id, stream) of a followed file."""
    if path.parent.name == "apps":
        return "app", path.stem, "output"
    name = path.name.removesuffix(".log")
    service, _, stream = name.rpartition(".")
    if stream not in ("out", "err"):
        return name, None, "log"
    return service, None, stream


def line_record(
    line: bytes, *, path: Path, inode: int, offset: int, logs_dir: Path
) -> dict[str, Any]:
    service, dep, stream = describe(path, logs_dir)
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
    parsed = _json_line(text)
    if parsed is not None:
        level = str(parsed.get("level", "info")).lower()
        record["level"] = (
            LEVEL_ALIASES.get(level, level) if level in (*LEVELS, *LEVEL_ALIASES) else "info"
        )
        record["message"] = str(parsed.get("message", text))
        for key in ("id", "template"):
            if isinstance(parsed.get(key), str):
                record[key] = parsed[key]
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
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and "message" in value else None


class Tailer:
    def __init__(
        self,
        *,
        logs_dir: Path,
        store: LogStore,
        sink: Sink,
        skip: tuple[str, ...] = (),
        settle_seconds: float = 0.25,
        rescan_seconds: float = 30.0,
    ) -> None:
        self.logs_dir = logs_dir
        self.store = store
        self.sink = sink
        self.skip = skip
        self.settle = settle_seconds
        """How long writes are let gather after a change, so that a burst of writes (50 apps
        starting) is read in as few chunks, and database writes, as the former 0.25 s poll."""
        self.rescan = rescan_seconds
        self._files: dict[str, Followed] = {}

    def candidates(self) -> list[Path]:
        files = [*self.logs_dir.glob("*.log"), *(self.logs_dir / "apps").glob("*.log")]
        return sorted(p for p in files if self._wanted(p))

    def _wanted(self, path: Path) -> bool:
        return (
            path.suffix == ".log"
            and path.parent in (self.logs_dir, self.logs_dir / "apps")
            and not path.name.startswith(self.skip)
        )

    async def run(self) -> None:
        with Changes(folders=[self.logs_dir, self.logs_dir / "apps"]) as changes:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(changes.collect)
                await self._follow_changes(changes)

    async def _follow_changes(self, changes: Changes) -> None:
        rescan_at = 0.0
        while True:
            changed = changes.take()
            if changed is None or time.monotonic() >= rescan_at:
                changes.watch()
                await self.poll_once()
                rescan_at = time.monotonic() + self.rescan
            else:
                for path in sorted(p for p in changed if self._wanted(p)):
                    await self._follow(path)
            with anyio.move_on_after(rescan_at - time.monotonic()):
                await changes.arrived()
            await anyio.sleep(self.settle)

    async def poll_once(self) -> int:
        total = 0
        for path in self.candidates():
            total += await self._follow(path)
        return total

    async def _follow(self, path: Path) -> int:
        key = str(path)
        try:
            st = path.stat()  # noqa: ASYNC240 - stat of a local file that just changed
        except FileNotFoundError:
            return 0
        state = self._files.get(key)
        if state is None:
            saved = await self.store.get_offset(key)
            state = Followed(*saved) if saved else Followed(st.st_ino, 0)
            self._files[key] = state
        total = 0
        if state.inode != st.st_ino:  # rotated: finish the old file first, wherever it went
            rotated = _find_inode(path, state.inode)
            if rotated is not None:
                total += await self._read(rotated, key, state, final=True)
            state.inode, state.offset = st.st_ino, 0
        elif st.st_size < state.offset:  # truncated
            state.offset = 0
        elif st.st_size == state.offset:  # nothing new: no need to open it
            return total
        total += await self._read(path, key, state, final=False)
        return total

    async def _read(self, path: Path, key: str, state: Followed, *, final: bool) -> int:
        total = 0
        while True:
            with open(path, "rb") as fh:  # noqa: ASYNC230 - a bounded read of a local file
                fh.seek(state.offset)
                chunk = fh.read(MAX_READ)
            if not chunk:
                return total
            end = chunk.rfind(b"\n") + 1
            if end == 0:
                if not final and len(chunk) < MAX_READ:
                    return total  # a partial last line: wait for its end
                end = len(chunk)
            records, offset = [], state.offset
            for line in chunk[:end].splitlines(keepends=True):
                if line.strip():
                    records.append(
                        line_record(
                            line,
                            path=Path(key),
                            inode=state.inode,
                            offset=offset,
                            logs_dir=self.logs_dir,
                        )
                    )
                offset += len(line)
            chunk_id = f"tail:{key}:{state.inode}:{state.offset}"
            stored_end = await self.store.insert_chunk(chunk_id, records, state.offset + end)
            if stored_end == state.offset + end:
                await self.sink(records)
            state.offset = stored_end
            await self.store.set_offset(key, state.inode, state.offset)
            total += len(records)


def _find_inode(path: Path, inode: int) -> Path | None:
    for candidate in sorted(path.parent.glob(path.name + ".*")):
        try:
            if os.stat(candidate).st_ino == inode:
                return candidate
        except FileNotFoundError:
            continue
    return None
