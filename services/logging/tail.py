"""Following the files supervisord writes (``<home>/logs/*.log``) and the apps' output
(``<home>/logs/apps/<id>.log``), rotation included.

Each chunk read is stored under an id naming its file, inode and starting offset, with the offset
it ends at; a chunk read again after a crash (between storing it and storing the offset) is found
by that id, and reading goes on from where the stored one ended, so no line is stored twice.
Offsets are kept in the database, so a restarted aggregator goes on where it left off.

A file is looked at when the kernel tells it changed (:mod:`services.logging.changes`), so nothing
is read or stat'ed while no log grows; every file is looked at once at the start and then every
``rescan_seconds``, in case a change went unseen.

The files looked at together (a round: all that changed while writes settled) cost a few database
operations whatever their number: one query for the saved offsets of the files seen for the first
time; then, for each pass (one chunk of each file; a file with more than a chunk to read, or whose
rotated file was just finished, is read again in a next pass), one insert of all the chunks (and,
only when some were stored before, one query for where those end); last, one write of the offsets
of every file read. The offsets are written after the chunks: a crash between the two only makes
the next aggregator read again chunks that are then found stored, so nothing is lost and nothing
is stored twice. A pass reads at most ``PASS_FILES`` files and a round makes at most
``ROUND_PASSES`` passes, so its memory and its length are bounded however fast a file grows: what
is left is read in the next round, which comes at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from loguru import logger

from common.errors import BinderError
from services.logging.changes import Changes
from services.logging.chunks import Chunk, Followed, describe, read_chunk
from services.logging.quota import AppQuota
from services.logging.store import LogStore

Sink = Callable[[list[dict[str, Any]]], Awaitable[None]]
PASS_FILES = 16
SETTLE_MAX_SECONDS = 1.0
"""The longest a change waits for writes to pause before it is read (a file written without
pause is read this often)."""
OUTAGE_RETRY_SECONDS = 1.0
"""While the database fails, how long the tailer waits between rounds."""
ROUND_PASSES = 8


@dataclass(frozen=True)
class Source:
    """A file to read in a round: a followed file, or the file a followed one was renamed to
    (rotated: read to its very end first, then ``then`` is the inode to go on with)."""

    key: str
    state: Followed
    path: Path
    then: int | None = None
    ended: bool = False
    """Nothing writes to the file any more: a last line without its end is taken as it is."""

    def read(self) -> Chunk | None:
        final = self.then is not None or self.ended
        try:
            return read_chunk(path=self.path, key=self.key, state=self.state, final=final)
        except FileNotFoundError:  # removed since it was looked at: nothing more to read
            return None

    def after(self, chunk: Chunk | None) -> Source | None:
        """What is left to read once ``chunk`` (None: nothing whole was left) is stored and
        ``state.offset`` moved to where it ends."""
        if chunk is not None and (chunk.full or self.state.offset < chunk.end):
            return self  # more in this file (or the stored chunk was shorter than this one)
        if self.then is None:
            return None
        self.state.inode, self.state.offset = self.then, 0  # the rotated file is finished
        return Source(key=self.key, state=self.state, path=Path(self.key), ended=self.ended)


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
        quota: AppQuota | None = None,
    ) -> None:
        self.logs_dir = logs_dir
        self.store = store
        self.sink = sink
        self.skip = skip
        self.settle = settle_seconds
        """The pause in writes after which what changed is read, so that a burst of writes (50
        apps starting) is read in as few chunks, and database writes, as the former 0.25 s
        poll, once it is over (see :meth:`_settled`)."""
        self.rescan = rescan_seconds
        self.quota = quota
        """Each app's share of what is stored (:mod:`services.logging.quota`); None: unbounded."""
        self._files: dict[str, Followed] = {}
        self._more: set[Path] = set()
        """Files a round left with more to read: the next round reads them first."""
        self._round = asyncio.Lock()
        """One round at a time: the follower's, or a clean-up's (:meth:`remove_ended_apps`)."""

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
        outage: str | None = None  # what the database said, while it fails
        while True:
            changed = changes.take()
            try:
                if changed is None or time.monotonic() >= rescan_at:
                    changes.watch()
                    await self.poll_once()
                    rescan_at = time.monotonic() + self.rescan
                else:
                    await self.follow(sorted(self._more | {p for p in changed if self._wanted(p)}))
            except BinderError as exc:  # the database down or frozen: the files keep the lines
                if outage is None:
                    logger.warning("storing log lines failed, trying again: {}", exc.message)
                outage, rescan_at = exc.message, 0.0  # offsets did not move: read again
                await anyio.sleep(OUTAGE_RETRY_SECONDS)
                continue
            if outage is not None:
                logger.info("log lines stored again after: {}", outage)
                outage = None
            with anyio.move_on_after(0 if self._more else rescan_at - time.monotonic()):
                await changes.arrived()
            if self._more:  # the last round left work: the next comes as before
                await anyio.sleep(self.settle)
            else:
                await self._settled(changes)

    async def _settled(self, changes: Changes) -> None:
        """Let writes gather until none came for ``settle`` seconds, or for at most
        ``SETTLE_MAX_SECONDS``: a burst of writes (ten apps starting at once) is read in one
        round, after it, and the round's database writes do not land amid the launches."""
        deadline = time.monotonic() + SETTLE_MAX_SECONDS
        seen = changes.noted
        while (left := deadline - time.monotonic()) > 0:
            await anyio.sleep(min(self.settle, left))
            if changes.noted == seen:
                return
            seen = changes.noted

    def pending(self) -> set[Path]:
        """Files the last round left with more to read."""
        return set(self._more)

    async def poll_once(self) -> int:
        return await self.follow(self.candidates())

    async def follow(self, paths: list[Path], *, ended: bool = False) -> int:
        """Read and store what was added to ``paths`` (one round); returns the lines stored.
        ``ended``: nothing writes to them any more (a last line without its end is stored)."""
        async with self._round:
            return await self._follow(paths, ended=ended)

    async def _follow(self, paths: list[Path], *, ended: bool) -> int:
        stats = await self._look(paths)
        sources = [s for p, st in stats.items() if (s := self._source(p, st, ended)) is not None]
        total, read = 0, set[str]()
        for _ in range(ROUND_PASSES):
            if not sources:
                break
            now, later = sources[:PASS_FILES], sources[PASS_FILES:]
            chunks = [(source, self._admitted(source.read())) for source in now]
            read.update(source.key for source, chunk in chunks if chunk is not None)
            total += await self._store(chunks)
            sources = later + [s for source, chunk in chunks if (s := source.after(chunk))]
        self._more = (self._more - set(paths)) | {Path(source.key) for source in sources}
        await self.store.set_offsets({key: self._files[key] for key in sorted(read)})
        return total

    def _admitted(self, chunk: Chunk | None) -> Chunk | None:
        """``chunk`` with only the lines its app's share admits, when it is an app's output."""
        if chunk is None or self.quota is None:
            return chunk
        dep_id = describe(Path(chunk.key))[1]
        if dep_id is None:
            return chunk
        return dataclasses.replace(chunk, records=self.quota.admit(dep_id, chunk.records))

    async def _look(self, paths: list[Path]) -> dict[Path, os.stat_result]:
        """The files of ``paths`` still there; those seen for the first time get their saved
        offsets (or start at their beginning)."""
        stats = {}
        for path in paths:
            try:
                stats[path] = path.stat()
            except FileNotFoundError:
                continue
        first = [str(p) for p in stats if str(p) not in self._files]
        saved = await self.store.get_offsets(first)
        for path, st in stats.items():
            self._files.setdefault(str(path), saved.get(str(path), Followed(st.st_ino, 0)))
        return stats

    def _source(self, path: Path, st: os.stat_result, ended: bool) -> Source | None:
        """What to read of a followed file in this round, if anything."""
        key = str(path)
        state = self._files[key]
        if state.inode != st.st_ino:  # rotated: finish the old file first, wherever it went
            rotated = _find_inode(path, state.inode)
            if rotated is not None:
                return Source(key=key, state=state, path=rotated, then=st.st_ino, ended=ended)
            state.inode, state.offset = st.st_ino, 0
        elif st.st_size < state.offset:  # truncated
            state.offset = 0
        elif st.st_size == state.offset:  # nothing new: no need to open it
            return None
        return Source(key=key, state=state, path=path, ended=ended)

    async def remove_ended_apps(self, *, idle_seconds: float) -> int:
        """Remove the apps' output files (``apps/<id>.log``, with ``<id>.log.1``) that nothing has written to for
        ``idle_seconds``, once every line of them is stored: what was not read yet is read and
        stored first (a last line without its end too), and a file with more left to read, or
        written to meanwhile, stays for the next time. Returns how many were removed."""
        cutoff = time.time() - idle_seconds
        idle = [p for p in (self.logs_dir / "apps").glob("*.log") if _written_before(p, cutoff)]
        if not idle:
            return 0
        await self.follow(sorted(idle), ended=True)
        removed: list[str] = []
        async with self._round:
            for path in idle:
                state = self._files.get(str(path))
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                read = state is not None and (state.inode, state.offset) == (st.st_ino, st.st_size)
                if read and st.st_mtime < cutoff and path not in self._more:
                    try:
                        path.unlink(missing_ok=True)
                        # its predecessor, kept by the app's shim under its bound (read before
                        # the log was begun anew)
                        path.with_name(path.name + ".1").unlink(missing_ok=True)
                    except OSError as exc:
                        logger.warning("could not remove {}: {}", path, exc)
                        continue
                    removed.append(str(path))
            for key in removed:
                self._files.pop(key, None)
            await self.store.forget_offsets(removed)
        return len(removed)

    async def _store(self, chunks: list[tuple[Source, Chunk | None]]) -> int:
        """Store one pass's chunks, move each file's offset to where its chunk ends, and hand
        the lines stored now to the live tail; returns their number."""
        stored_before = await self.store.insert_chunks([c for _, c in chunks if c is not None])
        new: list[dict[str, Any]] = []
        for source, chunk in chunks:
            if chunk is None:
                continue
            source.state.offset = stored_before.get(chunk.chunk_id, chunk.end)
            if chunk.chunk_id not in stored_before:
                new += chunk.records
        if new:
            await self.sink(new)
        return len(new)


def _written_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _find_inode(path: Path, inode: int) -> Path | None:
    for candidate in sorted(path.parent.glob(path.name + ".*")):
        try:
            if os.stat(candidate).st_ino == inode:
                return candidate
        except FileNotFoundError:
            continue
    return None
